"""``llama-tuner verify``: a study's preset replayed in llama-server beside its defaults, paired round by round."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys

import mlflow
import pytest

from conftest import assert_one_line_error
from test_serve import fake_study
from llama_tuner.measure.llama_server import ENV_VAR, find_llama_server
from llama_tuner.measure.server_bench import Replay, decisive_line, serve_and_measure, vocabulary
from llama_tuner.study.keys import DEFAULTS_BASELINE, VERIFY_PREFIX
from llama_tuner.study.storage import make_storage
from llama_tuner.study.view import StudyView

# A stand-in for llama-server: llama.cpp's --help and --version, /health, and /completion answering with the
# timings of fixed rates (FAKE_SPEC: t/s of the preset, which has --ctx-size, and of the defaults, which have
# only -m), each start's rates times 1 + drift x its round (starts 0 and 1 are round 0, 2 and 3 round 1, ...),
# as a machine that slows or warms up. Every start and request is logged to FAKE_SPEC's "log".
FAKE_SERVER = r'''
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of CPU threads to use during generation
-tb,   --threads-batch N                number of threads to use during batch and prompt processing
-c,    --ctx-size N                     size of the prompt context
-b,    --batch-size N                   logical maximum batch size
-ub,   --ubatch-size N                  physical maximum batch size
-fa,   --flash-attn [on|off|auto]       set Flash Attention use
-ctk,  --cache-type-k TYPE              KV cache data type for K
-ctv,  --cache-type-v TYPE              KV cache data type for V
-np,   --parallel N                     number of server slots
-kvu,  --kv-unified                     use single unified KV buffer
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM
-ncmoe, --n-cpu-moe N                   keep the MoE weights of the first N layers in the CPU
--load-mode MODE                        how to load the model
-nr,   --no-repack                      disable weight repacking
--swa-full                              use full-size SWA cache
-nkvo, --no-kv-offload                  disable KV offload
-m,    --model FNAME                    model path
--host HOST                             ip address to listen
--port PORT                             port to listen
"""
if "--help" in sys.argv:
    print(HELP)
    sys.exit(0)
if "--version" in sys.argv:
    print("version: 9999 (fake123)", file=sys.stderr)
    sys.exit(0)
spec = json.loads(os.environ["FAKE_SPEC"])
role = "preset" if "--ctx-size" in sys.argv else "defaults"
with open(spec["log"], "a") as f:
    start = sum(1 for line in open(spec["log"]) if line.startswith('["start"'))
    f.write(json.dumps(["start", role]) + "\n")
me = spec[role]
if me.get("die"):
    print("main: loading model", file=sys.stderr)
    print(me["die"], file=sys.stderr)
    sys.exit(1)
