"""The llama-server engine (``--engine llama-server``): bench and tune measured in llama-server over HTTP, its
speculative decoding searched, its devices read from ``--list-devices``; against a fake llama-server here, and the
real one in tests/test_llama_server.py's slow tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from llama_tuner.measure import llama_server as ls
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Status
from llama_tuner.measure.server_engine import ServerLauncher
from llama_tuner.study.storage import make_storage
from llama_tuner.study.view import StudyView

# A stand-in for llama-server whose speeds follow its flags: tg and pp grow with --threads (up to 2); with
# --spec-type ngram-mod a request in words (a string prompt, from /apply-template) is generated FAKE's "gain"
# times faster, with "accepted" of "drafted" tokens accepted per request, while random token ids draft nothing;
# a --ctx-size above "oom_ctx" fails to allocate as llama.cpp does. --list-devices prints FAKE's "devices".
# Streamed requests (the scenarios: /v1/chat/completions, /completion with stream) are answered with FAKE's
# "thinking" tokens of reasoning_content, then "answer" words, one per 1/tg s, up to max_tokens.
FAKE = r'''
import json, os, random, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """-h,    --help, --usage                  print usage and exit
--version                               show version and build info
--list-devices                          print list of available devices and exit
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
--load-mode MODE                        how to load the model
-nr,   --no-repack                      disable weight repacking
-m,    --model FNAME                    model path
--spec-type none,draft-simple,ngram-simple,ngram-mod,ngram-cache  types of speculative decoding
--host HOST                             ip address to listen
--port PORT                             port to listen
"""
spec = json.loads(os.environ["FAKE_ENGINE"])
if "--help" in sys.argv:
    print(HELP)
    sys.exit(0)
if "--version" in sys.argv:
    print("version: 7777 (fake456)", file=sys.stderr)
    sys.exit(0)
if "--list-devices" in sys.argv:
    print("Available devices:")
    print("\n".join(spec.get("devices", [])) or "  (none)")
    sys.exit(0)
arg = lambda flag, default: sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default
with open(spec["log"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print("load_tensors:   CPU_Mapped model buffer size =   100.00 MiB", file=sys.stderr)
if int(arg("--ctx-size", 4096)) > spec.get("oom_ctx", 1 << 30):
    print("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 9999999999", file=sys.stderr)
    print("llama_init_from_model: failed to initialize the context", file=sys.stderr)
    sys.exit(1)
speed = min(int(arg("--threads", 1)), 2) / 2
spec_type = arg("--spec-type", "none")
rng = random.Random(int(arg("--port", 0)))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"status": "ok"} if self.path == "/health" else {"total_slots": 1})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/apply-template":
            return self.reply({"prompt": "<user>" + body["messages"][0]["content"] + "</user>"})
        if self.path == "/tokenize":  # a token a word
            return self.reply({"tokens": [sum(map(ord, w)) for w in body["content"].split()]})
        if self.path == "/v1/chat/completions" or body.get("stream"):
            return self.stream(body)
        prompt, n = body["prompt"], body["n_predict"]
        words = isinstance(prompt, str)
        n_prompt = len(prompt) // 4 if words else len(prompt)
        gain = spec["gain"] if words and spec_type == "ngram-mod" else 1.0
        noise = 1 + rng.uniform(-0.01, 0.01)
        t = {"prompt_n": n_prompt, "prompt_ms": 1e3 * n_prompt / (spec["pp"] * speed * noise),
             "predicted_n": n, "predicted_ms": 1e3 * max(0, n - 1) / (spec["tg"] * speed * gain * noise)}
        if spec_type != "none" and words:  # llama-server leaves both out where nothing was drafted
            t["draft_n"], t["draft_n_accepted"] = spec["drafted"], spec["accepted"]
        self.reply({"content": "x", "timings": t})


    def stream(self, body):
        """A streamed answer: FAKE's "thinking" tokens of reasoning, then "answer" words, each after 1/tg s,
        stopping at max_tokens (capped); a q4_0 K cache changes the answer from word 3 on."""
        chat = self.path == "/v1/chat/completions"
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        cap = body.get("max_tokens") or body.get("n_predict")
        n_prompt = len(text.split()) + 8
        think, say = spec.get("thinking", 0), spec.get("answer", 30)
        words = [("reasoning_content", f"step{i}") for i in range(think)] + [
            ("content", f"{'other' if arg('--cache-type-k', 'f16') == 'q4_0' and i >= 3 else 'word'}{i}")
            for i in range(say)]
        capped = len(words) > cap
        words = words[:cap]
        rate = spec["tg"] * speed * (spec["gain"] if spec_type == "ngram-mod" else 1.0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        import time
        time.sleep(n_prompt / (spec["pp"] * speed))
        for kind, word in words:
            time.sleep(1 / rate)
            delta = {kind: word + " "}
            chunk = {"choices": [{"delta": delta, "finish_reason": None}]} if chat else {"content": word + " ",
                                                                                          "stop": False}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        t = {"prompt_n": n_prompt, "prompt_ms": 1e3 * n_prompt / (spec["pp"] * speed), "predicted_n": len(words),
             "predicted_ms": 1e3 * max(0, len(words) - 1) / rate}
        if spec_type != "none":
            t["draft_n"], t["draft_n_accepted"] = spec["drafted"], spec["accepted"]
        if chat:
            end = {"choices": [{"delta": {}, "finish_reason": "length" if capped else "stop"}],
                   "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(words)}, "timings": t}
        else:
            end = {"content": "", "stop": True, "stop_type": "limit" if capped else "eos",
                   "tokens_predicted": len(words), "tokens_evaluated": n_prompt, "timings": t}
        self.wfile.write(b"data: " + json.dumps(end).encode() + b"\n\n")
        if chat:
            self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


server = ThreadingHTTPServer((arg("--host", "127.0.0.1"), int(arg("--port", 0))), Handler)
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
'''


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """The fake llama-server's path and a function setting its behaviour (see FAKE); its starts are logged."""
    exe = tmp_path / "llama-server"
    exe.write_text(f"#!{sys.executable}\n{FAKE}")
    exe.chmod(0o755)
    log = tmp_path / "starts.log"

    def configure(**changes) -> None:
        spec = {"tg": 50.0, "pp": 400.0, "gain": 1.8, "drafted": 100, "accepted": 90, "log": str(log), **changes}
        monkeypatch.setenv("FAKE_ENGINE", json.dumps(spec))

    def starts() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    configure()
    return str(exe), configure, starts


