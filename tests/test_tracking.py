"""MLflow tracking with a real MLflow store, the ui command, outages and sync, and compare."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import REPACK_WORKS, ROOT
from tuner.compare import compare_text, row_for, token_cost
from tuner.fakes import FakeLauncher
from tuner.launcher import SubprocessLauncher
from tuner.probe import NoGpuProbe
from tuner.session import StudyRequest, open_tuner
from tuner.study_view import StudyView
from tuner.tracking import MlflowTracker, sync
from test_study import ENV

optuna.logging.set_verbosity(optuna.logging.WARNING)
GOLDEN = Path(__file__).parent / "golden"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def study(model, tmp_path, tracker, launcher=None, env=ENV, **kw):
    kw.setdefault("trials", 4)
    request = StudyRequest(model=str(model), storage=f"sqlite:///{tmp_path}/studies.db", seed=3, **kw)
    t = open_tuner(request, launcher=launcher or FakeLauncher(env=ENV), env=env, tracker=tracker)
    t.run()
    tracker.study_finished(StudyView(t.study))
    return t


@pytest.mark.slow
def test_a_real_study_logs_one_nested_run_per_trial(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    warnings: list[str] = []
    launcher = SubprocessLauncher(NoGpuProbe(), timeout_s=120)
    t = study(tiny_model, tmp_path, MlflowTracker(uri, warnings.append), launcher=launcher, env=None, trials=3,
              min_ctx=512,
              pins={"n_prompt": "64", "n_gen": "16", "repetitions": "2"})
    assert warnings == []
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[Path(tiny_model).stem], output_format="list")
    parent = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "trial"]
    trials = [tr for tr in t.study.trials if tr.state.name == "COMPLETE"]
    assert len(parent) == 1 and len(children) == len(trials) >= 3
    for run in children:
        d = run.data
        assert d.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert {"n_ctx", "n_batch", "n_ubatch", "n_threads", "flash_attn", "type_k"} <= set(d.params)
        assert d.tags["llama_cpp_python"] and d.tags["model_sha256"]
        if d.tags["status"] != "ok":  # llama.cpp's defaults (repack on) where its AMX kernels crash
            assert not REPACK_WORKS and d.params["repack"] == "True" and "SIGILL" in d.tags["failure_reason"]
            continue
        assert d.metrics["tg_tps"] > 0 and d.metrics["pp_tps"] > 0 and "peak_rss_bytes" in d.metrics
        assert d.tags["architecture"] == "llama" and d.tags["quant"] == "Q4_K_M"
        number = int(d.tags["optuna_trial"])
        assert t.study.trials[number].user_attrs["mlflow_run_id"] == run.info.run_id
        reps = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "tg_tps_rep")
        assert [m.step for m in reps] == [0, 1]
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent[0].info.run_id)}
    assert {"trials.csv", "presets.json", "llama-server-commands.txt", "pareto_front.png",
            "optimization_history.png"} <= artifacts


@pytest.mark.slow
def test_ui_serves_the_study_over_the_rest_api(long_context_model, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    t = study(long_context_model, tmp_path, MlflowTracker(uri, print))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "ui", "--port", str(port), "--tracking-uri", uri],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        exp = json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=long-context"))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req))["runs"]
        done = [tr for tr in t.study.trials if tr.state.name == "COMPLETE"]
        assert len(runs) == len(done) + 1  # the trials and their parent
    finally:
        os.killpg(proc.pid, 9)


@pytest.mark.slow
def test_mlflow_outage_loses_nothing_and_sync_fills_it_once(long_context_model, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    warnings: list[str] = []
    t = study(long_context_model, tmp_path, MlflowTracker(uri, warnings.append), trials=6)
    assert len(warnings) == 1 and "sync" in warnings[0]  # one warning, not one per trial
    done = [tr for tr in t.study.trials if tr.state.name == "COMPLETE"]
    assert len(done) >= 6 and all("result" in tr.user_attrs for tr in done)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--default-artifact-root", str(tmp_path / "art"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"{uri}/health")
        view = StudyView(t.study)
        assert sync(view, MlflowTracker(uri, print)) == (len(done), 0)
        assert sync(StudyView(t.study), MlflowTracker(uri, print)) == (0, len(done))
        runs = mlflow.MlflowClient(uri).search_runs(
            [mlflow.MlflowClient(uri).get_experiment_by_name("long-context").experiment_id])
        numbers = [r.data.tags.get("optuna_trial") for r in runs if r.data.tags.get("llama_tuner.kind") == "trial"]
        assert sorted(numbers) == sorted(str(tr.number) for tr in done)  # each exactly once
    finally:
        os.killpg(server.pid, 9)


def test_sync_cli_reports_an_unreachable_server_in_one_line(run_cli, long_context_model, tmp_path):
    from tuner.tracking import Tracker

    study(long_context_model, tmp_path, Tracker(), study_name="s1")
    r = run_cli("sync", "s1", "--storage", f"sqlite:///{tmp_path}/studies.db", "--tracking-uri",
                f"http://127.0.0.1:{free_port()}", env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "not reachable" in r.err


def test_token_cost_follows_llama_cpp_offload_order():
    facts = {"n_layer": 4, "layer_bytes": [10, 20, 30, 40], "output_bytes": 5, "n_swa": 0,
             "kv_bytes_per_token": {"f16": {"full": 8, "swa": 0}}}
    assert token_cost(facts, 0, "f16", "f16", 0).gpu_weights == 0
    one = token_cost(facts, 1, "f16", "f16", 0)
    assert (one.gpu_weights, one.cpu_weights, one.offloaded_layers) == (5, 100, 0)  # output first
    three = token_cost(facts, 3, "f16", "f16", 10)
    assert (three.gpu_weights, three.cpu_weights, three.kv) == (5 + 30 + 40, 30, 80)  # then the last layers


def test_compare_two_recorded_studies_matches_golden(tiny_model, long_context_model, tmp_path):
    from tuner.tracking import Tracker

    a = study(long_context_model, tmp_path, Tracker(), study_name="long", trials=6)
    b = study(tiny_model, tmp_path, Tracker(), study_name="tiny", trials=6, min_ctx=512,
              launcher=FakeLauncher(env=ENV, weights_bytes=1 << 30, n_layer=2))
    text = compare_text([row_for(StudyView(a.study)), row_for(StudyView(b.study))])
    golden = GOLDEN / "compare.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