factor = 1 + spec.get("drift", 0) * (start // 2)
requests = [0]
cached = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        requests[0] += 1
        if me.get("crash_at") == requests[0]:
            print("GGML_ASSERT(n_tokens_all <= cparams.n_batch) failed", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGABRT)
        with open(spec["log"], "a") as f:
            f.write(json.dumps(["request", role, body]) + "\n")
        prompt, n_predict = body["prompt"], body["n_predict"]
        reuse = 0  # what a slot keeps of its last prompt with cache_prompt (the last token is processed again)
        if body["cache_prompt"] and not me.get("no_reuse"):
            while reuse < min(len(prompt), len(cached)) and prompt[reuse] == cached[reuse]:
                reuse += 1
            reuse = min(reuse, len(prompt) - 1)
        cached[:] = prompt if body["cache_prompt"] else []
        n_prompt = len(prompt) - reuse
        self.reply(200, {"content": "x", "timings": {
            "prompt_n": n_prompt, "prompt_ms": 1e3 * n_prompt / (me["pp"] * factor),
            "predicted_n": n_predict,
            "predicted_ms": 1e3 * max(0, n_predict - 1) / (me["tg"] * factor)}})


port = int(sys.argv[sys.argv.index("--port") + 1])
server = ThreadingHTTPServer((sys.argv[sys.argv.index("--host") + 1], port), Handler)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
'''


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Write the fake llama-server; returns (its path, a function setting its spec, the log's events)."""
    exe = tmp_path / "llama-server"
    exe.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    exe.chmod(0o755)
    log = tmp_path / "fake.log"

    def configure(preset: dict, defaults: dict, drift: float = 0.0) -> None:
        monkeypatch.setenv("FAKE_SPEC", json.dumps({"preset": preset, "defaults": defaults, "drift": drift,
                                                    "log": str(log)}))

    def events() -> list:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return str(exe), configure, events


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory):
    """One fake study of the tiny model for the module (each test's verify overwrites its record)."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('verify')}/s.db"
    view = fake_study(tiny_model, storage, "s")
    return storage, view


def verify_args(storage: str, exe: str, *extra) -> list:
    return ["verify", "s", "--storage", storage, "--llama-server", exe, "--no-mlflow", *extra]


def test_verify_prints_served_figures_against_the_study_and_the_gap_paired_over_rounds(cli, study, fake_server):
    """The fake preset runs 600 pp / 60 tg t/s and the defaults 400 / 50, both 10% faster each round: what is
    printed is the servers' figures (mean +- sd over every repetition), their share against the study's, and a
    paired gap from which the drift drops out (the per-round ratio is the same in every round)."""
    storage, view = study
    exe, configure, _ = fake_server
    configure({"pp": 600.0, "tg": 60.0}, {"pp": 400.0, "tg": 50.0}, drift=0.1)
    r = cli(*verify_args(storage, exe, "--rounds", 3, "--repetitions", 2))
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    factors = [1.0, 1.1, 1.2]
    cand = view.presets["fastest"].candidate
    base = view.baselines[DEFAULTS_BASELINE].figures
    for i, (fig, rate, drate, study_fig, base_fig) in enumerate(
            (("tg", 60.0, 50.0, cand.figures.tg_mean, base.tg_mean),
             ("pp", 600.0, 400.0, cand.figures.pp_mean, base.pp_mean))):
        served = [rate * f for f in factors for _ in range(2)]
        defaults = [drate * f for f in factors for _ in range(2)]
        mean, dmean = statistics.fmean(served), statistics.fmean(defaults)
        assert lines[i] == (f"served {fig} {mean:,.1f} +- {statistics.stdev(served):,.1f} t/s (study {study_fig:,.1f}, "
                            f"{100 * (mean / study_fig - 1):+.1f}%); defaults {dmean:,.1f} +- "
                            f"{statistics.stdev(defaults):,.1f} (study {base_fig:,.1f}, "
                            f"{100 * (dmean / base_fig - 1):+.1f}%)"), lines[i]
    # 60 / 50 and 600 / 400 in every round: +20% and +50% with no spread
    assert lines[2] == "preset vs defaults over 3 paired rounds: tg +20.0% (±0.0), pp +50.0% (±0.0)", lines[2]
    assert lines[3].startswith("peak RSS: preset ") and ", defaults " in lines[3]
    record = StudyView(view.study).study.user_attrs[f"{VERIFY_PREFIX}fastest"]
    assert record["summary"]["tg"]["gap"]["paired_rounds"] == 3
    assert [sorted(r) for r in record["rounds"]] == [["defaults", "preset"]] * 3


def test_verify_takes_turns_at_starting_first_and_replays_the_studys_tests(cli, study, fake_server, tiny_model):
    """Round 1 starts the preset first, round 2 the defaults, round 3 the preset; each server gets a warmup, then
    per repetition a pp request (n_prompt ids, one token) and a tg request (one id, n_gen + 1 tokens, EOS
    ignored, greedy); the ids are normal tokens of the model's vocabulary, BOS first, the same for both servers
    in a round and other ones in the next."""
    storage, view = study
    exe, configure, events = fake_server
    configure({"pp": 600.0, "tg": 60.0}, {"pp": 400.0, "tg": 50.0})
    r = cli(*verify_args(storage, exe, "--rounds", 3, "--repetitions", 2))
    assert r.code == 0, r.err
    starts = [e[1] for e in events() if e[0] == "start"]
    assert starts == ["preset", "defaults", "defaults", "preset", "preset", "defaults"]
    cfg = view.presets["fastest"].candidate.figures.config
    vocab = vocabulary(str(tiny_model))
    requests = [(e[1], e[2]) for e in events() if e[0] == "request"]
    per_start = 1 + 2 * 2  # warmup, then (pp, tg) x 2 repetitions
    assert len(requests) == 6 * per_start
    normal = set(vocab.normal)
    assert len(normal) < vocab.n_vocab  # the twin's vocabulary has special and byte tokens to avoid
    for role, body in requests:
        ids = body["prompt"]
        assert ids[0] == vocab.bos and set(ids[1:]) <= normal, ids
        assert body["ignore_eos"] is True and body["top_k"] == 1 and body["cache_prompt"] is False
    first = requests[1:per_start]  # the preset's, round 1 (after its warmup)
    assert [(len(b["prompt"]), b["n_predict"]) for _, b in first] == [(cfg.n_prompt, 1), (1, cfg.n_gen + 1)] * 2
    prompts = [b["prompt"] for _, b in requests]
    assert prompts[:per_start] == prompts[per_start:2 * per_start]  # same ids for both servers in a round
    assert prompts[:per_start] != prompts[2 * per_start:3 * per_start]


def test_a_server_that_dies_at_start_is_a_recorded_outcome_with_its_log_line(cli, study, fake_server):
    storage, view = study
    exe, configure, events = fake_server
    line = "llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' has invalid ggml type 99"
    configure({"pp": 600.0, "tg": 60.0, "die": line}, {"pp": 400.0, "tg": 50.0})
    r = cli(*verify_args(storage, exe, "--rounds", 3))
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    assert f"preset did not start: {line} (exit code 1) (round 1)" in r.out.splitlines()
    assert [e[1] for e in events() if e[0] == "start"] == ["preset", "defaults"]  # no round after a failure
    record = StudyView(view.study).study.user_attrs[f"{VERIFY_PREFIX}fastest"]
    run = record["rounds"][0]["preset"]
    assert run["status"] == "start_failed" and run["reason"] == line and run["exit_code"] == 1
    assert record["rounds"][0]["defaults"]["status"] == "ok"


def test_a_server_that_crashes_while_measured_is_an_outcome_with_the_assert(fake_server, tiny_model):
    exe, configure, _ = fake_server
    configure({"pp": 600.0, "tg": 60.0, "crash_at": 3}, {"pp": 1.0, "tg": 1.0})
    run = serve_and_measure([exe, "-m", str(tiny_model), "--ctx-size", "512"], Replay(n_prompt=8, n_gen=4),
                            vocabulary(str(tiny_model)), label="preset")
    assert run.status == "crash", run
    assert run.reason == "GGML_ASSERT(n_tokens_all <= cparams.n_batch) failed" and run.signal == "SIGABRT"
    assert len(run.pp_n) == 1 and not run.tg_n  # the warmup and one pp answered; the tg request killed it


def test_curve_streams_and_depth_replays_read_the_servers_timings(fake_server, tiny_model):
    """A chat replay is one request per repetition (the prompt, then n_gen + 1 tokens); a depth is sent first
    with cache_prompt and the server's prompt_n shows what it processed after it (a note where it reused
    nothing); three streams at once add up (pp: every prompt token over the longest prompt time)."""
    exe, configure, events = fake_server
    argv = [exe, "-m", str(tiny_model), "--ctx-size", "512"]
    vocab = vocabulary(str(tiny_model))
    configure({"pp": 500.0, "tg": 40.0}, {"pp": 1.0, "tg": 1.0})
    chat = serve_and_measure(argv, Replay(workload="chat", n_prompt=16, n_gen=8, n_depth=32, repetitions=2), vocab,
                             label="preset")
    assert chat.ok and chat.pp_n == [16, 16] and chat.tg_n == [8, 8] and not chat.notes, chat
    assert chat.pp_rates == pytest.approx([500.0] * 2) and chat.tg_rates == pytest.approx([40.0] * 2)
    bodies = [e[2] for e in events() if e[0] == "request"][1:]  # after the warmup
    assert [(len(b["prompt"]), b["n_predict"], b["cache_prompt"]) for b in bodies] == [(32, 0, True), (48, 9, True)] * 2
    assert bodies[1]["prompt"][:32] == bodies[0]["prompt"]
    configure({"pp": 500.0, "tg": 40.0, "no_reuse": True}, {"pp": 1.0, "tg": 1.0})
    deep = serve_and_measure(argv, Replay(n_prompt=16, n_gen=8, n_depth=32, repetitions=1), vocab, label="preset")
    assert deep.pp_n == [48] and deep.tg_n == [8] and "did not reuse the cached 32" in deep.notes[0], deep
    streams = serve_and_measure(argv, Replay(workload="server", n_parallel=3, n_prompt=16, n_gen=8, repetitions=1),
                                vocab, label="preset")
    assert streams.pp_n == [48] and streams.tg_n == [24], streams
    assert streams.pp_rates == pytest.approx([1500.0]) and streams.tg_rates == pytest.approx([120.0])


def test_the_decisive_line_is_the_strongest_error_not_its_consequences():
    log = ("load_backend: failed to find ggml_backend_init in /x/libggml-cuda.so\n"
           "llama_model_load: error loading model: unknown model architecture: 'nosucharch'\n"
           "llama_model_load_from_file_impl: failed to load model\n"
           "srv    load_model: failed to load model, '/m.gguf'\n"
           "main: exiting due to model loading error\n")
    assert decisive_line(log) == "llama_model_load: error loading model: unknown model architecture: 'nosucharch'"
    assert decisive_line("a\nGGML_ASSERT(x) failed\nerror: b\n") == "GGML_ASSERT(x) failed"
    assert decisive_line("starting\nlistening\n") == "listening"


def test_token_ids_are_seeded_normal_tokens_with_bos_first(tiny_model):
    vocab = vocabulary(str(tiny_model))
    assert vocab.n_vocab == 1024 and vocab.bos == 1
    # the twin's vocabulary: <unk>, <s>, </s>, 256 byte tokens (types 2, 3, 3, 6), then normal ones
    assert vocab.normal == tuple(range(259, 1024))
    a, b = vocab.prompt(random.Random(7), 64), vocab.prompt(random.Random(7), 64)
    assert a == b and a[0] == 1 and all(259 <= t < 1024 for t in a[1:])
    assert vocab.prompt(random.Random(8), 64) != a


def test_verify_records_on_the_studys_mlflow_parent_run(cli, study, fake_server, tmp_path):
    storage, view = study
    exe, configure, _ = fake_server
    configure({"pp": 600.0, "tg": 60.0}, {"pp": 400.0, "tg": 50.0})
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    r = cli("verify", "s", "--storage", storage, "--llama-server", exe, "--rounds", 2, "--repetitions", 1,
            "--tracking-uri", tracking)
    assert r.code == 0, r.err
    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name(os.path.splitext(view.model_file)[0])
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`llama_tuner.kind` = 'study'")[0]
    assert parent.data.tags["verified_preset"] == "fastest"
    assert math.isclose(parent.data.metrics["verify.fastest.tg_gain_pct"], 20.0, abs_tol=0.01)
    assert math.isclose(parent.data.metrics["verify.fastest.tg_tps"], 60.0, rel_tol=1e-3)
    local = client.download_artifacts(parent.info.run_id, "verify/fastest.json", str(tmp_path))
    assert json.load(open(local))["summary"]["complete_rounds"] == 2


def test_verify_refuses_bad_input_in_one_line(cli, study, fake_server, monkeypatch, tmp_path):
    storage, _ = study
    exe = fake_server[0]
    assert_one_line_error(cli("verify", "nosuch", "--storage", storage, "--llama-server", exe), "no study named")
    monkeypatch.setenv(ENV_VAR, "none")
    assert_one_line_error(cli("verify", "s", "--storage", storage), "no llama-server", "--llama-server")
    assert_one_line_error(cli("verify", "s", "--storage", storage, "--llama-server", tmp_path / "nope"),
                          "is not a program here")
    assert_one_line_error(cli("verify", "s", "--storage", storage, "--llama-server", exe, "--rounds", 0), "--rounds")


@pytest.mark.slow
def test_verify_runs_the_demo_models_preset_in_the_real_llama_server(cli, demo_model_path, tmp_path):
    """The real llama-server on the demo model: both servers start, answer, and report positive figures; the
    preset's flags are the ones it was started with. Skipped only where no llama-server can be found."""
    try:
        exe = find_llama_server()
    except Exception as exc:  # noqa: BLE001 - a bad $LLAMA_TUNER_LLAMA_SERVER is a reason to skip
        pytest.skip(f"no usable llama-server: {exc}")
    if exe is None:
        pytest.skip("no llama-server binary: not on PATH, no $LLAMA_TUNER_LLAMA_SERVER, no `make llama-server` build")
    storage = f"sqlite:///{tmp_path}/s.db"
    fake_study(demo_model_path, storage, "s")
    r = cli("verify", "s", "--storage", storage, "--llama-server", exe, "--no-mlflow", "--rounds", 2,
            "--repetitions", 2)
    assert r.code == 0, r.err + r.out
    record = StudyView.load(make_storage(storage), "s").attrs[f"{VERIFY_PREFIX}fastest"]
    for figure in ("tg", "pp"):
        for label in ("preset", "defaults"):
            assert record["summary"][figure][label]["mean"] > 0, record["summary"]
    for rnd in record["rounds"]:
        for run in rnd.values():
            assert run["status"] == "ok" and run["peak_rss_bytes"] > demo_model_path.stat().st_size // 2, run
            assert run["tg_n"] == [record["replay"]["n_gen"]] * 2  # n_gen decode steps after the first token
    print("\n" + r.out)
