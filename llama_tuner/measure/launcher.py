"""Run measurements in isolated child processes and turn every ending into a TrialResult.

:class:`SubprocessLauncher` starts ``python -m llama_tuner.measure.child`` (a fresh interpreter,
so a crash, an abort or an out-of-memory kill in llama.cpp cannot touch the
caller), feeds it a job, reads its events from a pipe, enforces a per-run timeout,
samples its memory from a background thread, and classifies the end:

============  ==============================================================
ok            the child reported timings
oom           out-of-memory in llama.cpp's log, or a SIGKILL we did not send
crash         a signal (segfault, abort) or a non-zero exit without a result
timeout       no result within ``timeout_s``; the child's group is killed
load_error    llama.cpp refused the model file or the context
invalid       rejected before launch (see :class:`llama_tuner.measure.config.InvalidConfig`)
============  ==============================================================

A child that dies mid-job takes only its current run with it: the runs after it
are measured by a new child.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from itertools import groupby
from typing import Any, Iterator, Mapping, Sequence

import psutil

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.measure.environment import machine_environment
from llama_tuner.measure.llama_cpp_pin import require_llama_cpp_python
from llama_tuner.measure.peak_memory import MemorySampler
from llama_tuner.measure.probe import GpuProbe, NoGpuProbe, visible_gpu_index
from llama_tuner.measure.repack_check import CHECK, check_model, cpu_has_amx, repack_crash_reason
from llama_tuner.model.gguf_header import read_gguf_header
from llama_tuner.measure.result import DepthCurve, Environment, Status, TrialResult, workload_rates

_CHECKED: dict[str, str | None] = {}  # the repack check's answer, once per process
OOM_PATTERN = re.compile(r"out of memory|cannot allocate memory|cudaMalloc failed|failed to allocate|"
                         r"unable to allocate|std::bad_alloc|MemoryError|ErrorOutOfDeviceMemory", re.IGNORECASE)
ROOT_CAUSE_PATTERN = re.compile(r"error|assert|fault", re.IGNORECASE)
REASON_PATTERN = re.compile(r"error|assert|abort|fault|failed|exception|killed", re.IGNORECASE)
LOG_TAIL_CHARS = 4000
EXIT_GRACE_S = 10.0  # how long a child that has sent its results may take to exit


class Launcher(ABC):
    """Measures configurations of one model file, one TrialResult per config, in order."""

    @abstractmethod
    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        """Yield one result per config; never raises for a failed measurement."""

    def dry_run(self, model_path: str, configs: Sequence[BenchConfig]) -> list[TrialResult]:
        """What llama.cpp would allocate for each configuration, without allocating (empty: not supported)."""
        return []

    def repack_crash(self) -> str | None:
        """Why configurations with repack on cannot run on this machine, or None where they can."""
        return None

    def gpu_free_bytes(self) -> int | None:
        """Memory free on the GPU that measurements use, now (None without one)."""
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class SubprocessLauncher(Launcher):
    """The real launcher: one child per group of configs that share the model settings."""

    def __init__(self, probe: GpuProbe, *, timeout_s: float = 600.0, gpu_index: int | None = None,
                 extra_env: dict[str, str] | None = None, sample_interval: float | None = None,
                 ram_limit_bytes: int | None = None, exit_grace_s: float = EXIT_GRACE_S):
        """Measure with GPU ``probe``; a run may take ``timeout_s``, a child that has sent every result
        ``exit_grace_s`` more to exit before it is killed; ``ram_limit_bytes`` caps its address space.

        Raises:
            UserError: the installed llama-cpp-python is not the release the child is written for.
        """
        require_llama_cpp_python()
        self.probe = probe
        self.exit_grace_s = exit_grace_s
        self.ram_limit_bytes = ram_limit_bytes
        self.timeout_s = timeout_s
        self.gpu_index = gpu_index if gpu_index is not None else (visible_gpu_index(probe) if probe.gpus() else None)
        self.extra_env = extra_env or {}
        # The child reports its exact peak RSS itself; polling is for VRAM (and a backstop).
        # Polling often on a CPU-only machine steals time from llama.cpp's threads.
        self.sample_interval = sample_interval or (0.05 if self.gpu_index is not None else 0.5)

    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        return self._results(model_path, configs, dry_run=False)

    def dry_run(self, model_path: str, configs: Sequence[BenchConfig]) -> list[TrialResult]:
        """What llama.cpp would allocate for each configuration, from a load with ``no_alloc`` (metadata only,
        allocations simulated): results with ``buffers`` and no timings, in one child per model setting."""
        return list(self._results(model_path, configs, dry_run=True))

    def _results(self, model_path: str, configs: Sequence[BenchConfig], dry_run: bool) -> Iterator[TrialResult]:
        """One result per config, in order: invalid ones at once, the rest measured (or their allocations
        simulated) in children, consecutive configs with the same model settings sharing one."""
        ready: dict[int, TrialResult] = {}
        valid: list[tuple[int, BenchConfig]] = []
        for i, cfg in enumerate(configs):
            if cfg.speculative:
                ready[i] = TrialResult(Status.INVALID, cfg, model_path, started_at=_now(),
                                       reason=f"spec_type {cfg.spec_type}: speculative decoding is llama-server's; "
                                              "measure it with --engine llama-server")
                continue
            try:
                valid.append((i, cfg.resolved()))  # the launcher is the last gate before llama.cpp
            except InvalidConfig as exc:
                ready[i] = TrialResult(Status.INVALID, cfg, model_path, reason=str(exc), started_at=_now())
        next_out = 0
        # Consecutive configs with the same model settings share one loaded model.
        for _, group in groupby(valid, key=lambda ic: json.dumps(ic[1].model_params(), sort_keys=True)):
            pending = list(group)
            while pending:
                results = self._run_child(model_path, pending, dry_run=dry_run)
                ready.update((i, r) for (i, _), r in zip(pending, results))
                pending = pending[len(results):]
                while next_out in ready:
                    yield ready.pop(next_out)
                    next_out += 1
        while next_out in ready:
            yield ready.pop(next_out)
            next_out += 1

    def repack_crash(self) -> str | None:
        """The real check of :mod:`llama_tuner.measure.repack_check`, once per process: where the CPU lists AMX,
        a generated two-layer model measured with repack on, on the CPU."""
        if "repack" not in _CHECKED:
            reason = None
            if cpu_has_amx():
                check = SubprocessLauncher(NoGpuProbe(), timeout_s=120)
                on, off = check.measure(str(check_model()), [replace(CHECK, repack=r) for r in (True, False)])
                reason = repack_crash_reason(on, off)
            _CHECKED["repack"] = reason
        return _CHECKED["repack"]

    def gpu_free_bytes(self) -> int | None:
        """What NVML reports free on this launcher's GPU (None without one)."""
        return self.probe.memory(self.gpu_index).free if self.gpu_index is not None else None

    def _run_child(self, model_path: str, runs: list[tuple[int, BenchConfig]],
                   dry_run: bool = False) -> list[TrialResult]:
        """Measure ``runs`` in one child (or only simulate their allocations); returns results for a prefix
        of them (at least one)."""
        env = machine_environment(self.probe, self.gpu_index)
        before = self.probe.memory(self.gpu_index) if self.gpu_index is not None else None
        ram_before = int(psutil.virtual_memory().available)
        job = {"model_path": os.path.abspath(model_path), "model_params": runs[0][1].model_params(),
               "runs": [{"index": i, "config": cfg.to_dict()} for i, cfg in runs], "dry_run": dry_run}
        log = tempfile.TemporaryFile(mode="w+", prefix="llama-tuner-child-")
        read_fd, write_fd = os.pipe()
        started, t_spawn = _now(), time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "llama_tuner.measure.child", "--events-fd", str(write_fd)],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(write_fd,),
                                env=child_environment(os.environ, self.extra_env), start_new_session=True, text=True,
                                preexec_fn=self._prepare_child)
        os.close(write_fd)
        events: queue.Queue = queue.Queue()
        threading.Thread(target=_read_events, args=(read_fd, events), daemon=True).start()
        sampler = MemorySampler(proc.pid, probe=self.probe, gpu_index=self.gpu_index,
                                vram_used_before=before.used if before else None,
                                interval=self.sample_interval).start()
        results: list[TrialResult] = []
        load_time, timed_out, t_run, base_rss, loaded_model, overridden = None, False, t_spawn, None, None, None
        try:
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            while len(results) < len(runs):
                try:
                    ev = events.get(timeout=max(0.0, t_run + self.timeout_s - time.monotonic()))
                except queue.Empty:
                    timed_out = True
                    _kill_group(proc)
                    break
                if ev is None:
                    break
                kind = ev["event"]
                if kind == "env":
                    base_rss = ev["rss"]
                    env.llama_cpp_python, env.llama_cpp_build = ev["llama_cpp_python"], ev["llama_cpp_build"]
                    env.gpu_offload, env.system_info = ev["gpu_offload"], ev["system_info"]
                elif kind == "loaded":
                    load_time, loaded_model = ev["load_time_s"], ev.get("loaded_model")
                    overridden = _with_bytes(model_path, ev.get("overridden") or {})
                elif kind == "result":
                    peaks = sampler.window()
                    peaks.add_rss(ev["rss"])
                    i, cfg = runs[len(results)]
                    results.append(self._from_event(ev, cfg, model_path, env, peaks, load_time, before, ram_before,
                                                    started, log))
                    results[-1].base_rss_bytes = base_rss
                    results[-1].loaded_model = loaded_model
                    results[-1].overridden = overridden
                    results[-1].wall_time_s = time.monotonic() - t_run  # the first run's includes the spawn
                    t_run, started = time.monotonic(), _now()
        finally:
            if timed_out:
                _kill_group(proc)
            code = _wait_or_kill(proc, self.exit_grace_s)
            sampler.stop()
        if len(results) < len(runs):
            peaks = sampler.window()
            i, cfg = runs[len(results)]
            status, reason = classify_death(code, timed_out, self.timeout_s, _tail(log))
            results.append(TrialResult(status, cfg, model_path, reason=reason, exit_code=code if code >= 0 else None,
                                       signal=signal.Signals(-code).name if code < 0 else None, log_tail=_tail(log),
                                       load_time_s=load_time, wall_time_s=time.monotonic() - t_run,
                                       peak_rss_bytes=peaks.rss or None, peak_vram_bytes=peaks.vram,
                                       vram_free_before_bytes=before.free if before else None,
                                       ram_available_before_bytes=ram_before, env=env, started_at=started))
        log.close()
        return results

    def _prepare_child(self) -> None:
        """In the child before exec: die with the parent, and cap memory where a limit is set."""
        import ctypes
        import resource

        try:  # PR_SET_PDEATHSIG: a killed tuner must not leave a child measuring in the background
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
        except OSError:
            pass
        if self.ram_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (self.ram_limit_bytes, self.ram_limit_bytes))

    def _from_event(self, ev: dict[str, Any], cfg: BenchConfig, model_path: str, env: Environment, peaks,
                    load_time, before, ram_before, started: str, log) -> TrialResult:
        status, reason = Status(ev["status"]), ev.get("reason", "")
        tail = "" if status == Status.OK else _tail(log)
        if tail:
            if OOM_PATTERN.search(tail):
                status = Status.OOM
            evidence = evidence_line(tail)
            reason = f"{reason}: {evidence}" if evidence else reason
        curve = DepthCurve(**ev["curve"]) if ev.get("curve") else None
        pp, tg = workload_rates(cfg, ev.get("pp_ns") or [], ev.get("tg_ns") or [], curve)
        return TrialResult(
            status, cfg, model_path, reason=reason, log_tail=tail, pp=pp, tg=tg, curve=curve,
            load_time_s=ev.get("load_time_s", load_time), context_time_s=ev.get("context_time_s"),
            buffers=ev.get("buffers"),
            peak_rss_bytes=peaks.rss or None, peak_vram_bytes=peaks.vram,
            vram_free_before_bytes=before.free if before else None, ram_available_before_bytes=ram_before,
            env=Environment(**env.__dict__), started_at=started)


