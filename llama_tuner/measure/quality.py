"""KV cache quality of a model, measured once per model file and llama.cpp build (``llama-tuner quality``).

The measurement runs in :mod:`llama_tuner.measure.kv_quality` (a child that imports llama_cpp)
over the first ``n_tokens`` tokens of a text, by default the bundled ``quality_text.txt``
(written for this project and in the public domain). Results are cached by model sha256,
llama.cpp build, text, token count, cache type and device, so a study pays for each once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from llama_tuner.errors import UserError
from llama_tuner.measure.environment import (hash_cache_file, llama_cpp_info, model_sha256, read_json_cache,
                                             write_json_atomic)

DEFAULT_TEXT = Path(__file__).with_name("quality_text.txt")
CACHE_TYPES = ("f16", "q8_0", "q4_0")


def _cache_file() -> Path:
    return hash_cache_file().with_name("kv-quality.json")


def kv_quality(model_path: str, cache_types: list[str], *, text: str | None = None, n_tokens: int = 1024,
               n_threads: int = 1, n_gpu_layers: int = 0, repack: bool = True,
               timeout_s: float = 1800) -> dict[str, dict[str, float]]:
    """KL divergence and top-1 agreement of each cache type against an f16 cache (see kv_quality).

    Raises:
        UserError: the text is too short for ``n_tokens``, or the measurement failed or timed out.
    """
    text = text if text is not None else DEFAULT_TEXT.read_text()
    info = llama_cpp_info()
    device = f"gpu{n_gpu_layers}" if n_gpu_layers and info["gpu_offload"] else "cpu"
    base = "|".join([model_sha256(model_path), info["llama_cpp_build"], hashlib.sha256(text.encode()).hexdigest(),
                     str(n_tokens), device])
    cache = read_json_cache(_cache_file())
    todo = [t for t in cache_types if f"{base}|{t}" not in cache]
    if todo:
        job = {"model_path": str(Path(model_path).resolve()), "cache_types": todo, "text": text,
               "n_tokens": n_tokens, "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "repack": repack}
        try:
            p = subprocess.run([sys.executable, "-m", "llama_tuner.measure.kv_quality"], input=json.dumps(job),
                               capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"the quality measurement took over {timeout_s:g} s", "use fewer --tokens") from None
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:200]
            raise UserError(f"the quality measurement failed: {last}", "give a longer --text or fewer --tokens")
        for t, figures in json.loads(p.stdout).items():
            cache[f"{base}|{t}"] = figures
        try:
            write_json_atomic(_cache_file(), cache)
        except OSError:
            pass  # a read-only home still works, it just measures again
    return {t: {**cache[f"{base}|{t}"], "cached": t not in todo} for t in cache_types}
