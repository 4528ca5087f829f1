"""The host bandwidth probe: its arrays outgrow the caches but stay a bounded share of memory."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import psutil

from llama_tuner.measure import bandwidth
from llama_tuner.measure.bandwidth import last_level_cache_bytes, measure_host_read_gbs, probe_bytes_per_thread

GiB, MiB = 2**30, 2**20


def test_the_probe_on_a_64_core_machine_allocates_at_most_1_gib(monkeypatch):
    """An EPYC 9554 (64 cores, 256 MiB of L3) with plenty of memory: it used to allocate 64 x 256 MiB."""
    asked: list[int] = []
    real_ones = np.ones

    def recording_ones(n, dtype=float):
        asked.append(int(n) * np.dtype(dtype).itemsize)
        return real_ones(1024, dtype)  # the test machine need not hold what a 64-core one would

    monkeypatch.setattr(bandwidth.np, "ones", recording_ones)
    monkeypatch.setattr(bandwidth, "last_level_cache_bytes", lambda: 256 * MiB, raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=500 * GiB))
    measure_host_read_gbs(64, repeats=1)
    assert len(asked) == 64 and sum(asked) <= GiB
    assert sum(asked) >= 4 * 256 * MiB  # still 4x the L3, so it reads from RAM


def test_the_arrays_outgrow_big_caches_and_never_a_share_of_the_free_memory():
    genoa_x = probe_bytes_per_thread(96, cache_bytes=1152 * MiB, available_bytes=1500 * GiB)  # EPYC 9684X
    assert 96 * genoa_x >= 4 * 1152 * MiB and 96 * genoa_x <= 8 * GiB
    short = probe_bytes_per_thread(64, cache_bytes=256 * MiB, available_bytes=2 * GiB)
    assert 64 * short <= 2 * GiB / 8
    small = probe_bytes_per_thread(2, cache_bytes=8 * MiB, available_bytes=16 * GiB)
    assert small == 256 * MiB  # a small machine reads as much as it always did
    assert probe_bytes_per_thread(4, cache_bytes=None, available_bytes=64 * GiB) * 4 <= GiB


def test_last_level_cache_bytes_sums_every_l3_once(tmp_path):
    """Two CCDs of 4 cores, each with its 32 MiB L3 (seen from each of its cores) and a 1 MiB L2 per core."""
    for cpu in range(8):
        caches = [(1, "Data", "32K", str(cpu)), (1, "Instruction", "32K", str(cpu)), (2, "Unified", "1024K", str(cpu)),
                  (3, "Unified", "32768K", "0-3" if cpu < 4 else "4-7")]
        for i, (level, kind, size, shared) in enumerate(caches):
            d = tmp_path / f"cpu{cpu}" / "cache" / f"index{i}"
            d.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (d / name).write_text(f"{value}\n")
    assert last_level_cache_bytes(tmp_path) == 2 * 32 * MiB
    assert last_level_cache_bytes(tmp_path / "nothing") is None
