"""The memory model: checked against llama.cpp's own buffer report, and used to skip configs."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Callable

import pytest

from conftest import REPACK_WORKS, assert_one_line_error
from llama_tuner.measure.config import BenchConfig
from llama_tuner.testing.fakes import FakeGpuProbe, FakeLauncher
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.model.facts import ModelFacts
from llama_tuner.model.gguf_header import read_gguf_header
from llama_tuner.study.confirmation import confirm_leaders
from llama_tuner.study.memory_model import MemoryModel
from llama_tuner.model.info import load_model_info
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.study.objectives import RESULT_ATTR, measured_trials
from llama_tuner.measure.result import Environment, Status, TrialResult
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.tuner import START_ATTR
from llama_tuner.study.view import StudyView
from llama_tuner.model.twins import SHAPES, Shape, describe_shape, plan_tensors
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


# -- the truth: llama.cpp's own rules and figures, worked out here by hand, never the memory model's --------

MiB = 2**20
BLOCKS = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}  # ggml: (elements, bytes) of a block of each type


def cells(n: int) -> int:
    """llama.cpp pads the KV cache to a multiple of 256 cells."""
    return -(-n // 256) * 256


def kv_bytes(n_cells: int, n_layers: int, n_embd_k_gqa: int, n_embd_v_gqa: int, type_k: str, type_v: str) -> int:
    """llama.cpp's KV cache: n_cells x n_layers x (one K row of n_embd_k_gqa + one V row of n_embd_v_gqa), a row
    being whole ggml blocks of its type."""
    (ek, bk), (ev, bv) = BLOCKS[type_k], BLOCKS[type_v]
    return n_cells * n_layers * (n_embd_k_gqa // ek * bk + n_embd_v_gqa // ev * bv)


@dataclass(frozen=True)
class Header:
    """What llama.cpp sizes its buffers from, read from the GGUF header itself (not ModelInfo, not ModelFacts)."""

    n_layer: int
    n_head: int
    n_vocab: int
    n_embd_k_gqa: int  # head_count_kv x key_length
    n_embd_v_gqa: int
    layer_bytes: tuple[int, ...]  # the blk.{i}.* tensors of each repeating layer
    output_bytes: int  # the output layer: output_norm and output (or, tied, the token embedding again)

    @classmethod
    def read(cls, path) -> "Header":
        """The header of a GGUF file on disk (its raw key-values and tensor sizes; gguf's own reader takes a minute
        over the demo model's 262k tokens)."""
        h = read_gguf_header(path)
        arch = h.metadata["general.architecture"]
        f = {k[len(arch) + 1:]: v for k, v in h.metadata.items() if k.startswith(arch + ".")}
        tokens = h.metadata["tokenizer.ggml.tokens"]
        return cls._of(f["block_count"], f["attention.head_count"], f["attention.head_count_kv"],
                       f["attention.key_length"], f["attention.value_length"],
                       getattr(tokens, "length", None) or len(tokens),
                       {t.name: t.n_bytes for t in h.tensors})

    @classmethod
    def of_twin(cls, shape: Shape, quant: str) -> "Header":
        """The header write_synthetic_gguf writes for ``shape`` (config.json's values), without the 9 GB of data."""
        return cls._of(shape.n_layer, shape.n_head, shape.n_head_kv, shape.head_dim, shape.head_dim, shape.n_vocab,
                       {t.name: t.n_bytes for t in plan_tensors(shape, quant)})

    @classmethod
    def _of(cls, n_layer, n_head, n_head_kv, key_length, value_length, n_vocab, tensors) -> "Header":
        layers = tuple(sum(b for name, b in tensors.items() if name.startswith(f"blk.{il}.")) for il in range(n_layer))
        # A tied output (Gemma) is the token embedding, which llama.cpp loads a second time for the output layer.
        output = tensors["output_norm.weight"] + tensors.get("output.weight", tensors["token_embd.weight"])
        return cls(n_layer, n_head, n_vocab, n_head_kv * key_length, n_head_kv * value_length, layers, output)


@dataclass(frozen=True)
class GpuTruth:
    """What llama.cpp allocates for a configuration on a CUDA machine, by llama.cpp's own rules: -ngl N puts the
    output layer and the last N-1 repeating layers on the GPU (llama-model.cpp: i_gpu_start = n_layer + 1 - N), each
    with its KV cache, and the compute buffer there once any layer is; the process holds ``overhead`` more (the CUDA
    context). ``compute`` is llama.cpp's compute buffer of a configuration."""

    header: Header
    compute: Callable[[BenchConfig], int]
    overhead: int

    def buffers(self, c: BenchConfig) -> dict[str, dict[str, int]]:
        """llama.cpp's buffer report, as the child collects it from the log."""
        h = self.header
        first = min(h.n_layer, max(0, h.n_layer + 1 - c.n_gpu_layers))  # the first repeating layer on the GPU
        on_gpu = h.n_layer - first
        kv = [kv_bytes(cells(c.n_ctx), n, h.n_embd_k_gqa, h.n_embd_v_gqa, c.type_k, c.type_v) for n in (on_gpu, first)]
        weights = sum(h.layer_bytes[first:]) + (h.output_bytes if c.n_gpu_layers > 0 else 0)
        return {"model": {"CUDA0": weights}, "kv": {"CUDA0": kv[0], "CPU": kv[1]},
                "compute": {"CUDA0" if c.n_gpu_layers > 0 else "CPU": self.compute(c)}}

    def peak(self, c: BenchConfig) -> int:
        """The process's peak on the GPU: llama.cpp's GPU buffers and the overhead."""
        return self.overhead + sum(b.get("CUDA0", 0) for b in self.buffers(c).values())


# The long-context test model's compute buffer as llama.cpp's dry runs report it (llama-cpp-python 0.3.36, CPU
# build, 2026-12-02; SubprocessLauncher.dry_run over n_ctx 4096-131072, n_ubatch 128-2048): per token of the
# ubatch, 2 bytes per KV cell (the f16 mask) and 24 KiB with flash attention, 36 bytes per cell (with the f32
# scores of 8 heads) and 28 KiB without. Some of those reports, in MiB:
LONG_MODEL_COMPUTE_LOG = {(4096, 128, False): 21.5, (131072, 128, False): 579.5, (65536, 512, False): 1166.01,
                          (131072, 2048, False): 9272.04, (4096, 128, True): 4.0, (16384, 512, True): 28.01,
                          (131072, 512, True): 140.01, (65536, 2048, True): 304.05}
# What the H200 process held beyond the Mistral twin's weights, KV and logits (../shared/device/README.md: 11,617
# MiB at 16k and 9,377 at 2k, all layers: 524 and 538 MiB more), for a CUDA context.
CUDA_OVERHEAD = 524 * MiB


def long_model_compute(c: BenchConfig) -> int:
    """The long-context model's compute buffer by the rule its dry runs follow (LONG_MODEL_COMPUTE_LOG)."""
    n_kv = cells(c.n_ctx)
    return c.n_ubatch * ((2 * n_kv + 24 * 1024) if c.flash_attn else (36 * n_kv + 28 * 1024))


def test_the_truth_reproduces_llama_cpps_reports_of_the_long_context_model():
    for (n_ctx, n_ubatch, fa), logged in LONG_MODEL_COMPUTE_LOG.items():
        c = BenchConfig(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, flash_attn=fa)
        assert long_model_compute(c) / MiB == pytest.approx(logged, abs=0.06)
    # and its dry runs' KV: 2048 MiB at 131072 cells with f16, 1088 MiB with q8_0, on 4 layers of 8 x 128
    assert kv_bytes(131072, 4, 1024, 1024, "f16", "f16") == 2048 * MiB
    assert kv_bytes(131072, 4, 1024, 1024, "q8_0", "q8_0") == 1088 * MiB


# llama.cpp's `llama_kv_cache: size = ...` lines for the demo model (Gemma 3 270M Q4_K_M, llama-cpp-python 0.3.36,
# CPU build, this VM, 2026-12-02): the cache of the 3 global layers, then that of the 15 sliding-window ones, MiB.
DEMO_KV_LOG = [  # n_ctx, n_ubatch, cache type, swa_full, (global MiB, sliding-window MiB)
    (4096, 512, "f16", False, (12.00, 15.00)),
    (8192, 512, "q8_0", False, (12.75, 7.97)),
    (2048, 512, "f16", True, (6.00, 30.00)),
    (16384, 512, "q4_0", False, (13.50, 4.22)),
    (32768, 128, "f16", False, (96.00, 11.25)),
    (40000, 256, "q8_0", False, (62.55, 5.98)),  # 40192 cells
]


@pytest.mark.parametrize("n_ctx,n_ubatch,kv,swa_full,logged", DEMO_KV_LOG)
def test_the_kv_cache_is_what_llama_cpp_logs_for_the_demo_model(demo_model_path, n_ctx, n_ubatch, kv, swa_full,
                                                                logged):
    h = Header.read(demo_model_path)
    n_swa = read_gguf_header(demo_model_path).metadata["gemma3.attention.sliding_window"]
    n_global = len(range(5, h.n_layer, 6))  # llama.cpp's Gemma 3: every 6th layer attends to the whole context
    swa_cells = cells(n_ctx) if swa_full else cells(min(n_ctx, n_swa + n_ubatch))
    by_hand = [kv_bytes(cells(n_ctx), n_global, h.n_embd_k_gqa, h.n_embd_v_gqa, kv, kv),
               kv_bytes(swa_cells, h.n_layer - n_global, h.n_embd_k_gqa, h.n_embd_v_gqa, kv, kv)]
    assert [b / MiB for b in by_hand] == pytest.approx(logged, abs=0.005)  # the log's 2 decimals
    cfg = BenchConfig(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, flash_attn=kv != "f16" or swa_full,
                      type_k=kv, type_v=kv, swa_full=swa_full)
    assert MemoryModel(ModelFacts.of(load_model_info(demo_model_path)), on_gpu=False).allocations(cfg).host_kv \
        == sum(by_hand)


@pytest.mark.parametrize("n_gpu_layers", range(6))
def test_weights_and_kv_go_to_the_gpu_by_llama_cpps_offload_order(long_context_model, n_gpu_layers):
    h = Header.read(long_context_model)
    cfg = BenchConfig(n_gpu_layers=n_gpu_layers, n_ctx=65536, n_batch=512, n_ubatch=512, flash_attn=True,
                      type_k="q8_0", type_v="q8_0")
    truth = GpuTruth(h, long_model_compute, 0).buffers(cfg)
    a = MemoryModel(ModelFacts.of(load_model_info(long_context_model)), on_gpu=True).allocations(cfg)
    assert (a.gpu_weights, a.gpu_kv, a.host_kv) == (truth["model"]["CUDA0"], truth["kv"]["CUDA0"], truth["kv"]["CPU"])
    assert a.gpu_kv + a.host_kv == 544 * MiB  # its dry run: 1088 MiB of q8_0 at 131072 cells, half at 65536


FAKE_GPU = Environment(**{**ENV.__dict__, "gpu_name": "Fake GPU", "vram_total_bytes": 12 << 30, "gpu_offload": True})
POINT = BenchConfig(n_gpu_layers=5, n_ctx=8192, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=4,
                    n_threads_batch=4)


@dataclass(kw_only=True)
class TruthLauncher(FakeLauncher):
    """A fake GPU machine whose peaks and buffer reports (measured and dry runs) are ``truth``'s."""

    truth: GpuTruth

    def __post_init__(self):
        self.peak_fn = self.truth.peak

    def measure(self, model_path, configs):
        for r in super().measure(model_path, configs):
            if r.ok:
                r.buffers = self.truth.buffers(r.config)
            yield r

    def dry_run(self, model_path, configs):
        return [TrialResult(Status.OK, c, model_path, buffers=self.truth.buffers(c)) for c in configs]


def fake_gpu_study(model, tmp_path, free_bytes, points=(), **request):
    """A study on a fake 12 GiB GPU with a 1.5 GiB budget, whose peaks are llama.cpp's (GpuTruth) for the long-context
    model, with ``points`` (configs) enqueued first."""
    truth = GpuTruth(Header.read(model), long_model_compute, CUDA_OVERHEAD)
    launcher = TruthLauncher(env=FAKE_GPU, truth=truth, free_bytes=free_bytes)
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
    loaded = {c.settings_key() for c in launcher.measured}
    for tr in skipped:
        r = tr.user_attrs[RESULT_ATTR]
        cfg = BenchConfig.from_dict(r["config"])
        assert r["status"] == "invalid" and r["predicted_peak_bytes"] > 1536 * 2**20
        assert tr.constraints["memory_budget"] > 0
        assert launcher.peak(cfg) > 1536 * 2**20 and cfg.settings_key() not in loaded  # rightly never loaded
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


# ../shared/device/README.md: the H200 process with the Mistral-Small-24B Q2_K twin, every layer, a 16384 context
# and flash attention held 11,617 MiB.
MISTRAL_16K = BenchConfig(n_gpu_layers=41, n_ctx=16384, n_batch=2048, n_ubatch=512, flash_attn=True, n_threads=8,
                          n_threads_batch=8)
MISTRAL_16K_MIB = 11_617


def mistral_truth() -> GpuTruth:
    """The Mistral twin on the H200 by llama.cpp's rules, anchored on MISTRAL_16K_MIB: its compute buffer is the
    logits (n_ubatch x n_vocab, f32) or, where larger, the attention (the KQ mask of every cell, f16 with flash
    attention; without, f32 and the f32 scores of every head), since llama.cpp's graph allocator reuses the one's
    memory for the other (the demo model's dry runs: 514.5 MiB without flash attention at 32768 tokens, its logits
    512 MiB and its attention 320); the process holds what the measurement has beyond that and the weights and KV."""
    h = Header.of_twin(SHAPES["mistral-small-24b"], "q2_k")

    def compute(c: BenchConfig) -> int:
        n_kv = cells(c.n_ctx)
        attention = n_kv * (2 if c.flash_attn else 4 + 4 * h.n_head)
        return c.n_ubatch * max(4 * h.n_vocab, attention)

    return GpuTruth(h, compute, MISTRAL_16K_MIB * MiB - GpuTruth(h, compute, 0).peak(MISTRAL_16K))


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
    # twin's header, a 12 GiB budget, --min-ctx 16384 and the reference user's baseline. Peaks are llama.cpp's
    # (mistral_truth: the H200's 11,617 MiB at 16k, other configurations by llama.cpp's rules from there) off by up
    # to +-2%, and speeds as measured there. With layers sampled, 13 trials found no full offload at 16k; fitted,
    # the fastest preset must be one.
    info = replace(describe_shape(SHAPES["mistral-small-24b"], "q2_k"), path=str(tiny_model))
    monkeypatch.setattr("llama_tuner.study.session.load_model_info", lambda path: info)
    truth = mistral_truth()
    assert truth.peak(MISTRAL_16K) == MISTRAL_16K_MIB * MiB
    env = Environment(**{**FAKE_GPU.__dict__, "vram_total_bytes": 140 << 30, "physical_cores": 16})

    class Spread(GpuTruth):
        def peak(self, c):
            return int(super().peak(c) * (1 + 0.02 * ((zlib.crc32(c.settings_key().encode()) % 201) - 100) / 100))

    launcher = TruthLauncher(env=env, n_layer=41, truth=Spread(truth.header, truth.compute, truth.overhead),
                             free_bytes=139 << 30)
    launcher.speeds = h200_speeds
    request = StudyRequest(model=str(tiny_model), storage=f"sqlite:///{tmp_path}/s.db", trials=12, seed=0,
                           vram_budget="12GiB", min_ctx=16384, baseline_flags="llama-server --ctx-size 2048 "
                           "--batch-size 512 --n-gpu-layers 49 --threads 8 --parallel 1")
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    t.run()
    confirm_leaders(t)
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