@pytest.fixture
def request_file(tmp_path) -> Path:
    path = tmp_path / "request.txt"
    path.write_text("Repeat this list back, word for word: " + ", ".join(f"item {i}" for i in range(60)))
    return path


def test_bench_measures_each_spec_type_in_llama_server_with_its_acceptance(cli, tiny_model, engine, request_file):
    exe, _, starts = engine
    r = cli("bench", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--spec-type", "none,ngram-mod",
            "--tg-prompt", request_file, "-t", "2", "-r", "2", "--json")
    assert r.code == 0, r.err
    none, mod = json.loads(r.out)
    assert [none["config"]["spec_type"], mod["config"]["spec_type"]] == ["none", "ngram-mod"]
    assert none["status"] == mod["status"] == "ok"
    assert mod["tg_mean"] / none["tg_mean"] == pytest.approx(1.8, rel=0.05)  # the server's timings, not ours
    assert (mod["draft_n"], mod["draft_accepted"]) == (200, 180)  # 2 repetitions of 100 drafted, 90 accepted
    assert none["draft_n"] is None
    assert mod["env"]["engine"] == "llama-server" and mod["env"]["llama_server"] == "7777 (fake456)"
    assert mod["buffers"]["model"] == {"CPU_Mapped": 100 << 20}  # from the server's load log
    argvs = starts()
    # one server for none; one per repetition for ngram-mod (each answer a fresh server's first)
    assert len(argvs) == 3 and "--spec-type" not in argvs[0]
    assert all(a[a.index("--spec-type") + 1] == "ngram-mod" for a in argvs[1:])

    table = cli("bench", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--spec-type", "ngram-mod",
                "--tg-prompt", request_file, "-t", "2", "-r", "2")
    assert "90% of 200 drafted accepted" in table.out
    assert "measured by llama-server 7777 (fake456)" in table.out


def test_random_token_ids_draft_nothing_and_say_so(cli, tiny_model, engine):
    exe, _, _ = engine
    r = cli("bench", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--spec-type", "ngram-mod",
            "-c", "1024", "-t", "2", "-r", "2")
    assert r.code == 0, r.err
    assert "nothing drafted" in r.out


