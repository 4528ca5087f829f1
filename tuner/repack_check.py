"""Does llama.cpp's repacked-weight path run on this CPU? One tiny real measurement tells.

With ``repack`` on (llama.cpp's default), weights go to the CPU backend's extra
buffer types, AMX among them where the CPU advertises it. On some Intel Xeons, and
VMs on them, llama.cpp's AMX matrix kernels die of SIGILL on their first tile
load (ggml-org/llama.cpp#26954, open for llama-cpp-python 0.3.36), so every
configuration with repack on crashes at prompt processing. A study checks once,
with a generated two-layer model in a child, and then searches repack off only.
Elsewhere the check costs nothing: it only runs where ``/proc/cpuinfo`` lists AMX.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tuner.config import BenchConfig
from tuner.fingerprint import hash_cache_file
from tuner.probe import NoGpuProbe
from tuner.result import Status

CHECK = BenchConfig(n_ctx=128, n_batch=64, n_ubatch=64, n_prompt=64, n_gen=1, repetitions=1, n_threads=1)


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises AMX tiles (Linux; False where unknown)."""
    try:
        flags = next((line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_tile" in flags.split()


def check_model() -> Path:
    """The generated model the check loads (written once next to the model-hash cache)."""
    from tuner.synth import SHAPES, write_synthetic_gguf

    path = hash_cache_file().parent / "repack-check-tiny-q4_k_m.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_gguf(path, SHAPES["tiny"], "q4_k_m")
    return path


@functools.cache
def repack_crash() -> str | None:
    """The crash reason if a repack-on measurement dies of SIGILL here, else None (checked once per process)."""
    if not cpu_has_amx():
        return None
    from tuner.launcher import SubprocessLauncher

    [result] = SubprocessLauncher(NoGpuProbe(), timeout_s=120).measure(str(check_model()), [CHECK])
    if result.status == Status.CRASH and "SIGILL" in (result.reason or ""):
        return result.reason
    return None
