"""Finding llama-server, reading its version and flags, and spelling exported commands the way it accepts them."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPACK_WORKS, ROOT, assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.measure import llama_server as ls
from llama_tuner.measure.server_engine import TG_PROMPT_FILE
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.llama_cpp_pin import LLAMA_CPP_PYTHON
from llama_tuner.model.twins import SHAPES, write_synthetic_gguf
from llama_tuner.report.export import llama_server_args
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.view import StudyView
from llama_tuner.testing.fakes import FakeLauncher

# The option lines of an older llama-server's --help (mid-2025): --no-mmap before --load-mode replaced it, and
# --flash-attn a switch before it took on|off|auto. Same layout as common_arg::to_string.
OLD_HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-tb,   --threads-batch N                number of threads to use during batch and prompt processing (default:
                                        same as --threads)
-c,    --ctx-size N                     size of the prompt context (default: 4096, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-b,    --batch-size N                   logical maximum batch size (default: 2048)
-ub,   --ubatch-size N                  physical maximum batch size (default: 512)
--swa-full                              use full-size SWA cache (default: false)
-fa,   --flash-attn                     enable Flash Attention (default: disabled)
-nkvo, --no-kv-offload                  disable KV offload
-ctk,  --cache-type-k TYPE              KV cache data type for K
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1
                                        (default: f16)
-ctv,  --cache-type-v TYPE              KV cache data type for V
-np,   --parallel N                     number of parallel sequences to decode (default: 1)
-kvu,  --kv-unified                     use single unified KV buffer for the KV cache of all sequences
--no-mmap                               do not memory-map model (slower load but may reduce pageouts if not
                                        using mlock)
-nr,   --no-repack                      disable weight repacking
-ngl,  --gpu-layers, --n-gpu-layers N   number of layers to store in VRAM
-m,    --model FNAME                    model path (default: `models/$filename` with filename from `--hf-file`
                                        or `--model-url` if set, otherwise models/7B/ggml-model-f16.gguf)
{moe}
----- example-specific params -----

--host HOST                             ip address to listen, or bind to an UNIX socket if the address ends
                                        with .sock (default: 127.0.0.1)
--port PORT                             port to listen (default: 8080)
"""
MOE_LINES = """\
-cmoe, --cpu-moe                        keep all Mixture of Experts (MoE) weights in the CPU
-ncmoe, --n-cpu-moe N                   keep the Mixture of Experts (MoE) weights of the first N layers in the
                                        CPU
"""
OLD_VERSION = "version: 5890 (a1b2c3d)\nbuilt with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu\n"


def fake_llama_server(path: Path, *, moe: bool = True, help_text: str | None = None,
                      version: str = OLD_VERSION) -> Path:
    """A program that answers --help (on stdout) and --version (on stderr) as an older llama-server does, and
    appends each call's arguments to ``path``.calls."""
    text = help_text if help_text is not None else OLD_HELP.format(moe=MOE_LINES if moe else "")
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    f"open({str(path) + '.calls'!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    f"if sys.argv[1:] == ['--version']:\n    sys.stderr.write({version!r})\n"
                    f"elif sys.argv[1:] == ['--help']:\n    sys.stdout.write({text!r})\n"
                    "else:\n    sys.exit(1)\n")
    path.chmod(0o755)
    return path


def real_llama_server() -> str | None:
    """The llama-server the tests would serve with (see llama_tuner.measure.llama_server), else None."""
    try:
        return ls.find_llama_server()
    except UserError:
        return None


def study_with_baseline(model, storage: str, name: str, baseline: str, **request) -> BenchConfig:
    """A fake-measured study whose fastest preset is ``baseline`` (llama-server flags), and that preset's config."""
    from test_serve import TWO_CORES

    t = open_tuner(StudyRequest(model=str(model), storage=storage, study_name=name, trials=2, seed=1, min_ctx=1024,
                                baseline_flags=baseline, **request),
                   launcher=FakeLauncher(env=TWO_CORES, repack_crash_reason=None if REPACK_WORKS else "SIGSEGV"),
                   env=TWO_CORES)
    t.run()
    return StudyView(t.study).presets["fastest"].candidate.figures.config


