"""GPU probes and the memory sampler, with fakes on CPU and NVML for real where a GPU exists."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from llama_tuner.testing.fakes import FakeGpuProbe
from llama_tuner.measure.probe import GpuInfo, NoGpuProbe, NvmlProbe, detect_probe
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


def test_cpu_machine_gets_no_gpu_probe_without_nvml_devices():
    probe = detect_probe()
    if isinstance(probe, NoGpuProbe):
        assert probe.gpus() == [] and probe.process_memory(0, os.getpid()) is None


class _Proc:
    def __init__(self, pid, mem):
        self.pid, self.usedGpuMemory = pid, mem


def _fake_pynvml(procs):
    """A stand-in for nvidia-ml-py with the calls NvmlProbe makes."""
    nv = types.SimpleNamespace(NVMLError=RuntimeError, NVML_CLOCK_MEM=2)
    mem = types.SimpleNamespace(total=24 << 30, used=2 << 30, free=22 << 30)
    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetCount = lambda: 1
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    nv.nvmlSystemGetDriverVersion = lambda: b"560.35.03"
    nv.nvmlDeviceGetName = lambda h: "NVIDIA GeForce RTX 4090"
    nv.nvmlDeviceGetMemoryInfo = lambda h: mem
    nv.nvmlDeviceGetMemoryBusWidth = lambda h: 384
    nv.nvmlDeviceGetMaxClockInfo = lambda h, kind: 10501
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: procs
    return nv


def test_nvml_probe_reads_through_the_nvml_api(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([_Proc(111, 7 << 30), _Proc(222, None)]))
    probe = NvmlProbe()
    [gpu] = probe.gpus()
    assert (gpu.name, gpu.driver, gpu.total_bytes) == ("NVIDIA GeForce RTX 4090", "560.35.03", 24 << 30)
    assert gpu.peak_bandwidth_gbs == pytest.approx(1008.1, rel=1e-3)
    assert probe.memory(0).free == 22 << 30
    assert probe.process_memory(0, 111) == 7 << 30
    assert probe.process_memory(0, 222) is None and probe.process_memory(0, 333) is None


@pytest.mark.gpu
def test_real_nvml_reports_this_gpu_and_a_process_using_it():
    probe = detect_probe()
    assert isinstance(probe, NvmlProbe)
    gpu = probe.gpus()[0]
    assert gpu.total_bytes > 1 << 30 and gpu.name and gpu.driver
    m = probe.memory(0)
    assert m.used + m.free <= m.total + (1 << 20)
