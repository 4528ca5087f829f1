"""Finding llama-server, and what it accepts: its version and the flags its ``--help`` lists.

Where llama-server is looked for, first found first: ``--llama-server PATH`` (a path, or a name on PATH), else
``$LLAMA_TUNER_LLAMA_SERVER`` (a path; ``none``: no llama-server, so ``serve`` falls back to llama-cpp-python's
server), else ``llama-server`` on PATH, else the one ``make llama-server`` built in this checkout
(``.cache/llama.cpp/llama-server``, a link to ``.cache/llama.cpp/<llama.cpp commit>/<cpu|cuda>/bin/llama-server``).

llama.cpp renames and retires flags (``--no-mmap`` became ``--load-mode none``; ``--flash-attn`` was a switch
before it took ``on|off|auto``), so a command is spelled for the binary that runs it: :func:`probe` reads the
spellings from its ``--help`` (each option line starts with its flags, then an optional value hint, then the help
text). This module imports nothing of llama_cpp.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from llama_tuner.errors import UserError

ENV_VAR = "LLAMA_TUNER_LLAMA_SERVER"
NONE = "none"  # $LLAMA_TUNER_LLAMA_SERVER=none: do not look for one
# `make llama-server` links its last build here.
CACHED = Path(__file__).resolve().parents[2] / ".cache" / "llama.cpp" / "llama-server"
PROBE_TIMEOUT_S = 60
BUILD_HINT = "`make llama-server` builds the llama.cpp llama-tuner measures with"

_FLAG = re.compile(r"--?[A-Za-z0-9][\w.+-]*")


@dataclass(frozen=True)
class LlamaServer:
    """A llama-server binary: its path, the version it reports and the flags it accepts (each spelling, short and
    long, to its value hint such as ``N`` or ``[on|off|auto]``; None for a switch that takes no value)."""

    path: str
    version: str
    flags: dict[str, str | None] = field(repr=False)

    def takes_value(self, flag: str) -> bool:
        """Whether ``flag`` (one it accepts) is followed by a value."""
        return self.flags.get(flag) is not None

    def spec_types(self) -> tuple[str, ...]:
        """The ``--spec-type`` values its ``--help`` lists (``none,draft-simple,...,ngram-mod``); () without one."""
        hint = self.flags.get("--spec-type") or ""
        return tuple(t for t in re.split(r"[\s,|\[\]<>]+", hint) if t)

    def require(self, flag: str, fix: str = BUILD_HINT) -> None:
        """Check that this llama-server accepts ``flag``.

        Raises:
            UserError: it does not, naming the flag, the binary and its version.
        """
        if flag not in self.flags:
            raise UserError(f"this llama-server ({self.path}, version {self.version}) has no {flag}",
                            f"use a newer llama-server ({fix})")


def find_llama_server(explicit: str | None = None) -> str | None:
    """The path of the llama-server to run (see the module's docstring for the order), None where there is none.

    Raises:
        UserError: ``explicit`` or ``$LLAMA_TUNER_LLAMA_SERVER`` names no program here.
    """
    if explicit:
        exe = shutil.which(explicit)
        if exe is None:
            raise UserError(f"--llama-server {explicit} is not a program here", "give the path to llama-server")
        return exe
    env = os.environ.get(ENV_VAR)
    if env == NONE:
        return None
    if env:
        exe = shutil.which(env)
        if exe is None:
            raise UserError(f"{ENV_VAR}={env} is not a program here",
                            f"give the path to llama-server, or unset {ENV_VAR}")
        return exe
    return shutil.which("llama-server") or (str(CACHED) if os.access(CACHED, os.X_OK) else None)


def parse_help(text: str) -> dict[str, str | None]:
    """The flags a llama.cpp ``--help`` lists, each to its value hint (None: a switch).

    An option line starts (unindented, or by at most 4 spaces in older builds) with its flags separated by
    commas, then the value hint, then two or more spaces and the help text, which may go on in lines indented
    by 40 spaces; ``-fa,   --flash-attn [on|off|auto]`` gives ``-fa`` and ``--flash-attn`` with the hint
    ``[on|off|auto]``.
    """
    flags: dict[str, str | None] = {}
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if indent > 4 or not line.lstrip().startswith("-"):
            continue
        head = re.split(r"\s{2,}", re.sub(r",\s+", ", ", line.strip()), maxsplit=1)[0]
        *names, last = head.split(", ")
        last, _, hint = last.partition(" ")
        names.append(last)
        if not all(_FLAG.fullmatch(n) for n in names):
            continue
        for n in names:
            flags[n] = hint.strip() or None
    return flags


def parse_version(text: str) -> str:
    """What ``llama-server --version`` says of itself: ``0.5.0-dev (build 1, commit 0c1e570)`` from
    ``version: 0.5.0-dev (build 1, commit 0c1e570)``, ``1 (0c1e570)`` from an older ``version: 1 (0c1e570)``;
    else its first line, else ``unknown``."""
    m = re.search(r"^version:\s*(.+?)\s*$", text, re.MULTILINE)
    if m:
        return m.group(1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "unknown"


def probe(path: str) -> LlamaServer:
    """The version and flags of the llama-server at ``path``, read once per binary (path, mtime and size).

    Raises:
        UserError: it does not run, does not answer in time, or its ``--help`` lists no flags.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UserError(f"llama-server {path} cannot be read ({exc.strerror})", "give the path to llama-server") \
            from None
    return _probe(os.path.realpath(path), st.st_mtime_ns, st.st_size, path)


@lru_cache(maxsize=16)
def _probe(real: str, mtime_ns: int, size: int, path: str) -> LlamaServer:
    help_text = _run(path, "--help")
    flags = parse_help(help_text)
    if "--port" not in flags or "--ctx-size" not in flags:
        raise UserError(f"{path} is not a llama-server: its --help lists no --ctx-size and --port",
                        f"give the path to llama-server ({BUILD_HINT})")
    return LlamaServer(path=path, version=parse_version(_run(path, "--version")), flags=flags)


def _run(path: str, arg: str) -> str:
    """stdout and stderr of ``path arg`` (llama.cpp prints its usage on stdout, its version on stderr)."""
    try:
        r = subprocess.run([path, arg], capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{path} {arg} did not answer in {PROBE_TIMEOUT_S} s", "give the path to llama-server") \
            from None
    except OSError as exc:
        raise UserError(f"{path} does not run ({exc.strerror})", "give the path to llama-server") from None
    return r.stdout + r.stderr


@dataclass(frozen=True)
class Device:
    """A device llama.cpp offloads to, as ``--list-devices`` names it: ``CUDA0``, ``ROCm0``, ``Vulkan0``, ``MTL0``."""

    name: str
    description: str
    total_bytes: int
    free_bytes: int


_DEVICE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$", re.MULTILINE)


def parse_devices(text: str) -> list[Device]:
    """The devices of ``--list-devices``'s output (``  CUDA0: NVIDIA H200 (143771 MiB, 142888 MiB free)``, one a
    line after ``Available devices:``; a CPU-only build lists none)."""
    return [Device(m.group(1), m.group(2), int(m.group(3)) * 2**20, int(m.group(4)) * 2**20)
            for m in _DEVICE.finditer(text)]


def list_devices(path: str) -> list[Device]:
    """The GPUs (and other offload devices) the llama-server at ``path`` can use, with their memory now: CUDA,
    ROCm, Vulkan, Metal and SYCL builds alike.

    Raises:
        UserError: it does not run or does not answer in time.
    """
    return parse_devices(_run(path, "--list-devices"))
