"""Compare models' presets side by side, and explain speed by bytes read per generated token.

Generating one token reads every weight of every layer once (plus the output
matrix, and the KV cache up to the current depth), so for a memory-bound decoder
tg x bytes-per-token is the bandwidth achieved. Two models on one card usually
differ in tg by about the inverse ratio of their bytes per token; where they do
not, the difference in achieved bandwidth (partial offload, CPU layers) says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.sweep import markdown_table
from tuner.units import format_size


@dataclass
class TokenCost:
    """Bytes one generated token reads, split by where they live."""

    gpu_weights: int
    cpu_weights: int
    kv: int
    offloaded_layers: int
    n_layer: int

    @property
    def total(self) -> int:
        """All bytes read per token."""
        return self.gpu_weights + self.cpu_weights + self.kv


def token_cost(facts: dict, n_gpu_layers: int, type_k: str, type_v: str, depth: float) -> TokenCost:
    """Bytes per generated token at ``depth`` tokens of context.

    llama.cpp offloads the output layer first and then the last repeating layers:
    layer i is on the GPU when i >= n_layer + 1 - n_gpu_layers.
    """
    n_layer = facts["n_layer"]
    first_gpu = max(0, n_layer + 1 - n_gpu_layers)
    layers = facts["layer_bytes"]
    gpu = sum(layers[first_gpu:]) + (facts["output_bytes"] if n_gpu_layers > 0 else 0)
    cpu = sum(layers[:first_gpu]) + (0 if n_gpu_layers > 0 else facts["output_bytes"])
    kv_types = facts["kv_bytes_per_token"]

    def per_token(kind: str) -> float:
        k, v = kv_types.get(type_k, kv_types["f16"]), kv_types.get(type_v, kv_types["f16"])
        return (k[kind] + v[kind]) / 2  # each entry holds K+V of one type

    n_swa = facts.get("n_swa") or 0
    swa_depth = min(depth, n_swa) if n_swa else depth
    kv = per_token("full") * depth + per_token("swa") * swa_depth
    return TokenCost(gpu, cpu, int(kv), max(0, n_layer - first_gpu), n_layer)


@dataclass
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
    cost = token_cost(view.attrs["model_facts"], c.n_gpu_layers, c.type_k, c.type_v, depth)
    env = view.attrs.get("environment", {})
    return ModelRow(view.name, view.attrs.get("model_file", "?"), preset, f.tg_mean, f.pp_mean, c.n_ctx,
                    f.peak_memory_bytes, f.headroom_bytes, cost, env.get("gpu_peak_bandwidth_gbs"))


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
    """Why ``a`` is faster or slower than ``b``: bytes per token vs bandwidth achieved."""
    speed = a.tg / b.tg
    bytes_ratio = b.cost.total / a.cost.total
    bw = a.bandwidth_gbs / b.bandwidth_gbs
    cause = ("it reads fewer bytes per token" if bytes_ratio > 1 else "it reads more bytes per token")
    return (f"{a.model} generates {speed:.2f}x as fast as {b.model}: {cause} "
            f"({format_size(a.cost.total)} vs {format_size(b.cost.total)}, a {bytes_ratio:.2f}x factor) "
            f"and achieves {bw:.2f}x the bandwidth.")


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
