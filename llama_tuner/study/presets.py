"""Choosing presets from measured candidates: fastest, max-context, balanced.

"Speed" follows the study's ``--objective``: generation rate (tg), prompt rate
(pp) or their geometric mean (balanced). Two candidates whose mean speeds differ
by less than two standard deviations of that difference (from each one's
repetitions: sqrt(sd1^2/n1 + sd2^2/n2)) are a tie, and a tie goes to the one
using less memory: on a shared GPU, headroom is worth more than noise. Memory
has a resolution too: a saving smaller than MEMORY_STEP of the budget (say 40 MB
of a 24 GB RAM budget, from a q4_0 KV cache) is no reason to take a candidate
whose mean is lower, so among the tied candidates within that step of the
leanest, the fastest wins, unless one of them is a baseline: today's settings
are not changed for a gain inside the noise. One noisy measurement widens only
its own ties, not those of every other candidate.
Candidates confirmed together, taking turns (``TrialResult.interleaved``), are
compared round by round instead: the standard error is that of the per-round
differences, so drift of the machine, which hits both alike, cancels out.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from llama_tuner.measure.result import Rates, TrialResult

OBJECTIVES = ("tg", "pp", "balanced", "answer")  # answer: seconds to answer (chat, reasoning, long, custom)
PRESET_NAMES = ("fastest", "max-context", "balanced")
MAX_CONTEXT_SHARE = 0.90
TIE_SIGMAS = 2.0
MEMORY_STEP = 0.01  # share of the memory budget below which a saving does not count


@dataclass
class Candidate:
    """A feasible measured configuration; ``confirm`` is its re-measurement with more repetitions."""

    trial: int
    result: TrialResult
    confirm: TrialResult | None = None
    baseline: str | None = None

    @property
    def figures(self) -> TrialResult:
        """The measurement to trust: the confirmation where there is one."""
        return self.confirm if self.confirm is not None and self.confirm.ok else self.result

    @property
    def memory(self) -> int:
        """Peak memory (VRAM on a GPU, else RSS), for tie-breaking."""
        return self.figures.peak_memory_bytes or 0


def speed(result: TrialResult, objective: str) -> tuple[float, float]:
    """(mean, standard deviation) of the speed that ``objective`` means, in t/s."""
    tg, pp = result.tg or Rates(1, []), result.pp or Rates(1, [])
    if objective == "answer":  # answers per second: the inverse of the seconds to answer
        answer = result.answer or Rates(1, [])
        return answer.mean, answer.stddev
    if objective == "tg":
        return tg.mean, tg.stddev
    if objective == "pp":
        return pp.mean, pp.stddev
    mean = math.sqrt(tg.mean * pp.mean)
    rel = math.sqrt((tg.stddev / tg.mean) ** 2 + (pp.stddev / pp.mean) ** 2) / 2
    return mean, mean * rel


def _tests(result: TrialResult, objective: str) -> list[Rates | None]:
    """The tests whose rates make up ``objective``'s speed."""
    return {"tg": [result.tg], "pp": [result.pp], "balanced": [result.tg, result.pp],
            "answer": [result.answer]}[objective]


def standard_error(result: TrialResult, objective: str) -> float:
    """Standard error of the mean speed: its standard deviation over the square root of the repetitions."""
    tests = _tests(result, objective)
    n = min((len(r.samples_ns) if r else 0) for r in tests)
    return speed(result, objective)[1] / math.sqrt(n) if n > 1 else 0.0


def round_speeds(result: TrialResult, objective: str) -> list[float]:
    """The speed of each round of an interleaved confirmation (empty for other results)."""
    step = result.interleaved.per_round if result.interleaved else 0
    tests = _tests(result, objective)
    if not step or any(r is None for r in tests):
        return []
    per_test = [[statistics.fmean(r.rates[i:i + step]) for i in range(0, len(r.rates), step)] for r in tests]
    return [math.prod(values) ** (1 / len(values)) for values in zip(*per_test)]


# Student's t at 97.5% by degrees of freedom: with 3 paired rounds, 2 sigmas would call one race in 6 a win.
_T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)


def t_sigmas(n: int) -> float:
    """How many standard errors of a mean of ``n`` paired differences make a two-sided 95% interval."""
    return _T975[n - 2] if 2 <= n < len(_T975) + 2 else TIE_SIGMAS


