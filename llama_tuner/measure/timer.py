"""llama-bench's measurement, on one context: the prompt and generation tests, depth curves and server streams.

Imported only by the measuring child (:mod:`llama_tuner.measure.child`), which owns the process; see its
docstring for the method. Also the test-only fault points the child's tests use.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import signal
import sys
import time
from typing import Any

from llama_cpp import llama_cpp as C

from llama_tuner.measure.workloads import PROBE_TOKENS, curve_depths, is_curve

# test-only: "<abort|segv|sigill|hang|exit>@<load|context|pp|tg|shutdown>[#run]"
FAULT_ENV = "LLAMA_TUNER_TEST_FAULT"


class DecodeError(RuntimeError):
    """llama_decode returned a non-zero code."""


current_run = -1  # the job index being measured (set by the child), for "#n" faults


def fault_point(phase: str) -> None:
    """Test hook: misbehave at ``phase`` (of run ``#n`` only, if given) when tests ask for it."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, where = spec.partition("@")
    where, _, run = where.partition("#")
    if where != phase or (run and int(run) != current_run):
        return
    print(f"llama-tuner test fault: {kind} at {phase}", file=sys.stderr, flush=True)
    if kind == "abort":
        os.abort()
    elif kind == "segv":
        ctypes.string_at(0)
    elif kind == "sigill":  # what llama.cpp's AMX kernels do on some CPUs (llama_tuner.measure.repack_check)
        os.kill(os.getpid(), signal.SIGILL)
    elif kind == "hang":
        time.sleep(10**6)
    elif kind == "exit":
        os._exit(3)


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
        self.sampler = None  # the curve's probes sample their tokens (Timer.answer)

    def free(self) -> None:
        """Free the sampler, if one was made."""
        if self.sampler is not None:
            C.llama_sampler_free(self.sampler)
            self.sampler = None

    def _tokens(self, n: int, first: bool) -> ctypes.Array:
        toks = [self.rng.randrange(self.n_vocab) for _ in range(n)]
        if first and self.bos is not None:
            toks[0] = self.bos
        return (C.llama_token * n)(*toks)

    def _decode(self, arr: ctypes.Array, n: int) -> None:
        rc = C.llama_decode(self.ctx, C.llama_batch_get_one(arr, n))
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}")

    def prompt(self, n_prompt: int, first: bool = True) -> int:
        """Decode n_prompt random tokens in n_batch chunks (BOS first if ``first``); return elapsed ns."""
        n_batch = self.cfg["n_batch"]
        chunks = [(self._tokens(min(n_batch, n_prompt - i), first and i == 0), min(n_batch, n_prompt - i))
                  for i in range(0, n_prompt, n_batch)]
        t0 = time.perf_counter_ns()
        for arr, n in chunks:
            self._decode(arr, n)
        C.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def generate(self, n_gen: int, first: bool = True) -> int:
        """Decode n_gen single tokens, synchronizing after each; return elapsed ns."""
        arrs = [self._tokens(1, first and i == 0) for i in range(n_gen)]
        t0 = time.perf_counter_ns()
        for arr in arrs:
            self._decode(arr, 1)
            C.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def answer(self, n_gen: int, sampled_first: bool) -> int:
        """Generate n_gen tokens as a reply is generated: each one sampled (greedy, in llama.cpp) from the last
        one's logits and fed back (the first is BOS where nothing precedes it); return elapsed ns."""
        if self.sampler is None:
            self.sampler = C.llama_sampler_init_greedy()
        one = (C.llama_token * 1)(self.bos if self.bos is not None else 0)
        t0 = time.perf_counter_ns()
        for i in range(n_gen):
            if i or sampled_first:
                one[0] = C.llama_sampler_sample(self.sampler, self.ctx, -1)
            self._decode(one, 1)
        C.llama_synchronize(self.ctx)
        return time.perf_counter_ns() - t0

    def curve(self, depths: list[int]) -> tuple[list[int], list[int]]:
        """One depth curve (:mod:`llama_tuner.measure.workloads`): the ns to fill each span between ``depths``, and
        the ns of PROBE_TOKENS generated at each depth (then removed from the cache)."""
        C.llama_memory_clear(self.memory, False)
        spans, probes = [], []
        for i, depth in enumerate(depths):
            if i:
                spans.append(self.prompt(depth - depths[i - 1], first=depths[i - 1] == 0))
            probes.append(self.answer(PROBE_TOKENS, sampled_first=depth > 0))
            if not C.llama_memory_seq_rm(self.memory, 0, depth, -1):
                raise DecodeError(f"llama.cpp could not remove the probe tokens at depth {depth}")
        return spans, probes

    def streams(self, n_streams: int, n_prompt: int, n_gen: int) -> tuple[int, int]:
        """``n_streams`` sequences: each prompt in n_batch chunks, then ``n_gen`` steps decoding one token of
        every stream in one batch, as llama-server's slots do; (prefill ns, generation ns)."""
        C.llama_memory_clear(self.memory, False)
        size = max(n_streams, min(self.cfg["n_batch"], n_prompt))
        batch = C.llama_batch_init(size, 0, 1)
        try:
            def fill(items: list[tuple[int, int, int, bool]]) -> None:
                for j, (tok, pos, seq, logits) in enumerate(items):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                    batch.seq_id[j][0], batch.logits[j] = seq, logits
                batch.n_tokens = len(items)
                rc = C.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise DecodeError(f"llama_decode returned {rc}")

            chunk = min(self.cfg["n_batch"], n_prompt)
            t0 = time.perf_counter_ns()
            for seq in range(n_streams):
                for lo in range(0, n_prompt, chunk):
                    n = min(chunk, n_prompt - lo)
                    fill([(self.rng.randrange(self.n_vocab), lo + j, seq, lo + j == n_prompt - 1) for j in range(n)])
            C.llama_synchronize(self.ctx)
            t1 = time.perf_counter_ns()
            for step in range(n_gen):
                fill([(self.rng.randrange(self.n_vocab), n_prompt + step, seq, True) for seq in range(n_streams)])
                C.llama_synchronize(self.ctx)
            return t1 - t0, time.perf_counter_ns() - t1
        finally:
            C.llama_batch_free(batch)

    def _reset(self) -> None:
        C.llama_memory_clear(self.memory, False)
        if self.cfg["n_depth"]:
            self.prompt(self.cfg["n_depth"])

    def run(self) -> dict[str, Any]:
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

    def _run(self) -> dict[str, Any]:
        cfg, out = self.cfg, {"pp_ns": [], "tg_ns": []}
        if is_curve(cfg["workload"]):
            depths = curve_depths(cfg["n_depth"], cfg["n_prompt"], cfg["n_gen"])
            self.curve(depths[:2])  # warmup
            fault_point("tg")
            runs = [self.curve(depths) for _ in range(cfg["repetitions"])]
            return {"curve": {"depths": depths, "probe_tokens": PROBE_TOKENS,
                              "span_ns": [r[0] for r in runs], "probe_ns": [r[1] for r in runs]}}
        if cfg["workload"] == "server":
            n = cfg["n_parallel"]
            self.streams(n, min(cfg["n_prompt"], 32), 1)  # warmup
            fault_point("tg")
            for _ in range(cfg["repetitions"]):
                pp, tg = self.streams(n, cfg["n_prompt"], cfg["n_gen"])
                out["pp_ns"].append(pp)
                out["tg_ns"].append(tg)
            return out
        if cfg["n_prompt"]:
            C.llama_memory_clear(self.memory, False)
            self.prompt(cfg["n_prompt"])  # warmup
            fault_point("pp")
            for _ in range(cfg["repetitions"]):
                self._reset()
                out["pp_ns"].append(self.prompt(cfg["n_prompt"]))
        if cfg["n_gen"]:
            C.llama_memory_clear(self.memory, False)
            self.generate(1)  # warmup
            fault_point("tg")
            for _ in range(cfg["repetitions"]):
                self._reset()
                out["tg_ns"].append(self.generate(cfg["n_gen"]))
        return out
