"""GPU probing behind one small interface: NVML where an NVIDIA GPU exists, else none.

The launcher asks a probe for the GPU's name, driver, total and free memory, and
the memory a process holds on it. Tests use :class:`llama_tuner.testing.fakes.FakeGpuProbe`.
"""

from __future__ import annotations

import os
import platform
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    """One GPU as NVML describes it; ``index`` is NVML's, which numbers GPUs by PCI bus."""

    index: int
    name: str
    driver: str
    total_bytes: int
    bus_width_bits: int | None = None
    max_mem_clock_mhz: int | None = None
    uuid: str | None = None  # "GPU-..." as nvidia-smi -L shows it

    @property
    def peak_bandwidth_gbs(self) -> float | None:
        """Theoretical memory bandwidth in GB/s: 2 transfers per clock x bus width."""
        if not self.bus_width_bits or not self.max_mem_clock_mhz:
            return None
        return 2 * self.max_mem_clock_mhz * 1e6 * self.bus_width_bits / 8 / 1e9


@dataclass(frozen=True)
class DeviceMemory:
    """Device-wide memory figures in bytes."""

    used: int
    free: int
    total: int


class GpuProbe(ABC):
    """Reads GPU facts and memory use; implementations must be thread-safe for reads."""

    @abstractmethod
    def gpus(self) -> list[GpuInfo]:
        """The GPUs visible to this process (empty when there are none)."""

    @abstractmethod
    def memory(self, index: int) -> DeviceMemory:
        """Used, free and total memory of GPU ``index``.

        Raises:
            LookupError: there is no such GPU.
        """

    @abstractmethod
    def process_memory(self, index: int, pid: int) -> int | None:
        """Bytes process ``pid`` holds on GPU ``index``; None when the driver cannot tell."""

    def gpu(self, index: int) -> GpuInfo | None:
        """GPU ``index``, or None if absent."""
        return next((g for g in self.gpus() if g.index == index), None)

    def find(self, name: str) -> GpuInfo | None:
        """The GPU that ``name`` names: an NVML index ("1") or a UUID ("GPU-..."); None if there is none."""
        name = name.strip()
        if name.isdigit():
            return self.gpu(int(name))
        return next((g for g in self.gpus() if g.uuid and g.uuid.lower() == name.lower()), None)


class NoGpuProbe(GpuProbe):
    """The probe of a machine without an NVIDIA GPU (or without a driver)."""

    def gpus(self) -> list[GpuInfo]:
        return []

    def memory(self, index: int) -> DeviceMemory:
        raise LookupError("no GPU on this machine")

    def process_memory(self, index: int, pid: int) -> int | None:
        return None


class NvmlProbe(GpuProbe):
    """NVML through nvidia-ml-py (imported as ``pynvml``)."""

    def __init__(self) -> None:
        import pynvml  # deferred: absent drivers must not break CPU machines

        self.nvml = pynvml
        pynvml.nvmlInit()
        self._gpus: list[GpuInfo] | None = None

    def _handle(self, index: int):
        return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def gpus(self) -> list[GpuInfo]:
        if self._gpus is None:
            nv = self.nvml
            driver = _text(nv.nvmlSystemGetDriverVersion())
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = self._handle(i)
                out.append(GpuInfo(index=i, name=_text(nv.nvmlDeviceGetName(h)), driver=driver,
                                   total_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                                   bus_width_bits=_optional(lambda: nv.nvmlDeviceGetMemoryBusWidth(h)),
                                   max_mem_clock_mhz=_optional(
                                       lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)),
                                   uuid=_optional(lambda: _text(nv.nvmlDeviceGetUUID(h)), cast=str)))
            self._gpus = out
        return self._gpus

    def find(self, name: str) -> GpuInfo | None:
        """As :meth:`GpuProbe.find`, a UUID looked up by NVML itself (``nvmlDeviceGetHandleByUUID``)."""
        name = name.strip()
        if name.isdigit():
            return self.gpu(int(name))
        try:
            return self.gpu(int(self.nvml.nvmlDeviceGetIndex(self.nvml.nvmlDeviceGetHandleByUUID(name))))
        except self.nvml.NVMLError:  # not found, or a MIG instance (which has no NVML index of its own)
            return None

    def memory(self, index: int) -> DeviceMemory:
        info = self.nvml.nvmlDeviceGetMemoryInfo(self._handle(index))
        return DeviceMemory(int(info.used), int(info.free), int(info.total))

    def process_memory(self, index: int, pid: int) -> int | None:
        # nvidia-ml-py's wrapper uses the v3 process-info struct where the driver has it.
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self._handle(index))
        except self.nvml.NVMLError:
            return None
        for p in procs:
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None  # e.g. in a container, NVML reports host PIDs


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read, cast=int):
    try:
        return cast(read())
    except Exception:  # noqa: BLE001 - older GPUs/drivers lack these queries
        return None


def detect_probe() -> GpuProbe:
    """NvmlProbe when NVML initialises and sees a GPU, else NoGpuProbe."""
    try:
        probe = NvmlProbe()
        if probe.gpus():
            return probe
    except Exception:  # noqa: BLE001 - no library, no driver, no device: all mean "no GPU"
        pass
    return NoGpuProbe()


def cpu_name() -> str:
    """The CPU model name, as /proc/cpuinfo or the platform reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_name() -> str:
    """This machine's host name."""
    return socket.gethostname()


def ram_total() -> int:
    """Total RAM of this machine in bytes."""
    return int(psutil.virtual_memory().total)


def visible_gpu_index(probe: GpuProbe | None = None) -> int:
    """The NVML index of the GPU the children will use (first of CUDA_VISIBLE_DEVICES): an index as it
    is, a UUID looked up with ``probe`` (0 without one, or when the probe does not know it)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    if first.isdigit():
        return int(first)
    gpu = probe.find(first) if probe is not None and first else None
    return gpu.index if gpu is not None else 0
