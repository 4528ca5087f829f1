"""How two measurements compare on one figure: the gap as a share, its 95% interval, and the verdict.

Every decision llama-tuner makes between two configurations, and every gain it prints,
comes from :func:`compare`. Two results raced in the same interleaved batch
(``TrialResult.interleaved``) are compared round by round: the ratio of each round
(drift of the machine scales both of a round alike), its mean, and Student's t over the
rounds both ran. Otherwise the means of their repetitions are compared, with Welch's
interval on the ratio (delta method). A gap is claimed only outside its interval:
inside it, the two are a tie.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

from llama_tuner.measure.result import Rates, TrialResult

FIGURES = ("tg", "pp", "balanced", "answer")  # answer: answers per second (the inverse of seconds to answer)
CONFIDENCE = 0.95


def _tests(result: TrialResult, figure: str) -> list[Rates | None]:
    """The tests whose rates make up ``figure``."""
    return {"tg": [result.tg], "pp": [result.pp], "balanced": [result.tg, result.pp],
            "answer": [result.answer]}[figure]


def has_figure(result: TrialResult, figure: str) -> bool:
    """True when ``result`` measured every test ``figure`` is made of."""
    return result.ok and all(r is not None and r.samples_ns for r in _tests(result, figure))


def speed(result: TrialResult, figure: str) -> tuple[float, float]:
    """(mean, standard deviation) of ``figure`` over the result's repetitions: t/s for tg and pp, their
    geometric mean for balanced, answers per second for answer (nan when not measured)."""
    if not has_figure(result, figure):
        return math.nan, math.nan
    tests = _tests(result, figure)
    if len(tests) == 1:
        return tests[0].mean, tests[0].stddev
    tg, pp = tests
    mean = math.sqrt(tg.mean * pp.mean)
    rel = math.sqrt((tg.stddev / tg.mean) ** 2 + (pp.stddev / pp.mean) ** 2) / 2
    return mean, mean * rel


def round_speeds(result: TrialResult, figure: str) -> list[float]:
    """``figure`` in each round of an interleaved confirmation (empty for other results)."""
    step = result.interleaved.per_round if result.interleaved else 0
    if not step or not has_figure(result, figure):
        return []
    per_test = [[statistics.fmean(r.rates[i:i + step]) for i in range(0, len(r.rates), step)]
                for r in _tests(result, figure)]
    return [math.prod(values) ** (1 / len(values)) for values in zip(*per_test)]


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """Student's t quantile of a two-sided ``confidence`` interval with ``df`` degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Gap:
    """``a`` against ``b`` on one figure: ``share`` = a / b - 1 (0.05: a is 5% faster), the half-width of its
    95% interval (inf when it cannot be known), and whether it was paired round by round."""

    share: float
    half: float
    paired: bool = False
    rounds: int = 0

    @property
    def verdict(self) -> str:
        """"better", "worse" or "tie" (the interval holds 0)."""
        if math.isnan(self.share) or self.share - self.half <= 0 <= self.share + self.half:
            return "tie"
        return "better" if self.share > 0 else "worse"

    def text(self) -> str:
        """"+9.8% (±4.1)" outside the interval; "tie (+1.2% ±4.1)" inside it."""
        if math.isnan(self.share):
            return "-"
        figure = f"{100 * self.share:+.1f}%"
        half = "±?" if math.isinf(self.half) else f"±{100 * self.half:.1f}"
        return f"{figure} ({half})" if self.verdict != "tie" else f"tie ({figure} {half})"


def paired(a: TrialResult, b: TrialResult) -> bool:
    """True when ``a`` and ``b`` were raced in the same interleaved batch."""
    return a.interleaved is not None and a.interleaved == b.interleaved


def compare(a: TrialResult, b: TrialResult, figure: str, *, confidence: float = CONFIDENCE) -> Gap:
    """``a`` against ``b`` on ``figure`` (see the module doc): paired over the rounds both ran when they were
    raced together (at least two), else Welch's interval on the ratio of the means; the interval holds
    ``confidence`` (95% unless a caller corrects it for making several comparisons at once)."""
    if not (has_figure(a, figure) and has_figure(b, figure)):
        return Gap(math.nan, math.inf)
    if paired(a, b):
        ra, rb = round_speeds(a, figure), round_speeds(b, figure)
        ratios = [x / y for x, y in zip(ra, rb)]  # the rounds both ran are the first ones
        n = len(ratios)
        if n >= 2:
            half = t_quantile(n - 1, confidence) * statistics.stdev(ratios) / math.sqrt(n)
            return Gap(statistics.fmean(ratios) - 1, half, paired=True, rounds=n)
    return _unpaired(a, b, figure, confidence)


def _unpaired(a: TrialResult, b: TrialResult, figure: str, confidence: float) -> Gap:
    (ma, sa), (mb, sb) = speed(a, figure), speed(b, figure)
    na, nb = (min(len(r.samples_ns) for r in _tests(x, figure)) for x in (a, b))
    ratio = ma / mb
    if na < 2 or nb < 2:
        return Gap(ratio - 1, math.inf)
    va, vb = (sa / ma) ** 2 / na, (sb / mb) ** 2 / nb  # squared relative standard errors
    if va + vb == 0:
        return Gap(ratio - 1, 0.0)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))  # Welch-Satterthwaite
    return Gap(ratio - 1, t_quantile(df, confidence) * ratio * math.sqrt(va + vb))
