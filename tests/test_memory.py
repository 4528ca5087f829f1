"""The memory model: checked against llama.cpp's own buffer report, and used to skip configs."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest

from conftest import REPACK_WORKS, assert_one_line_error
from llama_tuner.measure.config import BenchConfig
from llama_tuner.testing.fakes import FakeGpuProbe, FakeLauncher
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.memory_model import MemoryModel
from llama_tuner.model.info import load_model_info
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.study.objectives import RESULT_ATTR, measured_trials
from llama_tuner.measure.result import Environment
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.tuner import START_ATTR
from llama_tuner.study.view import StudyView
from llama_tuner.model.twins import SHAPES, Shape, describe_shape
from llama_tuner.report.memory_plan import _cfg, max_context
from test_study import ENV

SMALL_TEST = dict(n_prompt=32, n_gen=4, repetitions=1, n_threads=1, repack=REPACK_WORKS)


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx,kv,swa_full,fa", [(4096, "f16", False, False), (8192, "q8_0", False, True),
                                                   (2048, "f16", True, True), (16384, "q4_0", False, True)])
def test_kv_prediction_matches_llama_cpps_kv_buffers(demo_model_path, n_ctx, kv, swa_full, fa):
    info = load_model_info(demo_model_path)  # Gemma 3: 15 of 18 layers use a 512-token window
    cfg = BenchConfig(n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=fa, type_k=kv, type_v=kv,
                      swa_full=swa_full, **SMALL_TEST)
    [r] = SubprocessLauncher(NoGpuProbe()).measure(str(demo_model_path), [cfg])
    assert r.ok, r.reason
    reported = sum(r.buffers["kv"].values())
    predicted = MemoryModel(ModelFacts.of(info), on_gpu=False).allocations(cfg.resolved()).host_kv
    assert abs(predicted - reported) <= 0.001 * reported + 64 * 1024  # llama.cpp prints MiB to 2 decimals


@pytest.mark.slow
def test_compute_and_peak_are_refitted_from_measurements(demo_model_path):
    info = load_model_info(demo_model_path)
    configs = [BenchConfig(n_ctx=c, n_batch=u, n_ubatch=u, flash_attn=fa, **SMALL_TEST)
               for c, u, fa in [(4096, 128, True), (4096, 512, False), (8192, 256, True), (16384, 512, True),
                                (8192, 64, False), (32768, 256, False)]]
    results = list(SubprocessLauncher(NoGpuProbe()).measure(str(demo_model_path), configs))
    assert all(r.ok for r in results), [r.reason for r in results]
    mm = MemoryModel(ModelFacts.of(info), on_gpu=False)
    mm.fit(results[:4])
    for r in results[4:]:  # predict configs it has not seen
        compute = sum(r.buffers["compute"].values())
        assert abs(mm.allocations(r.config).host_compute - compute) <= 0.10 * compute + 2**20
        assert abs(mm.predict(r.config) - r.peak_memory_bytes) <= 0.10 * r.peak_memory_bytes
    # Gemma's 262k vocabulary: an ubatch of 512 reserves 512 x 262144 x 4 bytes of logits.
    big = sum(results[1].buffers["compute"].values())
    assert big > 512 * 262144 * 4


def test_the_mistral_twin_plan_agrees_with_the_measured_h200_figure():
    info = describe_shape(SHAPES["mistral-small-24b"], "q2_k")
    mm = MemoryModel(ModelFacts.of(info), on_gpu=True)
    cfg = BenchConfig(n_gpu_layers=41, n_ctx=16384, n_batch=2048, n_ubatch=512, flash_attn=True,
                      n_threads=8, n_threads_batch=8)
    # ../shared/device/README.md: this twin, all layers, ctx 16384, flash attention: 11,617 MiB used.
    measured = 11_617 * 2**20
    assert abs(mm.predict(cfg) - measured) / measured < 0.05
    assert mm.predict(cfg) <= 12 * 2**30  # so a 12 GiB budget admits it


def test_plan_cli_on_a_twin(cli, long_context_model):
    r = cli("inspect", long_context_model, "--plan", "--vram-budget", "2GiB", "--ctx", "65536")
    assert r.code == 0, r.err
    assert "largest context that fits with all layers" in r.out and "most layers that fit" in r.out
    assert "(over)" in r.out  # the 131072 context with f16 KV (2 GiB of cache) does not fit 2 GiB
    assert_one_line_error(cli("inspect", long_context_model, "--plan", "--ctx", "999999"), "--ctx")


FAKE_GPU = Environment(**{**ENV.__dict__, "gpu_name": "Fake GPU", "vram_total_bytes": 12 << 30, "gpu_offload": True})
POINT = BenchConfig(n_gpu_layers=5, n_ctx=8192, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=4,
                    n_threads_batch=4)


def fake_gpu_study(model, tmp_path, free_bytes, points=(), **request):
    """A study on a fake 12 GiB GPU with a 1.5 GiB budget, whose measured peaks are 2% above what
    the memory model predicts, with ``points`` (configs) enqueued first."""
    truth = MemoryModel(ModelFacts.of(load_model_info(model)), on_gpu=True)
    launcher = FakeLauncher(env=FAKE_GPU, peak_fn=lambda c: int(truth.predict(c) * 1.02), free_bytes=free_bytes)
    req = StudyRequest(model=str(model), storage=f"sqlite:///{tmp_path}/s.db", vram_budget="1536MiB",
                       min_headroom="64MiB", min_ctx=4096, **request)
    t = open_tuner(req, launcher=launcher, env=FAKE_GPU, probe=FakeGpuProbe())
    for cfg in points:
        t.study.enqueue_trial(t.space.params_of(cfg))
    t.run()
    return t, launcher


def sampled_configs(t) -> list[BenchConfig]:
    """The configurations a study measured, baselines left out, in trial order."""
    return [BenchConfig.from_dict(tr.user_attrs[RESULT_ATTR]["config"]) for tr in measured_trials(t.study.trials)
            if not tr.user_attrs.get("baseline")]


def test_configs_predicted_over_budget_are_skipped_not_loaded(long_context_model, tmp_path):
    # A fake GPU machine with 12 GiB; the long-context model's 131072-token f16 cache alone needs 2 GiB,
    # so with a 1.5 GiB budget the big contexts are skipped before loading.
    big = replace(POINT, n_ctx=131072)  # a sampled point whose f16 cache alone is 2 GiB
    t, launcher = fake_gpu_study(long_context_model, tmp_path, 11 << 30, [big], trials=15, seed=2,
                                 ranges={"n_gpu_layers": (0, 5)})
    skipped = [tr for tr in t.study.trials if tr.user_attrs.get("skipped")]
    assert any(tr.params == t.space.params_of(big) for tr in skipped)
    measured_ctx = {c.n_ctx for c in launcher.measured}
    for tr in skipped:
        r = tr.user_attrs[RESULT_ATTR]
        assert r["status"] == "invalid" and r["predicted_peak_bytes"] > 1536 * 2**20
        assert tr.constraints["memory_budget"] > 0
    assert 131072 in measured_ctx  # the llama.cpp-defaults baseline is measured even though it is too big
    assert len(measured_trials(t.study.trials)) == 15  # skips do not count as measurements


def test_on_a_gpu_each_trial_offloads_the_most_layers_that_fit(long_context_model, tmp_path):
    # The same fake 12 GiB GPU and 1.5 GiB budget: an 8192-token context fits with all 5 layers; the
    # 131072-token f16 cache (512 MiB per layer) fits only with some, so that trial gets fewer layers
    # instead of being skipped, and never a layer that would break the budget.
    t, launcher = fake_gpu_study(long_context_model, tmp_path, 11 << 30, [POINT, replace(POINT, n_ctx=131072)],
                                 trials=8, seed=3)
    assert t.space.fit_layers
    limit = 1536 * 2**20 - 64 * 2**20
    sampled = sampled_configs(t)
    by_ctx = {c.n_ctx: c for c in sampled[:2]}  # the two enqueued points come first
    assert by_ctx[8192].n_gpu_layers == 5
    assert 0 < by_ctx[131072].n_gpu_layers < 5
    for c in sampled:
        assert launcher.peak(c) <= limit, c  # within budget and headroom
        if c.n_gpu_layers < 5:  # and one more layer would not have been
            assert launcher.peak(replace(c, n_gpu_layers=c.n_gpu_layers + 1)) > limit, c
    assert not any(tr.user_attrs.get("skipped") for tr in t.study.trials)


def test_layers_fit_what_is_free_when_other_programs_hold_part_of_the_budget(long_context_model, tmp_path):
    # Same fake GPU, but only 1 GiB of it free: the 65536-token f16 cache (1 GiB, 256 MiB a layer) would
    # fit the 1.5 GiB budget with every layer, and the free memory only with fewer.
    t, launcher = fake_gpu_study(long_context_model, tmp_path, 1 << 30, [replace(POINT, n_ctx=65536)], trials=3,
                                 seed=3)
    first = sampled_configs(t)[0]
    assert first.n_ctx == 65536 and 0 < first.n_gpu_layers < 5
    assert launcher.peak(first) <= (1 << 30) - 64 * 2**20


def h200_speeds(c: BenchConfig) -> tuple[float, float]:
    """(tg, pp) of the Mistral twin on the H200 as measured there (docs/benchmarks.md §6): 104 t/s tg with
    all 41 layers, each layer left on the CPU adding 48 ms / threads per token (24 t/s at ngl 33 with
    12 threads), 6% less without flash attention, 1-2% less with a quantized KV cache."""
    cpu_layers = 41 - c.n_gpu_layers
    tg = 1 / (1 / 104 + cpu_layers * 0.048 / min(c.n_threads, 16))
    tg *= (1.0 if c.flash_attn else 0.94) * {"f16": 1.0, "q8_0": 0.99, "q4_0": 0.98}[c.type_k]
    pp = 1 / (1 / 2560 + cpu_layers * 0.0012 / min(c.n_threads_batch, 16))
    return tg, pp


def test_the_mistral_twin_under_12_gib_gets_every_layer_at_16k(tiny_model, tmp_path, monkeypatch):
    # The H200 run of 2026-11-27 (docs/benchmarks.md §6), replayed on a fake GPU: the Mistral-Small-24B
    # twin's header, a 12 GiB budget, --min-ctx 16384 and the reference user's baseline. Peaks are the
    # memory model's prior off by up to +-2%, and speeds as measured there. With layers sampled, 13 trials
    # found no full offload at 16k; fitted, the fastest preset must be one.
    info = replace(describe_shape(SHAPES["mistral-small-24b"], "q2_k"), path=str(tiny_model))
    monkeypatch.setattr("llama_tuner.study.session.load_model_info", lambda path: info)
    truth = MemoryModel(ModelFacts.of(info), on_gpu=True)
    env = Environment(**{**FAKE_GPU.__dict__, "vram_total_bytes": 140 << 30, "physical_cores": 16})

    def peak(c):
        return int(truth.predict(c) * (1 + 0.02 * ((zlib.crc32(c.settings_key().encode()) % 201) - 100) / 100))

    launcher = FakeLauncher(env=env, n_layer=41, peak_fn=peak, free_bytes=139 << 30)
    launcher.speeds = h200_speeds
    request = StudyRequest(model=str(tiny_model), storage=f"sqlite:///{tmp_path}/s.db", trials=12, seed=0,
                           vram_budget="12GiB", min_ctx=16384, baseline_flags="llama-server --ctx-size 2048 "
                           "--batch-size 512 --n-gpu-layers 49 --threads 8 --parallel 1")
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    t.run()
    fastest = StudyView(t.study).presets["fastest"].candidate.figures
    assert fastest.config.n_gpu_layers == 41 and fastest.config.n_ctx >= 16384
    assert fastest.peak_memory_bytes <= (12 << 30) - (512 << 20)
    # The first sampled point is llama.cpp's defaults at 16k with the least quantized cache that holds
    # every layer; here its f16 cache at 16k is predicted just over the limit, so q8_0.
    [start] = [tr for tr in t.study.trials if tr.user_attrs.get(START_ATTR)]
    first = BenchConfig.from_dict(start.user_attrs[RESULT_ATTR]["config"])
    assert (first.n_gpu_layers, first.n_ctx, first.type_k, first.n_ubatch) == (41, 16384, "q8_0", 512)


# -- direct checks of the plan and the model's error margin ------------------

def _long_twin():
    """The long-context test model's header, without writing it: 2 GiB of f16 KV cache at 131072 tokens."""
    return describe_shape(Shape(arch="llama", n_layer=4, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128,
                                n_ff=1024, n_vocab=1024, n_ctx_train=131072), "q8_0")


