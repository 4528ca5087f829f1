"""Two (or more) models' answers to the same requests, side by side, and why one takes longer.

Seconds for a file of requests are tokens written times seconds per token written: ``T = N x (T / N)``, so the
ratio of two models' seconds is exactly the ratio of the tokens they wrote times the ratio of their seconds per
token (the prompt's time included in the latter). The larger of the two factors is the cause named: a reasoning
model that thinks for thousands of tokens takes longer because it writes more, not because it is slower per
token, and the sentence says so with the figures.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

from llama_tuner.measure.scenarios import Answer, per_request, summarize
from llama_tuner.report.tables import markdown_table
from llama_tuner.study.comparison import t_quantile

SNIPPET_CHARS = 160


@dataclass(kw_only=True)
class ScenarioSide:
    """One study's preset and its answers to the requests: ``source`` says where they come from (the study's own
    measurement, or measured now for this comparison)."""

    label: str
    study: str
    model: str
    preset: str
    answers: list[Answer]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def by_request(self) -> dict[str, list[Answer]]:
        """Each request's answers (one per pass)."""
        return per_request(self.answers)


@dataclass(frozen=True)
class Totals:
    """A side's figures over the requests both sides answered."""

    seconds: float  # the sum over the requests of each one's median seconds
    median_s: float
    p90_s: float
    written: int  # tokens written over the requests (first pass)
    thinking: int
    capped: int
    requests: int
    tg_tps: float | None  # medians over the requests of the server's own rates
    pp_tps: float | None

    @property
    def seconds_per_token(self) -> float:
        """Seconds per token written, the prompts' time included."""
        return self.seconds / self.written if self.written else math.nan


def totals(side: ScenarioSide, names: Sequence[str]) -> Totals:
    """``side``'s figures over the requests ``names``."""
    groups = side.by_request()
    chosen = [a for n in names for a in groups[n]]
    s = summarize(chosen)
    firsts = [groups[n][0] for n in names]
    tg = [a.tg_tps for a in chosen if a.tg_tps is not None]
    pp = [a.pp_tps for a in chosen if a.pp_tps is not None]
    return Totals(seconds=s.total_s, median_s=s.median_s, p90_s=s.p90_s,
                  written=sum(a.generated_tokens for a in firsts), thinking=sum(a.thinking_tokens for a in firsts),
                  capped=sum(1 for a in firsts if a.capped), requests=len(names),
                  tg_tps=statistics.median(tg) if tg else None, pp_tps=statistics.median(pp) if pp else None)


def per_request_ratio(slow: ScenarioSide, fast: ScenarioSide, names: Sequence[str]) -> tuple[float, float, float]:
    """The geometric mean over the requests of ``slow``'s seconds over ``fast``'s, and its 95% interval (Student's
    t over the requests' log ratios; infinite with one request)."""
    logs = [math.log(statistics.median(a.seconds for a in slow.by_request()[n])
                     / statistics.median(a.seconds for a in fast.by_request()[n])) for n in names]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = t_quantile(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def why(slow: ScenarioSide, fast: ScenarioSide, a: Totals, b: Totals, names: Sequence[str] = ()) -> str:
    """Why ``slow`` (figures ``a``) takes longer than ``fast`` (``b``): its seconds as tokens written times seconds
    per token, the larger factor named as the cause; where the per-request ratio's 95% interval holds 1, the two
    take the same time within the noise and nothing is named."""
    ratio = a.seconds / b.seconds
    if names:
        mean, lo, hi = per_request_ratio(slow, fast, names)
        if lo <= 1 <= hi:
            return (f"{slow.label} and {fast.label} take the same time within the noise: {a.seconds:.1f} s against "
                    f"{b.seconds:.1f} s for the {a.requests} requests, {mean:.2f}x per request (95% interval "
                    f"{lo:.2f}-{hi:.2f}x); they write {a.written:,} and {b.written:,} tokens.")
    tokens = a.written / b.written if b.written else math.inf
    per_token = a.seconds_per_token / b.seconds_per_token if b.written and a.written else math.nan
    thinking = f" ({a.thinking:,} of them thinking)" if a.thinking else ""
    written = (f"it writes {tokens:.2f}x the tokens ({a.written:,} against {b.written:,}{thinking}), at "
               f"{per_token:.2f}x the seconds per token")
    if math.isfinite(tokens) and math.isfinite(per_token):
        cause = "tokens written" if abs(math.log(tokens)) >= abs(math.log(per_token)) else "seconds per token"
    else:
        cause = "tokens written"
    capped = f"; {a.capped} of its {a.requests} answers hit their cap ({b.capped} of {fast.label}'s)" \
        if a.capped or b.capped else ""
    return (f"{slow.label} takes {ratio:.2f}x as long as {fast.label} ({a.seconds:.1f} s against {b.seconds:.1f} s "
            f"for the {a.requests} requests): {written}. The cause is the {cause}{capped}.")


def _snippet(a: Answer) -> str:
    text = (a.text or "").strip() or ("(thinking only) " + a.reasoning.strip() if a.reasoning else "(nothing)")
    text = " ".join(text.split())
    return text[:SNIPPET_CHARS] + ("..." if len(text) > SNIPPET_CHARS else "")


def scenario_compare_text(sides: list[ScenarioSide]) -> str:
    """Per request and in total, each side's seconds, tokens written (thinking apart), capped answers, tg and pp;
    then why each other side takes longer than the quickest, and the first words of every answer.

    Raises:
        ValueError: the sides share no request.
    """
    names = [n for n in sides[0].by_request() if all(n in s.by_request() for s in sides[1:])]
    if not names:
        raise ValueError("the sides answered no request in common")
    cols = ["request"] + [f"{s.label} {what}" for s in sides for what in ("s", "written", "capped")]
    rows = []
    for n in names:
        row = [n]
        for s in sides:
            group = s.by_request()[n]
            first = group[0]
            thinking = f" ({first.thinking_tokens:,} thinking)" if first.thinking_tokens else ""
            row += [f"{statistics.median(a.seconds for a in group):.2f}", f"{first.generated_tokens:,}{thinking}",
                    "capped" if first.capped else "no"]
        rows.append(row)
    sums = [totals(s, names) for s in sides]
    total_cols = ["", "model", "preset", "s in all", "s per answer (median)", "p90 s", "tokens written", "thinking",
                  "capped", "s per token", "tg t/s", "pp t/s"]
    total_rows = [[s.label, s.model, s.preset, f"{t.seconds:.1f}", f"{t.median_s:.2f}", f"{t.p90_s:.2f}",
                   f"{t.written:,}", f"{t.thinking:,}", f"{t.capped} of {t.requests}", f"{t.seconds_per_token:.4f}",
                   f"{t.tg_tps:.2f}" if t.tg_tps else "-", f"{t.pp_tps:.2f}" if t.pp_tps else "-"]
                  for s, t in zip(sides, sums)]
    lines = [markdown_table(rows, cols), "", markdown_table(total_rows, total_cols), ""]
    lines += [f"- {s.label}: {s.source}" + "".join(f"; {n}" for n in s.notes) for s in sides]
    order = sorted(range(len(sides)), key=lambda i: sums[i].seconds)
    quick = order[0]
    lines.append("")
    for i in order[1:]:
        lines.append("- " + why(sides[i], sides[quick], sums[i], sums[quick], names))
    lines += ["", "answers (first words):"]
    for n in names:
        lines.append(f"- {n}:")
        lines += [f"    {s.label}: {_snippet(s.by_request()[n][0])}" for s in sides]
    return "\n".join(lines).rstrip() + "\n"
