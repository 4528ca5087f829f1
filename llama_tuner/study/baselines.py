"""Baselines: llama.cpp's own defaults, and the user's ``llama-server`` command line.

A study measures its baselines first and reports every preset's gain over them.
``--baseline`` takes a real command line, so a user can paste what they run
today; flags that change speed or memory are mapped, harmless ones (host, port,
sampling...) are accepted and ignored, and any other flag is refused by name
rather than silently measured as something else. As llama-server does, a baseline
without ``-ngl`` puts every layer on the GPU, and ``--fit`` (on by default, with its
``--fit-target`` and ``--fit-ctx``) fits the settings left unset to the GPU's memory
(:class:`ServerCommand`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace

from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.model.facts import ModelFacts
from llama_tuner.model.info import ModelInfo
from llama_tuner.study.memory_model import FIT_MARGIN, FIT_MIN_CTX, MemoryModel

# flag -> BenchConfig field; all take one value
_VALUED = {
    "-c": "n_ctx", "--ctx-size": "n_ctx", "-b": "n_batch", "--batch-size": "n_batch",
    "-ub": "n_ubatch", "--ubatch-size": "n_ubatch", "-t": "n_threads", "--threads": "n_threads",
    "-tb": "n_threads_batch", "--threads-batch": "n_threads_batch", "-ngl": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers", "-ctk": "type_k", "--cache-type-k": "type_k",
    "-ctv": "type_v", "--cache-type-v": "type_v", "-ncmoe": "n_cpu_moe", "--n-cpu-moe": "n_cpu_moe",
}
_SWITCHES = {"--no-mmap": ("use_mmap", False), "--mmap": ("use_mmap", True), "--swa-full": ("swa_full", True),
             "-nr": ("repack", False), "--no-repack": ("repack", False), "--repack": ("repack", True),
             "-nkvo": ("offload_kqv", False), "--no-kv-offload": ("offload_kqv", False),
             "-kvo": ("offload_kqv", True), "--kv-offload": ("offload_kqv", True)}
# Accepted and ignored: they do not change one sequence's speed or memory. Value = takes an argument.
_IGNORED = {
    "-m": True, "--model": True, "--host": True, "--port": True, "-a": True, "--alias": True, "--api-key": True,
    "--chat-template": True, "--chat-template-file": True, "--temp": True, "--top-k": True, "--top-p": True,
    "--min-p": True, "--repeat-penalty": True, "-s": True, "--seed": True, "-n": True, "--n-predict": True,
    "--timeout": True, "-to": True, "--mlock": False, "--jinja": False,
    "-cb": False, "--cont-batching": False, "--no-webui": False, "--metrics": False, "--log-disable": False,
    "-v": False, "--verbose": False, "--slots": False, "--no-slots": False,
}
# llama-server's --fit (on by default): how it fits the settings left unset to the device (ServerCommand).
_FIT_FLAGS = ("-fit", "--fit", "-fitt", "--fit-target", "-fitc", "--fit-ctx")
_METAVAR = {"-fit": "on|off", "--fit": "on|off", "-fitt": "MiB", "--fit-target": "MiB"}
_TRUE, _FALSE = {"on", "enabled", "1", "true"}, {"off", "disabled", "0", "false"}  # llama.cpp's is_truthy/falsey
SERVER_AUTO_SLOTS = 4  # llama-server's -np default (auto): 4 slots in one unified KV cache


@dataclass(frozen=True, kw_only=True)
class ServerCommand:
    """A ``llama-server`` command line as llama-tuner models it (llama.cpp's common/arg.cpp and common/fit.cpp).

    ``config`` is what llama-server starts from: the flags given, the rest at its defaults, every layer on
    the GPU (``-ngl`` unset is ``auto``: all layers where the build offloads, fitted). Its ``--fit`` (on
    by default) then changes only what the user left unset: the context unless ``-c N`` was given (``-c 0``
    asks for the training context, which it keeps unless a later ``--fit-ctx`` allows less), and layers and
    experts unless ``-ngl`` (other than ``auto``), ``-ncmoe`` or ``-cmoe`` was given.
    """

    config: BenchConfig
    fit: bool = True  # -fit on|off
    fit_target_bytes: int = FIT_MARGIN  # -fitt MiB: the memory --fit leaves free on the device
    fit_min_ctx: int | None = FIT_MIN_CTX  # -fitc N: the least context --fit shrinks to; None: it keeps it
    ctx_set: bool = False  # -c N (N > 0)
    placement_set: bool = False  # -ngl N / all, -ncmoe N (N > 0), -cmoe

    def on_machine(self, model: ModelInfo, *, gpu_offload: bool, gpu_limit: int | None) -> BenchConfig:
        """The configuration this command runs on a machine: without offload (a CPU build) no layer is on a
        GPU (llama-server ignores -ngl); on a GPU, fitted as ``--fit`` fits it to ``gpu_limit`` bytes, the
        GPU's free memory or the budget less llama-server's default ``--fit-target`` (:data:`FIT_MARGIN`),
        as ``--fit-target`` changes it. ``gpu_limit`` None (free memory unknown), or ``-fit off``: not
        fitted. Fitting to host memory on a CPU build is not modelled (as for llama-server's defaults)."""
        cfg = self.config
        if not gpu_offload:
            return replace(cfg, n_gpu_layers=0)
        if not self.fit or gpu_limit is None:
            return cfg
        limit = gpu_limit + FIT_MARGIN - self.fit_target_bytes
        ctx_fitted = not self.ctx_set and self.fit_min_ctx is not None
        memory = MemoryModel(ModelFacts.of(model), on_gpu=True)
        # A min_ctx of the context itself keeps it: the fit goes straight to the placement.
        fitted = memory.fit_like_llama_server(cfg, limit, min_ctx=self.fit_min_ctx if ctx_fitted else cfg.n_ctx)
        if self.placement_set:  # llama.cpp's fit stops after the context: layers and experts stay as given
            fitted = replace(fitted, n_gpu_layers=cfg.n_gpu_layers, n_cpu_moe=cfg.n_cpu_moe)
        return fitted


def server_baseline(command: str, model: ModelInfo, *, workload: str = "pp-tg", gpu_offload: bool,
                    gpu_limit: int | None) -> BenchConfig:
    """What ``llama-server`` runs for ``command`` ("" = only the model: llama-server's defaults) on this
    machine (:meth:`ServerCommand.on_machine`): the configuration a baseline measures.

    Raises:
        UserError: see :func:`parse_server_command`.
    """
    return parse_server_command(command, model, workload).on_machine(model, gpu_offload=gpu_offload,
                                                                     gpu_limit=gpu_limit)


def parse_server_flags(command: str, model: ModelInfo, workload: str = "pp-tg") -> BenchConfig:
    """The configuration a ``llama-server`` command line starts from (unset flags take llama-server's defaults,
    every layer on a GPU; :class:`ServerCommand`), for ``workload``: only the server workload measures
    several slots (``-np N``). Before the machine and ``--fit``: see :func:`server_baseline`.

    Raises:
        UserError: see :func:`parse_server_command`.
    """
    return parse_server_command(command, model, workload).config


def parse_server_command(command: str, model: ModelInfo, workload: str = "pp-tg") -> ServerCommand:
    """A ``llama-server`` command line, parsed (see :class:`ServerCommand`), for ``workload``.

    Raises:
        UserError: a flag llama-tuner does not know or cannot model, a bad value, or an invalid configuration.
    """
    try:
        args = shlex.split(command)
    except ValueError as exc:
        raise UserError(f"--baseline cannot be parsed: {exc}", "quote it as one shell argument") from None
    if args and not args[0].startswith("-"):
        args = args[1:]  # the program name
    values: dict[str, object] = {}
    fit: dict[str, object] = {}
    ctx_set = placement_set = False
    defaults = replace(server_defaults(model, cores=None), n_gpu_layers=model.n_gpu_layers_all)
    i = 0
    while i < len(args):
        flag = args[i]
        name, _, inline = flag.partition("=") if flag.startswith("--") else (flag, "", "")
        nxt = inline or (args[i + 1] if i + 1 < len(args) else None)
        step = 1 if inline else 2
        if name in _VALUED or name in _FIT_FLAGS:
            if nxt is None:
                raise UserError(f"--baseline: {name} needs a value", f"write {name} {_METAVAR.get(name, 'N')}")
        if name in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
            ngl = _gpu_layers(name, nxt, model)
            if ngl is None:  # auto: llama-server's default
                values.pop("n_gpu_layers", None)
                placement_set = "n_cpu_moe" in values and values["n_cpu_moe"] != 0
            else:
                values["n_gpu_layers"], placement_set = ngl, True
        elif name in _VALUED:
            field = _VALUED[name]
            values[field] = _value(name, nxt, model)
            if field == "n_ctx":
                ctx_set = int(nxt) > 0
                if not ctx_set:  # llama.cpp: -c 0 asks for the full context, which --fit then keeps
                    fit["fit_min_ctx"] = None
            if field == "n_cpu_moe" and values[field]:
                placement_set = True
        elif name in _FIT_FLAGS:
            fit.update(_fit_value(name, nxt))
        elif name in ("-fa", "--flash-attn"):
            if nxt is None or nxt.startswith("-") and not inline:
                values["flash_attn"], step = True, 1  # older llama.cpp: a bare switch
            elif nxt.lower() in _TRUE | {"auto", "-1"}:
                values["flash_attn"] = True  # "auto" enables it wherever the backend supports it
            elif nxt.lower() in _FALSE:
                values["flash_attn"] = False
            else:
                raise UserError(f"--baseline: unknown --flash-attn value {nxt!r}", "use on, off or auto")
        elif name in ("-np", "--parallel"):
            if workload == "server" and nxt is not None and nxt.isdigit() and int(nxt) >= 1:
                values["n_parallel"] = int(nxt)
            elif nxt is None or nxt != "1":
                raise UserError(f"--baseline: {name} {nxt} serves several sequences; llama-tuner measures one "
                                "unless --workload server", f"use {name} 1, drop it, or add --workload server")
        elif name in ("-lm", "--load-mode"):
            values["use_mmap"] = str(nxt) in ("auto", "mmap", "mmap+mlock")
        elif name in ("-cmoe", "--cpu-moe"):  # every layer's experts in host memory
            values["n_cpu_moe"], step, placement_set = model.n_layer, 1, True
        elif name in _SWITCHES:
            key, value = _SWITCHES[name]
            values[key], step = value, 1
        elif name in _IGNORED:
            step = (1 if inline else 2) if _IGNORED[name] else 1
        else:
            raise UserError(f"--baseline: unsupported llama-server flag {name}", "remove it; llama-tuner maps "
                            "-c -b -ub -t -tb -ngl -ncmoe -cmoe -fa -ctk -ctv -fit -fitt -fitc and mmap/KV switches")
        i += step
    cfg = replace(defaults, workload=workload, **values)
    if workload == "server" and "n_parallel" not in values:
        cfg = replace(cfg, n_parallel=SERVER_AUTO_SLOTS)
    if "n_threads" in values and "n_threads_batch" not in values:
        cfg = replace(cfg, n_threads_batch=cfg.n_threads)
    try:
        cfg = cfg.resolved(model)
    except InvalidConfig as exc:
        raise UserError(f"--baseline describes an invalid configuration: {exc.problem}", exc.fix) from None
    return ServerCommand(config=replace(cfg, n_threads=values.get("n_threads"),
                                        n_threads_batch=values.get("n_threads_batch", values.get("n_threads"))),
                         ctx_set=ctx_set, placement_set=placement_set, **fit)


def _gpu_layers(flag: str, text: str, model: ModelInfo) -> int | None:
    """``-ngl``'s value: None for ``auto`` (-1, llama-server's default, which --fit fits), every layer for
    ``all`` (or below -1), else the number (at most every layer)."""
    if text == "auto":
        return None
    if text == "all":
        return model.n_gpu_layers_all
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--baseline: {flag} {text!r} is not a number", f"write {flag} N, auto or all") from None
    if n == -1:
        return None
    return model.n_gpu_layers_all if n < -1 else min(n, model.n_gpu_layers_all)


def _fit_value(flag: str, text: str) -> dict[str, object]:
    """The :class:`ServerCommand` field a --fit flag sets.

    Raises:
        UserError: a value llama-server refuses, or one margin per GPU (llama-tuner measures on one).
    """
    if flag in ("-fit", "--fit"):
        if text.lower() not in _TRUE | _FALSE:
            raise UserError(f"--baseline: unknown {flag} value {text!r}", f"use {flag} on or {flag} off")
        return {"fit": text.lower() in _TRUE}
    if flag in ("-fitt", "--fit-target"):
        parts = [p for p in text.replace("/", ",").split(",") if p]
        if len(parts) > 1:
            raise UserError(f"--baseline: {flag} {text} gives one margin per GPU; llama-tuner measures on one",
                            f"give one value, e.g. {flag} {parts[0]}")
        if not parts or not parts[0].isdigit():
            raise UserError(f"--baseline: {flag} {text!r} is not a size in MiB", f"write {flag} MiB, e.g. 1024")
        return {"fit_target_bytes": int(parts[0]) * 2**20}
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--baseline: {flag} {text!r} is not a number", f"write {flag} N, e.g. 4096") from None
    if n < 1:
        raise UserError(f"--baseline: {flag} {n} is no context", f"write {flag} N with N >= 1, e.g. 4096")
    return {"fit_min_ctx": n}


def _value(flag: str, text: str, model: ModelInfo) -> object:
    field = _VALUED[flag]
    if field in ("type_k", "type_v"):
        return text.lower()
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--baseline: {flag} {text!r} is not a number", f"write {flag} N") from None
    if field == "n_ctx" and n == 0:
        return model.n_ctx_train  # llama-server: 0 = the training context
    if field in ("n_threads", "n_threads_batch") and n <= 0:
        return None  # llama-server: <= 0 = all cores
    return n


def server_defaults(model: ModelInfo, cores: int | None, gpu_offload: bool = False,
                    n_ctx: int | None = None) -> BenchConfig:
    """llama-server's defaults: -b 2048 -ub 512, threads = physical cores, flash attention auto
    (on where supported), f16 KV cache, all layers offloaded where the build can, the training
    context (or ``n_ctx`` where the caller knows less fits)."""
    ctx = n_ctx or model.n_ctx_train or 4096
    return BenchConfig(n_gpu_layers=model.n_gpu_layers_all if gpu_offload else 0, n_ctx=ctx,
                       n_batch=min(2048, ctx), n_ubatch=min(512, ctx), n_threads=cores, n_threads_batch=cores,
                       flash_attn=True, type_k="f16", type_v="f16")
