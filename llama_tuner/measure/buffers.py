"""llama.cpp's buffer lines: what it allocated on each device, as its load log says.

``load_tensors:   CUDA0 model buffer size =  1234.56 MiB``, ``llama_kv_cache:        CPU KV buffer size = ...``,
``sched_reserve:  Vulkan0 compute buffer size = ...``: the same lines from the measuring child's log callback and
from llama-server's log, on every backend (CUDA, ROCm, Vulkan, Metal, SYCL, CPU).
"""

from __future__ import annotations

import re

BUFFER_LINE = re.compile(r"(\S+) +(model|KV|compute) buffer size = +([\d.]+) MiB")


def buffers_of(log: str) -> dict[str, dict[str, int]]:
    """Bytes per buffer kind (model, kv, compute) and buffer name (``CUDA0``, ``CPU_Mapped``...) in ``log``;
    a name's sizes add up (a split model has a model buffer per file)."""
    out: dict[str, dict[str, int]] = {"model": {}, "kv": {}, "compute": {}}
    for m in BUFFER_LINE.finditer(log):
        kind = m.group(2).lower()
        out[kind][m.group(1)] = out[kind].get(m.group(1), 0) + int(float(m.group(3)) * 2**20)
    return out
