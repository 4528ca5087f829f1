"""KV cache quality: next-token distributions of quantized caches against an f16 cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error
from tuner.measure.kv_quality import compare, log_softmax, summary


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
