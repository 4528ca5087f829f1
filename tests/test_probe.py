"""GPU probes and the memory sampler, with fakes on CPU and NVML for real where a GPU exists."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from llama_tuner.testing.fakes import FakeGpuProbe
from llama_tuner.measure.probe import DeviceMemory, GpuInfo, NoGpuProbe, NvmlProbe, detect_probe
from llama_tuner.measure.peak_memory import MemorySampler


def test_peak_bandwidth_from_bus_width_and_memory_clock():
    # H100 SXM: 5120-bit HBM3 at 2619 MHz -> 3.35 TB/s.
    assert GpuInfo(index=0, name="H100", driver="x", total_bytes=80 << 30, bus_width_bits=5120,
                   max_mem_clock_mhz=2619).peak_bandwidth_gbs == pytest.approx(3352.3, rel=1e-3)
    assert GpuInfo(index=0, name="old", driver="x", total_bytes=1).peak_bandwidth_gbs is None


def test_sampler_takes_the_process_figure_from_the_probe():
    probe = FakeGpuProbe()
    probe.per_process[os.getpid()] = 3 << 30
    s = MemorySampler(os.getpid(), probe=probe, gpu_index=0, vram_used_before=probe.used)
    s.sample()
    probe.per_process[os.getpid()] = 1 << 30
    peaks = s.window()
    assert peaks.vram == 3 << 30 and peaks.rss > 0
    assert s.window().vram == 1 << 30  # a new window forgets the old peak


def test_sampler_falls_back_to_device_growth_when_pids_are_hidden():
    probe = FakeGpuProbe(report_pids=False)
    s = MemorySampler(os.getpid(), probe=probe, gpu_index=0, vram_used_before=probe.used)
    probe.used += 5 << 30
    assert s.window().vram == 5 << 30


def test_sampler_thread_sees_a_short_peak():
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; b = bytearray(300 * 2**20); time.sleep(0.5); del b; time.sleep(0.5)"])
    s = MemorySampler(child.pid, probe=NoGpuProbe(), gpu_index=None, vram_used_before=None, interval=0.02).start()
    child.wait()
    s.stop()
    assert s.window().rss > 300 * 2**20


class _Proc:
    def __init__(self, pid, mem):
        self.pid, self.usedGpuMemory = pid, mem


class _NvmlError(Exception):
    pass


GRAPHICS, MEM = 0, 2  # NVML_CLOCK_GRAPHICS, NVML_CLOCK_MEM
RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", total=24 << 30, used=2 << 30, bus=384,
                clocks={GRAPHICS: 3120, MEM: 10501}, procs=[(111, 7 << 30), (222, None)])
T4 = dict(name=b"Tesla T4", total=16 << 30, used=5 << 30, bus=None,  # an older driver: no bus width
          clocks={GRAPHICS: 1590, MEM: 5001}, procs=[(333, 3 << 30)])


def _fake_pynvml(devices, *, init_error: bool = False):
    """A stand-in for nvidia-ml-py over ``devices`` (a handle is its device's dict), with the calls NvmlProbe
    makes; a query a device lacks raises NVMLError as NVML's "Not Supported" does."""
    nv = types.SimpleNamespace(NVMLError=_NvmlError, NVML_CLOCK_GRAPHICS=GRAPHICS, NVML_CLOCK_MEM=MEM)

    def init():
        if init_error:
            raise _NvmlError("Driver Not Loaded")

    def supported(value):
        if value is None:
            raise _NvmlError("Not Supported")
        return value

    nv.nvmlInit = init
    nv.nvmlDeviceGetCount = lambda: len(devices)
    nv.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nv.nvmlSystemGetDriverVersion = lambda: b"560.35.03"
    nv.nvmlDeviceGetName = lambda h: h["name"]
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"], used=h["used"],
                                                                 free=h["total"] - h["used"])
    nv.nvmlDeviceGetMemoryBusWidth = lambda h: supported(h["bus"])
    nv.nvmlDeviceGetMaxClockInfo = lambda h, kind: h["clocks"][kind]
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [_Proc(*p) for p in supported(h["procs"])]
    return nv


def test_nvml_probe_describes_each_gpu_from_its_own_handle(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([RTX_4090, T4]))
    probe = NvmlProbe()
    ada, t4 = probe.gpus()
    assert (ada.index, ada.driver, t4.index, t4.name, t4.total_bytes) == (0, "560.35.03", 1, "Tesla T4", 16 << 30)
    # The memory clock, not the graphics clock: 2 x 10501 MHz x 384 bits = 1008 GB/s.
    assert ada.peak_bandwidth_gbs == pytest.approx(1008.1, rel=1e-3)
    assert t4.bus_width_bits is None and t4.peak_bandwidth_gbs is None  # unknown, not an error
    assert probe.gpu(1) is t4 and probe.gpu(2) is None


def test_nvml_probe_reads_memory_and_processes_of_the_gpu_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([RTX_4090, dict(T4, procs=None)]))
    probe = NvmlProbe()
    assert probe.memory(0) == DeviceMemory(used=2 << 30, free=22 << 30, total=24 << 30)
    assert probe.memory(1).free == 11 << 30
    assert probe.process_memory(0, 111) == 7 << 30
    assert probe.process_memory(0, 222) is None  # listed without a figure
    assert probe.process_memory(0, 333) is None  # a process of the other GPU
    assert probe.process_memory(1, 111) is None  # that GPU cannot list processes


@pytest.mark.parametrize("pynvml,expected", [
    (None, NoGpuProbe),  # nvidia-ml-py not installed
    (_fake_pynvml([], init_error=True), NoGpuProbe),  # no driver
    (_fake_pynvml([]), NoGpuProbe),  # a driver, no GPU
    (_fake_pynvml([T4]), NvmlProbe),
])
def test_nvml_is_the_probe_only_where_it_starts_and_sees_a_gpu(monkeypatch, pynvml, expected):
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)  # None: `import pynvml` raises ImportError
    assert type(detect_probe()) is expected


@pytest.mark.gpu
def test_real_nvml_reports_this_gpu_and_a_process_using_it():
    probe = detect_probe()
    assert isinstance(probe, NvmlProbe)
    gpu = probe.gpus()[0]
    assert gpu.total_bytes > 1 << 30 and gpu.name and gpu.driver
    m = probe.memory(0)
    assert m.used + m.free <= m.total + (1 << 20)