def tied(a: TrialResult, b: TrialResult, objective: str) -> bool:
    """True when the two speeds differ by no more than their noise: for candidates confirmed in the same
    interleaved batch, the mean per-round gap (as a share) within a Student's t 95% interval of the rounds both
    ran; otherwise the mean speeds within TIE_SIGMAS standard errors of their difference."""
    ra, rb = round_speeds(a, objective), round_speeds(b, objective)
    if a.interleaved is not None and a.interleaved == b.interleaved and min(len(ra), len(rb)) >= 3:
        # A candidate that left the race early has fewer rounds: the rounds both ran are the first ones.
        diffs = [(x - y) / x for x, y in zip(ra, rb)]  # drift scales both of a round alike
        return abs(statistics.fmean(diffs)) <= t_sigmas(len(diffs)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    gap = abs(speed(a, objective)[0] - speed(b, objective)[0])
    return gap <= TIE_SIGMAS * math.hypot(standard_error(a, objective), standard_error(b, objective))


@dataclass
class Preset:
    """A chosen configuration with the reason it was chosen."""

    name: str
    candidate: Candidate
    why: str
    ties: list[int] = field(default_factory=list)


def _break_ties(ranked: list[Candidate], objective: str, budget_bytes: int | None) -> tuple[Candidate, list[int]]:
    """The choice among the candidates tied with the fastest of ``ranked``: those within MEMORY_STEP of
    the budget of the leanest (any saving counts when the budget is unknown) stay; of these, a baseline
    (today's settings are not changed for a gain inside the noise), else the fastest."""
    ties = [c for c in ranked if c is ranked[0] or tied(ranked[0].figures, c.figures, objective)]
    # Never trade below a baseline in the tie: a preset is not slower than what the user runs today.
    floor = max((speed(c.figures, objective)[0] for c in ties if c.baseline), default=None)
    if floor is not None:
        ties = [c for c in ties if speed(c.figures, objective)[0] >= floor]
    step = MEMORY_STEP * budget_bytes if budget_bytes else 0
    leanest = min(c.memory for c in ties)
    lean = [c for c in ties if c.memory - leanest <= step]
    choice = max(lean, key=lambda c: (c.baseline is not None, speed(c.figures, objective)[0], -c.memory))
    return choice, [c.trial for c in ties if c is not choice]


def _tie_note(preset: Candidate, ties: list[int], ranked: list[Candidate]) -> str:
    """Why a tied preset won: its memory, being today's settings, or its speed."""
    if not ties:
        return ""
    if preset.baseline is not None:
        why = (f"kept the baseline {preset.baseline!r}: nothing is faster beyond the noise "
               f"or saves {MEMORY_STEP:.0%} of the budget")
    elif preset is not ranked[0]:
        why = "least memory"
    else:
        why = f"the others save under {MEMORY_STEP:.0%} of the budget"
    return f" (tied, within the noise, with trials {ties}; {why})"


def rank(candidates: list[Candidate], objective: str) -> list[Candidate]:
    """Candidates sorted fastest first."""
    return sorted(candidates, key=lambda c: -speed(c.figures, objective)[0])


def choose_presets(candidates: list[Candidate], objective: str,
                   budget_bytes: int | None = None) -> dict[str, Preset]:
    """The three presets from feasible candidates (empty when there is none); ``budget_bytes`` is the
    memory budget that sets how large a saving must be to win a tie."""
    if not candidates:
        return {}
    ranked = rank(candidates, objective)
    fastest, ties = _break_ties(ranked, objective, budget_bytes)
    what = "fewest seconds to answer" if objective == "answer" else f"highest {objective} speed"
    out = {"fastest": Preset("fastest", fastest, what + _tie_note(fastest, ties, ranked),
                             ties)}
    floor = MAX_CONTEXT_SHARE * speed(fastest.figures, objective)[0]
    fast_enough = [c for c in ranked if speed(c.figures, objective)[0] >= floor]
    top_ctx = max(c.figures.config.n_ctx for c in fast_enough)
    longest, lties = _break_ties([c for c in fast_enough if c.figures.config.n_ctx == top_ctx], objective,
                                 budget_bytes)
    out["max-context"] = Preset("max-context", longest,
                                f"largest context ({top_ctx}) at >= {MAX_CONTEXT_SHARE:.0%} of the fastest's speed",
                                lties)
    tg_max = max(c.figures.tg_mean for c in candidates)
    pp_max = max(c.figures.pp_mean for c in candidates)
    ctx_max = max(c.figures.config.n_ctx for c in candidates)

    def score(c: Candidate) -> float:
        f = c.figures
        return (f.tg_mean / tg_max * f.pp_mean / pp_max * f.config.n_ctx / ctx_max) ** (1 / 3)

    balanced = max(candidates, key=lambda c: (round(score(c), 3), -c.memory))
    out["balanced"] = Preset("balanced", balanced,
                             f"best geometric mean of tg, pp and context relative to the best of each "
                             f"({score(balanced):.2f})")
    return out


def gain(preset: Candidate, baseline: Candidate, what: str) -> float:
    """Relative gain of a preset over a baseline in an objective's speed: tg, pp, balanced, or answers per
    second (0.25 = 25% faster)."""
    return speed(preset.figures, what)[0] / speed(baseline.figures, what)[0] - 1
