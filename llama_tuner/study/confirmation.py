"""Confirming the leaders: the fastest candidates and the fastest baseline, raced in paired rounds.

A single measurement that was lucky falls back when measured again. So before presets
are chosen, the leaders are measured again together, one repetition each per round, the
order rotating, so that drift of the machine hits all of them alike and
:func:`llama_tuner.study.comparison.compare` can compare them round by round. The race is
sequential: after ``MIN_ROUNDS`` rounds, a candidate whose per-round gap to the leader is
decided (slower beyond a 95% interval, Student's t, or a tie: the gap and its uncertainty inside
``EQUIVALENCE``) leaves the race, and the race ends when only the leader is left, or
after ``confirm_repetitions`` rounds. A close race costs rounds; a clear one does not. A
candidate that crashes or runs out of memory in any round is out, and can be no preset.

Every round is stored on the study as it ends (the race's record under ``RACE_ATTR``, each
candidate's merged rounds under ``CONFIRM_PREFIX``), so Ctrl-C loses at most the round it cut,
and the next ``tune`` goes on with the same race where nothing new was measured.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from llama_tuner.measure.result import Interleaved, TrialResult, merge_rounds
from llama_tuner.study.keys import CONFIRM_PREFIX, RACE_ATTR
from llama_tuner.study.objectives import result_of
from llama_tuner.study.comparison import round_speeds, t_quantile
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
        half = t_quantile(k - 1) * statistics.stdev(diffs) / math.sqrt(k) if k > 1 else math.inf
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
        r = result_of(tuner.study.trials[n])
        timed = sum(sum(t.samples_ns) for t in (r.pp, r.tg) if t) / 1e9
        load = r.load_time_s or 0.0
        overhead = max(0.0, (r.wall_time_s or 0.0) - load - timed)
        total += overhead + timed / max(1, r.config.repetitions)
    first = result_of(tuner.study.trials[trial_numbers[0]])
    return total + (first.load_time_s or 0.0)


RoundHook = Callable[[int, int, Verdict, float], None]


def confirm(tuner: Tuner, trial_numbers: list[int], on_round: RoundHook | None = None) -> dict[int, TrialResult]:
    """Race the given trials in paired rounds (see the module doc), storing every round on the study as it ends.

    A race of the same trials that a Ctrl-C cut goes on from its last stored round.
    ``on_round(round, max_rounds, verdict, seconds_left_at_most)`` hears each round's outcome.
    """
    study = tuner.study
    objective = StudyView(study).objective
    bases = {n: result_of(study.trials[n]) for n in trial_numbers}
    max_rounds = max(MIN_ROUNDS, tuner.settings.confirm_repetitions)
    race = study.user_attrs.get(RACE_ATTR) or {}
    merged: dict[int, TrialResult] = {}
    if race.get("trials") == list(trial_numbers) and not race.get("complete"):  # a cut race: go on with it
        batch = Interleaved(race["batch"], 1)
        merged = {n: TrialResult.from_dict(study.user_attrs[f"{CONFIRM_PREFIX}{n}"]) for n in trial_numbers
                  if f"{CONFIRM_PREFIX}{n}" in study.user_attrs}
        merged = {n: r for n, r in merged.items() if r.interleaved == batch}
    else:
        batch = Interleaved(f"{study.study_name}:{time.time():.3f}:{','.join(map(str, trial_numbers))}", 1)
    parts: dict[int, list[TrialResult]] = {n: [merged[n]] if n in merged else [] for n in trial_numbers}
    done_rounds = int(race.get("rounds", 0)) if merged else 0
    racing = verdict(merged, objective).open(list(trial_numbers)) if merged else list(trial_numbers)
    for r in range(done_rounds, max_rounds):
        if len(racing) <= 1 and r >= MIN_ROUNDS:
            break
        order = racing[r % len(racing):] + racing[:r % len(racing)]
        configs = [replace(bases[n].config, repetitions=1) for n in order]
        for n, result in zip(order, tuner.launcher.measure(tuner.model.path, configs)):
            parts[n].append(result)
        merged = {n: merge_rounds(p, batch) for n, p in parts.items() if p}
        v = verdict(merged, objective)
        racing = v.open(racing)
        done = len(racing) <= 1
        _store(study, batch, trial_numbers, merged, r + 1, complete=done or r + 1 == max_rounds)
        if on_round:
            left = 0.0 if done else (max_rounds - r - 1) * round_cost_s(tuner, racing)
            on_round(r + 1, max_rounds, v, left)
        if done:
            break
    else:
        _store(study, batch, trial_numbers, merged, max_rounds, complete=True)
    return merged


def _store(study, batch: Interleaved, trial_numbers: list[int], merged: dict[int, TrialResult], rounds: int,
           *, complete: bool) -> None:
    """Write the race's rounds so far: each candidate's merged result, then the race's record."""
    for n, result in merged.items():
        study.set_user_attr(f"{CONFIRM_PREFIX}{n}", result.to_dict())
    study.set_user_attr(RACE_ATTR, {"batch": batch.batch, "trials": list(trial_numbers), "rounds": rounds,
                                    "complete": complete})


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
        view = StudyView(tuner.study)
        top = view.leaders(tuner.settings.confirm_top)
        batches = {getattr(view.confirmations.get(n), "interleaved", None) for n in top}
        if not top or (len(batches) == 1 and None not in batches):
            return
        if on_pass:
            on_pass(top)
        confirm(tuner, top, on_round)
