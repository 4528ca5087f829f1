"""No silent trade of answer quality: KV cache types whose KL divergence exceeds ``--max-kld`` are never
chosen for a preset.

Before a study measures, its creator measures each quantized cache type the space holds
against an f16 cache (:func:`llama_tuner.measure.quality.kv_quality`, cached per model file and
build) and stores the record on the study; every reader of the study (presets, report,
export, MLflow) takes the figures from there. A random-weight twin has no quality to
measure: its record says so, and its presets say so where they use a quantized cache.
"""

from __future__ import annotations

from typing import Any, Callable

from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.quality import kv_quality
from llama_tuner.model.info import ModelInfo
from llama_tuner.study.keys import KV_QUALITY_ATTR
from llama_tuner.study.space import parse_attention

DEFAULT_MAX_KLD = 0.02  # between q8_0 (0.007-0.008 on the demo model) and q4_0 (0.09-0.14)
QUANTIZED = ("q8_0", "q4_0")


def measure_record(model: ModelInfo, cache_types: list[str], max_kld: float, **kw: Any) -> dict[str, Any]:
    """The record a study stores: ``{"max_kld", "types": {type: figures}, "unknown": why or None}`` (why, in a
    word or two, the figures are missing)."""
    if model.extra.get("twin"):
        return {"max_kld": max_kld, "types": {}, "unknown": "twin"}
    types = kv_quality(model.path, cache_types, **kw) if cache_types else {}
    return {"max_kld": max_kld, "types": {t: {k: v for k, v in f.items() if k != "cached"} for t, f in types.items()},
            "unknown": None}


def record_for_study(tuner, max_kld: float, on_phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The study's record for ``max_kld``: the one it holds, else measured (or taken from the cache) for the
    quantized caches ``llama_tuner``'s space holds and stored on the study. A failed measurement is recorded as
    unknown, not fatal."""
    record = tuner.study.user_attrs.get(KV_QUALITY_ATTR)
    if record is not None and record.get("max_kld") == max_kld:
        return record
    kinds = sorted({k for choice in tuner.space.choices.get("attention", []) for k in parse_attention(choice)[1:]}
                   | {tuner.space.fixed[k] for k in ("type_k", "type_v") if k in tuner.space.fixed})
    kinds = [k for k in QUANTIZED if k in kinds]
    if kinds and not tuner.model.extra.get("twin"):
        on_phase(f"measuring what the {', '.join(kinds)} KV caches do to the answers (against f16, "
                 "1,024 tokens; once per model and build)")
    gpu = tuner.env.gpu_offload and tuner.gpu_index is not None
    try:
        record = measure_record(llama_tuner.model, kinds, max_kld, n_threads=tuner.env.physical_cores,
                                n_gpu_layers=tuner.model.n_gpu_layers_all if gpu else 0,
                                repack=tuner.space.fixed.get("repack", True) is not False)
    except UserError as exc:
        on_phase(f"warning: the KV cache quality was not measured ({exc.problem}); no cache type is excluded")
        record = {"max_kld": max_kld, "types": {}, "unknown": "measurement failed"}
    tuner.study.set_user_attr(KV_QUALITY_ATTR, record)
    return record


def cache_kld(config: BenchConfig, record: dict[str, Any] | None) -> float | None:
    """The KL divergence of ``config``'s KV cache against f16 (0 for f16; None where not measured)."""
    if config.type_k == config.type_v == "f16":
        return 0.0
    if not record or config.type_k != config.type_v:
        return None
    figures = record["types"].get(config.type_k)
    return figures["kld_mean"] if figures else None


def allowed(config: BenchConfig, record: dict[str, Any] | None) -> bool:
    """False when the cache's measured KL divergence exceeds the study's --max-kld."""
    kld = cache_kld(config, record)
    return kld is None or not record or kld <= record["max_kld"]


def kld_text(config: BenchConfig, record: dict[str, Any] | None) -> str:
    """The cache's quality beside its speed: "0 (f16)", "0.0071", or why it is unknown."""
    kld = cache_kld(config, record)
    if kld == 0.0:
        return "0 (f16)"
    if kld is not None:
        return f"{kld:.4f}"
    return f"unknown ({record['unknown']})" if record and record.get("unknown") else "not measured"


def excluded_note(record: dict[str, Any] | None) -> str:
    """Which cache types the presets leave out, and why ("" when none)."""
    if not record:
        return ""
    out = [f"{t} (KLD {f['kld_mean']:.4f}, top-1 agreement {100 * f['top1_agreement']:.1f}%)"
           for t, f in record["types"].items() if f["kld_mean"] > record["max_kld"]]
    return (f"KV caches over --max-kld {record['max_kld']:g} are never a preset: {', '.join(out)}" if out else "")
