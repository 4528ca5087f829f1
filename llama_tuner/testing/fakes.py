"""Fakes for tests: a launcher with a deterministic performance model standing in for llama.cpp, and a GPU.

:class:`FakeLauncher` answers like the real launcher (one TrialResult per config, raw samples kept)
from a simple model of a CPU or GPU: generation speed grows with threads and
offloaded layers, prompt speed with threads and the physical batch, memory with
context, batch and cache type. Configs can be made to fail, and every measured
config is recorded so tests can check that nothing is measured twice.
:class:`FakeGpuProbe` is a scripted GPU whose memory the test sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.measure.launcher import Launcher
from llama_tuner.measure.probe import DeviceMemory, GpuInfo, GpuProbe
from llama_tuner.measure.result import DepthCurve, Environment, Rates, Status, TrialResult, workload_rates
from llama_tuner.measure.workloads import PROBE_TOKENS, curve_depths, is_curve

_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "f32": 4.0, "bf16": 2.0}


@dataclass(kw_only=True)
class FakeLauncher(Launcher):
    """See the module docstring. ``fail`` maps a config to a Status (or None for success)."""

    env: Environment = field(default_factory=lambda: Environment(host="fakehost", cpu="Fake CPU", physical_cores=8,
                                                                  ram_total_bytes=32 << 30,
                                                                  llama_cpp_python="0.3.36", llama_cpp_build="fake"))
    n_layer: int = 32
    weights_bytes: int = 4 << 30
    kv_bytes_per_token_f16: int = 128 << 10
    free_bytes: int = 30 << 30
    noise: float = 0.01
    fail: Callable[[BenchConfig], Status | None] = lambda cfg: None
    repack_crash_reason: str | None = None  # as if llama.cpp's AMX kernels crashed here
    measured: list[BenchConfig] = field(default_factory=list)
    on_measure: Callable[[BenchConfig], None] | None = None
    peak_fn: Callable[[BenchConfig], int] | None = None  # ground truth for memory, when a test needs one

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        """Noise-free (tg, pp) of a configuration."""
        offload = min(c.n_gpu_layers, self.n_layer) / self.n_layer
        threads = min(c.n_threads, 6) + 0.2 * max(0, c.n_threads - 6) - 0.5 * max(0, c.n_threads - 8)
        tg = 5.0 * threads * (1 + 8 * offload) * (1.08 if c.flash_attn else 1.0)
        tg *= {"f16": 1.0, "q8_0": 0.97, "q4_0": 0.94}.get(c.type_v, 1.0)
        tb = min(c.n_threads_batch, 8)
        pp = 40.0 * tb * (1 + 20 * offload) * (min(c.n_ubatch, 512) / 512) ** 0.3 * (1.1 if c.flash_attn else 1.0)
        return tg, pp

    def peak(self, c: BenchConfig) -> int:
        """Modelled peak memory of a configuration (``peak_fn`` when given)."""
        if self.peak_fn is not None:
            return self.peak_fn(c)
        kv = self.kv_bytes_per_token_f16 * c.n_ctx * (_KV_BYTES[c.type_k] + _KV_BYTES[c.type_v]) / 4
        compute = c.n_ubatch * (256 << 10) * (0.6 if c.flash_attn else 1.0)
        return int(self.weights_bytes + kv + compute)

    def repack_crash(self) -> str | None:
        """The configured ``repack_crash_reason``."""
        return self.repack_crash_reason

    def gpu_free_bytes(self) -> int | None:
        """``free_bytes`` on a fake GPU machine."""
        return self.free_bytes if self.env.gpu_name else None

    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        for cfg in configs:
            try:
                cfg = cfg.resolved(cores=self.env.physical_cores)
            except InvalidConfig as exc:
                yield TrialResult(Status.INVALID, cfg, model_path, reason=str(exc), env=self.env)
                continue
            self.measured.append(cfg)
            if self.on_measure:
                self.on_measure(cfg)
            status = self.fail(cfg)
            gpu = self.env.uses_gpu  # a GPU beside a CPU build holds nothing
            common = dict(env=self.env, vram_free_before_bytes=self.free_bytes if gpu else None,
                          ram_available_before_bytes=self.free_bytes,
                          load_time_s=0.5, wall_time_s=1.0, started_at="2026-01-01T00:00:00+00:00")
            if status is None and cfg.repack and self.repack_crash_reason:
                yield TrialResult(Status.CRASH, cfg, model_path, reason=self.repack_crash_reason, **common)
                continue
            if status is not None:
                yield TrialResult(status, cfg, model_path, reason=f"fake {status.value}", **common)
                continue
            rng = random.Random(f"{cfg.settings_key()}-{len(self.measured)}")  # reproducible across runs
            tg, pp = self.speeds(cfg)

            def samples(rate: float, n: int) -> list[int]:
                return [int(1e9 * n / (rate * rng.gauss(1.0, self.noise))) for _ in range(cfg.repetitions)]

            peak = self.peak(cfg)
            pp_rates, tg_rates, curve = Rates(cfg.n_prompt, samples(pp, cfg.n_prompt)), None, None
            if is_curve(cfg.workload):  # generation 5% slower per 1,024 tokens of depth
                depths = curve_depths(cfg.n_depth, cfg.n_prompt, cfg.n_gen)
                probe = [[int(1e9 * PROBE_TOKENS * (1 + 0.05 * d / 1024) / (tg * rng.gauss(1.0, self.noise)))
                          for d in depths] for _ in range(cfg.repetitions)]
                span = [[int(1e9 * (b - a) / (pp * rng.gauss(1.0, self.noise))) for a, b in zip(depths, depths[1:])]
                        for _ in range(cfg.repetitions)]
                curve = DepthCurve(depths, PROBE_TOKENS, span, probe)
                pp_rates, tg_rates = workload_rates(cfg, [], [], curve)
            elif cfg.workload == "server":  # N streams: the aggregate grows as N^0.7
                pp_rates, tg_rates = workload_rates(cfg, samples(pp / cfg.n_parallel, cfg.n_prompt),
                                                    samples(tg * cfg.n_parallel ** -0.3, cfg.n_gen), None)
            yield TrialResult(Status.OK, cfg, model_path, pp=pp_rates, curve=curve,
                              tg=tg_rates or Rates(cfg.n_gen, samples(tg, cfg.n_gen)), context_time_s=0.1,
                              peak_rss_bytes=peak if not gpu else 600 << 20, peak_vram_bytes=peak if gpu else None,
                              **common)


@dataclass
class FakeGpuProbe(GpuProbe):
    """A scripted GPU for tests: fixed facts, and memory set by the test."""

    info: list[GpuInfo] = field(default_factory=lambda: [GpuInfo(
        index=0, name="Fake RTX 4070", driver="555.42", total_bytes=12 * 2**30, bus_width_bits=192,
        max_mem_clock_mhz=10501)])
    used: int = 512 * 2**20
    per_process: dict[int, int] = field(default_factory=dict)
    report_pids: bool = True

    def gpus(self) -> list[GpuInfo]:
        return self.info

    def memory(self, index: int) -> DeviceMemory:
        total = self.info[index].total_bytes
        return DeviceMemory(self.used, total - self.used, total)

    def process_memory(self, index: int, pid: int) -> int | None:
        return self.per_process.get(pid) if self.report_pids else None
