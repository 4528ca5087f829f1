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
from llama_tuner.model.facts import ModelFacts, TokenCost
from llama_tuner.report.artifacts import write_tables
from llama_tuner.report.study_report import study_description
from llama_tuner.report.compare import ModelRow, compare_text, row_for, versus
from llama_tuner.study.tracker import Tracker
from llama_tuner.testing.fakes import FakeLauncher
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.study.objectives import result_of
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.view import StudyView
from llama_tuner.tracking.mlflow_tracker import MlflowTracker, sync
from test_study import ENV

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
    tracker = MlflowTracker(uri, warnings.append, write_files=write_tables, describe=study_description)  # as tune
    t = study(tiny_model, tmp_path, tracker, launcher=launcher, env=None, trials=3,
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
            assert not REPACK_WORKS and d.params["repack"] == "True" and "died of SIG" in d.tags["failure_reason"]
            continue
        assert d.metrics["tg_tps"] > 0 and d.metrics["pp_tps"] > 0 and "peak_rss_bytes" in d.metrics
        assert d.tags["architecture"] == "llama" and d.tags["quant"] == "Q4_K_M"
        number = int(d.tags["optuna_trial"])
        assert t.study.trials[number].user_attrs["mlflow_run_id"] == run.info.run_id
        cfg = result_of(t.study.trials[number]).config
        assert d.tags["mlflow.runName"].startswith(f"ngl0 c{cfg.n_ctx} {cfg.type_k} ")  # named by its settings
        assert f"b{cfg.n_batch}/ub{cfg.n_ubatch}" in d.tags["mlflow.runName"]
        assert d.metrics["tg_tps"] == round(d.metrics["tg_tps"], 2)  # no 13 decimals
        # the measurement's own times, not the logging's few milliseconds
        assert run.info.end_time - run.info.start_time == pytest.approx(1000 * d.metrics["wall_time_s"], abs=2)
        reps = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "tg_tps_rep")
        assert [m.step for m in reps] == [0, 1]
    p = parent[0].data
    assert p.params["model"] == Path(tiny_model).name and p.params["min_ctx"] == "512"
    assert p.params["workload"] == "pp-tg: pp64+tg16" and p.params["objective"] == "tg" and p.params["trials"] == "3"
    assert "#### Presets" in p.tags["mlflow.note.content"] and "llama-server -m" in p.tags["mlflow.note.content"]
    exp = mlflow.MlflowClient(uri).get_experiment_by_name(Path(tiny_model).stem)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs view, not GenAI's
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent[0].info.run_id)}
    assert {"trials.csv", "presets.json", "llama-server-commands.txt", "pareto_front.png",
            "optimization_history.png"} <= artifacts


