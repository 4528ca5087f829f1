"""Tables as llama-bench prints them: markdown with numeric columns right-aligned, one row per test."""

from __future__ import annotations

import re
import statistics
from typing import Iterable, Sequence

from llama_tuner.measure.result import TrialResult
from llama_tuner.measure.workloads import SCENARIOS
from llama_tuner.model.info import ModelInfo


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


COLUMNS = ("model", "size", "params", "backend", "ngl", "repack", "threads", "n_batch", "n_ubatch", "fa",
           "type_k", "type_v", "n_ctx", "test", "t/s", "peak mem")


def backend(r: TrialResult) -> str:
    """The ggml backend that ran the result, as llama-bench names it: CUDA where it offloaded, else CPU."""
    if r.env.gpu_offload and r.env.gpu_name:
        return "CUDA"
    return "CPU"


def acceptance_text(r: TrialResult) -> str:
    """"91% of 1,204 drafted accepted" for a speculative result; "nothing drafted" where it drafted none."""
    if not r.draft_n:
        return "nothing drafted"
    return f"{100 * r.acceptance:.0f}% of {r.draft_n:,} drafted accepted"


def result_rows(model: ModelInfo, r: TrialResult) -> Iterable[list[str]]:
    """Table rows of one result: one per test (pp, tg), or one with the failure."""
    c = r.config
    threads = str(c.n_threads) if c.n_threads == c.n_threads_batch else f"{c.n_threads}/{c.n_threads_batch}"
    head = [f"{model.architecture} {_params(model.n_params)} {model.quant}", _size(model.file_size),
            _params(model.n_params), backend(r), str(c.n_gpu_layers) + (f" ncmoe {c.n_cpu_moe}" if c.n_cpu_moe else ""),
            str(int(c.repack)), threads, str(c.n_batch),
            str(c.n_ubatch),
            str(int(c.flash_attn)), c.type_k, c.type_v, str(c.n_ctx)]
    mem = _size(r.peak_memory_bytes) if r.peak_memory_bytes else "-"
    depth = f" @ d{c.n_depth}" if c.n_depth else ""
    if not r.ok:
        yield head + [f"pp{c.n_prompt}/tg{c.n_gen}{depth}", f"{r.status.value}: {r.reason[:60]}", mem]
        return
    if c.workload == "server":
        x = f" x{c.n_parallel}"
        yield head + [f"pp{c.n_prompt}{x}", f"{r.pp.mean:.2f} ± {r.pp.stddev:.2f}", mem]
        yield head + [f"tg{c.n_gen}{x}", f"{r.tg.mean:.2f} ± {r.tg.stddev:.2f} ({r.stream_tg_mean:.2f}/stream)", mem]
        return
    if c.workload == SCENARIOS:
        s = r.answer_summary
        for name, rates in ((f"pp ({s.requests} prompts)", r.pp), (f"tg ({s.requests} answers)", r.tg)):
            if rates is not None:
                yield head + [name, f"{statistics.median(rates.rates):.2f} (median)", mem]
        yield head + ["scenarios: seconds per answer", f"{s.median_s:.2f} s (median), p90 {s.p90_s:.2f} s", mem]
        return
    answer = f" @ d{c.n_depth + c.n_prompt}" if r.curve else depth
    spec = f" {c.spec_type}" if c.speculative else ""
    accepted = f" ({acceptance_text(r)})" if c.speculative else ""
    for name, rates, more in ((f"pp{c.n_prompt}{depth}", r.pp, ""), (f"tg{c.n_gen}{answer}{spec}", r.tg, accepted)):
        if rates is not None:
            yield head + [name, f"{rates.mean:.2f} ± {rates.stddev:.2f}{more}", mem]
    if r.curve:
        times = [ns / 1e9 for ns in r.answer.samples_ns]
        sd = statistics.stdev(times) if len(times) > 1 else 0.0
        yield head + [f"{c.workload}: time to answer", f"{r.time_to_answer_s:.2f} s ± {sd:.2f}", mem]
        for d, tg in zip(r.curve.depths, r.curve.tg_rates()):
            yield head + [f"tg{r.curve.probe_tokens} @ d{d}", f"{tg:.2f}", mem]


_NUMERIC = re.compile(r"^([-+]?[\d.,]+%?|-)( |$)")


def markdown_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table with numeric columns right-aligned, as llama-bench prints."""
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    right = {"test"} | {h for i, h in enumerate(columns)
                        if rows and all(_NUMERIC.match(str(r[i])) for r in rows)}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if h in right else str(c).ljust(w)
                                 for c, w, h in zip(cells, widths, columns)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if h in right else "-" * w for w, h in zip(widths, columns)) + " |"
    return "\n".join([line(columns), sep] + [line(r) for r in rows])
