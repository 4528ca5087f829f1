"""TrialResult: the one record that crosses every seam (measure -> study -> tracking -> export).

It keeps the raw per-repetition timings, not only means, so any later stage can
recompute statistics, test for ties, or plot distributions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from tuner.measure.config import BenchConfig


class Status(str, Enum):
    """How a measurement ended."""

    OK = "ok"
    OOM = "oom"
    CRASH = "crash"
    TIMEOUT = "timeout"
    INVALID = "invalid"
    LOAD_ERROR = "load_error"


@dataclass
class Rates:
    """One test's repetitions: tokens per repetition and the time each took (ns)."""

    n_tokens: int
    samples_ns: list[int]

    @property
    def rates(self) -> list[float]:
        """Tokens per second of each repetition (as llama-bench computes them)."""
        return [1e9 * self.n_tokens / ns for ns in self.samples_ns if ns > 0]

    @property
    def mean(self) -> float:
        """Mean of the per-repetition rates (t/s)."""
        r = self.rates
        return statistics.fmean(r) if r else math.nan

    @property
    def stddev(self) -> float:
        """Sample standard deviation of the per-repetition rates (0 for one repetition)."""
        r = self.rates
        return statistics.stdev(r) if len(r) > 1 else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation: stddev / mean."""
        m = self.mean
        return self.stddev / m if m else math.nan


@dataclass(kw_only=True)
class Environment:
    """Where a result was measured: host, hardware and software versions."""

    host: str = ""
    cpu: str = ""
    physical_cores: int = 0
    ram_total_bytes: int = 0
    gpu_name: str | None = None
    gpu_driver: str | None = None
    vram_total_bytes: int | None = None
    gpu_peak_bandwidth_gbs: float | None = None
    host_read_gbs: float | None = None
    llama_cpp_python: str = ""
    llama_cpp_build: str = ""
    gpu_offload: bool = False
    system_info: str = ""

    def hardware_key(self) -> str:
        """What makes two machines measure alike: GPU model and memory, else the CPU (not the
        measured bandwidth, which varies from run to run)."""
        if self.gpu_name:
            return f"gpu:{self.gpu_name}:{self.vram_total_bytes}"
        return f"cpu:{self.cpu}:{self.physical_cores}"


@dataclass(frozen=True)
class Interleaved:
    """How a confirmation was measured: in ``batch`` with other candidates, ``per_round`` repetitions at a
    time, taking turns. Samples ``[r * per_round, (r + 1) * per_round)`` of every member of a batch were
    measured in the same round r, so a slow or fast period of the machine hits them all alike."""

    batch: str
    per_round: int


@dataclass
class TrialResult:
    """The outcome of measuring one BenchConfig on one model file."""

    status: Status
    config: BenchConfig
    model_path: str
    _: KW_ONLY
    reason: str = ""
    exit_code: int | None = None
    signal: str | None = None
    log_tail: str = ""
    pp: Rates | None = None
    tg: Rates | None = None
    load_time_s: float | None = None
    context_time_s: float | None = None
    wall_time_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    vram_free_before_bytes: int | None = None
    ram_available_before_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    buffers: dict[str, dict[str, int]] | None = None
    base_rss_bytes: int | None = None
    bandwidth: dict[str, float] | None = None
    env: Environment = field(default_factory=Environment)
    started_at: str = ""
    interleaved: Interleaved | None = None
    loaded_model: dict[str, Any] | None = None  # llama.cpp's type, size and n_params of the model (llama-bench's)

    @property
    def ok(self) -> bool:
        """True when the measurement completed."""
        return self.status == Status.OK

    @property
    def tg_mean(self) -> float | None:
        """Mean generation rate (t/s), if measured."""
        return self.tg.mean if self.tg and self.tg.samples_ns else None

    @property
    def pp_mean(self) -> float | None:
        """Mean prompt-processing rate (t/s), if measured."""
        return self.pp.mean if self.pp and self.pp.samples_ns else None

    def allocated_bytes(self, device: str) -> int | None:
        """What llama.cpp allocated on ``device`` ("gpu" or "host"): model, KV and compute buffers."""
        if not self.buffers:
            return None
        total = 0
        for kind in self.buffers.values():
            for name, size in kind.items():
                on_gpu = name.startswith(("CUDA", "ROCm", "Vulkan", "Metal", "SYCL")) and "Host" not in name
                total += size if on_gpu == (device == "gpu") else 0
        return total

    @property
    def committed_rss_bytes(self) -> int | None:
        """RSS once every host buffer is in use: the interpreter's baseline plus llama.cpp's host buffers.

        A benchmark at depth 0 touches little of a large KV cache, so its peak RSS
        understates what the context needs once it fills; this figure does not.
        """
        host = self.allocated_bytes("host")
        return None if host is None or self.base_rss_bytes is None else self.base_rss_bytes + host

    @property
    def peak_memory_bytes(self) -> int | None:
        """The memory that limits this machine: VRAM where a GPU was used, else RAM.

        RAM is the larger of the measured peak RSS and the committed RSS (see above).
        """
        if self.peak_vram_bytes is not None and self.env.gpu_name:
            return self.peak_vram_bytes
        values = [v for v in (self.peak_rss_bytes, self.committed_rss_bytes) if v is not None]
        return max(values) if values else None

    @property
    def headroom_bytes(self) -> int | None:
        """Memory left free at the peak: free-before minus peak (VRAM on GPU, RAM otherwise)."""
        if self.env.gpu_name and self.peak_vram_bytes is not None and self.vram_free_before_bytes is not None:
            return self.vram_free_before_bytes - self.peak_vram_bytes
        if self.peak_rss_bytes is not None and self.ram_available_before_bytes is not None:
            return self.ram_available_before_bytes - self.peak_rss_bytes
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reverses it exactly."""
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialResult":
        """Rebuild a TrialResult from :meth:`to_dict` output."""
        d = dict(d)
        d["status"] = Status(d["status"])
        d["config"] = BenchConfig.from_dict(d["config"])
        for key in ("pp", "tg"):
            if d.get(key) is not None:
                d[key] = Rates(**d[key])
        d["env"] = Environment(**d.get("env", {}))
        if d.get("interleaved"):
            d["interleaved"] = Interleaved(**d["interleaved"])
        return cls(**d)


def merge_rounds(parts: list[TrialResult], interleaved: Interleaved) -> TrialResult:
    """One result from the rounds of one configuration measured in turns with others (see Interleaved).

    Samples are concatenated in round order and peaks are the largest seen. If any round
    did not complete, that failure is the result: a configuration that crashes once is
    not confirmed.
    """
    failed = next((p for p in parts if not p.ok), None)
    if failed is not None:
        return replace(failed, interleaved=interleaved)

    def joined(name: str) -> Rates | None:
        rates = [getattr(p, name) for p in parts]
        if any(r is None for r in rates):
            return None
        return Rates(rates[0].n_tokens, [ns for r in rates for ns in r.samples_ns])

    def largest(name: str) -> int | None:
        values = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return max(values) if values else None

    first = parts[0]
    return replace(first, config=replace(first.config, repetitions=sum(p.config.repetitions for p in parts)),
                   pp=joined("pp"), tg=joined("tg"), peak_rss_bytes=largest("peak_rss_bytes"),
                   peak_vram_bytes=largest("peak_vram_bytes"),
                   wall_time_s=sum(p.wall_time_s or 0.0 for p in parts), interleaved=interleaved)