def _with_bytes(model_path: str, overridden: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """The tensors llama.cpp placed by override, each with its buffer and its bytes (from the GGUF header)."""
    if not overridden:
        return None
    sizes = {t.name: t.n_bytes for t in read_gguf_header(model_path).tensors}
    return {name: {"buffer": buft, "bytes": sizes.get(name, 0)} for name, buft in sorted(overridden.items())}


def _read_events(fd: int, out: queue.Queue) -> None:
    with os.fdopen(fd, "r") as f:
        for line in f:
            try:
                out.put(json.loads(line))
            except json.JSONDecodeError:
                continue
    out.put(None)


def child_environment(parent: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a measuring child: the parent's, ``extra`` on top, and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    wherever CUDA_VISIBLE_DEVICES names GPUs and no order is set, so that CUDA numbers GPUs by PCI bus as NVML
    does, and the GPU whose memory NVML reads is the one the child measures on."""
    env = {**parent, **extra}
    if env.get("CUDA_VISIBLE_DEVICES") and "CUDA_DEVICE_ORDER" not in env:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def _wait_or_kill(proc: subprocess.Popen, grace_s: float) -> int:
    """The child's exit code, killing its group if it has not exited within ``grace_s``: a child that hangs
    while shutting down (a driver, an atexit handler) must not hang the study; its results are already in."""
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return proc.wait(timeout=30)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log) -> str:
    log.flush()
    log.seek(0, os.SEEK_END)
    size = log.tell()
    log.seek(max(0, size - LOG_TAIL_CHARS))
    return log.read()


def evidence_line(tail: str) -> str:
    """The log line that best explains a failure.

    An out-of-memory line wins; then a Python traceback's last line; then the first
    error-like line, since llama.cpp logs the cause before its consequences
    ("unknown model architecture" before "failed to load model").
    """
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    line = next((ln for ln in lines if OOM_PATTERN.search(ln)), None)
    if line is None and any(ln.startswith("Traceback") for ln in lines):
        line = lines[-1]
    line = line or next((ln for ln in lines if ROOT_CAUSE_PATTERN.search(ln)), None)
    line = line or next((ln for ln in reversed(lines) if REASON_PATTERN.search(ln)), None)
    return (line or (lines[-1] if lines else ""))[:200]


def classify_death(code: int, timed_out: bool, timeout_s: float, tail: str) -> tuple[Status, str]:
    """Status and one-line reason for a child that ended without reporting its run."""
    if timed_out:
        return Status.TIMEOUT, f"no result within {timeout_s:g} s; the child was killed"
    last = evidence_line(tail)
    detail = f": {last}" if last else ""
    if OOM_PATTERN.search(tail):
        return Status.OOM, f"out of memory{detail}"
    if code < 0:
        name = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            return Status.OOM, f"killed by SIGKILL (likely the kernel's OOM killer){detail}"
        if -code == signal.SIGILL:
            return Status.CRASH, ("child died of SIGILL: llama.cpp ran an instruction this CPU refuses; where "
                                  "it has AMX, llama.cpp's AMX kernels (used with repack on) crash this way "
                                  "(ggml-org/llama.cpp#26954): measure with repack off (--repack 0)")
        return Status.CRASH, f"child died of {name}{detail}"
    return Status.CRASH, f"child exited with code {code} without a result{detail}"
