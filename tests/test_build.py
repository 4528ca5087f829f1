"""The build: the Makefile's choice of a CUDA or CPU llama-cpp-python, and the exact release the child is written
for, pinned in pyproject.toml and the Makefile and checked in the optimizer and in the child."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.measure.llama_cpp_pin import FIX, LLAMA_CPP_PYTHON
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.measure.result import Status

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="needs GNU make")
H200 = "GPU 0: NVIDIA H200 (UUID: GPU-3a1c6a40-0d4d-1f6c-5e2b-8c0e7d0f1a2b)"


def _stub(bin_dir: Path, name: str, out: str, code: int = 0) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho '{out}'\nexit {code}\n")
    path.chmod(0o755)


def make_n(tmp_path: Path, *, smi: tuple[str, int] | None, nvcc: bool, args: tuple[str, ...] = ()) -> str:
    """``make -n install`` with only stub programs on PATH: ``smi`` is what a fake nvidia-smi prints and its exit
    code (None: no nvidia-smi), ``nvcc`` whether a fake nvcc exists; the venv a fresh one under ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        _stub(bin_dir, "nvidia-smi", *smi)
    if nvcc:
        _stub(bin_dir, "nvcc", "Cuda compilation tools, release 13.0")
    p = subprocess.run([MAKE, "-n", "install", f"VENV={tmp_path / 'venv'}", *args], cwd=ROOT, capture_output=True,
                       text=True, env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    return p.stdout


@needs_make
@pytest.mark.parametrize("smi,nvcc,args,cuda,why", [
    ((H200, 0), True, (), True, "NVIDIA GPU and nvcc found"),
    (None, True, (), False, "no NVIDIA GPU found"),  # this machine: nvcc but no driver
    (("No devices were found", 6), True, (), False, "no NVIDIA GPU found"),  # a driver, no device
    ((H200, 0), False, (), False, "no nvcc on PATH"),
    ((H200, 0), True, ("CUDA=0",), False, "CUDA=0"),
    (None, False, ("CUDA=1",), True, "CUDA=1"),
])
def test_make_builds_with_cuda_where_a_gpu_is_listed_and_nvcc_exists(tmp_path, smi, nvcc, args, cuda, why):
    out = make_n(tmp_path, smi=smi, nvcc=nvcc, args=args)
    assert ('CMAKE_ARGS="-DGGML_CUDA=on"' in out) == cuda, out
    assert f"touch {tmp_path / 'venv'}/.installed-cuda{int(cuda)}" in out  # the stamp names the build
    [line] = [ln for ln in out.splitlines() if ln.startswith("echo ")]
    build = "CUDA build" if cuda else "CPU build"
    assert line.startswith(f'echo "llama-cpp-python {LLAMA_CPP_PYTHON}: {build} (') and why in line, line


@needs_make
def test_make_reinstalls_only_when_the_build_changes(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-cuda0").touch()  # a CPU build, newer than pyproject.toml
    cpu = make_n(tmp_path, smi=None, nvcc=True)
    assert "pip install" not in cpu and "CPU build" in cpu  # up to date: nothing to install, the build named
    gpu = make_n(tmp_path, smi=(H200, 0), nvcc=True)  # the same venv on a machine with a GPU: rebuilt for CUDA
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in gpu and "rm -f" in gpu and ".installed-cuda1" in gpu


@needs_make
def test_make_refuses_a_cuda_value_it_does_not_know(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    p = subprocess.run([MAKE, "-n", "install", "CUDA=yes", f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True,
                       text=True, env={"PATH": str(bin_dir)})
    assert p.returncode != 0 and "CUDA=1" in p.stderr and "CUDA=0" in p.stderr


def test_pyproject_and_the_makefile_pin_the_release_the_child_is_written_for():
    deps = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    [pin] = [d for d in re.findall(r'"([^"]+)"', deps) if d.startswith("llama-cpp-python")]
    assert pin == f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON}"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LLAMA_CPP_VERSION := (\S+)$", makefile, re.M).group(1) == LLAMA_CPP_PYTHON


# -- the optimizer's check, before any work --------------------------------------

def _installed(monkeypatch, version: str | None) -> None:
    real = metadata.version

    def fake(name: str) -> str:
        if name != "llama-cpp-python":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", fake)


def _no_child(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"a child was started: {args}")

    monkeypatch.setattr("llama_tuner.measure.launcher.subprocess.Popen", refuse)
    monkeypatch.setattr("llama_tuner.measure.environment.subprocess.run", refuse)


def test_bench_with_another_llama_cpp_python_is_one_line_naming_both_releases_and_the_fix(cli, tiny_model,
                                                                                           monkeypatch):
    _installed(monkeypatch, "0.3.35")
    _no_child(monkeypatch)
    assert_one_line_error(cli("bench", tiny_model), "llama-cpp-python 0.3.35 is installed",
                          f"structs for {LLAMA_CPP_PYTHON}", FIX)


def test_tune_without_llama_cpp_python_says_so_before_any_work(cli, tiny_model, tmp_path, monkeypatch):
    _installed(monkeypatch, None)
    _no_child(monkeypatch)
    r = cli("tune", tiny_model, "--min-ctx", "512", "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow")
    assert_one_line_error(r, "llama-cpp-python is not installed", FIX)
    assert not (tmp_path / "s.db").exists()


def test_a_local_build_label_of_the_pinned_release_is_that_release(monkeypatch):
    _installed(monkeypatch, f"{LLAMA_CPP_PYTHON}+cu124")
    SubprocessLauncher(NoGpuProbe())  # no error
    _installed(monkeypatch, f"{LLAMA_CPP_PYTHON}.1")
    with pytest.raises(UserError, match=re.escape(f"{LLAMA_CPP_PYTHON}.1 is installed")):
        SubprocessLauncher(NoGpuProbe())


# -- the child's check, where llama_cpp.__version__ is what is loaded -----------

def test_the_child_ends_every_run_as_a_load_error_under_another_release(monkeypatch):
    import llama_cpp

    from llama_tuner.measure import child

    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    job = {"model_path": "/nonexistent.gguf", "model_params": {"n_gpu_layers": 0},
           "runs": [{"index": 3, "config": {}}, {"index": 4, "config": {}}]}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(job)))
    read_fd, write_fd = os.pipe()
    child.main(["--events-fd", str(write_fd)])  # nothing is loaded: the model path does not even exist
    with os.fdopen(read_fd) as f:
        events = [json.loads(line) for line in f]
    assert [(e["event"], e["index"], e["status"]) for e in events] == [("result", 3, "load_error"),
                                                                        ("result", 4, "load_error")]
    reason = events[0]["reason"]
    assert "0.3.99" in reason and LLAMA_CPP_PYTHON in reason and FIX in reason
    with pytest.raises(SystemExit, match="0.3.99"):  # --info, which build_environment asks, fails with it
        child.main(["--info"])


@pytest.mark.slow
def test_a_real_child_under_another_release_is_a_load_error_result(tmp_path, tiny_model):
    (tmp_path / "sitecustomize.py").write_text("import llama_cpp\nllama_cpp.__version__ = '0.3.99'\n")
    launcher = SubprocessLauncher(NoGpuProbe(), timeout_s=60, extra_env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    [r] = launcher.measure(str(tiny_model), [BenchConfig(n_ctx=512, n_batch=64, n_ubatch=64, n_prompt=8, n_gen=2,
                                                         repetitions=1, n_threads=1)])
    assert r.status == Status.LOAD_ERROR and "0.3.99" in r.reason and FIX in r.reason, r.reason
