"""Compare models' presets side by side, and explain speed by bytes read per generated token.

Generating one token reads every weight of every layer once (plus the output
matrix, and the KV cache up to the current depth), so for a memory-bound decoder
tg x bytes-per-token is the bandwidth achieved. Two models on one card usually
differ in tg by about the inverse ratio of their bytes per token; where they do
not, the difference in achieved bandwidth (partial offload, CPU layers) says why.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from llama_tuner.measure.result import TrialResult
from llama_tuner.measure.workloads import PRESETS, is_curve
from llama_tuner.study.comparison import compare
from llama_tuner.model.facts import TokenCost
from llama_tuner.study.quality_gate import kld_text
from llama_tuner.report.tables import markdown_table
from llama_tuner.units import format_size


@dataclass(kw_only=True)
class ModelRow:
    """One study's preset, with its cost per token and achieved bandwidth."""

    study: str
    model: str
    preset: str
    tg: float
    pp: float
    n_ctx: int
    peak: int | None
    headroom: int | None
    cost: TokenCost
    peak_bandwidth_gbs: float | None
    kv_quality: str = "-"  # the KL divergence of the preset's KV cache against f16 (quality_gate.kld_text)
    workload: str = "pp-tg"
    answer_s: float | None = None  # seconds to answer the workload
    prompt_s: float | None = None  # the prompt's share of it
    answer_how: str = ""  # "measured" (the study measured this workload's depth curve) or "estimated"
    sizes: tuple[int, int, int] = (0, 0, 0)  # the answered test: depth, prompt and generated tokens
    label: str = ""  # how sentences name it: the model, or the study where two rows share a model
    figures: TrialResult | None = None  # the preset's measurement, for the gap's interval

    @property
    def name(self) -> str:
        """The row's name in sentences."""
        return self.label or self.model

    @property
    def bandwidth_gbs(self) -> float:
        """Bytes per token x tokens per second, in GB/s."""
        return self.tg * self.cost.total / 1e9


Sizes = tuple[int, int, int]  # depth, prompt tokens, generated tokens


def workload_sizes(views, preset: str, workload: str) -> Sizes:
    """The test every row answers: that of the first study that measured ``workload``, else the workload's own."""
    for view in views:
        p = view.presets.get(preset)
        if p is not None and view.workload == workload:
            c = p.candidate.figures.config
            return c.n_depth, c.n_prompt, c.n_gen
    w = PRESETS[workload]
    return w.n_depth, w.n_prompt, w.n_gen


def answer_seconds(f, workload: str, sizes: Sizes) -> tuple[float | None, float | None, str]:
    """(seconds to answer ``workload`` of ``sizes``, the prompt's share, how it was found) for a measured preset:
    measured where the study measured that test's depth curve, else estimated from its pp and tg (which omits the
    slowdown as the context fills, so it is a lower bound); (None, None, "") for pp-tg and server."""
    if not is_curve(workload):
        return None, None, ""
    c = f.config
    if f.curve is not None and c.workload == workload and (c.n_depth, c.n_prompt, c.n_gen) == sizes:
        return f.time_to_answer_s, statistics.fmean(f.pp.samples_ns) / 1e9, "measured"
    _, n_prompt, n_gen = sizes
    prompt = n_prompt / f.pp_mean
    return prompt + n_gen / f.tg_mean, prompt, f"estimated from pp{c.n_prompt}/tg{c.n_gen}"


def row_for(view, preset: str = "fastest", workload: str | None = None, sizes: Sizes | None = None) -> ModelRow | None:
    """The comparison row of ``view``'s preset for ``workload`` (default: the study's own) of ``sizes`` (default:
    :func:`workload_sizes` of this study alone); None when the study has no such preset."""
    p = view.presets.get(preset)
    if p is None:
        return None
    f = p.candidate.figures
    c = f.config
    workload = workload or view.workload
    depth = c.n_depth + c.n_gen / 2 if c.workload == "pp-tg" else c.n_depth + c.n_prompt + c.n_gen / 2
    cost = view.facts.token_cost(c.n_gpu_layers, c.type_k, c.type_v, depth)  # at the average depth of generation
    answer, prompt, how = answer_seconds(f, workload, sizes or workload_sizes([view], preset, workload))
    return ModelRow(study=view.name, model=view.model_file, preset=preset, tg=f.tg_mean, pp=f.pp_mean, n_ctx=c.n_ctx,
                    peak=f.peak_memory_bytes, headroom=f.headroom_bytes, cost=cost,
                    peak_bandwidth_gbs=view.environment.gpu_peak_bandwidth_gbs,
                    kv_quality=kld_text(c, view.kv_quality), workload=workload, answer_s=answer, prompt_s=prompt,
                    answer_how=how, sizes=sizes or workload_sizes([view], preset, workload), figures=f)


