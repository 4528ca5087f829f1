"""``llama-tuner ui`` as a real process tree on loopback: what it starts, and that a SIGTERM stops all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, assert_one_line_error
from test_tracking import free_port

UP_S = 240  # two loaded cores start MLflow's server in 20-100 s
JOB_WORKERS = ("huey", "mlflow.server.jobs")  # MLflow's job runner and its huey consumers


def start_ui(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``llama-tuner ui --port P ARGS`` over stores in ``tmp_path``, once its port answers HTTP."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # what a user's shell has: MLflow's default
    proc = subprocess.Popen([sys.executable, "-m", "llama_tuner", "ui", "--port", str(port), *args], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + UP_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, port
        except urllib.error.HTTPError:  # an answer all the same
            return proc, port
        except OSError:
            time.sleep(0.5)
    stop(proc, tree(proc))
    raise TimeoutError(f"llama-tuner ui did not answer on port {port} (exit code {proc.poll()})")


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every descendant of ``proc`` now alive."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has stopped; only its parent has not reaped it)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def stop(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """Kill whatever a test left running, the ui and each descendant it had."""
    for p in alive(procs) + ([psutil.Process(proc.pid)] if proc.poll() is None else []):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
def test_ui_starts_mlflow_without_its_job_runner_and_workers(tmp_path):
    proc, _ = start_ui(tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    procs = tree(proc)
    try:
        time.sleep(3)  # MLflow starts its job runner beside the server, and the runner its consumers
        procs = tree(proc)
        assert any("mlflow" in cmdline(p) for p in procs)  # the server is among them
        jobs = [cmdline(p) for p in procs if any(w in cmdline(p) for w in JOB_WORKERS)]
        assert jobs == [], f"{len(jobs)} job processes for a UI that runs no jobs"
    finally:
        stop(proc, procs)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mlflow", "dashboard"])
def test_sigterm_of_ui_stops_its_whole_process_tree(tmp_path, which):
    args = (["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"] if which == "mlflow" else
            ["--dashboard", "--storage", f"sqlite:///{tmp_path}/studies.db"])
    proc, _ = start_ui(tmp_path, *args)
    procs = tree(proc)
    try:
        assert procs  # the server, at least
        proc.send_signal(signal.SIGTERM)  # to llama-tuner only, as `kill PID` does
        deadline = time.monotonic() + 15
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{p.pid} {cmdline(p)[:120]}" for p in alive(procs)]
        assert left == [], f"{len(left)} of {len(procs)} processes outlived llama-tuner ui"
        assert proc.wait(5) == 0  # the server's own exit from a clean stop, not death by the signal (-15)
    finally:
        stop(proc, procs)


# A server that starts a worker in a session of its own (out of its process group), which ignores SIGTERM.
STUBBORN = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "open(sys.argv[1], 'w').close(); time.sleep(600)", sys.argv[1]], start_new_session=True)
time.sleep(600)
"""


def test_a_stop_signal_ends_the_server_and_workers_that_left_its_group_or_ignore_sigterm(tmp_path):
    ready = tmp_path / "worker-ready"
    runner = (f"import sys; from llama_tuner.cli.tracking import run_server; "
              f"sys.exit(run_server([sys.executable, '-c', {STUBBORN!r}, {str(ready)!r}], env={{}}, grace_s=1))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", runner], env=env, start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = tree(proc)
        assert len(procs) == 2  # the server and its worker
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        assert alive(procs) == []  # the worker too, by SIGKILL after the grace
        assert code == 128 + signal.SIGTERM  # the server died of the SIGTERM passed on, and so does the runner
    finally:
        stop(proc, procs)


def test_a_server_that_exits_by_itself_passes_its_exit_code_on():
    from llama_tuner.cli.tracking import run_server

    assert run_server([sys.executable, "-c", "import sys; sys.exit(3)"], env=dict(os.environ)) == 3


def test_dashboard_on_a_bad_storage_url_is_one_line(cli):
    assert_one_line_error(cli("ui", "--dashboard", "--storage", "nosuchdb://x", "--port", str(free_port())),
                          "storage")
