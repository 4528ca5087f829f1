"""The scenarios workload: the user's own requests answered for real in llama-server (a fake one here, whose
answers are FAKE's thinking and answer words; the real one in tests/test_llama_server.py), measured, kept with
their text in the study and in MLflow, compared across studies, and judged by seconds per answer."""

# ruff: noqa: F811  (tests take the fake llama-server fixture imported below by its name)
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from test_server_engine import engine as fake_llama_server  # noqa: F401  (the fake llama-server fixture)
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Status, TrialResult
from llama_tuner.measure.scenarios import Answer, load_scenarios, summarize
from llama_tuner.report.answer_agreement import agreements
from llama_tuner.report.scenario_compare import ScenarioSide, scenario_compare_text
from llama_tuner.study.objectives import Limits, constraints


def _write(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CHAT = {"name": "chat", "messages": [{"role": "user", "content": "Say hello to the world."}]}
RAW = {"name": "raw", "prompt": "The three primary colors of light are"}


@pytest.fixture
def prompts(tmp_path) -> Path:
    return _write(tmp_path / "prompts.jsonl", ["# two requests", {**CHAT, "max_tokens": 100}, "",
                                               {**RAW, "max_tokens": 5}])


def test_the_bundled_file_holds_a_dozen_requests_of_every_kind_the_issue_names():
    scenarios = load_scenarios()
    names = [s.name for s in scenarios]
    assert len(scenarios) >= 12 and len(set(names)) == len(names)
    for kind in ("chat", "summary", "code", "math", "logic", "long-document"):
        assert any(n.startswith(kind) for n in names), kind
    assert any(not s.is_chat for s in scenarios)  # raw text too
    longest = max(scenarios, key=lambda s: s.chars())
    assert longest.name == "long-document" and longest.chars() > 4000
    code = next(s for s in scenarios if s.name == "code-fix")
    assert "```python" in code.messages[-1]["content"]  # the code to edit is quoted in the request


@pytest.mark.parametrize("line, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}]', "not JSON"),
    ('["a list"]', "not an object"),
    ('{"prompt": "x", "maxtokens": 5}', "unknown key 'maxtokens'"),
    ('{"prompt": "x", "messages": []}', "exactly one of messages and prompt"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "nothing to answer"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 1"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens 0"),
    ('{"prompt": "x", "name": "chat"}', "taken by an earlier line"),
])
def test_a_bad_line_is_named_by_its_number_before_any_work(cli, tmp_path, demo_model_path, line, needle):
    bad = _write(tmp_path / "bad.jsonl", [CHAT, "# a comment", line])
    r = cli("bench", demo_model_path, "--prompts", bad, "--llama-server", "/nonexistent/llama-server")
    assert_one_line_error(r, "line 3", needle)


def test_scenarios_refuse_a_twin_and_the_child_engine_in_one_line(cli, tiny_model, demo_model_path, prompts):
    assert_one_line_error(cli("bench", tiny_model, "--prompts", prompts), "random-weight twin", "noise")
    assert_one_line_error(cli("tune", tiny_model, "--workload", "scenarios", "--no-mlflow"), "random-weight twin")
    assert_one_line_error(cli("bench", demo_model_path, "--prompts", prompts, "--engine", "child"),
                          "answered by llama-server")
    assert_one_line_error(cli("tune", demo_model_path, "--max-capped", "0.5", "--no-mlflow"), "--max-capped")


def test_bench_answers_each_request_and_measures_thinking_answer_and_cap(
        cli, demo_model_path, fake_llama_server, prompts):
    exe, configure, _ = fake_llama_server
    configure(tg=400.0, pp=4000.0, thinking=12, answer=20)
    r = cli("bench", demo_model_path, "--prompts", prompts, "--llama-server", exe, "-t", "2", "--json")
    assert r.code == 0, r.err
    [result] = json.loads(r.out)
    chat, raw = result["answers"]
    # the chat: 12 thinking tokens (reasoning_content) and 20 answer words, under its cap of 100
    assert (chat["generated_tokens"], chat["thinking_tokens"], chat["answer_tokens"]) == (32, 12, 20)
    assert not chat["capped"] and chat["finish"] == "stop"
    assert chat["reasoning"].startswith("step0 ") and chat["text"].startswith("word0 ")
    assert 0 < chat["first_token_s"] < chat["answer_start_s"] < chat["seconds"]
    assert chat["seconds"] >= 32 / 400  # one token per 1/tg s
    # raw text through /completion: no reasoning parsing, capped at 5
    assert (raw["generated_tokens"], raw["thinking_tokens"], raw["capped"]) == (5, 0, True)
    assert result["config"]["repetitions"] == 1  # one pass over the file, though it holds two requests
    s = result["scenarios"]
    assert s["requests"] == 2 and s["capped"] == 1 and s["capped_share"] == 0.5
    assert s["seconds_per_answer_median"] == pytest.approx((chat["seconds"] + raw["seconds"]) / 2)
    table = cli("bench", demo_model_path, "--prompts", prompts, "--llama-server", exe, "-t", "2")
    assert "| chat" in table.out and "capped" in table.out and "2 requests:" in table.out


