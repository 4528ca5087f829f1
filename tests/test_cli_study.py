"""The tune / report / export commands end to end, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import NO_REPACK, REPACK_WORKS, assert_one_line_error

# Where llama.cpp's AMX kernels crash, its defaults (repack on) are a crashed baseline, with no gain.
BASES = {"yours", "llama-server defaults (fit)"} if REPACK_WORKS else {"yours"}


@pytest.mark.parametrize("args,needle", [
    (("--trials", "0"), "--trials 0 measures nothing"),
    (("--vram-budget", "abc"), "--vram-budget 'abc' is not a size"),
    (("--set", "nosuch=1"), "unknown setting 'nosuch'"),
    (("--set", "n_threads"), "is not KEY=VALUE"),
    (("--range", "n_ctx=big"), "is not LO:HI"),
    (("--timeout", "soon"), "is not a duration"),
    (("--baseline", "-c 2048 --weird-flag"), "unsupported llama-server flag --weird-flag"),
    (("--min-ctx", "99999999"), "exceeds the model's training context"),
    (("--sampler", "annealing"), "invalid value for '--sampler'"),
    (("--set", "n_prompt=0"), "--set n_prompt=0 leaves the study without a prompt test"),
    (("--set", "n_gen=0"), "--set n_gen=0 leaves the study without a generation test"),
    (("--baseline", "-c 256 -b 256 -ub 256"), "n_ctx 256 is too small"),
    (("--range", "n_ctx=8192:1024"), "is empty"),
    (("--range", "n_threads=1:2", "--baseline", "-c abc"), "-c 'abc' is not a number"),
    (("--objective", "answer"), "--objective answer does not judge the pp-tg workload"),
    (("--workload", "chat", "--objective", "tg"), "--objective tg does not judge the chat workload"),
    (("--prompt-tokens", "100"), "--prompt-tokens 100 needs a workload with a prompt and an answer"),
    (("--workload", "custom", "--gen-tokens", "0"), "--gen-tokens 0 needs a workload"),
    (("--min-stream-tps", "5"), "--min-stream-tps 5.0 applies to --workload server only"),
    (("--workload", "custom", "--prompt-tokens", "99999999"), "more than the model's training context"),
])
def test_tune_bad_input_is_one_line_before_any_work(cli, tiny_model, tmp_path, no_work_before_checks, args, needle):
    """Refused before a llama_cpp child, the bandwidth probe or the repack check runs, and before a study exists."""
    r = cli("tune", tiny_model, "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow", *args)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "s.db").exists()


def test_tune_refuses_a_non_gguf_model(run_cli, bad_files, tmp_path):
    r = run_cli("tune", bad_files["not_gguf"], "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow")
    assert_one_line_error(r, "not a GGUF file")


def test_report_and_export_of_a_missing_study_name_the_existing_ones(cli, tmp_path):
    r = cli("report", "nope", "--storage", f"sqlite:///{tmp_path}/s.db")
    assert_one_line_error(r, "no study named 'nope'")


@pytest.mark.slow
def test_tune_report_export_on_a_tiny_model(run_cli, tiny_model, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    common = ("--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--min-ctx", "512",
              "--set", "n_prompt=64", "--set", "n_gen=16", "--set", "repetitions=2")
    baseline = ("--baseline", "-c 1024 -b 512 -t 1" + NO_REPACK)
    r = run_cli("tune", tiny_model, "--study", "t", "--trials", "6", *baseline, *common)
    assert r.code == 0, r.err
    assert "presets:" in r.out and "llama-server (fastest):" in r.out and "tg vs yours" in r.out
    # stdout is a pipe here: one plain line per measured trial and per phase, and no library chatter
    trial_lines = [ln for ln in r.out.splitlines() if ln.startswith("[") and "] trial " in ln]
    assert len(trial_lines) >= 6 and trial_lines[-1].startswith("[6/6]") and "left" in trial_lines[-1]
    assert any(ln.startswith("confirming the leaders") for ln in r.out.splitlines())
    assert "INFO" not in r.out + r.err and "[I 20" not in r.out + r.err  # MLflow's and Optuna's INFO formats
    # the KV cache's quality beside the speed: a random-weight twin has none to measure
    assert "KV KLD" in r.out and "measuring what the" not in r.out
    quantized = [ln for ln in r.out.splitlines() if ln.startswith("| ") and "q" in ln.split("|")[9]]
    assert all("unknown (twin)" in ln for ln in quantized if not ln.startswith("| preset"))
    again = run_cli("tune", tiny_model, "--study", "t", "--trials", "6", *baseline, *common)
    assert again.code == 0 and "6 configurations measured" in again.out  # resumed, nothing new
    assert "confirming the leaders" not in again.out  # nor are the leaders measured again
    report = run_cli("report", "t", "--storage", storage)
    assert report.code == 0 and "baseline: yours" in report.out
    assert "baseline: llama-server defaults (fit)" in report.out
    for fmt in ("llama-server", "llama-cpp-python", "ollama", "json"):
        e = run_cli("export", "t", "--format", fmt, "--preset", "max-context", "--storage", storage)
        assert e.code == 0, e.err
    data = json.loads(run_cli("export", "t", "--format", "json", "--storage", storage).out)
    # gains over every baseline but the preset itself, where it is one (a tie keeps the baseline)
    assert data["measured"]["tg_tps"] > 0 and set(data["gain_over_baselines"]) == BASES - {data["baseline"]}
