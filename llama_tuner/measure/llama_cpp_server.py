"""llama-cpp-python's OpenAI-compatible server, started with a preset's settings (``llama-tuner serve``).

Run as ``python -m llama_tuner.measure.llama_cpp_server SETTINGS_JSON`` where no ``llama-server``
binary is at hand. Like the measuring child, it is a process of its own that imports
llama_cpp; the optimizer never does. The settings are a BenchConfig's, plus model path,
host and port.

llama-cpp-python's server takes most of llama.cpp's settings, but not weight repacking nor
the sliding-window cache size: its ``Llama`` fills them from llama.cpp's defaults (repack on,
full-size SWA cache). Those defaults are patched to the preset's values before the model
loads (repack off where a CPU's AMX kernels crash with it on; the smaller SWA cache the
preset's memory was measured with), so the server runs what was measured.

Two settings it cannot carry at all, and ``serve`` refuses such a preset (:func:`check_servable`):
experts in host memory (``n_cpu_moe``: its server never fills ``Llama``'s tensor_buft_overrides)
and several streams (``n_parallel``: one ``Llama`` decodes one sequence at a time). Its server's
own defaults that differ from what was measured are overridden: ``logits_all`` off (on, ``Llama``
allocates n_ctx x n_vocab float32 scores up front, 32 GiB for 32,768 tokens of a 262k vocabulary,
and computes every prompt token's logits) and mlock off (the measuring child never locks the
weights). Without ``logits_all`` it answers no ``logprobs`` (a request for them gets an error);
llama-server does. The test's sizes and seed (``workload``, ``n_prompt``, ``n_gen``, ``n_depth``,
``repetitions``, ``seed``) are what was measured, not server settings, and llama-server takes
none of them either.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig

LLAMA_SERVER_FIX = "install llama-server or pass --llama-server PATH"


def check_servable(cfg: BenchConfig) -> None:
    """Refuse a preset llama-cpp-python's server cannot run as measured (imports nothing of llama_cpp).

    Raises:
        UserError: the preset keeps experts in host memory (n_cpu_moe > 0) or decodes several streams
            (n_parallel > 1) or decodes speculatively; llama-server runs them all.
    """
    missing = []
    if cfg.n_cpu_moe > 0:
        missing.append(f"keep experts in host memory (--n-cpu-moe {cfg.n_cpu_moe})")
    if cfg.n_parallel > 1:
        missing.append(f"serve {cfg.n_parallel} streams at once (--parallel {cfg.n_parallel})")
    if cfg.speculative:
        missing.append(f"decode speculatively (--spec-type {cfg.spec_type})")
    if missing:
        raise UserError(f"llama-cpp-python's server cannot {' nor '.join(missing)}", LLAMA_SERVER_FIX)


def model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The llama_cpp.server ModelSettings fields for a preset's settings (unknown fields are not passed:
    llama-cpp-python would silently ignore them). ``logits_all`` and ``use_mlock`` are off, as measured
    (the server's defaults have both on)."""
    from llama_tuner.measure.child import GGML_TYPES  # imports llama_cpp: only in the server's process

    return {"model": settings["model_path"], "model_alias": settings.get("alias"),
            "n_gpu_layers": settings["n_gpu_layers"], "n_ctx": settings["n_ctx"], "n_batch": settings["n_batch"],
            "n_ubatch": settings["n_ubatch"], "n_threads": settings["n_threads"],
            "n_threads_batch": settings["n_threads_batch"], "flash_attn": settings["flash_attn"],
            "type_k": GGML_TYPES[settings["type_k"]], "type_v": GGML_TYPES[settings["type_v"]],
            "use_mmap": settings["use_mmap"], "use_mlock": False, "offload_kqv": settings["offload_kqv"],
            "logits_all": False, "chat_format": settings.get("chat_format"), "verbose": False}


def _patch_defaults(*, repack: bool, swa_full: bool) -> None:
    """Make llama.cpp's default params carry the preset's repack and swa_full (llama-cpp-python's server
    has no setting for either)."""
    from llama_cpp import llama_cpp as C

    model_defaults, context_defaults = C.llama_model_default_params, C.llama_context_default_params

    def model_params():
        params = model_defaults()
        params.use_extra_bufts = repack
        return params

    def context_params():
        params = context_defaults()
        params.swa_full = swa_full
        return params

    C.llama_model_default_params, C.llama_context_default_params = model_params, context_params


def main(argv: list[str] | None = None) -> None:
    """Serve the settings given as JSON in the first argument until interrupted."""
    settings = json.loads((argv or sys.argv[1:])[0])
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    _patch_defaults(repack=bool(settings.get("repack", True)), swa_full=bool(settings.get("swa_full", False)))
    app = create_app(server_settings=ServerSettings(host=settings["host"], port=settings["port"]),
                     model_settings=[ModelSettings(**model_settings(settings))])
    uvicorn.run(app, host=settings["host"], port=settings["port"], log_level="warning")


if __name__ == "__main__":
    main()
