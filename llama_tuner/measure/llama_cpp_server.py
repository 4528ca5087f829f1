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
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llama_tuner.measure.child import GGML_TYPES


def model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The llama_cpp.server ModelSettings fields for a preset's settings (unknown fields are not passed:
    llama-cpp-python would silently ignore them)."""
    return {"model": settings["model_path"], "model_alias": settings.get("alias"),
            "n_gpu_layers": settings["n_gpu_layers"], "n_ctx": settings["n_ctx"], "n_batch": settings["n_batch"],
            "n_ubatch": settings["n_ubatch"], "n_threads": settings["n_threads"],
            "n_threads_batch": settings["n_threads_batch"], "flash_attn": settings["flash_attn"],
            "type_k": GGML_TYPES[settings["type_k"]], "type_v": GGML_TYPES[settings["type_v"]],
            "use_mmap": settings["use_mmap"], "offload_kqv": settings["offload_kqv"],
            "chat_format": settings.get("chat_format"), "verbose": False}


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
