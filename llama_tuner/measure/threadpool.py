"""ggml CPU threadpools for a context, made and attached as llama-bench and llama-server do.

Child-side only: it loads llama.cpp's libraries (see :mod:`llama_tuner.measure.child`).

llama-cpp-python attaches no threadpool, so ggml makes a throwaway one for every
graph it computes, that is for every generated token: a few allocations in an
OpenMP build, but starting and joining the worker threads per token in a build
without OpenMP. ``llama-bench`` and ``llama-server`` (through llama.cpp's
``common``) create the pools once per context with the default parameters (poll
level 50, normal priority, inherited affinity) and attach them, one for
generation and, when ``n_threads_batch`` differs, a second one for batches.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from llama_cpp import llama_cpp as C
from llama_cpp._ggml import libggml

GGML_MAX_N_THREADS = 512
GGML_BACKEND_DEVICE_TYPE_CPU = 0


class ThreadpoolParams(ctypes.Structure):
    """``struct ggml_threadpool_params`` of ggml.h."""

    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


libggml.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]
libggml.ggml_threadpool_params_init.restype = None
libggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
libggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
libggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
libggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
libggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
libggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
C._lib.llama_attach_threadpool.argtypes = [C.llama_context_p_ctypes, ctypes.c_void_p, ctypes.c_void_p]
C._lib.llama_attach_threadpool.restype = None

_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ThreadpoolParams))
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@dataclass
class Threadpools:
    """The pools attached to one context; ``free()`` them after ``llama_free`` of the context."""

    pools: list[int] = field(default_factory=list)
    _free: _FREE | None = None

    def free(self) -> None:
        """Free every pool (their threads stop); safe to call twice."""
        while self.pools:
            self._free(self.pools.pop())


def _cpu_functions() -> tuple[_NEW, _FREE] | None:
    """ggml_threadpool_new/free of the CPU backend, looked up as llama.cpp's common does."""
    dev = libggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    reg = libggml.ggml_backend_dev_backend_reg(dev) if dev else None
    if not reg:
        return None
    new = libggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
    free = libggml.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
    return (_NEW(new), _FREE(free)) if new and free else None


def attach_threadpools(ctx, n_threads: int, n_threads_batch: int) -> Threadpools:
    """Create the generation (and, if its size differs, batch) pool and attach them to ``ctx``.

    Returns no pools, leaving ggml's per-graph default, where the build has no CPU backend.

    Raises:
        RuntimeError: ggml could not create a threadpool.
    """
    fns = _cpu_functions()
    if fns is None:
        return Threadpools()
    new, free = fns
    out = Threadpools(_free=free)
    batch = None
    if n_threads_batch != n_threads:
        params = ThreadpoolParams()
        libggml.ggml_threadpool_params_init(ctypes.byref(params), n_threads_batch)
        batch = new(ctypes.byref(params))
        if not batch:
            raise RuntimeError(f"ggml could not create a threadpool of {n_threads_batch} threads")
        out.pools.append(batch)
    params = ThreadpoolParams()
    libggml.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    params.paused = batch is not None  # as common does: the batch pool runs first
    pool = new(ctypes.byref(params))
    if not pool:
        out.free()
        raise RuntimeError(f"ggml could not create a threadpool of {n_threads} threads")
    out.pools.append(pool)
    C._lib.llama_attach_threadpool(ctx, pool, batch)
    return out
