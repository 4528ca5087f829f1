"""Distributed studies on a real PostgreSQL server: workers, kills, restarts, a real 2-worker study."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from conftest import ROOT
from llama_tuner.errors import UserError
from llama_tuner.testing.fakes import FakeLauncher
from llama_tuner.study.objectives import BASELINE_ATTR, REUSED_ATTR, measured_trials
from llama_tuner.measure.result import Environment
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.storage import make_storage
from llama_tuner.study.coordination import retried_numbers
from llama_tuner.study.worker import join_study
from test_study import ENV

optuna.logging.set_verbosity(optuna.logging.ERROR)
HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throw-away PostgreSQL cluster in a temporary directory, on 127.0.0.1."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="llama-tuner-pg-"))
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(self.as_postgres + [str(self.bindir / tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        time.sleep(1.0)
        self.start()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self, name: str) -> str:
        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
            c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def postgres():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql; .ci/run does)")
    pg = Postgres(Path(found[-1]).parent)
    yield pg
    pg.stop()


def create_study(model, url, name, trials=30, **kw) -> None:
    """What `tune` does before measuring: the study, its request and its baselines."""
    request = StudyRequest(model=str(model), storage=url, study_name=name, trials=trials, seed=7,
                           baseline_flags="-c 8192 -b 512 -t 2", **kw)
    t = open_tuner(request, launcher=FakeLauncher(env=ENV), env=ENV, storage=make_storage(url, 1, 3))
    t.enqueue_baselines()


def start_workers(n, name, url, record, delay):
    return [subprocess.Popen([sys.executable, str(HERE / "fake_worker.py"), name, url, str(record), str(delay)])
            for _ in range(n)]


def measured_keys(record: Path) -> list[str]:
    if not record.exists():
        return []
    return [ln.split()[2] for ln in record.read_text().splitlines() if ln.startswith("end ")]


def wait_all(procs, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.monotonic()))


@pytest.mark.slow
def test_three_workers_measure_exactly_the_study_count(postgres, long_context_model, tmp_path):
    url = postgres.new_database("three")
    create_study(long_context_model, url, "three")
    record = tmp_path / "record"
    procs = start_workers(3, "three", url, record, 0.2)
    wait_all(procs)
    assert [p.returncode for p in procs] == [0, 0, 0]
    study = optuna.load_study(study_name="three", storage=url)
    measured = measured_trials(study.trials)
    assert len(measured) == 30
    keys = measured_keys(record)
    assert len(keys) == len(set(keys)) == 30  # no configuration measured twice, across processes
    baselines = [t for t in measured if BASELINE_ATTR in t.user_attrs]
    assert sorted(t.user_attrs[BASELINE_ATTR] for t in baselines) == ["llama-server defaults (fit)", "yours"]
    assert {t.user_attrs["worker"]["pid"] for t in measured} == {p.pid for p in procs}  # all three worked


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_retried(postgres, long_context_model, tmp_path):
    url = postgres.new_database("killed")
    create_study(long_context_model, url, "killed", trials=30)
    record = tmp_path / "record"
    procs = start_workers(3, "killed", url, record, 0.8)
    victim = procs[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it while it is inside a measurement
        lines = record.read_text().splitlines() if record.exists() else []
        mine = [ln for ln in lines if f" {victim.pid} " in ln]
        if len(mine) >= 3 and mine[-1].startswith("start"):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the victim never started a measurement")
    wait_all(procs[1:])
    study = optuna.load_study(study_name="killed", storage=url)
    dead = [t for t in study.trials if t.user_attrs.get("worker", {}).get("pid") == victim.pid
            and t.state == TrialState.FAIL]
    assert len(dead) == 1  # the trial it was measuring ended failed ...
    assert dead[0].number in retried_numbers(study.trials)  # ... and its configuration was queued again
    assert len(measured_trials(study.trials)) == 30


@pytest.mark.slow
def test_workers_ride_out_a_database_restart(postgres, long_context_model, tmp_path):
    url = postgres.new_database("restart")
    create_study(long_context_model, url, "restart", trials=24)
    record = tmp_path / "record"
    procs = start_workers(2, "restart", url, record, 0.3)
    while len(measured_keys(record)) < 6:
        time.sleep(0.1)
    before = {t.number for t in measured_trials(optuna.load_study(study_name="restart", storage=url).trials)}
    postgres.restart()
    wait_all(procs)
    assert [p.returncode for p in procs] == [0, 0]
    after = measured_trials(optuna.load_study(study_name="restart", storage=url).trials)
    assert before <= {t.number for t in after} and len(after) == 24  # nothing completed was lost


def test_a_machine_with_other_hardware_is_refused(long_context_model, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    create_study(long_context_model, url, "s", trials=2)
    other = Environment(**{**ENV.__dict__, "cpu": "Another CPU"})
    with pytest.raises(UserError, match="start its own study: llama-tuner tune"):
        join_study("s", url, launcher=FakeLauncher(env=other), env=other)
    with pytest.raises(UserError, match="no study named 'nope'"):
        join_study("nope", url, env=ENV)


@pytest.mark.slow
def test_a_real_two_worker_study_logs_under_one_parent(postgres, tiny_model, tmp_path):
    url = postgres.new_database("real")
    port = free_port()
    mlflow_uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/mlflow.db", "--default-artifact-root", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--storage", url, "--tracking-uri", mlflow_uri]
    try:
        from test_tracking import wait_http

        wait_http(f"{mlflow_uri}/health")
        tune = subprocess.Popen([sys.executable, "-m", "llama_tuner", "tune", str(tiny_model), "--study", "real",
                                 "--trials", "8", "--min-ctx", "512", "--set", "n_prompt=64", "--set", "n_gen=16",
                                 "--set", "repetitions=2", "--no-confirm", *common], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker joins once the study exists
            try:
                optuna.load_study(study_name="real", storage=url)
                break
            except KeyError:
                time.sleep(0.5)
        worker = subprocess.run([sys.executable, "-m", "llama_tuner", "worker", "--study", "real", *common], env=env,
                                capture_output=True, text=True, timeout=600)
        out, err = tune.communicate(timeout=600)
        assert tune.returncode == 0 and worker.returncode == 0, (err, worker.stderr)
        study = optuna.load_study(study_name="real", storage=url)
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        hosts_pids = {t.user_attrs["worker"]["pid"] for t in done if REUSED_ATTR not in t.user_attrs}
        assert len(hosts_pids) == 2 and len(measured_trials(done)) == 8
        client = mlflow.MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name(Path(tiny_model).stem)
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "study"]
        children = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "trial"]
        assert len(parents) == 1 and len(children) == len(done)
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
        assert "llama-server" in out  # tune printed the presets and commands
    finally:
        os.killpg(server.pid, signal.SIGKILL)
