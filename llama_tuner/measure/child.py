"""The measuring child process: the only module that imports llama_cpp.

Run as ``python -m llama_tuner.measure.child --events-fd N`` with a job on stdin::

    {"model_path": str, "model_params": {...}, "runs": [{"index": int, "config": {...}}]}

It loads the model once, then for each run builds a context, attaches CPU
threadpools to it (:mod:`llama_tuner.measure.threadpool`) and times it the way
llama.cpp's ``tools/llama-bench`` does, with the low-level API: seeded random
tokens, a warmup, then ``repetitions`` timed runs, each after clearing the KV
memory and an untimed prefill of ``n_depth`` tokens. Prompt processing decodes
``n_prompt`` tokens in ``n_batch`` chunks and synchronizes once; generation
decodes ``n_gen`` single tokens, synchronizing after each.

Events go to fd N as JSON lines: ``env``, ``loaded``, ``start`` and ``result``
(see :mod:`llama_tuner.measure.launcher`). llama.cpp's own log goes to stderr, which the parent
keeps for failure reasons.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from typing import Any

import llama_cpp
import psutil
from llama_cpp import llama_cpp as C

from llama_tuner.measure import timer as timing
from llama_tuner.measure.buffers import BUFFER_LINE
from llama_tuner.measure.llama_cpp_pin import FIX, version_problem
from llama_tuner.measure.threadpool import attach_threadpools
from llama_tuner.measure.timer import DecodeError, Timer, fault_point
from llama_tuner.model.experts import layer_experts_pattern

# The KV cache's own size, printed after its buffers: in a dry run (no_alloc) the buffers read 0.00 MiB.
KV_SIZE_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
DRY_RUN = {"on": False, "kv_device": "CPU"}
OVERRIDE_LINE = re.compile(r"tensor (\S+) \(\d+ MiB \S+\) buffer type overridden to (\S+)")
# The tensors llama.cpp placed by an override, and where (e.g. {"blk.0.ffn_up_exps.weight": "CPU"}).
OVERRIDDEN: dict[str, str] = {}
# llama.cpp's own account of what it allocated, by kind and buffer (e.g. "kv": {"CUDA0": bytes}).
BUFFERS: dict[str, dict[str, int]] = {"model": {}, "kv": {}, "compute": {}}
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
def peak_rss() -> int:
    """This process's peak resident set size (VmHWM) since start or the last reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    """Restart the VmHWM high-water mark at the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Events:
    """JSON-lines writer on the parent's event pipe; every event carries the peak RSS."""

    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "w", buffering=1)

    def send(self, event: str, **data: Any) -> None:
        """Write one event (``env``, ``loaded``, ``result``) as a JSON line, with the peak RSS so far."""
        self.out.write(json.dumps({"event": event, "rss": peak_rss(), **data}) + "\n")
        self.out.flush()


def environment() -> dict[str, Any]:
    """Versions and capabilities of the llama.cpp build this child runs."""
    build = ""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        lib.ggml_commit.restype = ctypes.c_char_p
        lib.ggml_version.restype = ctypes.c_char_p
        build = f"ggml {lib.ggml_version().decode()} ({lib.ggml_commit().decode()})"
    except (OSError, AttributeError):
        pass
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_build": build,
        "gpu_offload": bool(C.llama_supports_gpu_offload()),
        "system_info": C.llama_print_system_info().decode(errors="replace").strip(),
    }


class BuftOverride(ctypes.Structure):
    """llama.h's ``llama_model_tensor_buft_override``: a tensor-name regex and the buffer type for its matches."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


_KEEP: list[Any] = []  # the override array and its strings, alive while llama.cpp loads from them


def cpu_moe_overrides(n_cpu_moe: int) -> ctypes.Array | None:
    """The NULL-terminated override list of llama-server ``--n-cpu-moe N``: the expert tensors of layers
    0..N-1 in the CPU's buffer type (from the ggml backend registry, as ``ggml_backend_cpu_buffer_type``)."""
    if n_cpu_moe <= 0:
        return None
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml, base = ctypes.CDLL(os.path.join(lib_dir, "libggml.so")), ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    cpu = base.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(0))  # GGML_BACKEND_DEVICE_TYPE_CPU
    patterns = [layer_experts_pattern(i).encode() for i in range(n_cpu_moe)]
    array = (BuftOverride * (n_cpu_moe + 1))(*[BuftOverride(p, cpu) for p in patterns], BuftOverride(None, None))
    _KEEP[:] = [array, patterns]
    return array


def load_model(path: str, mp: dict[str, Any], dry_run: bool = False):
    """Load the model with the model-level settings; returns (model or None, seconds). A dry run
    (``no_alloc``) reads only the metadata and simulates the allocations: llama.cpp reports the buffers it
    would allocate, and reads no weight."""
    params = C.llama_model_default_params()
    params.no_alloc = dry_run
    params.n_gpu_layers = int(mp["n_gpu_layers"])
    overrides = cpu_moe_overrides(int(mp.get("n_cpu_moe", 0)))
    if overrides is not None:
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    # llama.cpp asserts that a dry run does not map the file (its mmap path hands the mapping to a buffer).
    mmap = mp.get("use_mmap", True) and not dry_run
    params.load_mode = C.LLAMA_LOAD_MODE_MMAP if mmap else C.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = bool(mp.get("repack", True))
    t0 = time.perf_counter()
    fault_point("load")
    model = C.llama_model_load_from_file(path.encode(), params)
    return model, time.perf_counter() - t0