@pytest.mark.parametrize("args, needle", [
    (("--spec-type", "ngram-mod"), "--engine llama-server"),
    (("--tg-prompt", "REQUEST"), "--tg-prompt"),
    (("--engine", "llama-server", "--llama-server", "/nonexistent/llama-server"), "/nonexistent/llama-server"),
    (("--engine", "llama-server", "--spec-type", "ngram-bogus", "--llama-server", "EXE"), "spec_type"),
])
def test_bench_engine_mistakes_are_one_line(cli, tiny_model, engine, request_file, args, needle):
    exe, _, starts = engine
    args = [str(request_file) if a == "REQUEST" else exe if a == "EXE" else a for a in args]
    assert_one_line_error(cli("bench", tiny_model, *args), needle)
    assert starts() == []  # refused before any server started


def test_an_allocation_failure_in_the_servers_log_is_an_oom_with_that_line(tiny_model, engine):
    exe, configure, _ = engine
    configure(oom_ctx=2048)
    launcher = ServerLauncher(ls.probe(exe), timeout_s=30)
    ok, oom = launcher.measure(str(tiny_model), [BenchConfig(n_ctx=2048, n_batch=512, n_threads=2, repetitions=1),
                                                 BenchConfig(n_ctx=4096, n_batch=512, n_threads=2, repetitions=1)])
    assert ok.status is Status.OK
    assert oom.status is Status.OOM
    assert "failed to allocate" in oom.reason


def test_configurations_with_the_same_flags_share_one_server_start(tiny_model, engine):
    exe, _, starts = engine
    launcher = ServerLauncher(ls.probe(exe), timeout_s=30)
    same = dict(n_ctx=2048, n_batch=512, n_threads=2, repetitions=1)
    results = list(launcher.measure(str(tiny_model), [BenchConfig(n_prompt=64, n_gen=8, **same),
                                                      BenchConfig(n_prompt=256, n_gen=16, **same),
                                                      BenchConfig(n_prompt=64, n_gen=8, **{**same, "n_threads": 1})]))
    assert [r.status for r in results] == [Status.OK] * 3
    assert [r.pp.n_tokens for r in results] == [64, 256, 64]
    assert len(starts()) == 2  # the first two share one server; the third has other flags


def test_devices_come_from_list_devices_so_a_gpu_nvml_does_not_know_gets_layers(tiny_model, engine):
    """A ROCm build on a machine without NVML: its GPU is listed by llama-server, and the study offloads."""
    exe, configure, _ = engine
    configure(devices=["  ROCm0: AMD Radeon RX 7900 XTX (24560 MiB, 24000 MiB free)"])
    launcher = ServerLauncher(ls.probe(exe), timeout_s=30)
    env = launcher.environment()
    assert env.gpu_offload and env.gpu_name == "AMD Radeon RX 7900 XTX" and env.vram_total_bytes == 24560 << 20
    assert launcher.gpu_free_bytes() == 24000 << 20
    assert ls.parse_devices("Available devices:\n  (none)\n") == []


def test_tune_with_llama_server_searches_spec_types_and_exports_the_winner(cli, tiny_model, engine, tmp_path):
    exe, _, starts = engine
    storage = f"sqlite:///{tmp_path}/s.db"
    r = cli("tune", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--trials", "6", "--storage",
            storage, "--no-mlflow", "--study", "s", "--seed", "3", "--set", "n_threads=2", "--set",
            "n_threads_batch=2", "--set", "n_ctx=4096")
    assert r.code == 0, r.err
    view = StudyView.load(make_storage(storage), "s")
    types = {t.params.get("spec_type") for t in view.study.trials if "spec_type" in t.params}
    assert types <= {"none", "ngram-simple", "ngram-mod"} and "ngram-mod" in types  # the --help's draft-free ones
    assert all("--spec-type" not in a or "ngram-cache" not in a for a in starts())
    fastest = view.preset("fastest").candidate
    assert fastest.figures.config.spec_type == "ngram-mod"  # 1.8x tg beats the defaults beyond any noise
    assert fastest.figures.acceptance == pytest.approx(0.9)
    report = cli("report", "s", "--storage", storage).out
    assert "(ngram-mod, 90% accepted)" in report and "measured in llama-server 7777 (fake456) over HTTP" in report
    exported = cli("export", "s", "--storage", storage, "--llama-server", exe)
    assert "--spec-type ngram-mod" in exported.out
    payload = json.loads(cli("export", "s", "--storage", storage, "--format", "json").out)
    assert payload["settings"]["spec_type"] == "ngram-mod" and payload["measured"]["draft_acceptance"] == 0.9

    verified = cli("verify", "s", "--storage", storage, "--llama-server", exe, "--no-mlflow", "--rounds", "2")
    assert verified.code == 0, verified.err
    assert "speculative decoding (ngram-mod): 90% of" in verified.out
    record = StudyView.load(make_storage(storage), "s").attrs["verify:fastest"]
    served = record["summary"]["tg"]["preset"]["mean"]
    assert served == pytest.approx(fastest.figures.tg_mean, rel=0.05)  # verify replays the same request


