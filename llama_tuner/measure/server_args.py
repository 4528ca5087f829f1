"""A configuration as llama-server's command line, spelled for the binary that runs it.

Shared by the llama-server engine (:mod:`llama_tuner.measure.server_engine`), ``verify`` and the exports
(:mod:`llama_tuner.report.export`), so that what is measured is what is exported.
"""

from __future__ import annotations

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.llama_server import LlamaServer

_SWITCHES = {"--kv-unified", "--no-repack", "--swa-full", "--no-kv-offload"}  # llama_server_args's flags without value


LLAMA_SERVER_CACHE_RAM_MIB = 8192  # --cache-ram's default at 0c1e570: a host prompt cache of up to 8 GiB


def llama_server_args(model_path: str, c: BenchConfig, program: str = "llama-server", *,
                      server: LlamaServer | None = None, cache_ram_mib: int | None = None) -> list[str]:
    """The llama-server argument list for ``c`` (the program first), spelled as llama.cpp at the commit
    llama-cpp-python vendors spells it, or, given ``server``, as that binary's ``--help`` does.

    ``--parallel`` is explicit: the figures are for one sequence (or, for the server
    workload, for its N streams), and a server with several slots divides the
    context among them unless its cache is unified, as it was measured (``--kv-unified``).

    ``cache_ram_mib`` writes ``--cache-ram N``: llama-server's host prompt cache, which grows in RAM as
    conversations are cached, beyond what a measurement shows; None leaves llama-server's default.

    Raises:
        UserError: ``server`` lacks a flag the preset needs (named, with the binary and its version).
    """
    args = [program, "-m", model_path, "--ctx-size", str(c.n_ctx), "--batch-size", str(c.n_batch),
            "--ubatch-size", str(c.n_ubatch), "--n-gpu-layers", str(c.n_gpu_layers), "--threads", str(c.n_threads),
            "--threads-batch", str(c.n_threads_batch), "--flash-attn", "on" if c.flash_attn else "off",
            "--cache-type-k", c.type_k, "--cache-type-v", c.type_v, "--parallel", str(c.n_parallel)]
    if c.n_parallel > 1:
        args.append("--kv-unified")
    if c.n_cpu_moe:
        args += ["--n-cpu-moe", str(c.n_cpu_moe)]
    if not c.use_mmap:
        args += ["--load-mode", "none"]
    if not c.repack:
        args.append("--no-repack")
    if c.swa_full:
        args.append("--swa-full")
    if not c.offload_kqv:
        args.append("--no-kv-offload")
    if c.speculative:
        args += ["--spec-type", c.spec_type]
    if c.draft_model:
        args += ["--spec-draft-model", c.draft_model]
    if c.spec_draft_n_max:
        args += ["--spec-draft-n-max", str(c.spec_draft_n_max)]
    if cache_ram_mib is not None:
        args += ["--cache-ram", str(cache_ram_mib)]
    return args if server is None else respell(args, server)


def respell(args: list[str], server: LlamaServer) -> list[str]:
    """``args`` (llama_server_args's spelling) as ``server`` accepts them: ``--no-mmap`` for ``--load-mode none``
    where it has no ``--load-mode`` (llama.cpp before the load modes); a bare ``--flash-attn`` for on and nothing
    for off where the flag is a switch (before it took on|off|auto, when off was the default).

    Raises:
        UserError: ``server`` lacks a flag that ``args`` needs.
    """
    out = args[:1]
    i = 1
    while i < len(args):
        flag = args[i]
        value = None if flag in _SWITCHES else args[i + 1]
        i += 1 if value is None else 2
        if flag == "--load-mode" and "--load-mode" not in server.flags and "--no-mmap" in server.flags:
            out.append("--no-mmap")
            continue
        server.require(flag)
        if flag == "--flash-attn" and not server.takes_value(flag):
            out += ["--flash-attn"] if value == "on" else []
            continue
        out += [flag] if value is None else [flag, value]
    return out