def test_help_parsing_reads_each_spelling_and_whether_it_takes_a_value():
    flags = ls.parse_help(OLD_HELP.format(moe=MOE_LINES))
    assert flags["-fa"] is None and flags["--flash-attn"] is None  # a switch in that build
    assert flags["-ngl"] == flags["--gpu-layers"] == flags["--n-gpu-layers"] == "N"
    assert flags["-ctk"] == "TYPE" and flags["--no-mmap"] is None and flags["--port"] == "PORT"
    assert "--load-mode" not in flags
    # help text and its continuation lines are no flags: "(env: ...)", "allowed values: f32, f16, ...", "CPU"
    assert not [f for f in flags if not f.startswith("-")] and "f16" not in flags and "--hf-file" not in flags
    assert "-----" not in "".join(flags)


def test_the_version_is_read_from_what_llama_server_prints():
    assert ls.parse_version("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0\n") == \
        "0.5.0-dev (build 1, commit 0c1e570)"
    assert ls.parse_version("load_backend: loaded CPU backend\nversion: 1 (0c1e570)\n") == "1 (0c1e570)"
    assert ls.parse_version("") == "unknown"


def test_an_older_llama_server_gets_no_mmap_and_a_bare_flash_attn_switch(tmp_path):
    server = ls.probe(str(fake_llama_server(tmp_path / "llama-server")))
    assert server.version == "5890 (a1b2c3d)"  # printed on stderr
    cfg = BenchConfig(n_threads=2, n_threads_batch=2, use_mmap=False, flash_attn=True, repack=False)
    vendored = llama_server_args("/m.gguf", cfg)
    assert vendored[vendored.index("--load-mode") + 1] == "none"
    args = llama_server_args("/m.gguf", cfg, program=server.path, server=server)
    assert "--no-mmap" in args and "--load-mode" not in args and "none" not in args
    at = args.index("--flash-attn")
    assert args[at + 1] == "--cache-type-k"  # the switch, no value after it
    # every other flag and value as llama-cpp-python's llama.cpp spells it, in the same order
    assert [a for a in args if a not in ("--no-mmap", "--flash-attn")] == \
        [server.path] + [a for a in vendored[1:] if a not in ("--load-mode", "none", "--flash-attn", "on")]
    off = llama_server_args("/m.gguf", BenchConfig(n_threads=2, n_threads_batch=2, flash_attn=False),
                            server=server)
    assert "--flash-attn" not in off and "off" not in off  # off was that build's default


def test_a_flag_the_binary_lacks_is_one_error_naming_it_and_the_binary(tmp_path):
    server = ls.probe(str(fake_llama_server(tmp_path / "llama-server", moe=False)))
    with pytest.raises(UserError) as err:
        llama_server_args("/m.gguf", BenchConfig(n_threads=2, n_threads_batch=2, n_cpu_moe=3), server=server)
    assert str(err.value).startswith(f"this llama-server ({server.path}, version 5890 (a1b2c3d)) has no --n-cpu-moe")
    assert "make llama-server" in err.value.fix
    assert "--n-cpu-moe" not in llama_server_args("/m.gguf", BenchConfig(n_threads=2, n_threads_batch=2),
                                                  server=server)


def test_flags_are_read_once_per_binary_and_again_when_it_changes(tmp_path):
    exe = fake_llama_server(tmp_path / "llama-server", moe=False)
    calls = Path(f"{exe}.calls")
    first = ls.probe(str(exe))
    assert ls.probe(str(exe)) is first and calls.read_text().split("\n").count("--help") == 1
    fake_llama_server(exe, moe=True)  # rebuilt: another size and mtime
    os.utime(exe, ns=(os.stat(exe).st_atime_ns, os.stat(exe).st_mtime_ns + 10**9))
    again = ls.probe(str(exe))
    assert "--n-cpu-moe" in again.flags and "--n-cpu-moe" not in first.flags
    assert calls.read_text().split("\n").count("--help") == 2


