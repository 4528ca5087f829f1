"""The search space of a study, derived from the model, the machine and the user's pins.

Every point of the space is a valid llama.cpp configuration: flash attention and
the KV cache types form one categorical dimension of valid combinations (a
quantized V cache needs flash attention), batch sizes are ladders of powers of
two with ``n_ubatch <= n_batch <= n_ctx`` applied as llama.cpp clamps them, and
the context ladder doubles from ``--min-ctx`` to the training context. Values a
baseline uses are added to the ladders, so baselines are ordinary points of the
space and the sampler learns from them; its KV cache types only where the space
searches them anyway (their quality is measured and gated, see
:mod:`llama_tuner.study.quality_gate`). Pins and ranges are checked up front: each
range within its setting's domain, and the pins against llama.cpp's own rules
(:meth:`BenchConfig.validate`), so that no study starts whose every trial is invalid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

from llama_tuner.measure.config import (CONTEXT_KEYS, DRAFT_SPEC_TYPES, MAX_THREADS, MODEL_KEYS,
                                       QUANTIZED_CACHE_TYPES, SERVER_KEYS, TEST_KEYS, BenchConfig, InvalidConfig)
from llama_tuner.measure.workloads import PRESETS
from llama_tuner.errors import UserError
from llama_tuner.model.info import ModelInfo

CPU_BATCHES, CPU_UBATCHES = (512, 1024, 2048), (128, 256, 512)
GPU_BATCHES, GPU_UBATCHES = (512, 1024, 2048, 4096), (256, 512, 1024, 2048)
ATTENTION_CHOICES = ("fa0:f16/f16", "fa1:f16/f16", "fa1:q8_0/q8_0", "fa1:q4_0/q4_0")
RANGE_KEYS = ("n_gpu_layers", "n_cpu_moe", "n_threads", "n_threads_batch", "n_batch", "n_ubatch", "n_ctx")
STUDY_TEST = dict(n_prompt=512, n_gen=128, repetitions=3)


def attention_choice(flash_attn: bool, type_k: str, type_v: str) -> str:
    """The categorical value for a flash-attention / KV-type combination."""
    return f"fa{int(flash_attn)}:{type_k}/{type_v}"


def parse_attention(choice: str) -> tuple[bool, str, str]:
    """(flash_attn, type_k, type_v) of an attention choice."""
    fa, kv = choice.split(":")
    k, v = kv.split("/")
    return fa == "fa1", k, v


@dataclass(frozen=True)
class Machine:
    """What the space needs to know of the machine: cores, whether llama.cpp can offload, and
    whether its repacked-weight path runs here (see :mod:`llama_tuner.measure.repack_check`)."""

    physical_cores: int
    gpu_offload: bool
    repack_works: bool = True


PARALLEL_CHOICES = (1, 2, 4, 8)
DRAFT_N_MAX_CHOICES = (0, 8, 16)  # a draft model's --spec-draft-n-max; 0: llama.cpp's default (3)


def study_test(workload: str = "pp-tg", *, depth: int = 0, prompt_tokens: int | None = None,
               gen_tokens: int | None = None) -> dict[str, Any]:
    """What every trial of a study measures: the workload's sizes (llama_tuner.measure.workloads), changed by
    --prompt-tokens, --gen-tokens and --depth."""
    preset = PRESETS[workload]
    return {**STUDY_TEST, "workload": workload, "n_depth": depth,
            "n_prompt": prompt_tokens if prompt_tokens is not None else preset.n_prompt,
            "n_gen": gen_tokens if gen_tokens is not None else preset.n_gen}


@dataclass
class SpaceOptions:
    """The user's shaping of the space: the test (workload), --min-ctx, --set pins and --range limits."""

    min_ctx: int = 4096
    depth: int = 0
    pins: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    test: dict[str, Any] | None = None  # study_test(...); None: pp-tg at ``depth``
    spec_types: tuple[str, ...] = ()  # llama-server engine: the --spec-type values searched beside none
    draft_model: str = ""  # the draft model's path, for spec_type draft-simple


