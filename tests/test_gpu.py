"""On a real NVIDIA GPU with a CUDA build: NVML readings of real measurements, and a real study
under a VRAM budget. Skipped elsewhere (see conftest); run through ../shared/device."""

from __future__ import annotations

import optuna
import pytest

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.model.info import load_model_info
from llama_tuner.measure.probe import detect_probe
from llama_tuner.study.objectives import measured_trials, result_of
from llama_tuner.measure.result import Status

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TEST = dict(n_ctx=1024, n_batch=256, n_ubatch=256, n_prompt=256, n_gen=32, repetitions=3, flash_attn=True)


def test_an_offloaded_model_is_measured_with_nvml_peaks(small_model):
    all_layers = load_model_info(str(small_model)).n_gpu_layers_all
    configs = [BenchConfig(n_gpu_layers=ngl, **TEST) for ngl in (all_layers, 0)]
    full, none = SubprocessLauncher(detect_probe(), timeout_s=120).measure(str(small_model), configs)
    for r in (full, none):
        assert r.status == Status.OK, r.reason
        assert r.env.gpu_name and r.env.gpu_driver and r.env.gpu_offload and r.env.gpu_peak_bandwidth_gbs
        assert r.vram_free_before_bytes > 0 and r.peak_vram_bytes > 0
    # The weights, KV cache and compute buffer llama.cpp put on the GPU are inside the NVML peak
    # (which also holds the CUDA context), and offloading every layer needs more than offloading none.
    assert full.allocated_bytes("gpu") > none.allocated_bytes("gpu")
    assert full.peak_vram_bytes >= full.allocated_bytes("gpu")
    assert full.peak_vram_bytes > none.peak_vram_bytes


def test_a_real_study_on_the_gpu_keeps_to_its_vram_budget(run_cli, small_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/gpu.db"
    r = run_cli("tune", small_model, "--study", "g", "--trials", "5", "--vram-budget", "2GiB", "--storage", storage,
                "--no-mlflow", "--min-ctx", "512", "--set", "n_prompt=64", "--set", "n_gen=16",
                "--set", "repetitions=2", "--no-confirm")
    assert r.code == 0, r.err
    study = optuna.load_study(study_name="g", storage=storage)
    results = [result_of(t) for t in measured_trials(study.trials)]
    ok = [x for x in results if x and x.ok]
    assert len(ok) >= 3
    for x in ok:
        assert x.env.gpu_name and x.peak_vram_bytes and x.predicted_peak_bytes
        assert x.bandwidth and x.bandwidth["achieved_gbs"] > 0
        assert x.peak_memory_bytes == x.peak_vram_bytes  # the GPU's memory is what the budget limits
    assert "presets:" in r.out
