"""Does llama.cpp's repacked-weight path run on this CPU? One tiny real measurement tells.

With ``repack`` on (llama.cpp's default), weights go to the CPU backend's extra
buffer types, AMX among them where the CPU advertises it. On some Intel Xeons, and
VMs on them, llama.cpp's AMX matrix kernels die on their first tile load
(ggml-org/llama.cpp#26954, open for llama-cpp-python 0.3.36): of SIGILL on one such
VM, of SIGSEGV on another (2026-12-01), so every configuration with repack on
crashes. A study checks once, with a generated two-layer model measured in a child
with repack on and off: where on crashes and off runs, it searches repack off only.
Elsewhere the check costs nothing: it only runs where ``/proc/cpuinfo`` lists AMX.
:meth:`llama_tuner.measure.launcher.SubprocessLauncher.repack_crash` runs it.
"""

from __future__ import annotations

from pathlib import Path

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.environment import hash_cache_file
from llama_tuner.measure.result import Status, TrialResult
from llama_tuner.model.twins import SHAPES, write_synthetic_gguf

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
    path = hash_cache_file().parent / "repack-check-tiny-q4_k_m.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_gguf(path, SHAPES["tiny"], "q4_k_m")
    return path


def repack_crash_reason(repack_on: TrialResult, repack_off: TrialResult) -> str | None:
    """Why repack cannot run here: the reason of the check with repack on when it crashed (a signal, not a
    refused configuration) while the same check with repack off ran; else None."""
    if repack_on.status == Status.CRASH and repack_on.signal and repack_off.ok:
        return repack_on.reason
    return None