@pytest.mark.slow
def test_ui_serves_the_study_over_the_rest_api(long_context_model, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    t = study(long_context_model, tmp_path, MlflowTracker(uri, print))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llama_tuner", "ui", "--port", str(port), "--tracking-uri", uri],
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
        proc.terminate()  # ui stops its server's whole process tree (tests/test_ui.py)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
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


class CutClient:
    """An MlflowClient whose first ``method`` call on the parent run (``on="parent"``) or on a trial's run
    (``on="trial"``) raises, as when MLflow goes away in the middle of writing a run."""

    def __init__(self, client, tracker: MlflowTracker, method: str, on: str):
        self.client, self.tracker, self.method, self.on = client, tracker, method, on
        self.cut_run: str | None = None

    def __getattr__(self, name: str):
        real = getattr(self.client, name)
        if name != self.method or self.cut_run is not None:
            return real

        def cut(run_id: str, *args, **kwargs):
            if (run_id == self.tracker.parent_id) != (self.on == "parent"):
                return real(run_id, *args, **kwargs)
            self.cut_run = run_id
            raise ConnectionError("MLflow went away")

        return cut


@pytest.mark.parametrize("method,on", [("log_batch", "trial"), ("set_terminated", "trial"), ("log_batch", "parent")])
def test_sync_completes_a_run_whose_writing_was_cut_exactly_once(cli, long_context_model, tmp_path, method, on):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    warnings: list[str] = []
    tracker = MlflowTracker(uri, warnings.append)
    tracker._client = cut = CutClient(mlflow.MlflowClient(uri), tracker, method, on)
    t = study(long_context_model, tmp_path, tracker, study_name="cut")
    assert cut.cut_run is not None and len(warnings) == 1  # the cut happened, and the study went on
    done = [tr for tr in t.study.trials if tr.state.name == "COMPLETE"]
    storage = f"sqlite:///{tmp_path}/studies.db"
    first = cli("sync", "cut", "--storage", storage, "--tracking-uri", uri)
    again = cli("sync", "cut", "--storage", storage, "--tracking-uri", uri)
    assert first.code == 0 and f": {len(done)} runs written, 0 already" in first.out  # the cut run counts as missing
    assert again.code == 0 and f": 0 runs written, {len(done)} already" in again.out

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("long-context").experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "trial"]
    assert sorted(r.data.tags["optuna_trial"] for r in trial_runs) == sorted(str(tr.number) for tr in done)
    for run in trial_runs:  # each exactly once, and whole: params, metrics, final status and end
        result = result_of(t.study.trials[int(run.data.tags["optuna_trial"])])
        assert run.data.params == {k: str(v) for k, v in result.config.to_dict().items()}
        assert run.data.metrics["wall_time_s"] == round(result.wall_time_s, 3)
        assert run.info.status == ("FINISHED" if result.ok else "FAILED") and run.info.end_time
    parent = [r for r in runs if r.data.tags.get("llama_tuner.kind") == "study"]
    assert len(parent) == 1 and {"model", "objective", "trials", "workload"} <= parent[0].data.params.keys()
    if on == "trial":  # the half-written run is gone (deleted), not left beside its rewrite
        assert cut.cut_run not in {r.info.run_id for r in trial_runs}


