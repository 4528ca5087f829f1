"""Compare models' presets side by side, and explain speed by bytes read per generated token.

Generating one token reads every weight of every layer once (plus the output
matrix, and the KV cache up to the current depth), so for a memory-bound decoder
tg x bytes-per-token is the bandwidth achieved. Two models on one card usually
differ in tg by about the inverse ratio of their bytes per token; where they do
not, the difference in achieved bandwidth (partial offload, CPU layers) says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.model.facts import TokenCost
from tuner.report.tables import markdown_table
from tuner.units import format_size


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

    @property
    def bandwidth_gbs(self) -> float:
        """Bytes per token x tokens per second, in GB/s."""
        return self.tg * self.cost.total / 1e9


def row_for(view, preset: str = "fastest") -> ModelRow | None:
    """The comparison row of ``view``'s preset (None when the study has no such preset)."""
    p = view.presets.get(preset)
    if p is None:
        return None
    f = p.candidate.figures
    c = f.config
    depth = c.n_depth + c.n_gen / 2  # the average cache depth during the tg test
    cost = view.facts.token_cost(c.n_gpu_layers, c.type_k, c.type_v, depth)
    return ModelRow(study=view.name, model=view.model_file, preset=preset, tg=f.tg_mean, pp=f.pp_mean, n_ctx=c.n_ctx,
                    peak=f.peak_memory_bytes, headroom=f.headroom_bytes, cost=cost,
                    peak_bandwidth_gbs=view.environment.gpu_peak_bandwidth_gbs)


def _gbs(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def explain(r: ModelRow) -> str:
    """One paragraph on why this model runs at its speed."""
    where = (f"{r.cost.offloaded_layers}/{r.cost.n_layer} layers on the GPU"
             if r.cost.gpu_weights else "all layers on the CPU")
    share = (f", {100 * r.bandwidth_gbs / r.peak_bandwidth_gbs:.0f}% of the GPU's {r.peak_bandwidth_gbs:,.0f} GB/s"
             if r.peak_bandwidth_gbs and r.cost.gpu_weights else "")
    cpu = f" ({format_size(r.cost.cpu_weights)} of it from RAM)" if r.cost.cpu_weights and r.cost.gpu_weights else ""
    return (f"{r.model}: each generated token reads {format_size(r.cost.total)} ({where}{cpu}; "
            f"KV cache {format_size(r.cost.kv)}); at {r.tg:.2f} t/s that is {_gbs(r.bandwidth_gbs)} GB/s{share}.")


def versus(a: ModelRow, b: ModelRow) -> str:
    """Why ``a`` generates faster than ``b``. The speed ratio is exactly the ratio of bytes read per token
    times the ratio of bandwidth achieved; the sentence names the factor that explains the gap."""
    speed = a.tg / b.tg
    fewer = b.cost.total / a.cost.total  # > 1: a reads fewer bytes per token
    bw = a.bandwidth_gbs / b.bandwidth_gbs
    sizes = f"{format_size(a.cost.total)} vs {format_size(b.cost.total)}"
    if fewer >= 1 and bw >= 1:
        why = f"it reads {fewer:.2f}x fewer bytes per token ({sizes}) and achieves {bw:.2f}x the bandwidth"
    elif fewer >= 1:
        why = (f"it reads {fewer:.2f}x fewer bytes per token ({sizes}), which outweighs its {1 / bw:.2f}x "
               "lower achieved bandwidth")
    else:
        why = (f"it achieves {bw:.2f}x the bandwidth, which outweighs the {1 / fewer:.2f}x more bytes it reads "
               f"per token ({sizes})")
    return f"{a.model} generates {speed:.2f}x as fast as {b.model}: {why}."


def compare_text(rows: list[ModelRow]) -> str:
    """The side-by-side table, one explanation per model, and pairwise reasons."""
    cols = ("study", "model", "preset", "tg t/s", "pp t/s", "n_ctx", "peak mem", "headroom", "bytes/token",
            "GB/s", "offloaded")
    table = markdown_table([[r.study, r.model, r.preset, f"{r.tg:.2f}", f"{r.pp:.2f}", str(r.n_ctx),
                             format_size(r.peak), format_size(r.headroom), format_size(r.cost.total),
                             _gbs(r.bandwidth_gbs), f"{r.cost.offloaded_layers}/{r.cost.n_layer}"]
                            for r in rows], cols)
    lines = [table, ""] + [f"- {explain(r)}" for r in rows]
    ranked = sorted(rows, key=lambda r: -r.tg)
    lines += [""] + [f"- {versus(ranked[0], r)}" for r in ranked[1:]]
    return "\n".join(lines).rstrip() + "\n"