def _ladder(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo... below hi, then hi (from a lo of 0 or less it climbs from 1: it always ends)."""
    out, x = [], lo
    while x < hi:
        out.append(x)
        x = x * 2 if x > 0 else 1
    return out + [hi]


def range_domain(key: str, model: ModelInfo, *, need: int = 1) -> tuple[int, int | None]:
    """The values ``--range key=LO:HI`` may take for ``model`` (None: no upper bound); ``need`` is the context
    the study's test fills, the least context a trial can have.

    Raises:
        InvalidConfig: ``key`` is not a searched setting.
    """
    if key not in RANGE_KEYS:
        raise InvalidConfig(f"--range {key} is not a searched setting", f"use one of {', '.join(RANGE_KEYS)}")
    return {"n_gpu_layers": (0, model.n_gpu_layers_all), "n_cpu_moe": (0, model.n_layer),
            "n_threads": (1, MAX_THREADS), "n_threads_batch": (1, MAX_THREADS), "n_batch": (1, None),
            "n_ubatch": (1, None), "n_ctx": (need, model.n_ctx_train or None)}[key]


def check_ranges(ranges: dict[str, tuple[int, int]], model: ModelInfo, *, need: int = 1) -> None:
    """Check every --range before anything is measured: a searched setting, LO <= HI, and both within the
    setting's domain (:func:`range_domain`; ``need``: the context the study's test fills).

    Raises:
        InvalidConfig: the first range that breaks a rule, naming it and the fix.
    """
    for key, (lo, hi) in ranges.items():
        low, high = range_domain(key, model, need=need)
        if lo > hi:
            raise InvalidConfig(f"--range {key}={lo}:{hi} is empty", "write LO:HI with LO <= HI")
        if lo < low or (high is not None and hi > high):
            what = {"n_ctx": f"a trial's context holds the test's {need} tokens and at most the model's training "
                             f"context", "n_gpu_layers": f"the model has {model.n_layer} layers + output",
                    "n_cpu_moe": f"the model has {model.n_layer} layers"}.get(key, f"{key} is at least {low}")
            bounds = f"{low} <= LO <= HI" + (f" <= {high}" if high is not None else "")
            raise InvalidConfig(f"--range {key}={lo}:{hi} is out of range ({what})", f"write {key}=LO:HI with {bounds}")


class SearchSpace:
    """Named dimensions (int ranges or choice lists) plus pinned settings; see module doc."""

    def __init__(self, model: ModelInfo, machine: Machine, options: SpaceOptions,
                 baselines: tuple[BenchConfig, ...] = ()):
        """The space of ``model`` on ``machine`` shaped by ``options``, with the ``baselines``' values in it.

        Raises:
            InvalidConfig: an unknown pin or range key, an empty range, or a range this build cannot search.
            UserError: --min-ctx above the training context, or too small for --depth and the test.
        """
        self.model, self.machine, self.options = model, machine, options
        known = {f.name for f in fields(BenchConfig)}
        for key in options.pins:
            if key not in known:
                raise InvalidConfig(f"unknown setting {key!r} in --set", f"known settings: {', '.join(sorted(known))}")
        test = {**(options.test or study_test(depth=options.depth)), **{k: v for k, v in options.pins.items()
                                                                       if k in TEST_KEYS}}
        self.fixed: dict[str, Any] = {"use_mmap": True, "offload_kqv": True, "swa_full": False, **test}
        server = test["workload"] == "server"
        # The least context a trial needs: one stream's (the server's streams are searched, see below).
        need = BenchConfig(**test).context_needed()
        train = model.n_ctx_train or max(options.min_ctx, need)
        if options.min_ctx > train:
            raise UserError(f"--min-ctx {options.min_ctx} exceeds the model's training context {train}",
                            f"use --min-ctx {train} or less")
        if need > train:
            raise UserError(f"the {test['workload']} test needs {need} tokens of context, more than the model's "
                            f"training context {train}", "use fewer --prompt-tokens or --gen-tokens")
        self.need = need
        if options.min_ctx < need:
            raise UserError(f"--min-ctx {options.min_ctx} cannot hold the {test['workload']} test "
                            f"(depth {test['n_depth']}, {test['n_prompt']} prompt and {test['n_gen']} generated "
                            "tokens)", f"use --min-ctx {need} or more")
        gpu = machine.gpu_offload
        self.ints: dict[str, tuple[int, int]] = {"n_threads": (1, machine.physical_cores),
                                                 "n_threads_batch": (1, machine.physical_cores)}
        # On a GPU, each trial gets as many layers as the memory model says fit (Placement.fit), since
        # a layer left on the CPU costs far more speed than any other setting gains; --range searches them.
        self.fit_layers = gpu and "n_gpu_layers" not in options.ranges and "n_gpu_layers" not in options.pins
        if gpu and not self.fit_layers:
            self.ints["n_gpu_layers"] = (0, model.n_gpu_layers_all)
        else:
            self.fixed["n_gpu_layers"] = model.n_gpu_layers_all if gpu else 0
        self.choices: dict[str, list[Any]] = {
            "n_batch": list(GPU_BATCHES if gpu else CPU_BATCHES),
            "n_ubatch": list(GPU_UBATCHES if gpu else CPU_UBATCHES),
            "n_ctx": _ladder(options.min_ctx, train),
            "attention": list(ATTENTION_CHOICES),
        }
        # A MoE's expert placement: fitted per trial on a GPU (Placement.fit), searched with --range, pinned
        # with --set; with experts in host memory the load mode matters (llama.cpp advises --load-mode none), so it is
        # searched too. On a CPU every tensor is in host memory already.
        self.fixed["n_cpu_moe"] = 0
        self.fit_experts = (self.fit_layers and model.is_moe and "n_cpu_moe" not in options.ranges
                            and "n_cpu_moe" not in options.pins)
        if gpu and model.is_moe:
            self.choices["use_mmap"] = [True, False]
            if "n_cpu_moe" in options.ranges:
                self.ints["n_cpu_moe"] = (0, model.n_layer)
                del self.fixed["n_cpu_moe"]
        if server:  # streams decoding together: n_ctx holds every stream's prompt and answer
            self.choices["n_parallel"] = list(PARALLEL_CHOICES)
        if machine.repack_works:
            self.choices["repack"] = [True, False]
        else:
            self.fixed["repack"] = False
        # Speculative decoding (llama-server only): the draft-free types its --help lists, and a draft model's
        # type with how many tokens it drafts; a configuration without speculation has neither.
        self.fixed.update(spec_type="none", spec_draft_n_max=0, draft_model="")
        if options.spec_types:
            self.choices["spec_type"] = ["none", *options.spec_types]
            if any(t in DRAFT_SPEC_TYPES for t in options.spec_types):
                self.choices["spec_draft_n_max"] = list(DRAFT_N_MAX_CHOICES)
        self._include_baselines(baselines)
        self._apply_ranges()
        self._apply_pins()
        self._check_valid()

    def _include_baselines(self, baselines: tuple[BenchConfig, ...]) -> None:
        # A baseline's KV cache joins the attention choices only with cache types the space searches anyway: the
        # study measures those types' quality and gates every pair by its worst type. Another type (q5_1,
        # bf16...) is measured as the baseline's own, never searched (the gate's figures come after the space).
        searched = {t for c in self.choices["attention"] for t in parse_attention(c)[1:]}
        for b in baselines:
            for key, (lo, hi) in list(self.ints.items()):
                v = getattr(b, key)
                if v is not None:  # None threads: the machine's cores, already in the range
                    self.ints[key] = (min(lo, v), max(hi, v))
            for key in ("n_batch", "n_ubatch", "n_ctx"):
                if getattr(b, key) not in self.choices[key]:
                    self.choices[key] = sorted(self.choices[key] + [getattr(b, key)])
            att = attention_choice(b.flash_attn, b.type_k, b.type_v)
            if att not in self.choices["attention"] and {b.type_k, b.type_v} <= searched:
                self.choices["attention"].append(att)

    def _apply_ranges(self) -> None:
        check_ranges(self.options.ranges, self.model, need=self.need)
        both = sorted(self.options.ranges.keys() & self.options.pins.keys())
        if both:
            raise InvalidConfig(f"--set {both[0]} and --range {both[0]} both given", "pin it or search it, not both")
        for key, (lo, hi) in self.options.ranges.items():
            if key in self.ints:
                self.ints[key] = (lo, hi)
            elif key in self.choices:
                inside = [v for v in self.choices[key] if lo <= v <= hi] or ([lo] if lo == hi else [])
                self.choices[key] = inside or _ladder(lo, hi)
            elif key == "n_cpu_moe":
                raise InvalidConfig("--range n_cpu_moe searches where a mixture of experts keeps its experts, "
                                    "which needs a MoE model and a build that offloads to a GPU",
                                    "drop the range, or measure one placement with --set n_cpu_moe=N")
            else:  # n_gpu_layers on a build without offload
                raise InvalidConfig(f"--range {key}: this llama.cpp build cannot offload to a GPU",
                                    "rebuild with `make install CUDA=1`, or drop the range")

    def _apply_pins(self) -> None:
        pins = dict(self.options.pins)
        att_keys = {"flash_attn", "type_k", "type_v"} & pins.keys()
        if att_keys:
            keep = [c for c in self.choices["attention"]
                    if all(dict(zip(("flash_attn", "type_k", "type_v"), parse_attention(c)))[k] == pins[k]
                           for k in att_keys)]
            if not keep:
                fa, k, v = (pins.get("flash_attn", True), pins.get("type_k", "f16"), pins.get("type_v", "f16"))
                keep = [attention_choice(fa, k, v)]
            self.choices["attention"] = keep
            for k in att_keys:
                pins.pop(k)
        for key, value in pins.items():
            self.ints.pop(key, None)
            self.choices.pop(key, None)
            self.fixed[key] = value

    def _check_valid(self) -> None:
        """Refuse pins (with the ranges and the space's choices) that leave no valid configuration: every
        trial would be INVALID. Checked on the point of the space most likely valid, by the rule a trial's
        configuration is checked by (:meth:`BenchConfig.resolved`).

        Raises:
            InvalidConfig: the conflict, naming the pins and the fix.
        """
        pins = self.options.pins

        def given(keys) -> str:
            return " ".join(f"--set {k}={int(v) if isinstance(v, bool) else v}" for k, v in pins.items() if k in keys)

        valid = [c for c in self.choices["attention"]
                 if parse_attention(c)[0] or parse_attention(c)[2] not in QUANTIZED_CACHE_TYPES]
        if not valid:
            _, _, v = parse_attention(self.choices["attention"][0])
            raise InvalidConfig(f"{given(('flash_attn', 'type_k', 'type_v'))} conflict: a quantized V cache ({v}) "
                                "needs flash attention", "set flash_attn=1, or type_v=f16")
        params: dict[str, Any] = {k: lo for k, (lo, _) in self.ints.items()}
        params.update({k: max(v) if k == "n_ctx" else min(v) if k == "n_parallel" else v[0]
                       for k, v in self.choices.items() if k != "attention"})
        params["attention"] = valid[0]
        try:
            self.config_of(params).resolved(self.model)
        except InvalidConfig as exc:
            what = f"{given(pins)} leaves no valid configuration" if pins else "the space has no valid configuration"
            raise InvalidConfig(f"{what}: {exc.problem}", exc.fix) from None

    def suggest(self, trial) -> BenchConfig:
        """The configuration an Optuna trial proposes (clamped as llama.cpp would)."""
        params = {k: trial.suggest_int(k, lo, hi) for k, (lo, hi) in self.ints.items()}
        params.update({k: trial.suggest_categorical(k, v) for k, v in self.choices.items()})
        return self.config_of(params)

    def config_of(self, params: dict[str, Any]) -> BenchConfig:
        """The configuration for a dict of parameter values (without the clamping check)."""
        values = {**self.fixed, **{k: v for k, v in params.items() if k != "attention"}}
        if "attention" in params:
            values["flash_attn"], values["type_k"], values["type_v"] = parse_attention(params["attention"])
        if values.get("spec_type") in DRAFT_SPEC_TYPES:
            values["draft_model"] = values.get("draft_model") or self.options.draft_model
        else:  # nothing to draft with
            values["draft_model"], values["spec_draft_n_max"] = "", 0
        cfg = BenchConfig(**values)
        cfg = replace(cfg, n_batch=min(cfg.n_batch, cfg.n_ctx))
        return replace(cfg, n_ubatch=min(cfg.n_ubatch, cfg.n_batch))

    def params_of(self, cfg: BenchConfig) -> dict[str, Any]:
        """The point of the space nearest to ``cfg`` (exactly ``cfg`` unless pins or ranges exclude it).

        Baselines are enqueued at this point and measured with their own exact
        configuration; a pinned dimension is constant for every sampled trial, so
        projecting a baseline onto it hides nothing from the sampler.
        """
        params = {k: min(max(getattr(cfg, k), lo), hi) for k, (lo, hi) in self.ints.items()}
        for k, choices in self.choices.items():
            value = (attention_choice(cfg.flash_attn, cfg.type_k, cfg.type_v) if k == "attention"
                     else getattr(cfg, k))
            if value not in choices:
                numeric = isinstance(value, int) and not isinstance(value, bool)
                value = min(choices, key=lambda c: abs(c - value)) if numeric and k != "attention" else choices[0]
            params[k] = value
        return params

    def corners(self) -> list[BenchConfig]:
        """The extremes of what sizes memory: the least and largest context and physical batch, flash attention
        on and off (an f16 cache), the largest batch; for llama.cpp's dry runs (MemoryModel.calibrate)."""
        ctx, ub = self.choices.get("n_ctx", [self.fixed.get("n_ctx")]), self.choices.get("n_ubatch", [512])
        out = []
        for n_ctx in sorted({min(ctx), max(ctx)}):
            for n_ubatch in sorted({min(ub), max(ub)}):
                for attention in ("fa0:f16/f16", "fa1:f16/f16"):
                    params = {k: lo for k, (lo, hi) in self.ints.items()}
                    params.update({k: v[-1] if k == "n_batch" else v[0] for k, v in self.choices.items()})
                    params.update(n_ctx=n_ctx, n_ubatch=n_ubatch, attention=attention)
                    out.append(self.config_of(params))
        return list(dict.fromkeys(out))

    def grid(self) -> Iterator[BenchConfig]:
        """Every distinct configuration of the space, model settings varying slowest."""
        names = [k for k in MODEL_KEYS + CONTEXT_KEYS + ("attention",) + SERVER_KEYS
                 if k in self.ints or k in self.choices]
        values = [range(self.ints[k][0], self.ints[k][1] + 1) if k in self.ints else self.choices[k] for k in names]
        seen = set()
        for combo in itertools.product(*values):
            cfg = self.config_of(dict(zip(names, combo)))
            if cfg not in seen:
                seen.add(cfg)
                yield cfg
