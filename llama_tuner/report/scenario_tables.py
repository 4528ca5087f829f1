"""The scenarios' results as tables and lines: each request's answer, and the file's figures."""

from __future__ import annotations

import statistics
from typing import Sequence

from llama_tuner.measure.result import TrialResult
from llama_tuner.measure.scenarios import Answer, AnswerSummary, per_request

ANSWER_COLUMNS = ("request", "prompt", "written", "thinking", "capped", "first token", "answer starts", "seconds",
                  "tg t/s", "drafts accepted")


def _s(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "-"


def answer_rows(answers: Sequence[Answer]) -> list[list[str]]:
    """One row per request: its prompt and written tokens (of the first pass), the medians of its times over the
    passes, whether it hit its cap, and its drafts."""
    rows = []
    for name, group in per_request(answers).items():
        a = group[0]
        firsts = [x.first_token_s for x in group if x.first_token_s is not None]
        starts = [x.answer_start_s for x in group if x.answer_start_s is not None]
        tgs = [x.tg_tps for x in group if x.tg_tps is not None]
        drafted = sum(x.draft_n for x in group)
        accepted = sum(x.draft_accepted for x in group)
        rows.append([name, f"{a.prompt_tokens:,}", f"{a.generated_tokens:,}", f"{a.thinking_tokens:,}",
                     "capped" if a.capped else "no",
                     _s(statistics.median(firsts) if firsts else None),
                     _s(statistics.median(starts) if starts else None),
                     _s(statistics.median(x.seconds for x in group)),
                     f"{statistics.median(tgs):.2f}" if tgs else "-",
                     f"{100 * accepted / drafted:.0f}% of {drafted:,}" if drafted else "-"])
    return rows


def summary_text(s: AnswerSummary) -> str:
    """"12 requests: 5.21 s per answer (median), p90 9.80 s, 62.5 s in all; 318 tokens written per answer (0
    thinking); 3 of 12 capped" and the drafts' acceptance where it drafted."""
    drafts = f"; {100 * s.acceptance:.0f}% of {s.draft_n:,} drafted tokens accepted" if s.draft_n else ""
    return (f"{s.requests} requests: {s.median_s:.2f} s per answer (median), p90 {s.p90_s:.2f} s, {s.total_s:.1f} s "
            f"in all; {s.generated_tokens:,.0f} tokens written per answer ({s.thinking_tokens:,.0f} thinking); "
            f"{s.capped} of {s.requests} capped{drafts}")


def result_summary(r: TrialResult) -> str:
    """The scenarios' line of one result ("" where it answered nothing)."""
    s = r.answer_summary
    return summary_text(s) if s else ""
