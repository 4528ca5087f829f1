"""From a preset to a running server, and to a llama-swap configuration."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import mlflow
import pytest
import yaml

from conftest import REPACK_WORKS, ROOT, assert_one_line_error
from test_study import ENV
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.llama_cpp_server import model_settings
from llama_tuner.errors import UserError
from llama_tuner.measure.llama_server import ENV_VAR as LLAMA_SERVER_ENV
from llama_tuner.measure.llama_server import find_llama_server, probe
from llama_tuner.model.info import load_model_info
from llama_tuner.report.export import llama_server_args
from llama_tuner.model.twins import SHAPES, write_synthetic_gguf
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.view import StudyView
from llama_tuner.testing.fakes import FakeLauncher

TWO_CORES = replace(ENV, physical_cores=2)


def fake_study(model, storage: str, name: str, *, pins: dict[str, str] | None = None) -> StudyView:
    """A study whose presets come from the fake launcher: serving needs a real model file, not real figures."""
    crash = None if REPACK_WORKS else "child died of SIGSEGV"
    t = open_tuner(StudyRequest(model=str(model), storage=storage, study_name=name, trials=4, seed=1, min_ctx=1024,
                                pins=pins or {}),
                   launcher=FakeLauncher(env=TWO_CORES, repack_crash_reason=crash), env=TWO_CORES)
    t.run()
    return StudyView(t.study)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_bytes(pid: int, key: str) -> int:
    """A size from a running process's /proc status: VmHWM (peak resident set), VmLck (locked memory)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{key}:"))


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of a running process."""
    return status_bytes(pid, "VmHWM")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))


def test_llama_swap_export_holds_one_llama_server_cmd_per_study(cli, tiny_model, long_context_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    views = [fake_study(tiny_model, storage, "tiny"), fake_study(long_context_model, storage, "long")]
    r = cli("export", "tiny", "long", "--format", "llama-swap", "--storage", storage)
    assert r.code == 0, r.err
    models = yaml.safe_load(r.out)["models"]
    assert set(models) == {"tiny-q4_k_m", "long-context"}
    for view, key in zip(views, ("tiny-q4_k_m", "long-context")):
        cfg = view.presets["fastest"].candidate.figures.config
        args = shlex.split(models[key]["cmd"])
        assert args[:3] == ["llama-server", "--port", "${PORT}"]  # llama-swap's port macro
        assert args[args.index("-m") + 1] == view.model_path
        assert args[args.index("--ctx-size") + 1] == str(cfg.n_ctx)
        assert args[args.index("--threads") + 1] == str(cfg.n_threads)
        assert ("--no-repack" in args) == (not cfg.repack)
    assert_one_line_error(cli("export", "tiny", "long", "--storage", storage), "exports one study")


@pytest.mark.slow
def test_serve_answers_completions_and_chat_then_stops_on_ctrl_c(demo_model_path, tmp_path):
    """llama-cpp-python's server (no llama-server to be found) with a 32,768-token preset of the demo model: it starts
    (logits_all would ask for n_ctx x n_vocab float32 scores, 32 GiB, which a 24 GB machine without swap refuses)
    and a 700-token prompt leaves no per-token logits behind (logits_all keeps n_vocab floats, 1 MiB, per prompt
    token in Python's scores and as many in llama.cpp's outputs: about 1.9 GiB more peak RSS, against 30 MiB)."""
    storage, tracking = f"sqlite:///{tmp_path}/s.db", f"sqlite:///{tmp_path}/mlflow.db"
    info = load_model_info(str(demo_model_path))
    n_ctx, n_vocab = info.n_ctx_train, info.n_vocab
    assert n_ctx == 32768  # the demo model's whole context, pinned: every candidate, so every preset, uses it
    view = fake_study(demo_model_path, storage, "demo", pins={"n_ctx": str(n_ctx)})
    assert view.presets["fastest"].candidate.figures.config.n_ctx == n_ctx
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
           LLAMA_SERVER_ENV: "none"}  # not make llama-server's build either
    proc = subprocess.Popen([sys.executable, "-m", "llama_tuner", "serve", "demo", "--storage", storage,
                             "--port", str(port), "--tracking-uri", tracking],
                            stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.5)
        text = post(f"{base}/completions", {"prompt": "The capital of France is", "max_tokens": 8})
        assert text["choices"][0]["text"].strip() and text["usage"]["completion_tokens"] > 0
        chat = post(f"{base}/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                                  "max_tokens": 8})
        assert chat["choices"][0]["message"]["content"].strip()
        loaded = peak_rss_bytes(proc.pid)  # the serve process became the server (execv): same pid
        long = post(f"{base}/completions", {"prompt": "Paris is the capital of France. " * 100, "max_tokens": 4})
        prompt_tokens, peak = long["usage"]["prompt_tokens"], peak_rss_bytes(proc.pid)
        print(f"\nserver peak RSS {loaded / 2**20:.0f} MiB after the short requests, {peak / 2**20:.0f} MiB after a "
              f"{prompt_tokens}-token prompt (n_ctx {n_ctx}, n_vocab {n_vocab}: logits_all would allocate "
              f"{n_ctx * n_vocab * 4 / 2**30:.0f} GiB of scores and fill {prompt_tokens * n_vocab * 4 / 2**20:.0f} MiB "
              "of them for this prompt)")
        assert prompt_tokens > 500, long["usage"]
        assert peak < n_ctx * n_vocab * 4 // 16, peak
        # where the kernel grants the 32 GiB, logits_all still shows: n_vocab floats kept per prompt token
        assert peak - loaded < prompt_tokens * n_vocab * 4 // 2, (loaded, peak)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    first = proc.stderr.read().splitlines()[0]
    assert first.startswith("serving gemma-3-270m") and f"at http://127.0.0.1:{port}/v1" in first, first
    parent = mlflow.MlflowClient(tracking).search_runs(
        [mlflow.MlflowClient(tracking).get_experiment_by_name(demo_model_path.stem).experiment_id],
        filter_string="tags.`llama_tuner.kind` = 'study'")[0]
    assert parent.data.tags["served_preset"] == "fastest" and "llama_cpp_server" in parent.data.tags["served_command"]


def _found_llama_server() -> str | None:
    try:
        return find_llama_server()
    except UserError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_found_llama_server() is None,
                    reason="no llama-server found: `make llama-server` builds one (`make test` does)")
def test_serve_runs_llama_server_with_the_exported_flags_answers_and_stops_on_ctrl_c(demo_model_path, tmp_path):
    """`serve` finds llama-server (make llama-server's build where PATH has none) and becomes it (execv: the same
    process) with the preset's export, spelled for that binary, plus --host and --port; it answers completions
    and chat on loopback, and SIGINT (Ctrl-C) ends it and frees the port."""
    exe = _found_llama_server()
    storage = f"sqlite:///{tmp_path}/s.db"
    view = fake_study(demo_model_path, storage, "demo")
    cfg = view.presets["fastest"].candidate.figures.config
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # llama-server logs much: a pipe could fill and stall it
    proc = subprocess.Popen([sys.executable, "-m", "llama_tuner", "serve", "demo", "--storage", storage,
                             "--port", str(port), "--no-mlflow"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # 503 while the model loads, 200 once it serves
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(exe)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")[:-1]
        assert argv == llama_server_args(view.model_path, cfg, program=exe, server=probe(exe)) + \
            ["--host", "127.0.0.1", "--port", str(port)]
        text = post(f"{base}/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                               "temperature": 0})
        assert text["choices"][0]["text"].strip() and text["usage"]["completion_tokens"] > 0
        chat = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                                     "max_tokens": 8, "temperature": 0})
        assert chat["choices"][0]["message"]["content"].strip() and chat["usage"]["completion_tokens"] > 0
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not os.path.exists(f"/proc/{proc.pid}")  # gone, not a zombie
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5)
    first = (tmp_path / "serve.log").read_text().splitlines()[0]
    assert first.startswith("serving gemma-3-270m") and f"with llama-server {probe(exe).version} ({exe})" in first


@pytest.mark.slow
def test_the_fallback_loads_the_model_as_measured_unlocked_and_without_every_tokens_logits(tiny_model):
    """llama-cpp-python's server defaults lock the weights (mlock) and keep every token's logits (logits_all:
    n_ctx x n_vocab float32 scores); the measuring child does neither, and the served preset does neither."""
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings

    cfg = BenchConfig(n_ctx=2048, n_batch=256, n_ubatch=256).resolved(cores=1)
    locked = status_bytes(os.getpid(), "VmLck")
    llm = LlamaProxy.load_llama_from_model_settings(
        ModelSettings(**model_settings({**cfg.to_dict(), "model_path": str(tiny_model)})))
    try:
        assert status_bytes(os.getpid(), "VmLck") == locked  # nothing locked in memory
        assert llm.scores.shape[0] < cfg.n_ctx, llm.scores.shape  # one batch of logits, not the context's
        assert llm.create_completion("Hello", max_tokens=2)["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


@pytest.mark.parametrize(("shape", "request_options", "missing"), [
    # the pin keeps llama-server's defaults (no expert placement) from being a preset; --baseline is one
    ("tiny-moe", {"pins": {"n_cpu_moe": "2"}, "baseline_flags": "--n-cpu-moe 2"},
     lambda c: f"cannot keep experts in host memory (--n-cpu-moe {c.n_cpu_moe})"),
    # llama-server's defaults for the server workload: several slots
    ("tiny", {"workload": "server"},
     lambda c: f"cannot serve {c.n_parallel} streams at once (--parallel {c.n_parallel})"),
])
def test_serve_without_llama_server_refuses_a_preset_its_fallback_cannot_carry(cli, models_dir, tmp_path, monkeypatch,
                                                                               shape, request_options, missing):
    """llama-cpp-python's server has no expert placement and serves one stream: such a preset is refused in one
    line naming llama-server, before anything loads, rather than served without what made it fast."""
    model = write_synthetic_gguf(models_dir / f"{shape}-serve.gguf", SHAPES[shape], "q4_k_m")
    storage = f"sqlite:///{tmp_path}/s.db"
    crash = None if REPACK_WORKS else "child died of SIGSEGV"
    t = open_tuner(StudyRequest(model=str(model), storage=storage, study_name="s", trials=2, seed=1, min_ctx=1024,
                                **request_options),
                   launcher=FakeLauncher(env=TWO_CORES, repack_crash_reason=crash), env=TWO_CORES)
    t.run()
    cfg = StudyView(t.study).presets["fastest"].candidate.figures.config
    assert cfg.n_cpu_moe > 0 or cfg.n_parallel > 1, cfg  # the preset holds what the fallback lacks
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server to be found: none on PATH, and not the cache's
    monkeypatch.setenv(LLAMA_SERVER_ENV, "none")

    def execv(path, argv):
        raise AssertionError(f"started {shlex.join(argv)}")

    monkeypatch.setattr(os, "execv", execv)
    r = cli("serve", "s", "--storage", storage, "--no-mlflow", "--port", free_port())
    assert_one_line_error(r, f"llama-cpp-python's server {missing(cfg)}", "install llama-server or pass --llama-server")


def test_serve_refuses_a_busy_port_and_a_missing_server_program_in_one_line(cli, tiny_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    fake_study(tiny_model, storage, "tiny")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("serve", "tiny", "--storage", storage, "--port", port, "--no-mlflow", "--llama-server", sys.executable)
        assert_one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "--port")
    r = cli("serve", "tiny", "--storage", storage, "--no-mlflow", "--llama-server", "/nonexistent/llama-server")
    assert_one_line_error(r, "is not a program here")
