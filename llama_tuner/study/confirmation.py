"""Confirming the leaders: the fastest candidates and the fastest baseline, raced in paired rounds.

A single measurement that was lucky falls back when measured again. So before presets
are chosen, the leaders are measured again together, one repetition each per round, the
order rotating, so that drift of the machine hits all of them alike and
:func:`llama_tuner.study.presets.tied` can compare them round by round. The race is
sequential: after ``MIN_ROUNDS`` rounds, a candidate whose per-round gap to the leader is
decided (slower beyond a 95% interval, Student's t, or a tie: the gap and its uncertainty inside
``EQUIVALENCE``) leaves the race, and the race ends when only the leader is left, or
after ``confirm_repetitions`` rounds. A close race costs rounds; a clear one does not.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from llama_tuner.measure.result import Interleaved, TrialResult, merge_rounds
from llama_tuner.study.keys import CONFIRM_PREFIX
from llama_tuner.study.objectives import result_of
from llama_tuner.study.presets import round_speeds, t_sigmas
from llama_tuner.study.tuner import Tuner
from llama_tuner.study.view import StudyView

MIN_ROUNDS = 3
EQUIVALENCE = 0.03  # a gap this small (share of the leader's speed), known this well, is a tie for a user


@dataclass
class Verdict:
    """Where a race stands after some rounds: its leader, and for every other candidate the gap to it."""

    leader: int | None
    gaps: dict[int, tuple[float, float]] = field(default_factory=dict)  # relative gap, its 95% half-width
    settled: dict[int, str] = field(default_factory=dict)  # "slower", "tie" or "failed"

    def open(self, numbers: list[int]) -> list[int]:
        """The candidates still in the race (the leader included)."""
        return [n for n in numbers if n not in self.settled]

    def describe(self, baselines: frozenset[int] = frozenset()) -> str:
        """One line: the leader, then each other candidate's gap and state."""
        if self.leader is None:
            return "no candidate completed"
        parts = []
        for n, (gap, half) in sorted(self.gaps.items(), key=lambda kv: kv[1][0]):
            name = f"{n} (baseline)" if n in baselines else str(n)
            parts.append(f"{name} {-100 * gap:+.1f}% ±{100 * half:.1f} {self.settled.get(n, 'open')}")
        parts += [f"{n} failed" for n, s in self.settled.items() if s == "failed"]
        lead = f"{self.leader} (baseline)" if self.leader in baselines else str(self.leader)
        return f"trial {lead} leads" + (f"; {', '.join(parts)}" if parts else "")


def verdict(results: dict[int, TrialResult], objective: str) -> Verdict:
    """Rank raced ``results`` (merged rounds, same batch) and decide each gap to the leader."""
    speeds = {n: round_speeds(r, objective) if r.ok else [] for n, r in results.items()}
    failed = {n: "failed" for n, r in results.items() if not r.ok or not speeds[n]}
    alive = {n: s for n, s in speeds.items() if n not in failed}
    if not alive:
        return Verdict(None, settled=failed)
    # Those that left the race ran fewer rounds; the leader is among those that ran them all.
    most = max(len(s) for s in alive.values())
    leader = max((n for n, s in alive.items() if len(s) == most), key=lambda n: statistics.fmean(alive[n]))
    out = Verdict(leader, settled=dict(failed))
    for n, s in alive.items():
        if n == leader:
            continue
        k = min(len(s), most)
        # Drift scales every candidate of a round alike, so the gap of each round is taken as a share.
        diffs = [(a - b) / a for a, b in zip(alive[leader][:k], s[:k])]
        gap = statistics.fmean(diffs)
        half = t_sigmas(k) * statistics.stdev(diffs) / math.sqrt(k) if k > 1 else math.inf
        out.gaps[n] = (gap, half)
        if k >= MIN_ROUNDS and gap - half > 0:
            out.settled[n] = "slower"
        elif k >= MIN_ROUNDS and abs(gap) + half <= EQUIVALENCE:
            out.settled[n] = "tie"
    return out


def round_cost_s(tuner: Tuner, trial_numbers: list[int]) -> float:
    """About how long one round of these trials takes, from their own times: one repetition each, plus
    each run's overhead (context, warmup) and one model load (the child's start and the model's load)."""
    total = 0.0
    for n in trial_numbers:
        r = result_of(llama_tuner.study.trials[n])
        timed = sum(sum(t.samples_ns) for t in (r.pp, r.tg) if t) / 1e9
        load = r.load_time_s or 0.0
        overhead = max(0.0, (r.wall_time_s or 0.0) - load - timed)
        total += overhead + timed / max(1, r.config.repetitions)
    first = result_of(llama_tuner.study.trials[trial_numbers[0]])
    return total + (first.load_time_s or 0.0)


RoundHook = Callable[[int, int, Verdict, float], None]


def confirm(tuner: Tuner, trial_numbers: list[int], on_round: RoundHook | None = None) -> dict[int, TrialResult]:
    """Race the given trials in paired rounds (see the module doc) and store the confirmations on the study.

    ``on_round(round, max_rounds, verdict, seconds_left_at_most)`` hears each round's outcome.
    """
    study = tuner.study
    objective = StudyView(study).objective
    bases = {n: result_of(study.trials[n]) for n in trial_numbers}
    batch = Interleaved(f"{study.study_name}:{time.time():.3f}:{','.join(map(str, trial_numbers))}", 1)
    parts: dict[int, list[TrialResult]] = {n: [] for n in trial_numbers}
    racing, max_rounds = list(trial_numbers), max(MIN_ROUNDS, tuner.settings.confirm_repetitions)
    merged: dict[int, TrialResult] = {}
    for r in range(max_rounds):
        order = racing[r % len(racing):] + racing[:r % len(racing)]
        configs = [replace(bases[n].config, repetitions=1) for n in order]
        for n, result in zip(order, tuner.launcher.measure(llama_tuner.model.path, configs)):
            parts[n].append(result)
        merged = {n: merge_rounds(p, batch) for n, p in parts.items()}
        v = verdict(merged, objective)
        racing = v.open(racing)
        done = len(racing) <= 1
        if on_round:
            left = 0.0 if done else (max_rounds - r - 1) * round_cost_s(tuner, racing)
            on_round(r + 1, max_rounds, v, left)
        if done:
            break
    for n, result in merged.items():
        study.set_user_attr(f"{CONFIRM_PREFIX}{n}", result.to_dict())
    return merged


def confirm_leaders(tuner: Tuner, passes: int = 2, on_pass: Callable[[list[int]], None] | None = None,
                    on_round: RoundHook | None = None) -> None:
    """Race the fastest candidates with the fastest baseline until the leaders are one confirmed batch
    (at most ``passes`` races).

    A single measurement that was lucky falls back when measured again, and the
    candidate next in line must then be confirmed too; it is raced together with the
    others still in the lead, so all leaders are compared round by round.
    ``on_pass`` hears the trial numbers of each race before it starts.
    """
    for _ in range(passes):
        view = StudyView(llama_tuner.study)
        top = view.leaders(llama_tuner.settings.confirm_top)
        batches = {getattr(view.confirmations.get(n), "interleaved", None) for n in top}
        if not top or (len(batches) == 1 and None not in batches):
            return
        if on_pass:
            on_pass(top)
        confirm(tuner, top, on_round)
