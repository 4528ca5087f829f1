"""BenchConfig validation, TrialResult statistics and round trips, sweep expansion."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.model.info import load_model_info
from llama_tuner.measure.result import Environment, Rates, Status, TrialResult
from llama_tuner.measure.sweep import build_configs, expand_sweep
from llama_tuner.report.tables import markdown_table


@pytest.mark.parametrize("settings,needle", [
    ({"n_ubatch": 1024, "n_batch": 512}, "n_ubatch 1024 > n_batch 512"),
    ({"type_v": "q8_0"}, "needs flash attention"),
    ({"type_k": "q3_k"}, "unknown type_k"),
    ({"n_threads": 0}, "n_threads 0 is out of range"),
    ({"n_gpu_layers": -2}, "n_gpu_layers -2 is out of range"),
    ({"n_batch": 8192}, "llama.cpp would clamp it"),
    ({"n_ctx": 256, "n_batch": 256, "n_ubatch": 256}, "too small"),
    ({"n_prompt": 0, "n_gen": 0}, "nothing to measure"),
    ({"repetitions": 0}, "repetitions 0 is out of range"),
])
def test_invalid_configs_are_rejected_with_a_reason(settings, needle):
    with pytest.raises(InvalidConfig, match=needle):
        BenchConfig(**settings).validate()


def test_quantized_v_with_flash_attention_is_valid():
    BenchConfig(type_k="q4_0", type_v="q8_0", flash_attn=True).validate()
    BenchConfig(type_k="q8_0", flash_attn=False).validate()  # a quantized K alone is fine


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(InvalidConfig, match="unknown setting 'nosuch'"):
        BenchConfig.from_dict({"nosuch": 1})
    with pytest.raises(InvalidConfig, match="n_threads must be an integer"):
        BenchConfig.from_dict({"n_threads": "two"})
    with pytest.raises(InvalidConfig, match="flash_attn must be on or off"):
        BenchConfig.from_dict({"flash_attn": "maybe"})
    cfg = BenchConfig.from_dict({"flash_attn": "on", "n_ctx": "2048", "type_k": "Q8_0"})
    assert cfg.flash_attn is True and cfg.n_ctx == 2048 and cfg.type_k == "q8_0"


def test_resolved_fills_machine_defaults_and_checks_the_model(tiny_model):
    info = load_model_info(tiny_model)
    cfg = BenchConfig(n_gpu_layers=-1, n_ctx=2048).resolved(info, cores=6)
    assert cfg.n_gpu_layers == info.n_layer + 1 and cfg.n_threads == 6 and cfg.n_threads_batch == 6
    assert BenchConfig(n_threads=3, n_ctx=2048).resolved(info).n_threads_batch == 3
    with pytest.raises(InvalidConfig, match="exceeds the model's training context 4096"):
        BenchConfig(n_ctx=8192).resolved(info)
    with pytest.raises(InvalidConfig, match="n_gpu_layers 9 > 3"):
        BenchConfig(n_gpu_layers=9, n_ctx=2048).validate(info)


def test_settings_key_ignores_the_test_but_not_the_settings():
    a = BenchConfig(n_threads=2)
    assert a.settings_key() == BenchConfig(n_threads=2, repetitions=9, n_depth=100).settings_key()
    assert a.settings_key() != BenchConfig(n_threads=3).settings_key()


def test_rates_are_llama_bench_statistics():
    r = Rates(n_tokens=128, samples_ns=[1_000_000_000, 1_100_000_000, 900_000_000])
    expected = [128 / 1.0, 128 / 1.1, 128 / 0.9]
    assert r.rates == pytest.approx(expected)
    assert r.mean == pytest.approx(statistics.fmean(expected))
    assert r.stddev == pytest.approx(statistics.stdev(expected))  # sample, not population
    assert Rates(64, [5]).stddev == 0.0


def test_trial_result_round_trips_and_computes_headroom():
    env = Environment(host="h", cpu="c", gpu_name="Fake GPU", vram_total_bytes=12 << 30, gpu_offload=True)
    r = TrialResult(Status.OK, BenchConfig(n_threads=2, n_threads_batch=2), "/m.gguf",
                    pp=Rates(512, [10**8] * 3), tg=Rates(128, [2 * 10**9] * 3), peak_vram_bytes=9 << 30,
                    vram_free_before_bytes=11 << 30, peak_rss_bytes=1 << 30, ram_available_before_bytes=20 << 30,
                    env=env)
    again = TrialResult.from_dict(r.to_dict())
    assert again == r
    assert again.tg_mean == pytest.approx(64.0) and again.pp_mean == pytest.approx(5120.0)
    assert again.headroom_bytes == 2 << 30 and again.peak_memory_bytes == 9 << 30
    # The same GPU beside a CPU build of llama.cpp holds nothing of the model: what limits it is RAM.
    cpu_build = replace(r, env=replace(env, gpu_offload=False), peak_vram_bytes=0, vram_free_before_bytes=11 << 30)
    assert cpu_build.peak_memory_bytes == 1 << 30 and cpu_build.headroom_bytes == 19 << 30
    cpu = TrialResult(Status.OOM, BenchConfig(), "/m.gguf", peak_rss_bytes=3 << 30,
                      ram_available_before_bytes=20 << 30)
    assert cpu.headroom_bytes == 17 << 30 and cpu.tg_mean is None


def test_sweep_varies_model_settings_slowest():
    combos = expand_sweep({"n_threads": "1,2", "n_gpu_layers": "0,99", "n_batch": None})
    assert combos == [{"n_gpu_layers": "0", "n_threads": "1"}, {"n_gpu_layers": "0", "n_threads": "2"},
                      {"n_gpu_layers": "99", "n_threads": "1"}, {"n_gpu_layers": "99", "n_threads": "2"}]
    with pytest.raises(InvalidConfig, match="empty value"):
        expand_sweep({"n_threads": "1,,2"})


def test_build_configs_validates_every_combination(tiny_model):
    info = load_model_info(tiny_model)
    configs = build_configs({"n_threads": "1,2", "n_batch": "128,256", "n_ctx": "1024"}, info)
    assert [(c.n_batch, c.n_ubatch) for c in configs] == [(128, 128), (128, 128), (256, 256), (256, 256)]
    assert build_configs({"n_ctx": "1024"}, info)[0].n_batch == 1024  # the default follows the context
    with pytest.raises(InvalidConfig, match="n_ubatch 512 > n_batch 128"):
        build_configs({"n_batch": "128", "n_ubatch": "512", "n_ctx": "1024"}, info)


def test_markdown_table_aligns_columns():
    table = markdown_table([["a", "12"], ["bbb", "3"]], columns=("model", "t/s"))
    lines = table.splitlines()
    assert lines[0] == "| model | t/s |" and lines[1] == "| ----- | --: |"
    assert lines[2] == "| a     |  12 |" and lines[3] == "| bbb   |   3 |"
