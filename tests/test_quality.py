"""KV cache quality: next-token distributions of quantized caches against an f16 cache."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

from conftest import assert_one_line_error
from llama_tuner.measure.kv_quality import compare, log_softmax, summary, tokenize
from llama_tuner.testing.fakes import FakeLauncher


def test_kl_divergence_and_top1_agreement_on_known_distributions():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    kld, agree = compare(p + 3.0, q - 1.0)  # logits: a constant shift changes nothing
    assert kld[0] == pytest.approx(0.5 * np.log(2) - 0.25 * np.log(2)) and kld[1] == pytest.approx(0, abs=1e-12)
    assert agree.tolist() == [False, True]
    s = summary(kld, agree)
    assert s["kld_mean"] == pytest.approx(kld.mean()) and s["top1_agreement"] == 0.5 and s["n_positions"] == 2
    assert np.exp(log_softmax(np.array([[1000.0, 1000.0]]))).tolist() == [[0.5, 0.5]]  # no overflow


def test_bad_quality_input_is_one_line(cli, tiny_model):
    assert_one_line_error(cli("quality", tiny_model, "--kv", "q5_k"), "--kv 'q5_k'")
    assert_one_line_error(cli("quality", tiny_model, "--tokens", "3"), "--tokens 3")


@pytest.mark.slow
def test_quality_of_the_demo_model_orders_the_caches_and_is_cached(run_cli, demo_model_path):
    first = run_cli("quality", demo_model_path, "--kv", "f16,q8_0,q4_0", "--tokens", "256", "--json")
    assert first.code == 0, first.err
    got = {x["type"]: x for x in json.loads(first.out)}
    assert got["f16"]["kld_mean"] == 0 and got["f16"]["top1_agreement"] == 1.0  # f16 against itself
    assert 0 < got["q8_0"]["kld_mean"] < got["q4_0"]["kld_mean"]
    assert got["q8_0"]["top1_agreement"] > got["q4_0"]["top1_agreement"] and got["q4_0"]["n_positions"] == 256
    again = {x["type"]: x for x in json.loads(run_cli("quality", demo_model_path, "--kv", "q4_0", "--tokens", "256",
                                                      "--json").out)}
    assert again["q4_0"]["cached"] and again["q4_0"]["kld_mean"] == got["q4_0"]["kld_mean"]


# -- the quality gate of studies ----------------------------------------------

RECORD = {"max_kld": 0.02, "unknown": None,
          "types": {"q8_0": {"kld_mean": 0.007, "kld_p99": 0.03, "top1_agreement": 0.95, "n_positions": 1024},
                    "q4_0": {"kld_mean": 0.09, "kld_p99": 0.44, "top1_agreement": 0.81, "n_positions": 1024}}}


def test_the_gate_reads_each_cache_types_figure():
    from llama_tuner.measure.config import BenchConfig
    from llama_tuner.study.quality_gate import allowed, cache_kld, excluded_note, kld_text

    f16, q8, q4 = (BenchConfig(flash_attn=True, type_k=t, type_v=t) for t in ("f16", "q8_0", "q4_0"))
    assert [cache_kld(c, RECORD) for c in (f16, q8, q4)] == [0.0, 0.007, 0.09]
    assert [allowed(c, RECORD) for c in (f16, q8, q4)] == [True, True, False]
    assert allowed(q4, None)  # a study without a record (no gate): nothing excluded
    assert allowed(q4, {**RECORD, "types": {}, "unknown": "measurement failed"})  # said so, with a warning
    assert kld_text(q8, RECORD) == "0.0070" and kld_text(f16, None) == "0 (f16)"
    assert kld_text(q4, {"max_kld": 0.02, "types": {}, "unknown": "twin"}) == "unknown (twin)"
    assert "q4_0 (KLD 0.0900, top-1 agreement 81.0%)" in excluded_note(RECORD) and "q8_0" not in excluded_note(RECORD)


class QuantizedIsFastest(FakeLauncher):
    """A fake launcher on which the smaller the KV cache, the faster: the q4_0 cache would win every preset."""

    def speeds(self, c):
        tg, pp = super().speeds(c)
        factor = {"f16": 1.0, "q8_0": 1.1, "q4_0": 1.3}[c.type_v]
        return tg * factor, pp * factor


def test_no_preset_uses_a_cache_over_max_kld_and_exports_say_its_quality(long_context_model, tmp_path):
    from test_study import ENV, tuner_for
    from llama_tuner.report.export import study_preset_json
    from llama_tuner.report.study_report import full_report
    from llama_tuner.study.confirmation import confirm_leaders
    from llama_tuner.study.keys import KV_QUALITY_ATTR
    from llama_tuner.study.view import StudyView

    t = tuner_for(long_context_model, tmp_path, QuantizedIsFastest(env=ENV, noise=0.0), trials=16, seed=3)
    t.run()
    confirm_leaders(t)
    ungated = StudyView(t.study).presets
    assert "q4_0" in {p.candidate.figures.config.type_v for p in ungated.values()}  # without the gate, q4_0 wins
    t.study.set_user_attr(KV_QUALITY_ATTR, RECORD)
    view = StudyView(t.study)
    assert {p.candidate.figures.config.type_v for p in view.presets.values()} <= {"f16", "q8_0"}
    fastest = study_preset_json(view, "fastest")
    assert fastest["kv_cache_kld"] in (0.0, 0.007) and fastest["kv_cache_quality"] in ("0 (f16)", "0.0070")
    report = full_report(view)
    assert "KV KLD" in report and "never a preset: q4_0" in report


class FakeTokenizer:
    """llama_tokenize's contract: fill the buffer and return the count, or return -(tokens needed) when the
    buffer is too small (a model whose tokens outnumber the text's bytes: here, 3 tokens per byte)."""

    llama_token = ctypes.c_int32

    def __init__(self) -> None:
        self.calls: list[int] = []

    def llama_tokenize(self, vocab, raw, n_raw, out, n_max, add_special, parse_special):
        self.calls.append(n_max)
        tokens = [1] + [b * 3 + k for b in raw[:n_raw] for k in range(3)]
        if len(tokens) > n_max:
            return -len(tokens)
        for i, t in enumerate(tokens):
            out[i] = t
        return len(tokens)


def test_tokenize_retries_with_the_size_llama_tokenize_asks_for():
    fake = FakeTokenizer()
    text = b"a text whose tokens outnumber its bytes"
    tokens = tokenize(fake, None, text)
    assert len(tokens) == 1 + 3 * len(text) and tokens[:4] == [1, ord("a") * 3, ord("a") * 3 + 1, ord("a") * 3 + 2]
    assert fake.calls == [len(text) + 16, 1 + 3 * len(text)]  # asked once more, with the size it said it needs