def _gbs(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def explain(r: ModelRow) -> str:
    """One paragraph on why this model runs at its speed."""
    where = (f"{r.cost.offloaded_layers}/{r.cost.n_layer} layers on the GPU"
             if r.cost.gpu_weights else "all layers on the CPU")
    share = (f", {100 * r.bandwidth_gbs / r.peak_bandwidth_gbs:.0f}% of the GPU's {r.peak_bandwidth_gbs:,.0f} GB/s"
             if r.peak_bandwidth_gbs and r.cost.gpu_weights else "")
    cpu = f" ({format_size(r.cost.cpu_weights)} of it from RAM)" if r.cost.cpu_weights and r.cost.gpu_weights else ""
    return (f"{r.name}: each generated token reads {format_size(r.cost.total)} ({where}{cpu}; "
            f"KV cache {format_size(r.cost.kv)}); at {r.tg:.2f} t/s that is {_gbs(r.bandwidth_gbs)} GB/s{share}.")


def versus(a: ModelRow, b: ModelRow) -> str:
    """Why ``a`` generates faster than ``b``. The speed ratio is exactly the ratio of bytes read per token
    times the ratio of bandwidth achieved; the sentence names the factor that explains the gap."""
    speed = a.tg / b.tg
    fewer = b.cost.total / a.cost.total  # > 1: a reads fewer bytes per token
    bw = a.bandwidth_gbs / b.bandwidth_gbs
    sizes = f"{format_size(a.cost.total)} vs {format_size(b.cost.total)}"
    gap = compare(a.figures, b.figures, "tg") if a.figures is not None and b.figures is not None else None
    if gap is not None and gap.verdict == "tie":
        return (f"{a.name} and {b.name} generate at the same speed within the noise ({gap.text()}), though "
                f"{a.name} reads {format_size(a.cost.total)} per token and {b.name} {format_size(b.cost.total)}.")
    if fewer >= 1 and bw >= 1:
        why = f"it reads {fewer:.2f}x fewer bytes per token ({sizes}) and achieves {bw:.2f}x the bandwidth"
    elif fewer >= 1:
        why = (f"it reads {fewer:.2f}x fewer bytes per token ({sizes}), which outweighs its {1 / bw:.2f}x "
               "lower achieved bandwidth")
    else:
        why = (f"it achieves {bw:.2f}x the bandwidth, which outweighs the {1 / fewer:.2f}x more bytes it reads "
               f"per token ({sizes})")
    interval = f" ({gap.text()})" if gap is not None else ""
    return f"{a.name} generates {speed:.2f}x as fast as {b.name}{interval}: {why}."


def sooner(a: ModelRow, b: ModelRow) -> str:
    """Why ``a`` answers the workload sooner than ``b``: the seconds, split into prompt and generation."""
    def parts(r: ModelRow) -> str:
        return f"{r.prompt_s:.1f} s prompt + {r.answer_s - r.prompt_s:.1f} s generating"
    depth, prompt, gen = a.sizes
    test = f"{prompt} prompt tokens" + (f" after {depth}" if depth else "") + f", {gen} generated"
    both = (f"{a.name} answers a {a.workload} request ({test}) in {a.answer_s:.1f} s ({parts(a)}), {b.name} in "
            f"{b.answer_s:.1f} s ({parts(b)})")
    measured = a.answer_how == b.answer_how == "measured" and a.figures is not None and b.figures is not None
    gap = compare(a.figures, b.figures, "answer") if measured else None
    if gap is not None and gap.verdict == "tie":
        return f"{both}: the same within the noise ({gap.text()} answers per second)."
    interval = f" ({gap.text()} answers per second)" if gap is not None else ""
    return f"{both}: {b.answer_s / a.answer_s:.2f}x sooner{interval}."


def compare_text(rows: list[ModelRow]) -> str:
    """The side-by-side table, one explanation per model, and pairwise reasons (seconds to answer first, for a
    chat, reasoning, long or custom workload)."""
    answers = all(r.answer_s is not None for r in rows)
    models = [r.model for r in rows]
    for r in rows:
        r.label = r.study if models.count(r.model) > 1 else r.model
    cols = (("study", "model", "preset") + ((f"{rows[0].workload} s", "how") if answers else ())
            + ("tg t/s", "pp t/s", "n_ctx", "KV KLD", "peak mem", "headroom", "bytes/token", "GB/s", "offloaded"))
    table = markdown_table([[r.study, r.model, r.preset]
                            + ([f"{r.answer_s:.2f}", r.answer_how] if answers else [])
                            + [f"{r.tg:.2f}", f"{r.pp:.2f}", str(r.n_ctx), r.kv_quality,
                               format_size(r.peak), format_size(r.headroom), format_size(r.cost.total),
                               _gbs(r.bandwidth_gbs), f"{r.cost.offloaded_layers}/{r.cost.n_layer}"]
                            for r in rows], cols)
    lines = [table, ""] + [f"- {explain(r)}" for r in rows]
    if answers:
        ranked = sorted(rows, key=lambda r: r.answer_s)
        lines += [""] + [f"- {sooner(ranked[0], r)}" for r in ranked[1:]]
        if any(r.answer_how != "measured" for r in rows):
            lines.append(f"- estimated: from pp and tg near depth 0, so without the slowdown as the context fills; "
                         f"tune with --workload {rows[0].workload} to measure it")
    ranked = sorted(rows, key=lambda r: -r.tg)
    lines += [""] + [f"- {versus(ranked[0], r)}" for r in ranked[1:]]
    return "\n".join(lines).rstrip() + "\n"
