"""The measuring child process: the only module that imports llama_cpp.

Run as ``python -m tuner.measure.child --events-fd N`` with a job on stdin::

    {"model_path": str, "model_params": {...}, "runs": [{"index": int, "config": {...}}]}

It loads the model once, then for each run builds a context, attaches CPU
threadpools to it (:mod:`tuner.measure.threadpool`) and times it the way
llama.cpp's ``tools/llama-bench`` does, with the low-level API: seeded random
tokens, a warmup, then ``repetitions`` timed runs, each after clearing the KV
memory and an untimed prefill of ``n_depth`` tokens. Prompt processing decodes
``n_prompt`` tokens in ``n_batch`` chunks and synchronizes once; generation
decodes ``n_gen`` single tokens, synchronizing after each.

Events go to fd N as JSON lines: ``env``, ``loaded``, ``start`` and ``result``
(see :mod:`tuner.measure.launcher`). llama.cpp's own log goes to stderr, which the parent
keeps for failure reasons.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import signal
import sys
import time
from typing import Any

import llama_cpp
import psutil
from llama_cpp import llama_cpp as C

from tuner.measure.threadpool import attach_threadpools

BUFFER_LINE = re.compile(r"(\S+) +(model|KV|compute) buffer size = +([\d.]+) MiB")
# llama.cpp's own account of what it allocated, by kind and buffer (e.g. "kv": {"CUDA0": bytes}).
BUFFERS: dict[str, dict[str, int]] = {"model": {}, "kv": {}, "compute": {}}
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
# test-only: "<abort|segv|sigill|hang|exit>@<load|context|pp|tg|shutdown>[#run]"
FAULT_ENV = "LLAMA_TUNER_TEST_FAULT"


class DecodeError(RuntimeError):
    """llama_decode returned a non-zero code."""


_current_run = -1


def _fault_point(phase: str) -> None:
    """Test hook: misbehave at ``phase`` (of run ``#n`` only, if given) when tests ask for it."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, where = spec.partition("@")
    where, _, run = where.partition("#")
    if where != phase or (run and int(run) != _current_run):
        return
    print(f"llama-tuner test fault: {kind} at {phase}", file=sys.stderr, flush=True)
    if kind == "abort":
        os.abort()
    elif kind == "segv":
        ctypes.string_at(0)
    elif kind == "sigill":  # what llama.cpp's AMX kernels do on some CPUs (tuner.measure.repack_check)
        os.kill(os.getpid(), signal.SIGILL)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "exit":
        os._exit(3)


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


def load_model(path: str, mp: dict[str, Any]):
    """Load the model with the model-level settings; returns (model or None, seconds)."""
    params = C.llama_model_default_params()
    params.n_gpu_layers = int(mp["n_gpu_layers"])
    params.load_mode = C.LLAMA_LOAD_MODE_MMAP if mp.get("use_mmap", True) else C.LLAMA_LOAD_MODE_NONE
    params.use_extra_bufts = bool(mp.get("repack", True))
    t0 = time.perf_counter()
    _fault_point("load")
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
    _fault_point("context")
    return C.llama_init_from_model(model, cp)


class Timer:
    """Runs llama-bench's prompt and generation tests on one context."""

    def __init__(self, ctx, model, cfg: dict[str, Any]):
        self.ctx = ctx
        self.cfg = cfg
        vocab = C.llama_model_get_vocab(model)
        self.n_vocab = C.llama_vocab_n_tokens(vocab)
        self.bos = C.llama_vocab_bos(vocab) if C.llama_vocab_get_add_bos(vocab) else None
        self.rng = random.Random(cfg["seed"])
        self.memory = C.llama_get_memory(ctx)

    def _tokens(self, n: int, first: bool) -> ctypes.Array:
        toks = [self.rng.randrange(self.n_vocab) for _ in range(n)]
        if first and self.bos is not None:
            toks[0] = self.bos
        return (C.llama_token * n)(*toks)

    def _decode(self, arr: ctypes.Array, n: int) -> None:
        rc = C.llama_decode(self.ctx, C.llama_batch_get_one(arr, n))
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}")

    def prompt(self, n_prompt: int) -> int:
        """Decode n_prompt random tokens in n_batch chunks; return elapsed ns."""
        n_batch = self.cfg["n_batch"]
        chunks = [(self._tokens(min(n_batch, n_prompt - i), i == 0), min(n_batch, n_prompt - i))
                  for i in range(0, n_prompt, n_batch)]
        t0 = time.perf_counter_ns()
        for arr, n in chunks:
            self._decode(arr, n)
        C.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def generate(self, n_gen: int) -> int:
        """Decode n_gen single tokens, synchronizing after each; return elapsed ns."""
        arrs = [self._tokens(1, i == 0) for i in range(n_gen)]
        t0 = time.perf_counter_ns()
        for arr in arrs:
            self._decode(arr, 1)
            C.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def _reset(self) -> None:
        C.llama_memory_clear(self.memory, False)
        if self.cfg["n_depth"]:
            self.prompt(self.cfg["n_depth"])

    def run(self) -> dict[str, list[int]]:
        """Warmup and repetitions of the pp and tg tests; per-repetition ns for each.

        Python's cyclic garbage collector is off meanwhile: a full collection of the
        interpreter's heap, taken between two tokens, is a pause llama.cpp does not have.
        """
        gc.collect()
        gc.disable()
        try:
            return self._run()
        finally:
            gc.enable()

    def _run(self) -> dict[str, list[int]]:
        cfg, out = self.cfg, {"pp_ns": [], "tg_ns": []}
        if cfg["n_prompt"]:
            C.llama_memory_clear(self.memory, False)
            self.prompt(cfg["n_prompt"])  # warmup
            _fault_point("pp")
            for _ in range(cfg["repetitions"]):
                self._reset()
                out["pp_ns"].append(self.prompt(cfg["n_prompt"]))
        if cfg["n_gen"]:
            C.llama_memory_clear(self.memory, False)
            self.generate(1)  # warmup
            _fault_point("tg")
            for _ in range(cfg["repetitions"]):
                self._reset()
                out["tg_ns"].append(self.generate(cfg["n_gen"]))
        return out