def test_a_program_that_is_no_llama_server_is_refused_in_one_line(tmp_path):
    exe = fake_llama_server(tmp_path / "not-a-server", help_text="usage: not-a-server [-v]\n  -v   verbose\n")
    with pytest.raises(UserError, match="is not a llama-server: its --help lists no --ctx-size and --port"):
        ls.probe(str(exe))


def test_llama_server_is_looked_for_given_then_in_the_environment_then_on_path_then_in_the_cache(tmp_path,
                                                                                                monkeypatch):
    given, env, on_path, cached = (fake_llama_server(tmp_path / name) for name in ("given", "env", "bin", "cache"))
    (tmp_path / "path").mkdir()
    os.symlink(on_path, tmp_path / "path" / "llama-server")
    monkeypatch.setattr(ls, "CACHED", cached)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setenv(ls.ENV_VAR, str(env))
    assert ls.find_llama_server(str(given)) == str(given)
    assert ls.find_llama_server() == str(env)
    monkeypatch.delenv(ls.ENV_VAR)
    assert ls.find_llama_server() == str(tmp_path / "path" / "llama-server")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert ls.find_llama_server() == str(cached)
    monkeypatch.setattr(ls, "CACHED", tmp_path / "no-build")
    assert ls.find_llama_server() is None
    monkeypatch.setattr(ls, "CACHED", cached)
    monkeypatch.setenv(ls.ENV_VAR, "none")  # serve then uses llama-cpp-python's server
    assert ls.find_llama_server() is None
    monkeypatch.setenv(ls.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(UserError, match=f"{ls.ENV_VAR}=.*missing is not a program here"):
        ls.find_llama_server()
    with pytest.raises(UserError, match="--llama-server .*missing is not a program here"):
        ls.find_llama_server(str(tmp_path / "missing"))


def test_export_spells_the_command_for_the_given_llama_server(cli, tiny_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    cfg = study_with_baseline(tiny_model, storage, "tiny", "--load-mode none --flash-attn on")
    assert not cfg.use_mmap and cfg.flash_attn  # the preset is that baseline
    exe = fake_llama_server(tmp_path / "llama-server")
    r = cli("export", "tiny", "--storage", storage, "--llama-server", str(exe))
    assert r.code == 0, r.err
    args = shlex.split(r.out)
    assert args[0] == str(exe) and "--no-mmap" in args and "--load-mode" not in args
    assert args[args.index("--flash-attn") + 1].startswith("-")
    r = cli("export", "tiny", "--storage", storage, "--format", "json", "--llama-server", str(exe))
    assert r.code == 0, r.err
    assert "--no-mmap" in json.loads(r.out)["llama_server"]
    r = cli("export", "tiny", "--storage", storage, "--format", "llama-swap", "--llama-server", str(exe))
    assert r.code == 0, r.err
    cmd = shlex.split(yaml.safe_load(r.out)["models"]["tiny-q4_k_m"]["cmd"])
    assert cmd[:3] == [str(exe), "--port", "${PORT}"] and "--no-mmap" in cmd
    plain = cli("export", "tiny", "--storage", storage)  # without --llama-server: the vendored llama.cpp's spelling
    assert plain.code == 0 and shlex.split(plain.out)[0] == "llama-server" and "--load-mode none" in plain.out
    assert_one_line_error(cli("export", "tiny", "--storage", storage, "--format", "ollama", "--llama-server", exe),
                          "--llama-server is for a llama-server command", "--format llama-server")


@pytest.mark.parametrize("command", ["export", "serve"])
def test_an_moe_preset_for_a_llama_server_without_n_cpu_moe_is_one_line_error(cli, models_dir, tmp_path, monkeypatch,
                                                                              command):
    from test_serve import free_port

    model = write_synthetic_gguf(models_dir / "tiny-moe-ls.gguf", SHAPES["tiny-moe"], "q4_k_m")
    storage = f"sqlite:///{tmp_path}/s.db"
    assert study_with_baseline(model, storage, "moe", "--n-cpu-moe 2", pins={"n_cpu_moe": "2"}).n_cpu_moe == 2
    exe = fake_llama_server(tmp_path / "llama-server", moe=False)

    def execv(path, argv):
        raise AssertionError(f"started {shlex.join(argv)}")

    monkeypatch.setattr(os, "execv", execv)
    extra = ["--no-mlflow", "--port", str(free_port())] if command == "serve" else []
    r = cli(command, "moe", "--storage", storage, "--llama-server", str(exe), *extra)
    assert_one_line_error(r, f"this llama-server ({exe}, version 5890 (a1b2c3d)) has no --n-cpu-moe",
                          "make llama-server")


def test_serve_runs_the_llama_server_on_path_with_the_flags_it_accepts(cli, tiny_model, tmp_path, monkeypatch):
    from test_serve import free_port

    storage = f"sqlite:///{tmp_path}/s.db"
    assert not study_with_baseline(tiny_model, storage, "tiny", "--load-mode none").use_mmap
    (tmp_path / "bin").mkdir()
    exe = fake_llama_server(tmp_path / "bin" / "llama-server")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.delenv(ls.ENV_VAR, raising=False)
    started = []

    def execv(path, argv):
        started.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    port = free_port()
    r = cli("serve", "tiny", "--storage", storage, "--no-mlflow", "--port", port)
    assert r.code == 0, r.err
    argv = started[0]
    assert argv[0] == str(exe) and "--no-mmap" in argv and "--load-mode" not in argv
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", str(port)]
    assert "with llama-server 5890 (a1b2c3d)" in r.err


# The llama-server `make llama-server` built (or the one found): what the tests serve with.

def _cache_key(exe: str) -> str | None:
    """The directory a build of ``make llama-server`` is keyed by (.cache/llama.cpp/<key>/<backend>/bin/...)."""
    parts = Path(os.path.realpath(exe)).parts
    return parts[-4] if len(parts) > 4 and parts[-5] == "llama.cpp" and parts[-6] == ".cache" else None


@pytest.mark.skipif(real_llama_server() is None, reason="no llama-server found (make llama-server builds one)")
def test_the_found_llama_server_accepts_every_flag_the_export_writes_as_written():
    server = ls.probe(real_llama_server())
    every = BenchConfig(n_threads=2, n_threads_batch=2, n_parallel=2, n_cpu_moe=1, use_mmap=False, repack=False,
                        swa_full=True, offload_kqv=False, flash_attn=True, spec_type="ngram-mod")
    for cfg in (every, BenchConfig(n_threads=1, n_threads_batch=1, flash_attn=False)):
        vendored = llama_server_args("/m.gguf", cfg, program=server.path)
        if "--load-mode" in server.flags and server.takes_value("--flash-attn"):  # this llama.cpp or a later one
            assert llama_server_args("/m.gguf", cfg, program=server.path, server=server) == vendored
    for flag in ("--host", "--port"):
        server.require(flag)


@pytest.mark.skipif(real_llama_server() is None or _cache_key(real_llama_server()) is None,
                    reason="no llama-server built by make llama-server")
def test_make_llama_server_keys_its_build_by_the_llama_cpp_commit_it_reports():
    exe = real_llama_server()
    key = _cache_key(exe)
    head = ROOT / ".cache" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / \
        ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    assert key == head.read_text().strip()[:7]
    assert f"commit {key})" in ls.probe(exe).version  # what llama-server --version says it was built from


def _make_n(*args: str) -> str:
    """What `make -n ARGS` would run (commands printed, none run but the recursive make's dry run)."""
    r = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(not (ROOT / ".cache" / "llama.cpp" / "llama-server").exists(),
                    reason="no llama-server built by make llama-server")
def test_a_second_make_llama_server_builds_nothing_and_make_test_builds_it_first():
    assert "cmake" not in _make_n("llama-server", "CUDA=0")
    cuda = _make_n("llama-server", "CUDA=1")
    key = _cache_key(str(ROOT / ".cache" / "llama.cpp" / "llama-server"))
    if not (ROOT / ".cache" / "llama.cpp" / key / "cuda" / ".built").exists():
        assert "-DGGML_CUDA=on" in cuda and f".cache/llama.cpp/{key}/cuda" in cuda
    dry = _make_n("test", "CUDA=0")
    assert dry.index("ln -sfn") < dry.index("pytest")


@pytest.mark.slow
@pytest.mark.skipif(real_llama_server() is None, reason="no llama-server found (make llama-server builds one)")
def test_the_real_llama_server_engine_measures_ngram_mod_on_a_code_edit(run_cli, demo_model_path):
    """The demo model answering the bundled code edit in the real llama-server, with and without ngram-mod: both
    measured by the server's own timings, and ngram-mod drafts tokens that the model accepts."""
    r = run_cli("bench", demo_model_path, "--engine", "llama-server", "--spec-type", "none,ngram-mod", "--tg-prompt",
                TG_PROMPT_FILE, "-p", "64", "-n", "160", "-r", "1", "-t", "2", "--json", timeout=600)
    assert r.code == 0, r.err
    none, mod = json.loads(r.out)
    assert none["status"] == mod["status"] == "ok", (none["reason"], mod["reason"])
    assert none["draft_n"] is None and mod["draft_n"] > 0 and 0 < mod["draft_accepted"] <= mod["draft_n"]
    assert mod["env"]["llama_server"] == ls.probe(real_llama_server()).version


@pytest.mark.slow
@pytest.mark.skipif(real_llama_server() is None, reason="no llama-server found (make llama-server builds one)")
def test_the_real_llama_server_answers_scenarios_with_their_own_token_counts(run_cli, demo_model_path, tmp_path):
    """A chat (the model's template through /v1/chat/completions) and raw text (/completion) answered for real by
    the demo model in llama-server, with and without ngram-mod: the client's times in order, the server's token
    counts within their caps (a capped answer is exactly its cap), the written text tokenized back to about as
    many tokens, and the drafts counted for the speculative one."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"name": "chat", "max_tokens": 40, "messages": [
        {"role": "user", "content": "Repeat this list: apples, pears, plums, apples, pears, plums."}]}) + "\n"
        + json.dumps({"name": "raw", "prompt": "One, two, three, four,", "max_tokens": 24}) + "\n")
    r = run_cli("bench", demo_model_path, "--prompts", prompts, "--spec-type", "none,ngram-mod", "-t", "2", "--json",
                timeout=600)
    assert r.code == 0, r.err
    none, mod = json.loads(r.out)
    for result in (none, mod):
        assert result["status"] == "ok", result["reason"]
        for a, cap in zip(result["answers"], (40, 24)):
            assert 0 < a["first_token_s"] <= a["answer_start_s"] < a["seconds"]
            assert a["prompt_tokens"] > 5 and 0 < a["generated_tokens"] <= cap
            assert a["capped"] == (a["finish"] == "length") and (not a["capped"] or a["generated_tokens"] == cap)
            assert abs(len(a["tokens"]) - a["generated_tokens"]) <= 3, (len(a["tokens"]), a["generated_tokens"])
            assert a["tg_tps"] > 1 and a["pp_tps"] > 1
    assert none["scenarios"]["draft_n"] == 0 and mod["scenarios"]["draft_n"] > 0
    # Not asserted: that ngram-mod's greedy answer is the plain one's. It is not always (measured: the chat's
    # diverged after 64 characters): the draft's verification batch computes the logits in another shape, and a
    # near-tie flips, as batch sizes flip them between f16 trials (docs/benchmarks.md §14).
