"""Workloads: their test sizes, the depth-curve arithmetic, server streams, and what each is judged by."""

from __future__ import annotations

import pytest

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.measure.result import DepthCurve, Rates, Status, TrialResult, workload_rates
from llama_tuner.measure.workloads import PROBE_TOKENS, answer_ns, curve_depths
from llama_tuner.report.export import llama_server_args, ollama_modelfile
from llama_tuner.study.objectives import Limits, constraints
from llama_tuner.study.comparison import speed


def test_the_curve_probes_doubling_depths_and_the_prompts_and_answers_ends():
    assert curve_depths(0, 512, 4096) == [0, 512, 1024, 2048, 4096, 4608]
    assert curve_depths(0, 1024, 256) == [0, 1024, 1280]
    assert curve_depths(1000, 2000, 300) == [0, 1000, 1024, 2048, 3000, 3300]


def test_time_to_answer_sums_the_prompts_spans_and_integrates_the_per_token_time():
    depths = [0, 512, 1024, 2048, 4096, 4608]
    # Generation slows linearly with depth: 10 ms per token at depth 0, +1 ms per 1,024 tokens.
    per_token = [0.010 + d / 1024 * 0.001 for d in depths]
    probes = [int(t * PROBE_TOKENS * 1e9) for t in per_token]
    spans = [int((b - a) * 1e6) for a, b in zip(depths, depths[1:])]  # 1 ms per prompt token
    prompt, gen = answer_ns(depths, spans, probes, PROBE_TOKENS, 0, 512, 4096)
    assert prompt == 512 * 10**6
    exact = sum(0.010 + (512 + i + 0.5) / 1024 * 0.001 for i in range(4096))
    assert gen / 1e9 == pytest.approx(exact, rel=1e-4)
    # A prompt after a depth counts only the spans it covers.
    prompt, _ = answer_ns(depths, spans, probes, PROBE_TOKENS, 512, 1536, 1)
    assert prompt == 1536 * 10**6


def test_a_curve_result_is_judged_by_its_seconds_to_answer():
    cfg = BenchConfig(workload="chat", n_prompt=1024, n_gen=256, n_ctx=2048, repetitions=2)
    curve = DepthCurve(depths=[0, 1024, 1280], probe_tokens=PROBE_TOKENS,
                       span_ns=[[10**9, 2 * 10**8]] * 2, probe_ns=[[int(0.02 * PROBE_TOKENS * 1e9)] * 3] * 2)
    pp, tg = workload_rates(cfg, [], [], curve)
    r = TrialResult(Status.OK, cfg, "/m.gguf", pp=pp, tg=tg, curve=curve)
    assert r.time_to_answer_s == pytest.approx(1.0 + 256 * 0.02, rel=1e-6)
    assert speed(r, "answer")[0] == pytest.approx(1 / r.time_to_answer_s, rel=1e-6)
    assert TrialResult.from_dict(r.to_dict()) == r


def test_server_streams_report_aggregate_and_per_stream_rates_and_a_floor_per_stream():
    cfg = BenchConfig(workload="server", n_parallel=4, n_prompt=64, n_gen=32, n_ctx=512)
    pp, tg = workload_rates(cfg, [10**9], [10**9], None)
    r = TrialResult(Status.OK, cfg, "/m.gguf", pp=pp, tg=tg, peak_rss_bytes=1 << 30)
    assert r.tg_mean == 128 and r.stream_tg_mean == 32
    limits = Limits(8 << 30, 0, 256)
    assert "min_stream_tps" not in constraints(r, limits)
    assert constraints(r, Limits(8 << 30, 0, 256, min_stream_tps=40))["min_stream_tps"] > 0  # 32 < 40 per stream
    assert constraints(r, Limits(8 << 30, 0, 256, min_stream_tps=30))["min_stream_tps"] < 0


def test_the_context_must_hold_what_each_workload_fills():
    with pytest.raises(InvalidConfig, match="4 streams"):
        BenchConfig(workload="server", n_parallel=4, n_prompt=512, n_gen=128, n_ctx=2048).validate()
    BenchConfig(workload="server", n_parallel=4, n_prompt=512, n_gen=128, n_ctx=2560).validate()
    with pytest.raises(InvalidConfig, match="n_ctx >= 4624"):
        BenchConfig(workload="reasoning", n_prompt=512, n_gen=4096, n_ctx=4608).validate()
    with pytest.raises(InvalidConfig, match="server workload"):
        BenchConfig(n_parallel=2).validate()
    with pytest.raises(InvalidConfig, match="unknown workload"):
        BenchConfig(workload="poetry").validate()


def test_a_server_preset_exports_its_streams_and_their_shared_context():
    cfg = BenchConfig(workload="server", n_parallel=4, n_ctx=8192, n_threads=2, n_threads_batch=2)
    args = llama_server_args("/m.gguf", cfg)
    assert args[args.index("--parallel") + 1] == "4" and "--kv-unified" in args
    assert args[args.index("--ctx-size") + 1] == "8192"
    modelfile = ollama_modelfile("/m.gguf", cfg)
    assert "PARAMETER num_ctx 2048" in modelfile and "OLLAMA_NUM_PARALLEL=4" in modelfile
    one = llama_server_args("/m.gguf", BenchConfig(n_threads=2, n_threads_batch=2))
    assert one[one.index("--parallel") + 1] == "1" and "--kv-unified" not in one


