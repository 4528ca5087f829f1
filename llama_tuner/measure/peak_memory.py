"""Peak memory of a child process, sampled from the parent in a background thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

from llama_tuner.measure.probe import GpuProbe


@dataclass
class Peaks:
    """Highest RSS and GPU memory seen in one sampling window (bytes; None = unknown)."""

    rss: int = 0
    vram: int | None = None

    def add_rss(self, value: int) -> None:
        """Raise the RSS peak to ``value`` if higher."""
        self.rss = max(self.rss, value)


class MemorySampler:
    """Polls a process's RSS, and its GPU memory where a GPU exists, every ``interval`` s.

    GPU memory is the process's own figure from NVML; where the driver does not
    report the process (containers show host PIDs), it is the growth of the
    device's used memory since ``vram_used_before``.
    """

    def __init__(self, pid: int, *, probe: GpuProbe, gpu_index: int | None, vram_used_before: int | None,
                 interval: float = 0.02):
        self.pid = pid
        self.probe = probe
        self.gpu_index = gpu_index
        self.vram_used_before = vram_used_before
        self.interval = interval
        self._peaks = Peaks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def start(self) -> "MemorySampler":
        """Start sampling; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop the thread."""
        self._stop.set()
        self._thread.join(timeout=2)

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        try:
            rss = psutil.Process(self.pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            rss = 0
        vram = self._vram()
        with self._lock:
            self._peaks.add_rss(rss)
            if vram is not None:
                self._peaks.vram = max(self._peaks.vram or 0, vram)

    def _vram(self) -> int | None:
        if self.gpu_index is None:
            return None
        own = self.probe.process_memory(self.gpu_index, self.pid)
        if own is not None:
            return own
        if self.vram_used_before is None:
            return None
        return max(0, self.probe.memory(self.gpu_index).used - self.vram_used_before)

    def window(self) -> Peaks:
        """Peaks since the previous call (or since start); starts a new window."""
        self.sample()
        with self._lock:
            peaks, self._peaks = self._peaks, Peaks()
        return peaks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
