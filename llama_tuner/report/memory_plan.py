"""``inspect --plan``: what fits a memory budget, before anything is loaded."""

from __future__ import annotations

from llama_tuner.measure.config import BenchConfig
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.memory_model import MemoryModel
from llama_tuner.model.info import ModelInfo
from llama_tuner.report.tables import markdown_table
from llama_tuner.units import format_size

KV_TYPES = ("f16", "q8_0", "q4_0")


def _cfg(info: ModelInfo, ngl: int, ctx: int, kv: str, ubatch: int) -> BenchConfig:
    return BenchConfig(n_gpu_layers=ngl, n_ctx=ctx, n_batch=min(2048, ctx), n_ubatch=min(ubatch, ctx),
                       flash_attn=True, type_k=kv, type_v=kv, n_threads=1, n_threads_batch=1)


def max_layers(mm: MemoryModel, info: ModelInfo, ctx: int, kv: str, budget: int, ubatch: int) -> int:
    """The most layers (n_gpu_layers) that fit ``budget`` at ``ctx`` (0 if none)."""
    return mm.max_layers(_cfg(info, 0, ctx, kv, ubatch), budget) or 0


def max_context(mm: MemoryModel, info: ModelInfo, ngl: int, kv: str, budget: int, ubatch: int) -> int:
    """The largest context, in steps of 256 up to the training context, that fits ``budget``."""
    lo, hi = 0, (info.n_ctx_train or 131072) // 256
    while lo < hi:  # binary search on multiples of 256
        mid = (lo + hi + 1) // 2
        if mm.predict(_cfg(info, ngl, mid * 256, kv, ubatch)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def plan_text(info: ModelInfo, budget: int, ctx: int, on_gpu: bool, ubatch: int = 512) -> str:
    """The plan for ``budget`` bytes of GPU memory (or RAM when ``on_gpu`` is False)."""
    mm = MemoryModel(ModelFacts.of(info), on_gpu=on_gpu)
    device = "GPU" if on_gpu else "RAM"
    ngl_all = info.n_gpu_layers_all if on_gpu else 0
    lines = [f"plan for {info.file_name} ({info.architecture}, {info.quant}, {info.n_layer} layers) within "
             f"{format_size(budget)} of {device}; flash attention on, ubatch {ubatch}; before any measurement "
             f"(a study refits this from what it measures)"]
    p = mm.allocations(_cfg(info, ngl_all, ctx, "f16", ubatch))
    dev = "gpu" if on_gpu else "host"
    overhead = mm.predict(_cfg(info, ngl_all, ctx, "f16", ubatch)) - p.total(dev)
    weights, kv, compute = ((p.gpu_weights, p.gpu_kv, p.gpu_compute) if on_gpu
                            else (p.host_weights, p.host_kv, p.host_compute))
    total = weights + kv + compute + overhead
    verdict = (f"fits, {format_size(budget - total)} left" if total <= budget
               else f"does NOT fit by {format_size(total - budget)}")
    where = f"all {ngl_all} layers" if on_gpu else "CPU"
    lines.append(f"ctx {ctx}, f16 KV, {where}: weights {format_size(weights)} + KV {format_size(kv)} + compute "
                 f"{format_size(compute)} + overhead {format_size(overhead)} = {format_size(total)}: {verdict}")
    if on_gpu:
        lines.append("most layers that fit at ctx {}: ".format(ctx) + ", ".join(
            f"{kv} KV {max_layers(mm, info, ctx, kv, budget, ubatch)}/{ngl_all}" for kv in KV_TYPES))
    lines.append("largest context that fits" + (" with all layers" if on_gpu else "") + ": " + ", ".join(
        f"{kv} KV {max_context(mm, info, ngl_all, kv, budget, ubatch)}" for kv in KV_TYPES))
    top = info.n_ctx_train or 131072
    ladder = [n for n in (4096 * 2**i for i in range(12)) if n < top] + [top]
    rows = []
    for n in ladder:
        cells = [str(n)]
        for kv in KV_TYPES:
            peak = mm.predict(_cfg(info, ngl_all, n, kv, ubatch))
            cells.append(format_size(peak) + ("" if peak <= budget else " (over)"))
        rows.append(cells)
    lines.append("\npredicted peak by context and KV cache type:\n" + markdown_table(rows, ("n_ctx",) + KV_TYPES))
    return "\n".join(lines)
