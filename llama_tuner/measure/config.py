"""One llama.cpp configuration to measure, validated before anything is launched.

Split as llama-bench splits it: model-load settings (a change reloads the model),
context settings (a change only rebuilds the context) and the test itself
(prompt, generation and depth tokens, repetitions). Names follow llama-cpp-python's
``Llama(...)`` keyword arguments so a preset exports without renaming.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import psutil

from llama_tuner.errors import UserError
from llama_tuner.measure.workloads import PROBE_TOKENS, SCENARIOS, WORKLOADS, is_curve
from llama_tuner.model.info import KV_CACHE_TYPES, ModelInfo

ENGINES = ("child", "llama-server")  # what measures: the child (llama-cpp-python) or llama-server over HTTP
MODEL_KEYS = ("n_gpu_layers", "n_cpu_moe", "use_mmap", "repack")
CONTEXT_KEYS = ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn",
                "type_k", "type_v", "offload_kqv", "swa_full", "n_parallel")
TEST_KEYS = ("workload", "n_prompt", "n_gen", "n_depth", "repetitions", "seed")
# What only llama-server has: speculative decoding (the child cannot measure them; see SERVER_DEFAULTS).
SERVER_KEYS = ("spec_type", "spec_draft_n_max", "draft_model")
# llama.cpp's --spec-type names that need no draft model (common/speculative.cpp); "none" is no speculation.
DRAFT_FREE_SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")
DRAFT_SPEC_TYPES = ("draft-simple",)  # with -md/--spec-draft-model: a smaller model of the same vocabulary
# Cache types that store V at less than 16 bits: llama.cpp needs flash attention for them.
QUANTIZED_CACHE_TYPES = tuple(t for t in KV_CACHE_TYPES if t not in ("f32", "f16", "bf16"))
MAX_THREADS = 1024


class InvalidConfig(UserError):
    """A configuration llama.cpp would reject, clamp or misread; the message says why."""


def physical_cores() -> int:
    """Physical CPU cores available to this process (llama.cpp's default thread count)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        return max(1, min(cores, len(os.sched_getaffinity(0))))
    except AttributeError:
        return cores


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Every setting of one measurement; ``None`` threads mean "decide from the machine"."""

    # model load
    n_gpu_layers: int = 0
    n_cpu_moe: int = 0  # the first N layers keep their expert tensors in host memory (llama-server --n-cpu-moe N)
    use_mmap: bool = True  # load mode: mmap, or read into llama.cpp's buffers (llama-server --load-mode none)
    repack: bool = True  # llama.cpp's extra CPU weight buffers (repacked, AMX): llama-bench --repack
    # context
    n_ctx: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    offload_kqv: bool = True
    swa_full: bool = False
    n_parallel: int = 1  # sequences (llama-server --parallel slots) sharing the context's n_ctx cells
    # speculative decoding, llama-server only (--engine llama-server): --spec-type, --spec-draft-n-max (0:
    # llama.cpp's default) and the draft model's path (-md) for a draft type
    spec_type: str = "none"
    spec_draft_n_max: int = 0
    draft_model: str = ""
    # test: what is measured (llama_tuner.measure.workloads)
    workload: str = "pp-tg"
    n_prompt: int = 512
    n_gen: int = 128
    n_depth: int = 0
    repetitions: int = 5
    seed: int = 42

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        """Build from a mapping, rejecting unknown keys and values of the wrong type.

        Raises:
            InvalidConfig: an unknown setting, or a value of the wrong type.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidConfig(f"unknown setting {unknown[0]!r}", f"known settings: {', '.join(known)}")
        values = {k: _coerce(k, v, known[k].type) for k, v in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """All settings as a plain dict."""
        return asdict(self)

    def model_params(self) -> dict[str, Any]:
        """The settings whose change needs the model reloaded."""
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def context_params(self) -> dict[str, Any]:
        """The settings that only need a new context."""
        return {k: getattr(self, k) for k in CONTEXT_KEYS}

    def server_params(self) -> dict[str, Any]:
        """The settings only llama-server has (speculative decoding); empty where all are llama.cpp's defaults."""
        return {k: getattr(self, k) for k in SERVER_KEYS if getattr(self, k) != SERVER_DEFAULTS[k]}

    @property
    def speculative(self) -> bool:
        """Whether this configuration decodes speculatively (it needs llama-server)."""
        return self.spec_type != "none"

    def test_params(self) -> dict[str, Any]:
        """What is measured: prompt, generation, depth, repetitions, seed."""
        return {k: getattr(self, k) for k in TEST_KEYS}

    def settings_key(self) -> str:
        """A stable hash of the llama.cpp settings (not the test), for finding repeats."""
        # The server settings count only where set, so that every key from before them stays the same.
        payload = json.dumps({**self.model_params(), **self.context_params(), **self.server_params()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def resolved(self, model: ModelInfo | None = None, cores: int | None = None) -> "BenchConfig":
        """Fill in machine-dependent defaults and canonical values, then validate.

        ``n_gpu_layers`` of -1 or beyond the model means "all" (n_layer + 1), and the
        thread counts default to the physical cores, as llama.cpp's tools do.

        Raises:
            InvalidConfig: see :meth:`validate`.
        """
        threads = self.n_threads or cores or physical_cores()
        ngl = self.n_gpu_layers
        if model is not None and (ngl < 0 or ngl > model.n_gpu_layers_all):
            ngl = model.n_gpu_layers_all
        out = replace(self, n_gpu_layers=ngl, n_threads=threads, n_threads_batch=self.n_threads_batch or threads)
        out.validate(model)
        return out

    def validate(self, model: ModelInfo | None = None) -> None:
        """Raise InvalidConfig with the first problem found, naming the fix.

        Raises:
            InvalidConfig: a configuration llama.cpp would reject, clamp or misread.
        """
        _check_range("n_gpu_layers", self.n_gpu_layers, -1, None)
        _check_range("n_cpu_moe", self.n_cpu_moe, 0, None)
        if self.workload not in WORKLOADS:
            raise InvalidConfig(f"unknown workload {self.workload!r}", f"use one of {', '.join(WORKLOADS)}")
        for key in ("n_ctx", "n_batch", "n_ubatch", "repetitions", "n_parallel"):
            _check_range(key, getattr(self, key), 1, None)
        for key in ("n_threads", "n_threads_batch"):
            if getattr(self, key) is not None:
                _check_range(key, getattr(self, key), 1, MAX_THREADS)
        for key in ("n_prompt", "n_gen", "n_depth"):
            _check_range(key, getattr(self, key), 0, None)
        if self.n_prompt == 0 and self.n_gen == 0:
            raise InvalidConfig("n_prompt and n_gen are both 0: nothing to measure", "set -p or -n above 0")
        if self.n_ubatch > self.n_batch:
            raise InvalidConfig(f"n_ubatch {self.n_ubatch} > n_batch {self.n_batch}",
                                "use an ubatch no larger than the batch")
        if self.n_batch > self.n_ctx:
            raise InvalidConfig(f"n_batch {self.n_batch} > n_ctx {self.n_ctx}: llama.cpp would clamp it",
                                "use a batch no larger than the context")
        self._check_context()
        self._check_speculative()
        for key in ("type_k", "type_v"):
            if getattr(self, key) not in KV_CACHE_TYPES:
                raise InvalidConfig(f"unknown {key} {getattr(self, key)!r}", f"use one of {', '.join(KV_CACHE_TYPES)}")
        if self.type_v in QUANTIZED_CACHE_TYPES and not self.flash_attn:
            raise InvalidConfig(f"type_v {self.type_v} needs flash attention",
                                "turn flash_attn on, or use type_v f16")
        if model is not None:
            if self.n_gpu_layers > model.n_gpu_layers_all:
                raise InvalidConfig(f"n_gpu_layers {self.n_gpu_layers} > {model.n_gpu_layers_all} "
                                    f"(the model has {model.n_layer} layers + output)",
                                    f"use at most {model.n_gpu_layers_all}, or -1 for all")
            if self.n_cpu_moe and not model.is_moe:
                raise InvalidConfig(f"n_cpu_moe {self.n_cpu_moe} needs a mixture-of-experts model, and "
                                    f"{model.file_name} has no expert tensors", "leave n_cpu_moe at 0")
            if self.n_cpu_moe > model.n_layer:
                raise InvalidConfig(f"n_cpu_moe {self.n_cpu_moe} > the model's {model.n_layer} layers",
                                    f"use at most {model.n_layer} (every layer's experts in host memory)")
            if model.n_ctx_train and self.n_ctx > model.n_ctx_train:
                raise InvalidConfig(f"n_ctx {self.n_ctx} exceeds the model's training context "
                                    f"{model.n_ctx_train}", f"use n_ctx <= {model.n_ctx_train}")


    def context_needed(self) -> int:
        """The cells the test fills: depth and the larger test (pp-tg), depth, prompt and answer (curves), or
        every stream's prompt and answer (server)."""
        if self.workload == "server":
            return self.n_parallel * (self.n_prompt + self.n_gen)
        if self.workload == SCENARIOS:  # the longest request's prompt (estimated) and the largest cap
            return self.n_prompt + self.n_gen
        if is_curve(self.workload):  # the probe at the answer's end generates past it
            return self.n_depth + self.n_prompt + self.n_gen + PROBE_TOKENS
        return self.n_depth + max(self.n_prompt, self.n_gen)

    def _check_speculative(self) -> None:
        _check_range("spec_draft_n_max", self.spec_draft_n_max, 0, None)
        known = ("none",) + DRAFT_FREE_SPEC_TYPES + DRAFT_SPEC_TYPES
        if self.spec_type not in known:
            raise InvalidConfig(f"unknown spec_type {self.spec_type!r}", f"use one of {', '.join(known)}")
        if self.spec_type in DRAFT_SPEC_TYPES and not self.draft_model:
            raise InvalidConfig(f"spec_type {self.spec_type} needs a draft model", "give one with --draft-model PATH")
        if self.draft_model and self.spec_type not in DRAFT_SPEC_TYPES:
            raise InvalidConfig(f"a draft model needs spec_type {DRAFT_SPEC_TYPES[0]}, not {self.spec_type}",
                                f"set spec_type={DRAFT_SPEC_TYPES[0]}, or leave the draft model out")
        if self.spec_draft_n_max and not self.draft_model:
            raise InvalidConfig("spec_draft_n_max sets how many tokens a draft model drafts, and there is none",
                                "give a draft model with --draft-model PATH, or leave spec_draft_n_max out")

    def _check_context(self) -> None:
        need = self.context_needed()
        if need > self.n_ctx:
            whole = is_curve(self.workload) or self.workload == SCENARIOS
            test = self.n_prompt + self.n_gen if whole else max(self.n_prompt, self.n_gen)
            what = (f"{self.n_parallel} streams of {self.n_prompt} + {self.n_gen} tokens" if self.workload == "server"
                    else f"depth {self.n_depth} + {test} test tokens")
            raise InvalidConfig(f"n_ctx {self.n_ctx} is too small for {what}", f"use n_ctx >= {need}")
        if self.n_parallel > 1 and self.workload != "server":
            raise InvalidConfig(f"n_parallel {self.n_parallel} needs the server workload",
                                "add --workload server, or leave n_parallel at 1")
        if self.workload != "pp-tg" and (self.n_prompt == 0 or self.n_gen == 0):
            raise InvalidConfig(f"the {self.workload} workload needs a prompt and an answer",
                                "give it prompt and generated tokens above 0")


SERVER_DEFAULTS = {f: BenchConfig.__dataclass_fields__[f].default for f in SERVER_KEYS}


def _check_range(key: str, value: Any, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"{key} must be an integer, got {value!r}", f"give {key} a whole number")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidConfig(f"{key} {value} is out of range", f"use a value {bound}")


_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def _coerce(key: str, value: Any, type_hint: Any) -> Any:
    """Turn CLI strings and JSON values into the field's type, or raise InvalidConfig."""
    hint = str(type_hint)
    if value is None and "None" in hint:
        return None
    if "bool" in hint:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise InvalidConfig(f"{key} must be on or off, got {value!r}", f"use {key}=1 or {key}=0")
    if "int" in hint:
        if isinstance(value, bool):
            raise InvalidConfig(f"{key} must be an integer, got {value!r}", f"give {key} a whole number")
        try:
            return int(str(value).strip())
        except ValueError:
            raise InvalidConfig(f"{key} must be an integer, got {value!r}", f"give {key} a whole number") from None
    if key == "draft_model":  # a path: its case is its own
        return str(value).strip()
    return str(value).strip().lower()
