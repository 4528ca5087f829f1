"""On a real NVIDIA GPU with a CUDA build: NVML readings of real measurements, and a real study
under a VRAM budget. Skipped elsewhere (see conftest); run through ../shared/device. The study under a
budget also runs on a fake GPU (llama.cpp's figures for the same model) in the fast lane."""

from __future__ import annotations

import optuna
import pytest

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.model.info import load_model_info
from llama_tuner.measure.probe import detect_probe
from llama_tuner.study.objectives import measured_trials, result_of
from llama_tuner.measure.result import Status, TrialResult
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.testing.fakes import FakeGpuProbe
from test_memory import CUDA_OVERHEAD, FAKE_GPU, GpuTruth, Header, TruthLauncher, cells, kv_bytes, long_model_compute

on_a_gpu = [pytest.mark.gpu, pytest.mark.slow]
TEST = dict(n_ctx=1024, n_batch=256, n_ubatch=256, n_prompt=256, n_gen=32, repetitions=3, flash_attn=True)
# A study of the long-context model (a 131072-token f16 cache of 2 GiB: 512 MiB a layer) under 1.5 GiB: with every
# layer on the GPU, an f16 or q8_0 cache alone breaks the budget, so the budget must place the layers.
BUDGET, BUDGET_ARG = 1536 * 2**20, "1536MiB"
PINS = {"n_ctx": "131072", "flash_attn": "1", "n_ubatch": "512", "n_prompt": "64", "n_gen": "16", "repetitions": "2"}


def kept_off_the_gpu(r: TrialResult, model_path) -> int:
    """The KV bytes of the layers ``r`` kept on the CPU (llama.cpp's order: -ngl N offloads the last N-1), which
    every layer on the GPU would have added to its GPU peak."""
    h = Header.read(model_path)
    c = r.config
    return kv_bytes(cells(c.n_ctx), min(h.n_layer, max(0, h.n_layer + 1 - c.n_gpu_layers)), h.n_embd_k_gqa,
                    h.n_embd_v_gqa, c.type_k, c.type_v)


def assert_kept_to_the_budget(results: list[TrialResult], model_path) -> None:
    """Every trial within the budget; and some only because layers were kept off the GPU."""
    ok = [x for x in results if x and x.ok]
    assert len(ok) >= 3
    for x in ok:
        assert x.peak_vram_bytes <= BUDGET, (x.config, x.peak_vram_bytes)
    assert any(x.peak_vram_bytes + kept_off_the_gpu(x, model_path) > BUDGET for x in ok)


@pytest.mark.gpu
@pytest.mark.slow
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


@pytest.mark.gpu
@pytest.mark.slow
def test_a_real_study_on_the_gpu_keeps_to_its_vram_budget(run_cli, long_context_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/gpu.db"
    pins = [arg for k, v in PINS.items() for arg in ("--set", f"{k}={v}")]
    r = run_cli("tune", long_context_model, "--study", "g", "--trials", "5", "--vram-budget", BUDGET_ARG,
                "--storage", storage, "--no-mlflow", *pins, "--no-confirm")
    assert r.code == 0, r.err
    study = optuna.load_study(study_name="g", storage=storage)
    results = [result_of(t) for t in measured_trials(study.trials)]
    assert_kept_to_the_budget(results, long_context_model)
    for x in [x for x in results if x and x.ok]:
        assert x.env.gpu_name and x.peak_vram_bytes and x.predicted_peak_bytes
        assert x.bandwidth and x.bandwidth["achieved_gbs"] > 0
        assert x.peak_memory_bytes == x.peak_vram_bytes  # the GPU's memory is what the budget limits
    assert "presets:" in r.out


def test_a_study_on_a_fake_gpu_keeps_to_its_vram_budget(long_context_model, tmp_path):
    # The study above on a fake GPU whose peaks and buffer reports are llama.cpp's for this model (test_memory).
    truth = GpuTruth(Header.read(long_context_model), long_model_compute, CUDA_OVERHEAD)
    launcher = TruthLauncher(env=FAKE_GPU, truth=truth, free_bytes=11 << 30)
    request = StudyRequest(model=str(long_context_model), storage=f"sqlite:///{tmp_path}/s.db", study_name="g",
                           trials=5, seed=0, vram_budget=BUDGET_ARG, pins=dict(PINS))
    t = open_tuner(request, launcher=launcher, env=FAKE_GPU, probe=FakeGpuProbe())
    t.run()
    results = [result_of(tr) for tr in measured_trials(t.study.trials)]
    assert_kept_to_the_budget(results, long_context_model)
    assert all(x.predicted_peak_bytes for x in results if x.ok)
