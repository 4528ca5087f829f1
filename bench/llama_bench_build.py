"""Build llama.cpp's own ``llama-bench`` from the sdist of the installed llama-cpp-python.

Both then run the very same llama.cpp commit, compiled with the options
llama-cpp-python's build uses on CPU (Release, GGML_NATIVE, shared libraries,
no curl), so a difference in figures is a difference in how we measure.
The build lives in ``bench/.cache/`` and is reused when present.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"


def _sdist(ver: str) -> Path:
    """Download (once) and unpack the llama-cpp-python sdist of version ``ver``."""
    src = CACHE / f"llama_cpp_python-{ver}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={ver}", "-d", str(CACHE)], check=True)
    with tarfile.open(CACHE / f"llama_cpp_python-{ver}.tar.gz") as tar:
        tar.extractall(CACHE, filter="data")
    return src


def llama_bench_binary() -> Path:
    """Path of a llama-bench built from the installed llama-cpp-python's llama.cpp."""
    ver = version("llama-cpp-python")
    build = CACHE / f"llama-bench-{ver}"
    binary = build / "bin" / "llama-bench"
    if binary.exists():
        return binary
    src = _sdist(ver) / "vendor" / "llama.cpp"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", "2"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


if __name__ == "__main__":
    print(llama_bench_binary())
