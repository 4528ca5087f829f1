"""Choosing presets: fastest, max-context and balanced, from the race's configurations and the baselines.

The rules (docs/benchmarks.md §4), every comparison made by
:func:`llama_tuner.study.comparison.compare` (paired rounds where two were raced together):

- A preset is a configuration confirmed in the confirmation race, or a baseline the
  user could keep: one that ran, is feasible, keeps to --max-kld and honours the pins.
  A baseline that breaks them is a reference in the tables, never a preset.
- ``fastest``: the raced configurations that *beat every such baseline* (faster beyond the
  95% interval on the objective, not slower beyond it on the other figure -- pp for a tg
  objective, tg for a pp one -- and no smaller context). If none does, the preset is the
  baseline: a tie is not a gain. Among those that do, the leader and every one not slower
  than it beyond the noise are tied, and the tie is broken by the other figure (those not
  worse than its best beyond the noise stay), then by context, and by memory last: the leanest
  where it saves at least MEMORY_STEP of the budget, else the fastest.
- ``max-context``: the largest context at >= MAX_CONTEXT_SHARE of the fastest's speed; a
  baseline that has that context is kept unless a raced configuration with it beats it.
- ``balanced``: the best geometric mean of tg, pp and context relative to the best of each; a
  baseline is kept unless the winner's score beats the baseline's beyond the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llama_tuner.measure.result import TrialResult
from llama_tuner.study.comparison import CONFIDENCE, FIGURES, Gap, compare, speed

OBJECTIVES = FIGURES  # tg, pp, balanced, answer: what "fastest" means
PRESET_NAMES = ("fastest", "max-context", "balanced")
MAX_CONTEXT_SHARE = 0.90
MEMORY_STEP = 0.01  # share of the memory budget below which a saving does not break a tie


@dataclass
class Candidate:
    """A measured configuration; ``confirm`` is its measurement in the confirmation race, if it ran in one."""

    trial: int
    result: TrialResult
    confirm: TrialResult | None = None
    baseline: str | None = None

    @property
    def figures(self) -> TrialResult:
        """The measurement to trust: the race's where it raced (even a failed one), else its own."""
        return self.confirm if self.confirm is not None else self.result

    @property
    def memory(self) -> int:
        """Peak memory (VRAM on a GPU, else RSS), for tie-breaking."""
        return self.figures.peak_memory_bytes or 0

    @property
    def n_ctx(self) -> int:
        """The context it runs with."""
        return self.figures.config.n_ctx

    @property
    def label(self) -> str:
        """"trial 7", or the baseline's name."""
        return f"the baseline {self.baseline!r}" if self.baseline else f"trial {self.trial}"


@dataclass
class Preset:
    """A chosen configuration with the reason it was chosen, and the trials tied with it."""

    name: str
    candidate: Candidate
    why: str
    ties: list[int] = field(default_factory=list)


def other_figure(objective: str) -> str | None:
    """The figure a preset must not lose beyond the noise while it wins the objective."""
    return {"tg": "pp", "pp": "tg"}.get(objective)


def gain(preset: Candidate, baseline: Candidate, figure: str) -> Gap:
    """The preset against a baseline on ``figure`` (tg, pp, balanced or answer), with its interval."""
    return compare(preset.figures, baseline.figures, figure)


def _mean(c: Candidate, figure: str) -> float:
    value = speed(c.figures, figure)[0]
    return -math.inf if math.isnan(value) else value


def beats(c: Candidate, b: Candidate, objective: str, contenders: int = 1) -> bool:
    """True when ``c`` is a gain over ``b`` for a user: faster beyond the noise on the objective, not slower
    beyond it on the other figure, and no smaller context. With several ``contenders`` tried against the same
    baseline, the objective's interval is widened (Bonferroni) so that the chance that any of them wins by
    noise alone stays 5%."""
    confidence = 1 - (1 - CONFIDENCE) / max(1, contenders)
    if compare(c.figures, b.figures, objective, confidence=confidence).verdict != "better" or c.n_ctx < b.n_ctx:
        return False
    other = other_figure(objective)
    return other is None or gain(c, b, other).verdict != "worse"


def rank(candidates: list[Candidate], objective: str) -> list[Candidate]:
    """Candidates sorted fastest first (by the mean of the objective)."""
    return sorted(candidates, key=lambda c: -_mean(c, objective))


def _break_ties(pool: list[Candidate], objective: str, budget_bytes: int | None) -> tuple[Candidate, list[int], str]:
    """The choice among ``pool``'s leader and those tied with it (see the module doc): (choice, the other tied
    trials, why it won the tie)."""
    leader = rank(pool, objective)[0]
    tied = tied_all = [c for c in pool if c is leader or gain(c, leader, objective).verdict != "worse"]
    if len(tied) == 1:
        return leader, [], ""
    why = "faster"
    other = other_figure(objective)
    if other is not None:
        best = rank(tied, other)[0]
        kept = [c for c in tied if c is best or gain(c, best, other).verdict != "worse"]
        why = f"{other} not worse beyond the noise" if len(kept) < len(tied) else why
        tied = kept
    top_ctx = max(c.n_ctx for c in tied)
    if any(c.n_ctx < top_ctx for c in tied):
        why = "the largest context"
    tied_ctx = [c for c in tied if c.n_ctx == top_ctx]
    fastest = rank(tied_ctx, objective)[0]
    leanest = min(tied_ctx, key=lambda c: (c.memory, -_mean(c, objective)))
    step = MEMORY_STEP * budget_bytes if budget_bytes else 0
    saving = fastest.memory - leanest.memory
    choice = leanest if saving > 0 and saving >= step else fastest
    if choice is leanest and leanest is not fastest:
        why = f"least memory ({saving / 2**20:.0f} MiB less)"
    elif len(tied_ctx) > 1:
        why = (f"{why}; no tied one saves {MEMORY_STEP:.0%} of the budget" if why != "faster"
               else f"the faster mean; no tied one saves {MEMORY_STEP:.0%} of the budget")
    return choice, [c.trial for c in tied_all if c is not choice], why


