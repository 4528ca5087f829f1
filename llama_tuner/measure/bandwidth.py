"""Memory bandwidth: the host's achievable read rate, and how much of it a result uses.

Generation is memory-bound: each token reads every offloaded weight once, so
tg x bytes-per-token is the bandwidth achieved. Its share of the device's peak
says how much faster the settings could still make it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llama_tuner.measure.result import Environment, TrialResult
from llama_tuner.model.facts import ModelFacts


def measure_host_read_gbs(threads: int, bytes_per_thread: int = 256 * 2**20, repeats: int = 3) -> float:
    """Aggregate read bandwidth of ``threads`` threads each summing its own array (best of ``repeats``).

    numpy releases the GIL inside reductions, so the threads read in parallel.
    This is an achievable figure for this machine, not a datasheet peak.
    """
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