def test_sync_cli_reports_an_unreachable_server_in_one_line(run_cli, long_context_model, tmp_path):
    study(long_context_model, tmp_path, Tracker(), study_name="s1")
    r = run_cli("sync", "s1", "--storage", f"sqlite:///{tmp_path}/studies.db", "--tracking-uri",
                f"http://127.0.0.1:{free_port()}", env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "not reachable" in r.err


def facts(n_swa: int = 0, swa_layers: tuple[int, ...] = ()) -> ModelFacts:
    """Four layers of 10..40 bytes, an output of 5 bytes, one f16 K+V cell of 2 bytes per layer."""
    return ModelFacts(architecture="llama", quant="Q8_0", name="m", n_params=1, file_size=100, n_layer=4, n_embd=8,
                      n_ff=16, n_head=2, n_vocab=32, n_swa=n_swa, swa_layers=list(swa_layers),
                      layer_bytes=[10, 20, 30, 40], output_bytes=5, token_embd_bytes=7, tied_embeddings=False,
                      k_layer_bytes={"f16": [1] * 4, "q8_0": [2] * 4}, v_layer_bytes={"f16": [1] * 4, "q8_0": [3] * 4})


def test_token_cost_follows_llama_cpp_offload_order():
    f = facts()
    assert f.token_cost(0, "f16", "f16", 0).gpu_weights == 0
    one = f.token_cost(1, "f16", "f16", 0)
    assert (one.gpu_weights, one.cpu_weights, one.offloaded_layers) == (5, 100, 0)  # output first
    three = f.token_cost(3, "f16", "f16", 10)
    assert (three.gpu_weights, three.cpu_weights, three.kv) == (5 + 30 + 40, 30, 80)  # then the last layers
    assert f.token_cost(0, "f16", "q8_0", 10).kv == 4 * (1 + 3) * 10  # K and V each of its own type


def test_sliding_window_layers_read_at_most_their_window():
    cost = facts(n_swa=4, swa_layers=(0, 1)).token_cost(0, "f16", "f16", 10)
    assert cost.kv == 2 * 2 * 10 + 2 * 2 * 4


def test_model_facts_survive_the_study_store_and_ignore_keys_of_older_versions():
    stored = {**facts().to_dict(), "kv_bytes_per_token": {"f16": {"full": 8, "swa": 0}}}
    assert ModelFacts.from_dict(stored) == facts()
    with pytest.raises(KeyError):
        ModelFacts.from_dict({"n_layer": 4})


def row(model: str, tg: float, total_bytes: int) -> ModelRow:
    cost = TokenCost(gpu_weights=total_bytes, cpu_weights=0, kv=0, offloaded_layers=4, n_layer=4)
    return ModelRow(study="s-" + model, model=model, preset="fastest", tg=tg, pp=100.0, n_ctx=4096, peak=1 << 30,
                    headroom=1 << 29, cost=cost, peak_bandwidth_gbs=1000.0)


@pytest.mark.parametrize("fast,slow,why", [
    (row("small", 100.0, 1 << 30), row("big", 50.0, 2 << 30), "reads 2.00x fewer bytes per token"),
    (row("small", 100.0, 1 << 30), row("big", 80.0, 2 << 30),
     "fewer bytes per token (1.00 GiB vs 2.00 GiB), which outweighs its 1.60x lower"),
    (row("big", 100.0, 2 << 30), row("small", 80.0, 1 << 30), "2.50x the bandwidth, which outweighs the 2.00x more"),
])
def test_the_reason_one_model_is_faster_follows_from_bytes_and_bandwidth(fast, slow, why):
    text = versus(fast, slow)
    assert text.startswith(f"{fast.model} generates {fast.tg / slow.tg:.2f}x as fast as {slow.model}")
    assert why in text
    # speed ratio = bytes ratio x bandwidth ratio: the two factors named account for the whole gap
    ratio = slow.cost.total / fast.cost.total * fast.bandwidth_gbs / slow.bandwidth_gbs
    assert fast.tg / slow.tg == pytest.approx(ratio)


class TwiceAsFast(FakeLauncher):
    """A model that reads fewer bytes per token: twice the fake's speeds."""

    def speeds(self, c):
        tg, pp = super().speeds(c)
        return 2 * tg, 2 * pp


def test_compare_of_two_recorded_studies_ranks_by_speed_and_explains_by_bytes(tiny_model, long_context_model,
                                                                              tmp_path):
    a = study(long_context_model, tmp_path, Tracker(), study_name="long", trials=6)
    b = study(tiny_model, tmp_path, Tracker(), study_name="tiny", trials=6, min_ctx=512,
              launcher=TwiceAsFast(env=ENV, weights_bytes=1 << 30, n_layer=2))
    rows = [row_for(StudyView(a.study)), row_for(StudyView(b.study))]
    fast, slow = sorted(rows, key=lambda r: -r.tg)
    text = compare_text(rows)
    table = text.split("\n\n")[0].splitlines()
    assert len(table) == 4 and "long-context.gguf" in text and "tiny-q4_k_m.gguf" in text
    for r in rows:  # each model's bytes per token come from its own header: weights of every layer, plus KV
        assert r.cost.total == sum(StudyView(a.study if r.study == "long" else b.study).facts.layer_bytes) + \
            StudyView(a.study if r.study == "long" else b.study).facts.output_bytes + r.cost.kv
    claim = text.strip().splitlines()[-1]
    assert claim.startswith(f"- {fast.model} generates {fast.tg / slow.tg:.2f}x as fast as {slow.model} (+")
    same = compare_text([row_for(StudyView(a.study)), row_for(StudyView(a.study))]).strip().splitlines()[-1]
    assert "the same speed within the noise (tie (+0.0% ±" in same  # a gap inside the noise is no claim
    if fast.cost.total < slow.cost.total:
        assert "fewer bytes per token" in claim
    else:  # the faster one reads more: only a higher achieved bandwidth can explain it
        assert "the bandwidth, which outweighs" in claim and "more bytes" in claim