def describe_model(model) -> dict[str, Any]:
    """What llama.cpp says of a loaded model, as llama-bench reports it: its type (``llama_model_desc``,
    e.g. "gemma3 270M Q4_K - Medium"), size in bytes and parameter count."""
    buf = ctypes.create_string_buffer(256)
    C.llama_model_desc(model, buf, ctypes.sizeof(buf))
    return {"type": buf.value.decode(errors="replace"), "size": int(C.llama_model_size(model)),
            "n_params": int(C.llama_model_n_params(model))}


def new_context(model, cfg: dict[str, Any]):
    """Create a context with the context-level settings, as llama-bench does."""
    cp = C.llama_context_default_params()
    cp.n_ctx = cfg["n_ctx"]
    cp.n_batch = cfg["n_batch"]
    cp.n_ubatch = cfg["n_ubatch"]
    cp.n_threads = cfg["n_threads"]
    cp.n_threads_batch = cfg["n_threads_batch"]
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg["flash_attn"] else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = GGML_TYPES[cfg["type_k"]]
    cp.type_v = GGML_TYPES[cfg["type_v"]]
    cp.offload_kqv = cfg["offload_kqv"]
    cp.swa_full = cfg["swa_full"]
    cp.n_seq_max = cfg.get("n_parallel", 1)
    cp.kv_unified = True  # llama-server's slots share one cache of n_ctx cells, as llama-batched-bench's default
    fault_point("context")
    return C.llama_init_from_model(model, cp)


def run_job(job: dict[str, Any], events: Events) -> None:
    """Load the model once and measure every run of the job, streaming events."""
    timing.current_run = job["runs"][0]["index"]
    events.send("env", **environment())  # its "rss" is the interpreter's baseline, before llama.cpp
    C.llama_backend_init()
    dry = DRY_RUN["on"] = bool(job.get("dry_run"))
    model, load_s = load_model(job["model_path"], job["model_params"], dry_run=dry)
    if not model:
        for run in job["runs"]:
            events.send("result", index=run["index"], status="load_error",
                        reason="llama.cpp could not load the model (llama_model_load_from_file failed)")
        return
    events.send("loaded", load_time_s=load_s, loaded_model=describe_model(model), overridden=dict(OVERRIDDEN))
    for n, run in enumerate(job["runs"]):
        cfg = run["config"]
        timing.current_run = run["index"]
        events.send("start", index=run["index"])
        if n:  # the first run's peak includes loading the model
            reset_peak_rss()
        BUFFERS["kv"].clear()
        BUFFERS["compute"].clear()
        t0 = time.perf_counter()
        ctx = new_context(model, cfg)
        if not ctx:
            events.send("result", index=run["index"], status="load_error",
                        reason="llama.cpp could not create the context (llama_init_from_model failed)")
            continue
        if dry:  # what llama.cpp would allocate for this configuration, and nothing measured
            events.send("result", index=run["index"], status="ok", buffers=BUFFERS)
            C.llama_free(ctx)
            continue
        pools = attach_threadpools(ctx, cfg["n_threads"], cfg["n_threads_batch"])
        ctx_s = time.perf_counter() - t0
        timer = Timer(ctx, model, cfg)
        try:
            timings = timer.run()
        except DecodeError as exc:
            events.send("result", index=run["index"], status="crash", reason=str(exc), context_time_s=ctx_s)
        else:
            events.send("result", index=run["index"], status="ok", load_time_s=load_s, context_time_s=ctx_s,
                        buffers=BUFFERS, **timings)
        finally:
            timer.free()
            C.llama_free(ctx)
            pools.free()
    C.llama_model_free(model)
    fault_point("shutdown")  # after every result is sent: as a driver or an atexit handler may hang


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child: read the job from stdin and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-fd", type=int)
    parser.add_argument("--info", action="store_true", help="print the build's versions as JSON and exit")
    args = parser.parse_args(argv)
    problem = version_problem(llama_cpp.__version__)
    if problem:  # first: the structs here (and llama-cpp-python's own) are laid out as that release has them
        refuse(f"{problem}; fix: `{FIX}`", args.events_fd)
        return
    if args.info:
        print(json.dumps(environment()))
        return
    if args.events_fd is None:
        parser.error("--events-fd is required")
    llama_cpp.llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    run_job(json.load(sys.stdin), Events(args.events_fd))


def refuse(reason: str, events_fd: int | None) -> None:
    """Measure nothing: every run of the job on stdin ends as a load_error for ``reason`` (``--info``, without
    an events pipe, exits with it on stderr).

    Raises:
        SystemExit: ``events_fd`` is None.
    """
    if events_fd is None:
        sys.exit(f"error: {reason}")
    events = Events(events_fd)
    for run in json.load(sys.stdin)["runs"]:
        events.send("result", index=run["index"], status="load_error", reason=reason)


@llama_cpp.llama_log_callback
def _LOG_CALLBACK(level, text, user_data):  # noqa: N802 - ctypes callback
    """Send every llama.cpp log line to stderr, where the parent keeps it; note buffer sizes."""
    line = text.decode("utf-8", errors="replace")
    o = OVERRIDE_LINE.search(line)
    if o:
        OVERRIDDEN[o.group(1)] = o.group(2)
    k = KV_SIZE_LINE.search(line)
    if k and DRY_RUN["on"]:  # the cache's size, on the device of the buffer line before it (one device: exact)
        dev = DRY_RUN["kv_device"]
        BUFFERS["kv"][dev] = BUFFERS["kv"].get(dev, 0) + int(float(k.group(1)) * 2**20)
    m = BUFFER_LINE.search(line)
    if m and m.group(2) == "KV" and DRY_RUN["on"]:
        DRY_RUN["kv_device"] = m.group(1)
    elif m:
        kind = m.group(2).lower()
        BUFFERS[kind][m.group(1)] = BUFFERS[kind].get(m.group(1), 0) + int(float(m.group(3)) * 2**20)
    sys.stderr.write(line)


if __name__ == "__main__":
    main()
