"""No silent trade of answer quality: KV cache types whose KL divergence exceeds ``--max-kld`` are never
chosen for a preset.

Before a study measures, its creator measures each cache type other than f16 that the space or a
baseline holds against an f16 cache (:func:`llama_tuner.measure.quality.kv_quality`, cached per model
file and build) and stores the record on the study; every reader of the study (presets, report,
export, MLflow) takes the figures from there. A cache is judged by its worst type: a K/V pair with a
type over ``--max-kld`` is not allowed, nor one with a type the record lacks (only f16, and f32,
which loses nothing against it, need no figure). A random-weight twin has no quality to measure:
its record says so, and its presets say so where they use a quantized cache; where the
measurement failed, the record says so and nothing is excluded (with a warning).
"""

from __future__ import annotations

from typing import Any, Callable

from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.quality import kv_quality
from llama_tuner.model.info import KV_CACHE_TYPES, ModelInfo
from llama_tuner.study.keys import KV_QUALITY_ATTR
from llama_tuner.study.space import parse_attention

DEFAULT_MAX_KLD = 0.02  # between q8_0 (0.007-0.008 on the demo model) and q4_0 (0.09-0.14)
LOSSLESS = ("f16", "f32")  # the reference, and a cache no less exact than it: KL divergence 0


def measure_record(model: ModelInfo, cache_types: list[str], max_kld: float, **kw: Any) -> dict[str, Any]:
    """The record a study stores: ``{"max_kld", "types": {type: figures}, "unknown": why or None}`` (why, in a
    word or two, the figures are missing)."""
    if model.extra.get("twin"):
        return {"max_kld": max_kld, "types": {}, "unknown": "twin"}
    types = kv_quality(model.path, cache_types, **kw) if cache_types else {}
    return {"max_kld": max_kld, "types": {t: {k: v for k, v in f.items() if k != "cached"} for t, f in types.items()},
            "unknown": None}


def study_cache_types(tuner) -> list[str]:
    """The cache types whose quality ``tuner``'s study needs: every type but f16 and f32 that its space
    searches or pins, or that one of its baselines uses (the user's reference is reported with its
    figure), in llama.cpp's order."""
    kinds = {k for choice in tuner.space.choices.get("attention", []) for k in parse_attention(choice)[1:]}
    kinds |= {tuner.space.fixed[k] for k in ("type_k", "type_v") if k in tuner.space.fixed}
    kinds |= {t for b in getattr(tuner, "baselines", {}).values() for t in (b.type_k, b.type_v)}
    return [k for k in KV_CACHE_TYPES if k in kinds and k not in LOSSLESS]


def record_for_study(tuner, max_kld: float, on_phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The study's record for ``max_kld``: the one it holds where it has every type the study needs
    (:func:`study_cache_types`), else measured (or taken from the cache) and stored on the study. A failed
    measurement is recorded as unknown, not fatal."""
    kinds = study_cache_types(tuner)
    record = tuner.study.user_attrs.get(KV_QUALITY_ATTR)
    if (record is not None and record.get("max_kld") == max_kld
            and (record.get("unknown") or set(kinds) <= set(record.get("types", {})))):
        return record
    if kinds and not tuner.model.extra.get("twin"):
        on_phase(f"measuring what the {', '.join(kinds)} KV caches do to the answers (against f16, "
                 "1,024 tokens; once per model and build)")
    gpu = tuner.env.gpu_offload and tuner.gpu_index is not None
    try:
        record = measure_record(tuner.model, kinds, max_kld, n_threads=tuner.env.physical_cores,
                                n_gpu_layers=tuner.model.n_gpu_layers_all if gpu else 0,
                                repack=tuner.space.fixed.get("repack", True) is not False)
    except UserError as exc:
        on_phase(f"warning: the KV cache quality was not measured ({exc.problem}); no cache type is excluded")
        record = {"max_kld": max_kld, "types": {}, "unknown": "measurement failed"}
    tuner.study.set_user_attr(KV_QUALITY_ATTR, record)
    return record


def type_kld(cache_type: str, record: dict[str, Any] | None) -> float | None:
    """The KL divergence of a cache of ``cache_type`` (K and V) against f16: 0 for f16 and f32, the record's
    figure, or None where it was not measured."""
    if cache_type in LOSSLESS:
        return 0.0
    figures = (record or {}).get("types", {}).get(cache_type)
    return figures["kld_mean"] if figures else None


def cache_kld(config: BenchConfig, record: dict[str, Any] | None) -> float | None:
    """The KL divergence of ``config``'s KV cache against f16 (0 for f16), judged by its worse type: a mixed
    K/V pair is not measured as a pair, so it takes the figure of its type that loses most. None where a
    type was not measured."""
    klds = [type_kld(t, record) for t in (config.type_k, config.type_v)]
    return None if None in klds else max(klds)


def allowed(config: BenchConfig, record: dict[str, Any] | None) -> bool:
    """Whether a preset may use ``config``'s KV cache: not when one of its types exceeds the study's --max-kld,
    nor when a type other than f16 and f32 was never measured. Where the study has no record, or its record
    says why nothing was measured (a twin, a failed measurement), nothing is excluded."""
    if not record or record.get("unknown"):
        return True
    kld = cache_kld(config, record)
    return kld is not None and kld <= record["max_kld"]


def why_not_allowed(config: BenchConfig, record: dict[str, Any] | None) -> str | None:
    """Why a preset may not use ``config``'s KV cache (see :func:`allowed`), or None where it may."""
    if allowed(config, record):
        return None
    unmeasured = [t for t in (config.type_k, config.type_v) if type_kld(t, record) is None]
    if unmeasured:
        return f"its KV cache type {unmeasured[0]} was never measured against f16"
    return f"its KV cache ({config.type_k}/{config.type_v}) exceeds --max-kld {record['max_kld']:g}"


def kld_text(config: BenchConfig, record: dict[str, Any] | None) -> str:
    """The cache's quality beside its speed: "0 (f16)", "0.0071", or why it is unknown."""
    kld = cache_kld(config, record)
    if kld == 0.0:
        return "0 (f16)"
    if kld is not None:
        return f"{kld:.4f}" if config.type_k == config.type_v else f"{kld:.4f} (its {_worst(config, record)})"
    return f"unknown ({record['unknown']})" if record and record.get("unknown") else "not measured"


def _worst(config: BenchConfig, record: dict[str, Any] | None) -> str:
    return max((config.type_k, config.type_v), key=lambda t: type_kld(t, record) or 0.0)


def excluded_note(record: dict[str, Any] | None) -> str:
    """Which cache types the presets leave out, and why ("" when none)."""
    if not record:
        return ""
    out = [f"{t} (KLD {f['kld_mean']:.4f}, top-1 agreement {100 * f['top1_agreement']:.1f}%)"
           for t, f in record["types"].items() if f["kld_mean"] > record["max_kld"]]
    return (f"KV caches over --max-kld {record['max_kld']:g} are never a preset: {', '.join(out)}" if out else "")
