"""Memory bandwidth: the host's achievable read rate, and how much of it a result uses.

Generation is memory-bound: each token reads every offloaded weight once, so
tg x bytes-per-token is the bandwidth achieved. Its share of the device's peak
says how much faster the settings could still make it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from llama_tuner.measure.result import Environment, TrialResult
from llama_tuner.model.facts import ModelFacts


PER_THREAD_BYTES = 256 * 2**20  # each thread's array, on a machine small enough
MIN_TOTAL_BYTES = 2**30  # together at least this much (unless memory is short) ...
CACHE_MULTIPLE = 4  # ... and this many times the last-level caches (an EPYC 9684X has 1152 MiB of L3) ...
MAX_TOTAL_BYTES = 8 * 2**30  # ... but never more than this,
MAX_AVAILABLE_SHARE = 1 / 8  # nor more than this share of the memory available now
_CACHE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}  # sysfs writes a cache's size as 32768K


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """The bytes of all the machine's last-level caches together (every L3 of every CCD and socket), read
    from sysfs; None where sysfs does not say (not Linux)."""
    caches: dict[tuple[int, str], int] = {}
    for d in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level, shared = int((d / "level").read_text()), (d / "shared_cpu_list").read_text().strip()
            size = (d / "size").read_text().strip()
            unit = _CACHE_UNITS.get(size[-1:], 1)
            caches[(level, shared)] = int(size[:-1] if unit > 1 else size) * unit
        except (OSError, ValueError):
            continue
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


def probe_bytes_per_thread(threads: int, *, cache_bytes: int | None, available_bytes: int) -> int:
    """Bytes of each thread's array for :func:`measure_host_read_gbs`: PER_THREAD_BYTES each, but together
    no more than the larger of MIN_TOTAL_BYTES and CACHE_MULTIPLE x the last-level caches (so that the
    read comes from RAM, not a cache), and never more than MAX_TOTAL_BYTES or MAX_AVAILABLE_SHARE of the
    memory available (64 cores used to allocate 16 GiB in the parent)."""
    threads = max(1, threads)
    total = min(threads * PER_THREAD_BYTES, max(MIN_TOTAL_BYTES, CACHE_MULTIPLE * (cache_bytes or 0)),
                MAX_TOTAL_BYTES, int(available_bytes * MAX_AVAILABLE_SHARE))
    return max(8, total // threads // 8 * 8)


def measure_host_read_gbs(threads: int, bytes_per_thread: int | None = None, repeats: int = 3) -> float:
    """Aggregate read bandwidth of ``threads`` threads each summing its own array (best of ``repeats``); the
    arrays are sized by :func:`probe_bytes_per_thread` unless ``bytes_per_thread`` is given.

    numpy releases the GIL inside reductions, so the threads read in parallel.
    This is an achievable figure for this machine, not a datasheet peak.
    """
    if bytes_per_thread is None:
        bytes_per_thread = probe_bytes_per_thread(threads, cache_bytes=last_level_cache_bytes(),
                                                  available_bytes=int(psutil.virtual_memory().available))
    arrays = [np.ones(bytes_per_thread // 8, dtype=np.float64) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = max(best, threads * bytes_per_thread / (time.perf_counter() - t0) / 1e9)
    return best


def bandwidth_of(result: TrialResult, facts: ModelFacts, env: Environment) -> dict[str, float] | None:
    """Bytes per generated token, achieved GB/s, and the share of the peak of the device holding most bytes."""
    if not result.ok or not result.tg_mean:
        return None
    c = result.config
    cost = facts.token_cost(c.n_gpu_layers if env.gpu_offload else 0, c.type_k, c.type_v, c.n_depth + c.n_gen / 2)
    achieved = result.tg_mean * cost.total / 1e9
    on_gpu = cost.gpu_weights > cost.cpu_weights
    peak = env.gpu_peak_bandwidth_gbs if on_gpu else env.host_read_gbs
    out = {"bytes_per_token": float(cost.total), "gpu_bytes_per_token": float(cost.gpu_weights),
           "achieved_gbs": achieved}
    if peak:
        out["bandwidth_share"] = achieved / peak
    return out