def test_tune_engine_options_are_checked_before_anything_runs(cli, tiny_model, engine, tmp_path,
                                                              no_work_before_checks):
    exe, _, starts = engine
    storage = f"sqlite:///{tmp_path}/s.db"
    assert_one_line_error(cli("tune", tiny_model, "--set", "spec_type=ngram-mod", "--storage", storage),
                          "--engine llama-server")
    assert_one_line_error(cli("tune", tiny_model, "--engine", "llama-server", "--workload", "chat", "--storage",
                              storage, "--llama-server", exe), "pp-tg")
    assert starts() == []


def test_llama_bench_output_of_the_engine_names_its_commit_engine_and_drafts(cli, tiny_model, engine, request_file):
    exe, _, _ = engine
    r = cli("bench", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--spec-type", "ngram-mod",
            "--tg-prompt", request_file, "-t", "2", "-r", "2", "-o", "jsonl")
    assert r.code == 0, r.err
    pp, tg = (json.loads(line) for line in r.out.splitlines())
    assert tg["engine"] == "llama-server" and tg["spec_type"] == "ngram-mod"
    assert (tg["draft_n"], tg["draft_accepted"], pp["draft_n"]) == (200, 180, None)
    from llama_tuner.report.llama_bench_output import _commit

    assert _commit("llama-server 0.5.0-dev (build 1, commit 0c1e570)") == "0c1e570"  # as the real one says
    assert _commit("ggml 0.25.3 (0c1e570-dirty)") == "0c1e570"


def test_a_worker_joins_a_llama_server_study_with_its_own_llama_server_and_the_studys_request(
        cli, tiny_model, engine, tmp_path, request_file, monkeypatch):
    """The study's request file and llama-server path are the first host's: a worker measures with the llama-server
    found on its machine and the request stored on the study, so its trials belong to the same study."""
    import optuna

    from llama_tuner.study.worker import join_study

    exe, _, starts = engine
    storage = f"sqlite:///{tmp_path}/s.db"
    copy = tmp_path / "elsewhere.txt"
    copy.write_text(request_file.read_text())
    r = cli("tune", tiny_model, "--engine", "llama-server", "--llama-server", exe, "--trials", "2", "--storage",
            storage, "--no-mlflow", "--study", "s", "--tg-prompt", copy, "--no-confirm", "--set", "n_threads=2")
    assert r.code == 0, r.err
    copy.unlink()  # gone, as on another host
    study = optuna.load_study(study_name="s", storage=storage)
    request = dict(study.user_attrs["request"])
    study.set_user_attr("request", {**request, "llama_server": str(tmp_path / "no" / "llama-server"), "trials": 3})
    monkeypatch.setenv("PATH", f"{Path(exe).parent}:{__import__('os').environ['PATH']}")  # this host's, on PATH
    monkeypatch.delenv(ls.ENV_VAR, raising=False)
    before = len(starts())
    join_study("s", storage).run()  # refused if its figures were of another request (the study's fingerprint)
    assert len(starts()) > before
    assert len([t for t in optuna.load_study(study_name="s", storage=storage).trials if t.state.is_finished()]) == 3


def test_each_repetition_of_a_speculative_answer_is_a_fresh_servers_first(tiny_model, engine, request_file):
    """A speculative server learns the answers it gave: the same request again is drafted from its own earlier
    answer. So a speculative configuration answering words measures each repetition in a server of its own."""
    exe, _, starts = engine
    launcher = ServerLauncher(ls.probe(exe), timeout_s=30, tg_prompt=request_file.read_text())
    mod, plain = launcher.measure(str(tiny_model), [
        BenchConfig(n_ctx=2048, n_batch=512, n_threads=2, repetitions=3, spec_type="ngram-mod"),
        BenchConfig(n_ctx=2048, n_batch=512, n_threads=2, repetitions=3)])
    assert mod.ok and plain.ok and len(mod.tg.samples_ns) == len(mod.pp.samples_ns) == 3
    assert (mod.draft_n, mod.draft_accepted) == (300, 270)
    assert len(starts()) == 3 + 1  # three fresh servers for ngram-mod, one for the rest
