"""What a quantized KV cache does to the scenarios' answers: how many greedy answers stay token-identical to the
f16 cache's, and where the others first differ.

The f16 answer of a request is the one most of the study's f16 trials wrote (their batch sizes and threads can
change the last bits of the logits, and so, rarely, a greedy answer: the f16 rows show that floor). Each trial's
answer (its first pass) is compared token by token with it; a cache type's figures are over all its trials and
requests. Beside them, the KL divergence ``quality`` measured for the type.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from llama_tuner.measure.result import TrialResult
from llama_tuner.report.tables import markdown_table
from llama_tuner.study.quality_gate import kld_text

REFERENCE = ("f16", "f16")


@dataclass(frozen=True)
class Agreement:
    """One cache type's answers against f16's: requests compared, identical, and the first differences' mean
    position (tokens into the answer; None where all were identical)."""

    cache: tuple[str, str]
    trials: int
    compared: int
    identical: int
    first_difference: float | None

    @property
    def share(self) -> float:
        """The share of compared answers that are token-identical to f16's."""
        return self.identical / self.compared if self.compared else float("nan")


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None where they are the same)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreements(results: list[TrialResult]) -> list[Agreement]:
    """Each cache type's agreement with the f16 answers (f16 itself first); [] without f16 answers."""
    with_answers = [r for r in results if r.ok and r.answers]
    votes: dict[str, Counter] = {}
    for r in with_answers:
        if (r.config.type_k, r.config.type_v) == REFERENCE:
            for a in r.answers:
                if a.repetition == 0 and a.tokens:
                    votes.setdefault(a.name, Counter())[tuple(a.tokens)] += 1
    reference: dict[str, tuple[int, ...]] = {name: c.most_common(1)[0][0] for name, c in votes.items()}
    if not reference:
        return []
    by_cache: dict[tuple[str, str], list[TrialResult]] = {}
    for r in with_answers:
        by_cache.setdefault((r.config.type_k, r.config.type_v), []).append(r)
    out = []
    for cache in sorted(by_cache, key=lambda c: (c != REFERENCE, c)):
        compared = identical = 0
        firsts = []
        for r in by_cache[cache]:
            for a in r.answers:
                if a.repetition != 0 or not a.tokens or a.name not in reference:
                    continue
                compared += 1
                pos = _first_difference(list(reference[a.name]), a.tokens)
                if pos is None:
                    identical += 1
                else:
                    firsts.append(pos)
        if compared:
            out.append(Agreement(cache, len(by_cache[cache]), compared, identical,
                                 statistics.fmean(firsts) if firsts else None))
    return out


def agreement_table(results: list[TrialResult], kv_quality: dict | None) -> str:
    """The agreement of each cache type's answers with f16's, with its KLD ("" without f16 answers)."""
    rows = []
    for ag in agreements(results):
        k, v = ag.cache
        probe = next(r for r in results if (r.config.type_k, r.config.type_v) == ag.cache)
        rows.append([f"{k}/{v}" + (" (reference)" if ag.cache == REFERENCE else ""), str(ag.trials),
                     f"{ag.identical} of {ag.compared} ({100 * ag.share:.0f}%)",
                     f"{ag.first_difference:.0f}" if ag.first_difference is not None else "-",
                     kld_text(probe.config, kv_quality)])
    if not rows:
        return ""
    return ("the KV cache's effect on the answers (greedy; each trial's first answer to each request, token by "
            "token, against the answer most f16 trials wrote):\n"
            + markdown_table(rows, ("K/V", "trials", "identical to f16", "first difference at token", "KV KLD")))
