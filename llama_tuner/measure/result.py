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

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.scenarios import Answer, AnswerSummary, passes, summarize
from llama_tuner.measure.workloads import SCENARIOS, answer_ns, is_curve


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


@dataclass
class DepthCurve:
    """A depth curve's raw times, per repetition (see :mod:`llama_tuner.measure.workloads`): ``span_ns[r][i]`` filled
    the context from ``depths[i]`` to ``depths[i + 1]``; ``probe_ns[r][i]`` generated ``probe_tokens`` at
    ``depths[i]``."""

    depths: list[int]
    probe_tokens: int
    span_ns: list[list[int]]
    probe_ns: list[list[int]]

    def tg_rates(self) -> list[float]:
        """Mean generation t/s at each depth, over the repetitions."""
        return [statistics.fmean(1e9 * self.probe_tokens / r[i] for r in self.probe_ns)
                for i in range(len(self.depths))]

    def points(self) -> list[dict[str, float]]:
        """The curve as JSON exports it: ``[{"depth": d, "tg_tps": t/s}, ...]``."""
        return [{"depth": d, "tg_tps": tg} for d, tg in zip(self.depths, self.tg_rates())]

    def pp_rates(self) -> list[float]:
        """Mean prompt t/s of each span (filling up to ``depths[i + 1]``), over the repetitions."""
        return [statistics.fmean(1e9 * (self.depths[i + 1] - self.depths[i]) / r[i] for r in self.span_ns)
                for i in range(len(self.depths) - 1)]


