"""What makes two measurements comparable: the model file, the hardware, the llama.cpp build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llama_tuner.errors import UserError
from llama_tuner.measure.bandwidth import measure_host_read_gbs
from llama_tuner.measure.config import physical_cores
from llama_tuner.measure.llama_cpp_pin import require_llama_cpp_python
from llama_tuner.measure.probe import GpuProbe, cpu_name, host_name, ram_total
from llama_tuner.measure.result import Environment
from llama_tuner.model.gguf_header import model_files


def hash_cache_file() -> Path:
    """Where model hashes are cached: $LLAMA_TUNER_CACHE, else the user's cache directory."""
    if os.environ.get("LLAMA_TUNER_CACHE"):
        return Path(os.environ["LLAMA_TUNER_CACHE"]) / "sha256-cache.json"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "llama-tuner" / "sha256-cache.json"


def model_sha256(path: str | os.PathLike, cache_file: Path | None = None) -> str:
    """SHA-256 of the model: of its file, or for a split GGUF (the first shard's path) of the hex digests of
    all its shards in order, each file's cached as :func:`file_sha256` caches it.

    Raises:
        UserError: a shard of a split GGUF is missing, or ``path`` is a later shard.
    """
    files = model_files(path)
    if len(files) == 1:
        return file_sha256(files[0], cache_file)
    return hashlib.sha256("".join(file_sha256(f, cache_file) for f in files).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, cache_file: Path | None = None) -> str:
    """SHA-256 of one file, cached by (absolute path, size, mtime) because big files take long."""
    cache_file = cache_file or hash_cache_file()
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache = {k: v for k, v in read_json_cache(cache_file).items() if isinstance(v, str)}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    # Entries of files that are gone or changed are dropped, so the cache does not grow forever.
    cache = {k: v for k, v in cache.items() if _still_current(k)}
    cache[key] = h.hexdigest()
    try:
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only checkout still works, it just hashes again
    return cache[key]


def read_json_cache(path: Path) -> dict[str, Any]:
    """A JSON object cached in ``path``; empty when the file is missing, unreadable, cut short or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: invalid JSON or UTF-8, e.g. a file cut short
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader sees the old file or the new one, never a part:
    into a temporary file in the same directory, then ``os.replace``. A failed write leaves ``path`` as it was.

    Raises:
        OSError: the directory cannot be made or written (the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _still_current(key: str) -> bool:
    path, size, mtime = key.rsplit("|", 2)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return f"{st.st_size}|{st.st_mtime_ns}" == f"{size}|{mtime}"


def machine_environment(probe: GpuProbe, gpu_index: int | None) -> Environment:
    """What the parent knows of this machine; the child adds the llama.cpp build."""
    gpu = probe.gpu(gpu_index) if gpu_index is not None else None
    return Environment(host=host_name(), cpu=cpu_name(), physical_cores=physical_cores(),
                       ram_total_bytes=ram_total(), gpu_name=gpu.name if gpu else None,
                       gpu_driver=gpu.driver if gpu else None, vram_total_bytes=gpu.total_bytes if gpu else None,
                       gpu_peak_bandwidth_gbs=gpu.peak_bandwidth_gbs if gpu else None)


def llama_cpp_info() -> dict[str, Any]:
    """The llama-cpp-python version, llama.cpp build, GPU offload and system info, asked of a child.

    Raises:
        UserError: llama-cpp-python is not the release the child is written for, or does not start in a child.
    """
    require_llama_cpp_python()
    p = subprocess.run([sys.executable, "-m", "llama_tuner.measure.child", "--info"], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama-cpp-python does not start in a child process: {last}",
                        "reinstall it with `make install` (or CUDA=1)")
    return json.loads(p.stdout)


def build_environment(probe: GpuProbe, gpu_index: int | None) -> Environment:
    """This machine plus the llama.cpp build, asked of a child (the optimizer never imports llama_cpp).

    Raises:
        UserError: llama-cpp-python does not start in a child process.
    """
    env = machine_environment(probe, gpu_index)
    info = llama_cpp_info()
    env.llama_cpp_python, env.llama_cpp_build = info["llama_cpp_python"], info["llama_cpp_build"]
    env.gpu_offload, env.system_info = info["gpu_offload"], info["system_info"]
    env.host_read_gbs = round(measure_host_read_gbs(env.physical_cores), 1)
    return env
