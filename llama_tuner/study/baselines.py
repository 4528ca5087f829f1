"""Baselines: llama.cpp's own defaults, and the user's ``llama-server`` command line.

A study measures its baselines first and reports every preset's gain over them.
``--baseline`` takes a real command line, so a user can paste what they run
today; flags that change speed or memory are mapped, harmless ones (host, port,
sampling...) are accepted and ignored, and any other flag is refused by name
rather than silently measured as something else.
"""

from __future__ import annotations

import shlex
from dataclasses import replace

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.errors import UserError
from llama_tuner.model.info import ModelInfo

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
    "--timeout": True, "-to": True, "-fit": True, "--fit": True, "--mlock": False, "--jinja": False,
    "-cb": False, "--cont-batching": False, "--no-webui": False, "--metrics": False, "--log-disable": False,
    "-v": False, "--verbose": False, "--slots": False, "--no-slots": False,
}
_TRUE, _FALSE = {"on", "enabled", "1", "true"}, {"off", "disabled", "0", "false"}
SERVER_AUTO_SLOTS = 4  # llama-server's -np default (auto): 4 slots in one unified KV cache


def parse_server_flags(command: str, model: ModelInfo, workload: str = "pp-tg") -> BenchConfig:
    """The configuration a ``llama-server`` command line runs (unset flags take llama-server's defaults), for
    ``workload``: only the server workload measures several slots (``-np N``).

    Raises:
        UserError: a flag llama-tuner does not know, a bad value, or an invalid configuration.
    """
    try:
        args = shlex.split(command)
    except ValueError as exc:
        raise UserError(f"--baseline cannot be parsed: {exc}", "quote it as one shell argument") from None
    if args and not args[0].startswith("-"):
        args = args[1:]  # the program name
    values: dict[str, object] = {}
    defaults = server_defaults(model, cores=None)
    i = 0
    while i < len(args):
        flag = args[i]
        name, _, inline = flag.partition("=") if flag.startswith("--") else (flag, "", "")
        nxt = inline or (args[i + 1] if i + 1 < len(args) else None)
        step = 1 if inline else 2
        if name in _VALUED:
            if nxt is None:
                raise UserError(f"--baseline: {name} needs a value", f"write {name} N")
            values[_VALUED[name]] = _value(name, nxt, model)
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
            values["n_cpu_moe"], step = model.n_layer, 1
        elif name in _SWITCHES:
            key, value = _SWITCHES[name]
            values[key], step = value, 1
        elif name in _IGNORED:
            step = (1 if inline else 2) if _IGNORED[name] else 1
        else:
            raise UserError(f"--baseline: unsupported llama-server flag {name}", "remove it; llama-tuner maps "
                            "-c -b -ub -t -tb -ngl -ncmoe -cmoe -fa -ctk -ctv and mmap/KV switches")
        i += step
    cfg = replace(defaults, workload=workload, **values)
    if workload == "server" and "n_parallel" not in values:
        cfg = replace(cfg, n_parallel=SERVER_AUTO_SLOTS)
    if "n_threads" in values and "n_threads_batch" not in values:
        cfg = replace(cfg, n_threads_batch=cfg.n_threads)
    try:
        return cfg.resolved(model)
    except InvalidConfig as exc:
        raise UserError(f"--baseline describes an invalid configuration: {exc.problem}", exc.fix) from None


def _value(flag: str, text: str, model: ModelInfo) -> object:
    field = _VALUED[flag]
    if field in ("type_k", "type_v"):
        return text.lower()
    if field == "n_gpu_layers" and text in ("auto", "all"):
        return model.n_gpu_layers_all
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--baseline: {flag} {text!r} is not a number", f"write {flag} N") from None
    if field == "n_ctx" and n == 0:
        return model.n_ctx_train  # llama-server: 0 = the training context
    if field in ("n_threads", "n_threads_batch") and n <= 0:
        return None  # llama-server: <= 0 = all cores
    if field == "n_gpu_layers" and n < 0:
        return model.n_gpu_layers_all
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
