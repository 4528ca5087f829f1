"""The KV quality gate judges a cache by its worst type, allows no type it never measured, and measures the
types of the space and of the baselines (a baseline's exotic types are measured, not searched)."""

from __future__ import annotations

from dataclasses import replace

from llama_tuner.measure.config import BenchConfig
from llama_tuner.study.keys import KV_QUALITY_ATTR
from llama_tuner.study.quality_gate import allowed, cache_kld, kld_text, record_for_study, why_not_allowed

FIG = {"kld_p99": 0.1, "top1_agreement": 0.9, "n_positions": 1024}
RECORD = {"max_kld": 0.02, "unknown": None,
          "types": {"q8_0": {**FIG, "kld_mean": 0.007}, "q4_0": {**FIG, "kld_mean": 0.09}}}


def cache(k, v):
    return BenchConfig(flash_attn=True, type_k=k, type_v=v)


def test_a_mixed_pair_is_judged_by_its_worst_type():
    q8q4, f16q4, q4f16, q8f16 = cache("q8_0", "q4_0"), cache("f16", "q4_0"), cache("q4_0", "f16"), cache("q8_0", "f16")
    assert not allowed(q8q4, RECORD) and not allowed(f16q4, RECORD) and not allowed(q4f16, RECORD)
    assert allowed(q8f16, RECORD) and allowed(cache("f16", "f16"), RECORD)
    assert cache_kld(f16q4, RECORD) == cache_kld(cache("q4_0", "q4_0"), RECORD)  # q4_0's figure, the worst
    assert cache_kld(q8f16, RECORD) == cache_kld(cache("q8_0", "q8_0"), RECORD)
    assert kld_text(q8q4, RECORD) == "0.0900 (its q4_0)"
    assert why_not_allowed(q8q4, RECORD) == "its KV cache (q8_0/q4_0) exceeds --max-kld 0.02"


def test_a_type_never_measured_is_not_allowed():
    q51 = cache("q5_1", "q5_1")
    assert not allowed(q51, RECORD) and not allowed(cache("q8_0", "q5_1"), RECORD)
    assert why_not_allowed(q51, RECORD) == "its KV cache type q5_1 was never measured against f16"
    assert kld_text(q51, RECORD) == "not measured"
    assert allowed(cache("f32", "f16"), RECORD)  # no less exact than the f16 reference


def test_the_study_measures_its_baselines_cache_types(long_context_model, tmp_path, monkeypatch):
    from test_study import tuner_for

    asked = []

    def fake_quality(path, types, **kw):
        asked.append(list(types))
        return {t: {**FIG, "kld_mean": {"q8_0": 0.007, "q4_0": 0.09}.get(t, 0.01), "cached": False} for t in types}

    monkeypatch.setattr("llama_tuner.study.quality_gate.kv_quality", fake_quality)
    t = tuner_for(long_context_model, tmp_path, baseline_flags="-c 8192 -t 2 -fa on -ctk q5_1 -ctv q5_1")
    assert not any("q5_1" in c for c in t.space.choices["attention"])  # measured as the baseline's, not searched
    t.model = replace(t.model, extra={**t.model.extra, "twin": False})  # as if real weights: a quality to measure
    record = record_for_study(t, 0.02)
    assert asked == [["q8_0", "q4_0", "q5_1"]] and t.study.user_attrs[KV_QUALITY_ATTR] == record
    assert allowed(t.baselines["yours"], record)  # now measured: judged by its figure
    assert record_for_study(t, 0.02) == record and len(asked) == 1  # stored: not measured again
    stale = {**record, "types": {k: v for k, v in record["types"].items() if k != "q5_1"}}
    t.study.set_user_attr(KV_QUALITY_ATTR, stale)  # a record without a type the study now needs: measured again
    assert "q5_1" in record_for_study(t, 0.02)["types"] and len(asked) == 2
