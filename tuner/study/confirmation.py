"""Confirming the leaders: the fastest candidates and the fastest baseline, measured again together.

A single measurement that was lucky falls back when measured again. So before presets
are chosen, the leaders get ``confirm_repetitions`` more repetitions each, taken in
turns within one run of the launcher, so that drift of the machine hits all of them
alike and :func:`tuner.study.presets.tied` can compare them round by round.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from tuner.measure.config import BenchConfig
from tuner.measure.result import Interleaved, TrialResult, merge_rounds
from tuner.study.keys import CONFIRM_PREFIX
from tuner.study.objectives import result_of
from tuner.study.tuner import Tuner
from tuner.study.view import StudyView

CONFIRM_PER_ROUND = 2


def _rounds(results, total: int) -> tuple[int, int, bool]:
    """(repetitions per round, rounds, whether one loaded model serves them all) for re-measuring
    ``results`` ``total`` more times each."""
    one_model = len({json.dumps(r.config.model_params(), sort_keys=True) for r in results}) == 1
    per_round = min(CONFIRM_PER_ROUND, total) if one_model else max(1, -(-total // 2))
    return per_round, -(-total // per_round), one_model


def estimate_s(tuner: Tuner, trial_numbers: list[int]) -> float:
    """About how long :func:`confirm` takes, from the trials' own times: each round costs a run's overhead
    (context, warmup) and its share of the timed repetitions; the model loads once (per round where the
    candidates' model settings differ)."""
    results = [result_of(tuner.study.trials[n]) for n in trial_numbers]
    per_round, rounds, one_model = _rounds(results, tuner.settings.confirm_repetitions)
    total = 0.0
    for r in results:
        timed = sum(sum(t.samples_ns) for t in (r.pp, r.tg) if t) / 1e9
        load = r.load_time_s or 0.0
        overhead = max(0.0, (r.wall_time_s or 0.0) - load - timed)
        per_rep = timed / max(1, r.config.repetitions)
        total += rounds * (overhead + per_round * per_rep) + (load if one_model else rounds * load)
    return total


def confirm(tuner: Tuner, trial_numbers: list[int]) -> dict[int, TrialResult]:
    """Re-measure the given trials together, taking turns, and store the confirmations on the study.

    Each configuration gets ``confirm_repetitions`` more repetitions, measured
    CONFIRM_PER_ROUND at a time in rounds (the order rotates each round). On a GPU, where
    candidates may differ in offload and so need a model load each, there are two
    rounds instead of one per CONFIRM_PER_ROUND repetitions.
    """
    study = tuner.study
    bases = {n: result_of(study.trials[n]) for n in trial_numbers}
    per_round, rounds, _ = _rounds(bases.values(), tuner.settings.confirm_repetitions)
    order = list(trial_numbers)
    schedule = [order[(i + r) % len(order)] for r in range(rounds) for i in range(len(order))]
    configs = [BenchConfig(**{**bases[n].config.to_dict(), "repetitions": per_round}) for n in schedule]
    parts: dict[int, list[TrialResult]] = {n: [] for n in order}
    for n, result in zip(schedule, tuner.launcher.measure(tuner.model.path, configs)):
        parts[n].append(result)
    batch = Interleaved(f"{study.study_name}:{time.time():.3f}:{','.join(map(str, order))}", per_round)
    out = {n: merge_rounds(parts[n], batch) for n in order}
    for n, result in out.items():
        study.set_user_attr(f"{CONFIRM_PREFIX}{n}", result.to_dict())
    return out


def confirm_leaders(tuner: Tuner, passes: int = 3, on_pass: Callable[[list[int]], None] | None = None) -> None:
    """Re-measure the fastest candidates, with the fastest baseline, together until they are one confirmed
    batch (at most ``passes``).

    A single measurement that was lucky falls back when measured again, and the
    candidate next in line must then be confirmed too; it is confirmed together with
    the others still in the lead, so all leaders are compared round by round.
    ``on_pass`` hears the trial numbers of each pass before it is measured.
    """
    for _ in range(passes):
        view = StudyView(tuner.study)
        top = view.leaders(tuner.settings.confirm_top)
        batches = {getattr(view.confirmations.get(n), "interleaved", None) for n in top}
        if not top or (len(batches) == 1 and None not in batches):
            return
        if on_pass:
            on_pass(top)
        confirm(tuner, top)