def _scenario_result(seconds: list[float], written: list[int], *, capped: int = 0, thinking: int = 0,
                     tokens: list[list[int]] | None = None, type_k: str = "f16") -> TrialResult:
    answers = [Answer(name=f"r{i}", generated_tokens=n, thinking_tokens=thinking if i == 0 else 0, seconds=s,
                      first_token_s=0.1, capped=i < capped, tokens=(tokens or [[]] * len(seconds))[i],
                      text=f"answer {i}")
               for i, (s, n) in enumerate(zip(seconds, written))]
    cfg = BenchConfig(workload="scenarios", n_prompt=100, n_gen=200, type_k=type_k, type_v="f16",
                      flash_attn=True, repetitions=1)
    return TrialResult(Status.OK, cfg, "m.gguf", answers=answers)


def test_seconds_per_answer_is_the_median_over_the_file_and_capped_answers_can_be_a_constraint():
    r = _scenario_result([1.0, 2.0, 9.0, 3.0], [10, 20, 90, 30], capped=2)
    s = summarize(r.answers)
    assert (s.median_s, s.capped, s.total_s) == (2.5, 2, 15.0)
    assert r.time_to_answer_s == 2.5 and r.answer.rates == [pytest.approx(0.4)]
    limits = Limits(budget_bytes=1 << 30, min_headroom_bytes=0, min_ctx=1, max_capped=0.25)
    assert constraints(r, limits)["max_capped"] == pytest.approx(0.25)  # 2 of 4 capped: over 0.25
    assert "max_capped" not in constraints(r, Limits(budget_bytes=1 << 30, min_headroom_bytes=0, min_ctx=1))


def test_the_why_names_tokens_written_or_seconds_per_token_whichever_explains_more():
    quick = _scenario_result([1.0, 1.0], [50, 50])
    verbose = _scenario_result([6.0, 6.0], [340, 350], thinking=300)  # 6.9x the tokens at 0.87x the s/token
    slow = _scenario_result([3.0, 3.0], [55, 50])  # ~the same tokens, 2.9x the s/token
    sides = [ScenarioSide(label=n, study=n, model=n, preset="fastest", answers=r.answers, source="measured")
             for n, r in (("A", quick), ("B", verbose), ("C", slow))]
    text = scenario_compare_text(sides)
    line_b = next(ln for ln in text.splitlines() if ln.startswith("- B takes"))
    assert "6.00x as long" in line_b and "6.90x the tokens" in line_b and "300 of them thinking" in line_b
    assert "cause is the tokens written" in line_b
    line_c = next(ln for ln in text.splitlines() if ln.startswith("- C takes"))
    assert "cause is the seconds per token" in line_c
    assert "answer 0" in text  # the first words of each answer
    same = [ScenarioSide(label=n, study=n, model=n, preset="fastest", answers=r.answers, source="measured")
            for n, r in (("A", _scenario_result([1.0, 2.0, 3.0], [10, 20, 30])),
                         ("D", _scenario_result([1.1, 1.9, 3.1], [10, 20, 30])))]
    tie = next(ln for ln in scenario_compare_text(same).splitlines() if ln.startswith("- D and A"))
    assert "the same time within the noise" in tie and "cause" not in tie


def test_a_quantized_cache_is_judged_by_the_answers_it_leaves_identical_to_f16s():
    ref = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    f16 = [_scenario_result([1, 1], [6, 3], tokens=ref), _scenario_result([1, 1], [6, 3], tokens=ref)]
    q8 = _scenario_result([1, 1], [6, 3], tokens=[[1, 2, 3, 4, 5, 6], [7, 8, 0]], type_k="q8_0")
    q4 = _scenario_result([1, 1], [6, 3], tokens=[[1, 9, 3, 4, 5, 6], [0, 8, 9]], type_k="q4_0")
    by_cache = {a.cache[0]: a for a in agreements(f16 + [q8, q4])}
    assert (by_cache["f16"].identical, by_cache["f16"].compared) == (4, 4)
    assert (by_cache["q8_0"].identical, by_cache["q8_0"].first_difference) == (1, 2.0)
    assert (by_cache["q4_0"].identical, by_cache["q4_0"].first_difference) == (0, 0.5)