def workload_rates(config: BenchConfig, pp_ns: list[int], tg_ns: list[int],
                   curve: DepthCurve | None) -> tuple[Rates | None, Rates | None]:
    """(pp, tg) of a measurement: llama-bench's tests as measured; a depth curve's prompt and answer (the
    prompt's tokens over its time, the answer's tokens over its integrated time); a server's aggregate."""
    if curve is not None:
        times = [answer_ns(curve.depths, spans, probes, curve.probe_tokens, config.n_depth, config.n_prompt,
                           config.n_gen) for spans, probes in zip(curve.span_ns, curve.probe_ns)]
        return Rates(config.n_prompt, [t[0] for t in times]), Rates(config.n_gen, [t[1] for t in times])
    n = config.n_parallel if config.workload == "server" else 1
    return (Rates(n * config.n_prompt, pp_ns) if pp_ns else None, Rates(n * config.n_gen, tg_ns) if tg_ns else None)


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
    engine: str = "child"  # what measured: the child (llama-cpp-python) or llama-server (--engine llama-server)
    llama_server: str = ""  # that llama-server's --version, where it measured

    @property
    def uses_gpu(self) -> bool:
        """True when trials run on the GPU: there is one and this llama.cpp build offloads to it. A GPU beside
        a CPU build is not used: memory is then RAM, budget and headroom included."""
        return bool(self.gpu_name and self.gpu_offload)

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
    curve: DepthCurve | None = None  # the raw depth curve of a chat, reasoning, long or custom workload
    overridden: dict[str, dict[str, Any]] | None = None  # tensors llama.cpp placed by override: {name: {buffer, bytes}}
    # speculative decoding (llama-server): tokens drafted and accepted over every tg repetition, as its timings say
    draft_n: int | None = None
    draft_accepted: int | None = None
    answers: list[Answer] | None = None  # scenarios: every request's answer (text and figures), per repetition

    @property
    def ok(self) -> bool:
        """True when the measurement completed."""
        return self.status == Status.OK

    @property
    def acceptance(self) -> float | None:
        """The share of drafted tokens the model accepted (speculative decoding), None where nothing was drafted."""
        return self.draft_accepted / self.draft_n if self.draft_n else None

    @property
    def tg_mean(self) -> float | None:
        """Mean generation rate (t/s), if measured."""
        return self.tg.mean if self.tg and self.tg.samples_ns else None

    @property
    def pp_mean(self) -> float | None:
        """Mean prompt-processing rate (t/s), if measured."""
        return self.pp.mean if self.pp and self.pp.samples_ns else None

    @property
    def answer(self) -> Rates | None:
        """Answers per second of each repetition of a chat, reasoning, long or custom workload: one answer over
        the prompt's and the generation's time (its inverse is :attr:`time_to_answer_s`). Of the scenarios: one
        answer over the median seconds per answer of each pass over the file."""
        if self.config.workload == SCENARIOS:
            if not self.answers:
                return None
            return Rates(1, [int(1e9 * statistics.median(a.seconds for a in p)) for p in passes(self.answers)])
        if not is_curve(self.config.workload) or not (self.pp and self.tg):
            return None
        return Rates(1, [a + b for a, b in zip(self.pp.samples_ns, self.tg.samples_ns)])

    @property
    def answer_summary(self) -> AnswerSummary | None:
        """The scenarios' figures: seconds per answer (median, p90), tokens written, capped share, drafts."""
        return summarize(self.answers) if self.answers else None

    @property
    def time_to_answer_s(self) -> float | None:
        """Mean seconds from sending the prompt to the answer's last token (curve workloads); the median seconds
        per answer over the file (scenarios)."""
        if self.config.workload == SCENARIOS:
            s = self.answer_summary
            return s.median_s if s else None
        a = self.answer
        return statistics.fmean(a.samples_ns) / 1e9 if a and a.samples_ns else None

    @property
    def stream_tg_mean(self) -> float | None:
        """Generation t/s each stream sees: the aggregate over ``n_parallel`` (server workload)."""
        return self.tg_mean / self.config.n_parallel if self.tg_mean is not None else None

    def allocated_bytes(self, device: str, kinds: tuple[str, ...] = ("model", "kv", "compute")) -> int | None:
        """What llama.cpp allocated on ``device`` ("gpu" or "host") in buffers of ``kinds`` (model, KV, compute)."""
        if not self.buffers:
            return None
        total = 0
        for kind in kinds:
            for name, size in self.buffers.get(kind, {}).items():
                on_gpu = name.startswith(("CUDA", "ROCm", "Vulkan", "Metal", "MTL", "SYCL")) and "Host" not in name
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
        if self.peak_vram_bytes is not None and self.env.uses_gpu:
            return self.peak_vram_bytes
        values = [v for v in (self.peak_rss_bytes, self.committed_rss_bytes) if v is not None]
        return max(values) if values else None

    @property
    def headroom_bytes(self) -> int | None:
        """Memory left free at the peak: free-before minus peak (VRAM on GPU, RAM otherwise)."""
        if self.env.uses_gpu and self.peak_vram_bytes is not None and self.vram_free_before_bytes is not None:
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
        if d.get("curve"):
            d["curve"] = DepthCurve(**d["curve"])
        if d.get("answers"):
            d["answers"] = [Answer.from_dict(a) for a in d["answers"]]
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
    curve = None
    if first.curve is not None:
        curve = replace(first.curve, span_ns=[r for p in parts for r in p.curve.span_ns],
                        probe_ns=[r for p in parts for r in p.curve.probe_ns])
    answers, offset = [], 0
    for p in parts:  # each part's passes follow the last part's
        answers += [replace(a, repetition=offset + a.repetition) for a in p.answers or []]
        offset += p.config.repetitions
    drafted = [p.draft_n for p in parts if p.draft_n is not None]
    accepted = [p.draft_accepted for p in parts if p.draft_accepted is not None]
    return replace(first, config=replace(first.config, repetitions=sum(p.config.repetitions for p in parts)),
                   pp=joined("pp"), tg=joined("tg"), curve=curve, draft_n=sum(drafted) if drafted else None,
                   draft_accepted=sum(accepted) if accepted else None, answers=answers or None,
                   peak_rss_bytes=largest("peak_rss_bytes"),
                   peak_vram_bytes=largest("peak_vram_bytes"),
                   wall_time_s=sum(p.wall_time_s or 0.0 for p in parts), interleaved=interleaved)