def _keep(baselines: list[Candidate], objective: str) -> Candidate:
    """The baseline to keep: the fastest, or the user's own ("yours") where it is not slower beyond the noise."""
    leader = rank(baselines, objective)[0]
    yours = next((b for b in baselines if b.baseline == "yours"), None)
    if yours is not None and yours is not leader and gain(yours, leader, objective).verdict != "worse":
        return yours
    return leader


def _gains_text(c: Candidate, baselines: list[Candidate], objective: str) -> str:
    return ", ".join(f"{gain(c, b, objective).text()} vs {b.baseline}" for b in baselines)


def _score(c: Candidate, best: dict[str, float]) -> float:
    f = c.figures
    return (f.tg_mean / best["tg"] * f.pp_mean / best["pp"] * c.n_ctx / best["ctx"]) ** (1 / 3)


def _score_beats(c: Candidate, b: Candidate) -> bool:
    """True when ``c``'s balanced score beats ``b``'s beyond the noise: the lower end of the interval of their
    tg-pp geometric mean ratio, with the context ratio, above 1."""
    g = gain(c, b, "balanced")
    low = 1 + g.share - g.half
    return low > 0 and low ** (2 / 3) * (c.n_ctx / b.n_ctx) ** (1 / 3) > 1


def choose_presets(entrants: list[Candidate], baselines: list[Candidate], objective: str,
                   budget_bytes: int | None = None) -> dict[str, Preset]:
    """The three presets (see the module doc) from ``entrants`` (configurations confirmed in the race, each
    with an ok ``confirm``) and ``baselines`` (those a user could keep); empty when both are empty.
    ``budget_bytes`` sets how large a memory saving must be to break a tie."""
    pool = [*entrants, *baselines]
    if not pool:
        return {}
    what = "fewest seconds to answer" if objective == "answer" else f"highest {objective} speed"
    winners = [c for c in entrants if all(beats(c, b, objective, len(entrants)) for b in baselines)]
    if winners:
        fastest, ties, tie_why = _break_ties(winners, objective, budget_bytes)
        why = what + (f": {_gains_text(fastest, baselines, objective)}" if baselines else "")
        if ties:
            why += f" (tied, within the noise, with trials {ties}; {tie_why})"
    else:
        fastest, ties = _keep(baselines, objective), []
        other = other_figure(objective)
        why = (f"kept {fastest.label}: no configuration confirmed in the race is faster beyond the noise"
               + (f" without being slower on {other} beyond it" if other else "") + " or with no smaller context"
               if entrants else f"kept {fastest.label}: no configuration was confirmed in a race")
    out = {"fastest": Preset("fastest", fastest, why, ties)}

    floor = [c for c in pool if c is fastest or gain(c, fastest, objective).share >= MAX_CONTEXT_SHARE - 1]
    top_ctx = max(c.n_ctx for c in floor)
    at_top = [c for c in floor if c.n_ctx == top_ctx]
    kept = [c for c in at_top if c.baseline]
    raced = [c for c in at_top if not c.baseline and all(beats(c, b, objective, len(entrants)) for b in kept)]
    if raced:
        longest, lties, _ = _break_ties(raced, objective, budget_bytes)
    else:
        longest, lties = _keep(kept, objective), []
    out["max-context"] = Preset("max-context", longest, f"largest context ({top_ctx}) at >= "
                                f"{MAX_CONTEXT_SHARE:.0%} of the fastest's {objective} speed"
                                + (f"; kept {longest.label}: it has that context" if longest.baseline else ""),
                                lties)

    scored = [c for c in pool if c.figures.tg_mean and c.figures.pp_mean]
    if scored:
        best = {"tg": max(c.figures.tg_mean for c in scored), "pp": max(c.figures.pp_mean for c in scored),
                "ctx": max(c.n_ctx for c in scored)}
        balanced = max(scored, key=lambda c: (round(_score(c, best), 3), -c.memory))
        scored_bases = [b for b in baselines if b in scored]
        why = (f"best geometric mean of tg, pp and context relative to the best of each "
               f"({_score(balanced, best):.2f})")
        if not balanced.baseline and not all(_score_beats(balanced, b) for b in scored_bases):
            balanced = max(scored_bases, key=lambda c: _score(c, best))
            why = (f"kept {balanced.label} ({_score(balanced, best):.2f}): no configuration's geometric mean of "
                   "tg, pp and context beats it beyond the noise")
        out["balanced"] = Preset("balanced", balanced, why)
    return out