def run_job(job: dict[str, Any], events: Events) -> None:
    """Load the model once and measure every run of the job, streaming events."""
    global _current_run
    _current_run = job["runs"][0]["index"]
    events.send("env", **environment())  # its "rss" is the interpreter's baseline, before llama.cpp
    C.llama_backend_init()
    model, load_s = load_model(job["model_path"], job["model_params"])
    if not model:
        for run in job["runs"]:
            events.send("result", index=run["index"], status="load_error",
                        reason="llama.cpp could not load the model (llama_model_load_from_file failed)")
        return
    events.send("loaded", load_time_s=load_s, loaded_model=describe_model(model))
    for n, run in enumerate(job["runs"]):
        cfg = run["config"]
        _current_run = run["index"]
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
        pools = attach_threadpools(ctx, cfg["n_threads"], cfg["n_threads_batch"])
        ctx_s = time.perf_counter() - t0
        try:
            timings = Timer(ctx, model, cfg).run()
        except DecodeError as exc:
            events.send("result", index=run["index"], status="crash", reason=str(exc), context_time_s=ctx_s)
        else:
            events.send("result", index=run["index"], status="ok", load_time_s=load_s, context_time_s=ctx_s,
                        buffers=BUFFERS, **timings)
        finally:
            C.llama_free(ctx)
            pools.free()
    C.llama_model_free(model)
    _fault_point("shutdown")  # after every result is sent: as a driver or an atexit handler may hang


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child: read the job from stdin and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-fd", type=int)
    parser.add_argument("--info", action="store_true", help="print the build's versions as JSON and exit")
    args = parser.parse_args(argv)
    if args.info:
        print(json.dumps(environment()))
        return
    if args.events_fd is None:
        parser.error("--events-fd is required")
    llama_cpp.llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    run_job(json.load(sys.stdin), Events(args.events_fd))


@llama_cpp.llama_log_callback
def _LOG_CALLBACK(level, text, user_data):  # noqa: N802 - ctypes callback
    """Send every llama.cpp log line to stderr, where the parent keeps it; note buffer sizes."""
    line = text.decode("utf-8", errors="replace")
    m = BUFFER_LINE.search(line)
    if m:
        kind = m.group(2).lower()
        BUFFERS[kind][m.group(1)] = BUFFERS[kind].get(m.group(1), 0) + int(float(m.group(3)) * 2**20)
    sys.stderr.write(line)


if __name__ == "__main__":
    main()
