"""The memory model: checked against llama.cpp's own buffer report, and used to skip configs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import REPACK_WORKS, assert_one_line_error
from tuner.config import BenchConfig
from tuner.fakes import FakeLauncher
from tuner.launcher import SubprocessLauncher
from tuner.memory import MemoryModel, model_facts
from tuner.model_info import load_model_info
from tuner.probe import FakeGpuProbe, NoGpuProbe
from tuner.records import RESULT_ATTR, measured_trials
from tuner.result import Environment
from tuner.session import StudyRequest, open_tuner
from tuner.synth import SHAPES, describe_shape
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
    predicted = MemoryModel(model_facts(info), on_gpu=False).plan(cfg.resolved()).host_kv
    assert abs(predicted - reported) <= 0.001 * reported + 64 * 1024  # llama.cpp prints MiB to 2 decimals


@pytest.mark.slow
def test_compute_and_peak_are_refitted_from_measurements(demo_model_path):
    info = load_model_info(demo_model_path)
    configs = [BenchConfig(n_ctx=c, n_batch=u, n_ubatch=u, flash_attn=fa, **SMALL_TEST)
               for c, u, fa in [(4096, 128, True), (4096, 512, False), (8192, 256, True), (16384, 512, True),
                                (8192, 64, False), (32768, 256, False)]]
    results = list(SubprocessLauncher(NoGpuProbe()).measure(str(demo_model_path), configs))
    assert all(r.ok for r in results), [r.reason for r in results]
    mm = MemoryModel(model_facts(info), on_gpu=False)
    mm.fit(results[:4])
    for r in results[4:]:  # predict configs it has not seen
        compute = sum(r.buffers["compute"].values())
        assert abs(mm.plan(r.config).host_compute - compute) <= 0.10 * compute + 2**20
        assert abs(mm.predict(r.config) - r.peak_memory_bytes) <= 0.10 * r.peak_memory_bytes
    # Gemma's 262k vocabulary: an ubatch of 512 reserves 512 x 262144 x 4 bytes of logits.
    big = sum(results[1].buffers["compute"].values())
    assert big > 512 * 262144 * 4


def test_the_mistral_twin_plan_agrees_with_the_measured_h200_figure():
    info = describe_shape(SHAPES["mistral-small-24b"], "q2_k")
    mm = MemoryModel(model_facts(info), on_gpu=True)
    cfg = BenchConfig(n_gpu_layers=41, n_ctx=16384, n_batch=2048, n_ubatch=512, flash_attn=True,
                      n_threads=8, n_threads_batch=8)
    # ../shared/device/README.md: this twin, all layers, ctx 16384, flash attention: 11,617 MiB used.
    measured = 11_617 * 2**20
    assert abs(mm.predict(cfg) - measured) / measured < 0.05
    assert mm.predict(cfg) <= 12 * 2**30  # so a 12 GiB budget admits it


def test_plan_cli_on_a_twin(run_cli, long_context_model):
    r = run_cli("inspect", long_context_model, "--plan", "--vram-budget", "2GiB", "--ctx", "65536")
    assert r.code == 0, r.err
    assert "largest context that fits with all layers" in r.out and "most layers that fit" in r.out
    assert "(over)" in r.out  # the 131072 context with f16 KV (2 GiB of cache) does not fit 2 GiB
    assert_one_line_error(run_cli("inspect", long_context_model, "--plan", "--ctx", "999999"), "--ctx")


def test_configs_predicted_over_budget_are_skipped_not_loaded(long_context_model, tmp_path):
    # A fake GPU machine with 12 GiB; the long-context model's 131072-token f16 cache alone needs 2 GiB,
    # so with a 1.5 GiB budget the big contexts are skipped before loading.
    env = Environment(**{**ENV.__dict__, "gpu_name": "Fake GPU", "vram_total_bytes": 12 << 30, "gpu_offload": True})
    truth = MemoryModel(model_facts(load_model_info(long_context_model)), on_gpu=True)
    launcher = FakeLauncher(env=env, peak_fn=lambda c: int(truth.predict(c) * 1.02), free_bytes=11 << 30)
    request = StudyRequest(model=str(long_context_model), storage=f"sqlite:///{tmp_path}/s.db", trials=15, seed=2,
                           vram_budget="1536MiB", min_headroom="64MiB", min_ctx=4096, ranges={"n_gpu_layers": (0, 5)})
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    big = BenchConfig(n_gpu_layers=5, n_ctx=131072, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=4,
                      n_threads_batch=4)
    t.study.enqueue_trial(t.space.params_of(big))  # a sampled point whose f16 cache alone is 2 GiB
    t.run()
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
    env = Environment(**{**ENV.__dict__, "gpu_name": "Fake GPU", "vram_total_bytes": 12 << 30, "gpu_offload": True})
    truth = MemoryModel(model_facts(load_model_info(long_context_model)), on_gpu=True)
    launcher = FakeLauncher(env=env, peak_fn=lambda c: int(truth.predict(c) * 1.02), free_bytes=11 << 30)
    request = StudyRequest(model=str(long_context_model), storage=f"sqlite:///{tmp_path}/s.db", trials=8, seed=3,
                           vram_budget="1536MiB", min_headroom="64MiB", min_ctx=4096)
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    assert t.space.fit_layers
    small = BenchConfig(n_gpu_layers=5, n_ctx=8192, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=4,
                        n_threads_batch=4)
    for cfg in (small, replace(small, n_ctx=131072)):
        t.study.enqueue_trial(t.space.params_of(cfg))
    t.run()
    limit = 1536 * 2**20 - 64 * 2**20
    sampled = [tr.user_attrs[RESULT_ATTR]["config"] for tr in measured_trials(t.study.trials)
               if not tr.user_attrs.get("baseline")]
    sampled = [BenchConfig.from_dict(c) for c in sampled]
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
    env = Environment(**{**ENV.__dict__, "gpu_name": "Fake GPU", "vram_total_bytes": 12 << 30, "gpu_offload": True})
    truth = MemoryModel(model_facts(load_model_info(long_context_model)), on_gpu=True)
    launcher = FakeLauncher(env=env, peak_fn=lambda c: int(truth.predict(c) * 1.02), free_bytes=1 << 30)
    request = StudyRequest(model=str(long_context_model), storage=f"sqlite:///{tmp_path}/s.db", trials=3, seed=3,
                           vram_budget="1536MiB", min_headroom="64MiB", min_ctx=4096)
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    cfg = BenchConfig(n_gpu_layers=5, n_ctx=65536, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=4,
                      n_threads_batch=4)
    t.study.enqueue_trial(t.space.params_of(cfg))
    t.run()
    [first] = [BenchConfig.from_dict(tr.user_attrs[RESULT_ATTR]["config"]) for tr in measured_trials(t.study.trials)
               if not tr.user_attrs.get("baseline")][:1]
    assert first.n_ctx == 65536 and 0 < first.n_gpu_layers < 5
    assert launcher.peak(first) <= (1 << 30) - 64 * 2**20