@pytest.mark.parametrize("budget_mib", [700, 1200, 2500, 2700])
def test_max_context_is_the_largest_multiple_of_256_that_fits(budget_mib):
    info, budget = _long_twin(), budget_mib * 2**20
    mm = MemoryModel(ModelFacts.of(info), on_gpu=True)
    ctx = max_context(mm, info, info.n_gpu_layers_all, "f16", budget, 512)
    assert ctx % 256 == 0 and 0 < ctx <= info.n_ctx_train
    assert mm.predict(_cfg(info, info.n_gpu_layers_all, ctx, "f16", 512)) <= budget
    if ctx < info.n_ctx_train:
        assert mm.predict(_cfg(info, info.n_gpu_layers_all, ctx + 256, "f16", 512)) > budget
    q4 = max_context(mm, info, info.n_gpu_layers_all, "q4_0", budget, 512)
    assert q4 >= ctx  # a smaller cache never holds less context


def test_max_context_is_zero_when_nothing_fits_and_the_training_context_when_all_does():
    info = _long_twin()
    mm = MemoryModel(ModelFacts.of(info), on_gpu=True)
    assert max_context(mm, info, info.n_gpu_layers_all, "f16", 2**20, 512) == 0
    assert max_context(mm, info, info.n_gpu_layers_all, "f16", 2**40, 512) == info.n_ctx_train


def test_uncertainty_is_3_percent_before_any_fit_then_the_typical_residual_at_least_half_a_percent():
    mm = MemoryModel(ModelFacts.of(_long_twin()), on_gpu=True)
    budget = 10 * 2**30
    assert mm.uncertainty(budget) == int(0.03 * budget)
    mm.correction, mm.residuals = 100, [100 + 200 * 2**20, 100 - 100 * 2**20, 100 + 50 * 2**20]
    assert mm.uncertainty(budget) == 100 * 2**20  # the median distance from the correction
    mm.residuals = [100, 100 + 2**20, 100 - 2**20]
    assert mm.uncertainty(budget) == int(0.005 * budget)  # never below half a percent of the budget
