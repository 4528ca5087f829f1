"""Shared fixtures: generated GGUF models, the demo model, and a CLI runner in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.model.twins import SHAPES, Shape, write_synthetic_gguf

ROOT = Path(__file__).resolve().parent.parent
# Where llama.cpp's AMX kernels die of SIGILL (llama_tuner.measure.repack_check), tests measure with repack off.
REPACK_WORKS = SubprocessLauncher(NoGpuProbe()).repack_crash() is None
NO_REPACK = "" if REPACK_WORKS else " --no-repack"


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Keep the model-hash cache of tests (and of the CLI processes they start) out of the user's."""
    os.environ["LLAMA_TUNER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where no NVIDIA GPU is visible."""
    from llama_tuner.measure.probe import NoGpuProbe, detect_probe

    if isinstance(detect_probe(), NoGpuProbe):
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run through ../shared/device)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A directory for generated model files shared by the whole session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir) -> Path:
    """A 2-layer llama-shaped Q4_K_M model (about 1 MB) that llama.cpp loads in milliseconds."""
    return write_synthetic_gguf(models_dir / "tiny-q4_k_m.gguf", SHAPES["tiny"], "q4_k_m")


@pytest.fixture(scope="session")
def small_model(models_dir) -> Path:
    """A 4-layer, 512-wide Q8_0 model: still fast, but slow enough to time."""
    return write_synthetic_gguf(models_dir / "small-q8_0.gguf", SHAPES["small"], "q8_0")


@pytest.fixture(scope="session")
def long_context_model(models_dir) -> Path:
    """4 layers with 8 KV heads of 128 and a 131072-token context: its full KV cache needs 2 GiB."""
    shape = Shape(arch="llama", n_layer=4, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128, n_ff=1024,
                  n_vocab=1024, n_ctx_train=131072)
    return write_synthetic_gguf(models_dir / "long-context.gguf", shape, "q8_0")


@pytest.fixture(scope="session")
def unknown_arch_model(models_dir) -> Path:
    """A well-formed GGUF whose architecture llama.cpp does not know: a load error."""
    shape = Shape(arch="nosucharch", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=1024)
    return write_synthetic_gguf(models_dir / "nosucharch.gguf", shape, "q8_0")


@pytest.fixture(scope="session")
def demo_model_path(models_dir) -> Path:
    """The real Gemma 3 270M Q4_K_M from the demo package."""
    from llama_tuner.model.demo import demo_model

    return demo_model(models_dir)


@pytest.fixture(scope="session")
def bad_files(models_dir, tiny_model) -> dict[str, Path]:
    """Each kind of bad model path: missing, a directory, not GGUF, truncated header and data."""
    data = tiny_model.read_bytes()
    bad = models_dir / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "adir").mkdir(exist_ok=True)
    (bad / "notgguf.gguf").write_text("this is not a model\n")
    (bad / "empty.gguf").write_bytes(b"")
    (bad / "trunc-header.gguf").write_bytes(data[:2000])
    (bad / "trunc-data.gguf").write_bytes(data[: len(data) // 2])
    return {"missing": bad / "nope.gguf", "directory": bad / "adir", "not_gguf": bad / "notgguf.gguf",
            "empty": bad / "empty.gguf", "truncated_header": bad / "trunc-header.gguf",
            "truncated_data": bad / "trunc-data.gguf"}


@dataclass
class CliResult:
    """What a real ``python -m llama_tuner`` process did."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli():
    """Run ``python -m llama_tuner ARGS`` in a real process (so exit codes and tracebacks are real): for commands
    that start children, and to check what a real process prints."""

    def run(*args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        p = subprocess.run([sys.executable, "-m", "llama_tuner", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=full_env, cwd=cwd or ROOT)
        return CliResult(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture
def cli():
    """Run ``llama-tuner ARGS`` in this process through click's CliRunner: for commands that start no child."""
    from click.testing import CliRunner

    from llama_tuner.cli.main import cli as group

    def run(*args: str) -> CliResult:
        result = CliRunner().invoke(group, [str(a) for a in args], prog_name="llama-tuner")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback a real process would print: fail with it
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', no traceback, naming ``needles``."""
    assert result.code == 2, (result.code, result.err)
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.fixture
def no_work_before_checks(monkeypatch):
    """Fail the test if a tune starts real work (the machine's environment, the GPU probe, the repack check)
    before its input is checked: bad input is refused before anything costly runs."""
    def work(*_, **__):
        raise AssertionError("work started before the input was checked")

    for target in ("llama_tuner.study.session.build_environment", "llama_tuner.study.session.detect_probe",
                   "llama_tuner.measure.launcher.SubprocessLauncher.repack_crash"):
        monkeypatch.setattr(target, work)