def test_tune_ranks_by_seconds_per_answer_keeps_the_answers_in_mlflow_and_compares_two_studies(
        run_cli, tmp_path, demo_model_path, fake_llama_server):
    exe, configure, _ = fake_llama_server
    configure(tg=400.0, pp=4000.0, answer=40)
    short = _write(tmp_path / "short.jsonl", [{**CHAT, "max_tokens": 8}, {**RAW, "max_tokens": 8}])
    long = _write(tmp_path / "long.jsonl", [{**CHAT, "max_tokens": 200}, {**RAW, "max_tokens": 200}])
    storage = f"sqlite:///{tmp_path}/studies.db"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name, path in (("short", short), ("long", long)):
        r = run_cli("tune", demo_model_path, "--prompts", path, "--trials", "3", "--study", name, "--storage",
                    storage, "--tracking-uri", uri, "--llama-server", exe, "--max-kld", "1", "--seed", "1",
                    "--set", "n_ctx=4096", "--set", "n_threads=2", "--set", "type_k=f16", "--set", "type_v=f16",
                    timeout=600)
        assert r.code == 0, r.err
        assert "s/answer" in r.out and "answer vs llama-server defaults" in r.out
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(demo_model_path.stem)
    runs = [run for run in client.search_runs([exp.experiment_id])
            if run.data.tags.get("llama_tuner.kind") == "trial" and run.data.tags.get("llama_tuner.study") == "short"]
    assert runs and all("seconds_per_answer" in run.data.metrics for run in runs)
    local = client.download_artifacts(runs[0].info.run_id, "answers.jsonl", str(tmp_path))
    kept = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert {a["name"] for a in kept} == {"chat", "raw"} and kept[0]["text"].startswith("word0")
    r = run_cli("compare", "long", "short", "--prompts", short, "--storage", storage, "--llama-server", exe)
    assert r.code == 0, r.err
    why = next(ln for ln in r.out.splitlines() if ln.startswith("- long takes"))
    assert "5.00x the tokens" in why and "cause is the tokens written" in why
    assert "max_tokens 200 against 8" in r.out  # the long study answered its own version of the requests
    r = run_cli("verify", "long", "--rounds", "2", "--storage", storage, "--llama-server", exe, "--no-mlflow")
    assert r.code == 0, r.err
    served = next(ln for ln in r.out.splitlines() if ln.startswith("served seconds per answer"))
    assert "80 tokens written per answer" not in served and "40 tokens written per answer" in served
    assert "over 2 paired rounds: answer" in r.out


def test_a_worker_answers_the_studys_own_requests_where_their_file_is_gone(
        cli, tmp_path, demo_model_path, fake_llama_server, monkeypatch):
    import optuna

    from llama_tuner.measure.llama_server import ENV_VAR
    from llama_tuner.study.worker import join_study

    exe, configure, starts = fake_llama_server
    configure(tg=400.0, pp=4000.0, answer=10)
    path = _write(tmp_path / "mine.jsonl", [{**CHAT, "max_tokens": 50}])
    storage = f"sqlite:///{tmp_path}/s.db"
    r = cli("tune", demo_model_path, "--prompts", path, "--llama-server", exe, "--trials", "2", "--storage", storage,
            "--no-mlflow", "--study", "s", "--no-confirm", "--set", "n_threads=2", "--set", "type_k=f16", "--set",
            "type_v=f16", "--set", "n_ctx=4096")
    assert r.code == 0, r.err
    path.unlink()  # gone, as on another host
    study = optuna.load_study(study_name="s", storage=storage)
    study.set_user_attr("request", {**study.user_attrs["request"], "trials": 3, "llama_server": None})
    monkeypatch.setenv(ENV_VAR, exe)
    before = len(starts())
    join_study("s", storage).run()  # refused if its requests were others (the study's fingerprint)
    assert len(starts()) > before
    trials = [t for t in optuna.load_study(study_name="s", storage=storage).trials if t.state.is_finished()]
    assert len(trials) == 3
    assert all(t.user_attrs["result"]["answers"][0]["name"] == "chat" for t in trials if "result" in t.user_attrs)


def test_a_speculative_preset_shows_its_acceptance_and_its_seconds_against_the_same_settings_without_it(
        cli, tmp_path, demo_model_path, fake_llama_server):
    from llama_tuner.report.study_report import speculative_lines
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    exe, configure, _ = fake_llama_server
    configure(tg=300.0, pp=4000.0, answer=60, gain=2.0)  # ngram-mod writes twice as fast
    path = _write(tmp_path / "p.jsonl", [{**CHAT, "max_tokens": 100}, {**RAW, "max_tokens": 100}])
    storage = f"sqlite:///{tmp_path}/s.db"
    pins = [x for k, v in (("n_threads", 2), ("n_threads_batch", 2), ("n_ctx", 4096), ("n_batch", 2048),
                           ("n_ubatch", 512), ("flash_attn", 1), ("type_k", "f16"), ("type_v", "f16"),
                           ("use_mmap", 1), ("repack", 1)) for x in ("--set", f"{k}={v}")]
    r = cli("tune", demo_model_path, "--prompts", path, "--llama-server", exe, "--trials", "5", "--storage",
            storage, "--no-mlflow", "--study", "s", "--seed", "2", *pins)
    assert r.code == 0, r.err
    view = StudyView.load(make_storage(storage), "s")
    fastest = view.preset("fastest").candidate.figures
    assert fastest.config.spec_type == "ngram-mod"
    [line] = [ln for ln in speculative_lines(view) if ln.startswith("fastest")]
    assert "90% of" in line and "drafted tokens accepted" in line and "s per answer" in line
    assert "without it (trial" in line and "+" in line  # the gain over the same settings without ngram-mod
    assert line in r.out
