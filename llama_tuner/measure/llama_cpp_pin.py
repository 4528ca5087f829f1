"""The one llama-cpp-python release the measuring child is written for, and the checks that it is installed.

The child declares llama.cpp's structs with ctypes itself (``BuftOverride`` in :mod:`llama_tuner.measure.child`,
``ThreadpoolParams`` in :mod:`llama_tuner.measure.threadpool`) and sets fields of llama-cpp-python's own
(``llama_model_params.load_mode``, ``llama_context_params.flash_attn_type``): another release may lay them out
otherwise, which does not fail but reads or writes the wrong bytes. So the release is pinned exactly (pyproject.toml,
the Makefile) and checked before any work: in the optimizer from the installed distribution's metadata
(:func:`require_llama_cpp_python`; the optimizer never imports llama_cpp), and in the child from
``llama_cpp.__version__`` (:func:`version_problem`). This module imports nothing of llama_cpp.
"""

from __future__ import annotations

from importlib import metadata

from llama_tuner.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"
FIX = f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON}"


def version_problem(installed: str | None) -> str | None:
    """Why llama-cpp-python ``installed`` (None: not installed) is not the release the child's structs are
    declared for; None when it is that release (a local build label such as ``+cu124`` aside)."""
    if installed is not None and installed.split("+")[0] == LLAMA_CPP_PYTHON:
        return None
    found = "is not installed" if installed is None else f"{installed} is installed"
    return f"llama-cpp-python {found}, but llama-tuner declares llama.cpp's structs for {LLAMA_CPP_PYTHON}"


def require_llama_cpp_python() -> None:
    """Check, without importing llama_cpp, that the installed llama-cpp-python is :data:`LLAMA_CPP_PYTHON`.

    Raises:
        UserError: another release is installed, or none.
    """
    try:
        installed = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        installed = None
    problem = version_problem(installed)
    if problem:
        raise UserError(problem, f"`{FIX}` (or `make install`, which builds it for this machine)")