def test_bench_takes_a_workloads_sizes_unless_given_and_np_means_server():
    from llama_tuner.cli.bench import workload_values

    assert workload_values({"n_prompt": None}, "reasoning") == {"n_prompt": "512", "n_gen": "4096", "n_depth": "0",
                                                                 "workload": "reasoning"}
    assert workload_values({"n_prompt": "100"}, "chat")["n_prompt"] == "100"
    assert workload_values({"n_parallel": "1,4"}, None)["workload"] == "server"
    assert workload_values({}, None) == {"workload": "pp-tg"}


def test_rates_of_a_pp_tg_test_are_unchanged():
    cfg = BenchConfig()
    pp, tg = workload_rates(cfg, [10**9], [10**9], None)
    assert pp == Rates(512, [10**9]) and tg == Rates(128, [10**9])


# -- studies of a workload (fake launcher) ---------------------------------------

def _study(model, tmp_path, **kw):
    from llama_tuner.study.session import StudyRequest, open_tuner
    from llama_tuner.testing.fakes import FakeLauncher

    from test_study import ENV

    request = StudyRequest(model=str(model), storage=f"sqlite:///{tmp_path}/s.db", trials=10, seed=1, **kw)
    launcher = FakeLauncher(env=ENV)
    return open_tuner(request, launcher=launcher, env=ENV), launcher


def test_a_reasoning_study_ranks_presets_by_seconds_to_answer_and_reports_their_depth_curves(long_context_model,
                                                                                              tmp_path):
    from llama_tuner.report.export import study_preset_json
    from llama_tuner.report.study_report import full_report
    from llama_tuner.study.view import StudyView

    t, launcher = _study(long_context_model, tmp_path, workload="reasoning")
    assert t.study.study_name.endswith("@cpu-reasoning") and t.settings.objective == "answer"
    t.run()
    assert all(c.workload == "reasoning" and (c.n_prompt, c.n_gen) == (512, 4096) and c.n_ctx >= 5120
               for c in launcher.measured)  # --min-ctx raised to what the test fills, rounded up to 1,024
    view = StudyView(t.study)
    fastest = view.presets["fastest"].candidate.figures
    assert fastest.time_to_answer_s == min(c.figures.time_to_answer_s for c in view.candidates)
    report = full_report(view)
    assert "answer s" in report and "depth curves" in report and "tg d4608" in report and "pp to d4608" in report
    data = study_preset_json(view, "fastest")
    assert data["measured"]["time_to_answer_s"] == pytest.approx(fastest.time_to_answer_s)
    assert [p["depth"] for p in data["measured"]["depth_curve"]] == [0, 512, 1024, 2048, 4096, 4608]


def test_a_server_study_searches_streams_and_keeps_every_stream_above_its_floor(long_context_model, tmp_path):
    from llama_tuner.report.export import llama_server_args
    from llama_tuner.study.view import StudyView

    t, launcher = _study(long_context_model, tmp_path, workload="server", min_stream_tps=20.0,
                         baseline_flags="llama-server -c 8192 -np 2 -t 2")
    assert t.baselines["yours"].n_parallel == 2  # as given; llama-server's own default is 4 slots
    assert t.baselines["llama-server defaults (fit)"].n_parallel == 4
    t.run()
    assert len({c.n_parallel for c in launcher.measured}) > 1
    view = StudyView(t.study)
    assert all(c.figures.stream_tg_mean >= 20.0 for c in view.candidates)
    fastest = view.presets["fastest"].candidate.figures
    args = llama_server_args(view.model_path, fastest.config)
    assert args[args.index("--parallel") + 1] == str(fastest.config.n_parallel)
    assert fastest.tg_mean == max(c.figures.tg_mean for c in view.candidates)  # aggregate t/s


def test_compare_answers_the_reference_users_question_per_workload(long_context_model, tmp_path):
    from llama_tuner.report.compare import compare_text, row_for
    from llama_tuner.study.view import StudyView

    reasoning, _ = _study(long_context_model, tmp_path, workload="reasoning", study_name="r")
    reasoning.run()
    plain, _ = _study(long_context_model, tmp_path, study_name="p")
    plain.run()
    rows = [row_for(StudyView(t.study), "fastest", "reasoning") for t in (reasoning, plain)]
    measured, estimated = rows
    assert measured.answer_how == "measured" and estimated.answer_how.startswith("estimated from pp512/tg128")
    f = StudyView(reasoning.study).presets["fastest"].candidate.figures
    assert measured.answer_s == pytest.approx(f.time_to_answer_s)
    text = compare_text(rows)
    assert "reasoning s" in text and "KV KLD" in text and "x sooner" in text
    assert "tune with --workload reasoning" in text
    assert row_for(StudyView(plain.study), "fastest").answer_s is None  # its own workload, pp-tg: no seconds


def test_every_compared_study_answers_the_same_test(long_context_model, tmp_path):
    from llama_tuner.report.compare import row_for, workload_sizes
    from llama_tuner.study.view import StudyView

    chat, _ = _study(long_context_model, tmp_path, workload="chat", prompt_tokens=256, gen_tokens=64, study_name="c")
    chat.run()
    plain, _ = _study(long_context_model, tmp_path, study_name="p")
    plain.run()
    views = [StudyView(chat.study), StudyView(plain.study)]
    sizes = workload_sizes(views, "fastest", "chat")
    assert sizes == (0, 256, 64)  # the measured study's test, not chat's default 1,024 + 256
    measured, estimated = [row_for(v, "fastest", "chat", sizes) for v in views]
    f = views[1].presets["fastest"].candidate.figures
    assert measured.answer_how == "measured"
    assert estimated.answer_s == pytest.approx(256 / f.pp_mean + 64 / f.tg_mean)
