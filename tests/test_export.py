"""Golden-file tests of every export format, and the export/report commands on a stored study."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llama_tuner.measure.config import BenchConfig
from llama_tuner.report.export import FORMATS, render
from llama_tuner.study.presets import Candidate
from llama_tuner.measure.result import Environment, Rates, Status, TrialResult

GOLDEN = Path(__file__).parent / "golden"
MODEL = "/models/My Models/Qwen3-8B-Q4_K_M.gguf"  # a space, so quoting matters


def _candidate(**changes) -> Candidate:
    cfg = BenchConfig(n_gpu_layers=37, n_ctx=16384, n_batch=2048, n_ubatch=512, n_threads=8, n_threads_batch=16,
                      flash_attn=True, type_k="q8_0", type_v="q8_0", n_prompt=512, n_gen=128, repetitions=4,
                      **changes)
    env = Environment(host="rig", cpu="Ryzen 7", physical_cores=8, gpu_name="NVIDIA GeForce RTX 4070",
                      gpu_driver="560.35.03", vram_total_bytes=12 << 30, llama_cpp_python="0.3.36",
                      llama_cpp_build="ggml 0.25.3 (0c1e570)", gpu_offload=True)
    r = TrialResult(Status.OK, cfg, MODEL, pp=Rates(512, [200_000_000, 210_000_000, 190_000_000, 200_000_000]),
                    tg=Rates(128, [2_000_000_000, 2_100_000_000, 1_900_000_000, 2_000_000_000]),
                    peak_vram_bytes=10_737_418_240, vram_free_before_bytes=11_811_160_064, env=env)
    return Candidate(7, r)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_golden_file(fmt):
    env = {"gpu_name": "NVIDIA GeForce RTX 4070", "llama_cpp_python": "0.3.36"}
    text = render(fmt, "fastest", _candidate(), MODEL, "qwen3@gpu-rtx-4070", env,
                  {"llama-server defaults (fit)": {
                      "tg": {"share": 0.25, "half_width": 0.041, "verdict": "better", "paired_rounds": 5},
                      "pp": {"share": 0.01, "half_width": 0.03, "verdict": "tie", "paired_rounds": 5}}})
    golden = GOLDEN / f"fastest.{fmt}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_llama_server_export_quotes_the_path_and_pins_one_slot():
    text = render("llama-server", "fastest", _candidate(), MODEL, "s", {})
    assert "-m '/models/My Models/Qwen3-8B-Q4_K_M.gguf'" in text and "--parallel 1" in text


def test_repack_off_is_exported_where_the_target_has_it_and_noted_where_not():
    off = _candidate(repack=False)
    assert render("llama-server", "fastest", off, MODEL, "s", {}).rstrip().endswith("--no-repack")
    assert "--no-repack" not in render("llama-server", "fastest", _candidate(), MODEL, "s", {})
    for fmt in ("llama-cpp-python", "ollama"):
        assert "repacking off" in render(fmt, "fastest", off, MODEL, "s", {})
        assert "repacking off" not in render(fmt, "fastest", _candidate(), MODEL, "s", {})


def test_llama_cpp_python_export_uses_only_real_kwargs():
    """llama-cpp-python silently ignores unknown kwargs: every exported name must be a real one."""
    import inspect

    from llama_cpp import Llama

    ns: dict = {}
    code = render("llama-cpp-python", "fastest", _candidate(), MODEL, "s", {}).replace("llm = Llama(", "kw = dict(")
    exec(code, ns)  # noqa: S102 - our own generated snippet
    accepted = set(inspect.signature(Llama.__init__).parameters)
    assert set(ns["kw"]) <= accepted
    import llama_cpp

    assert ns["kw"]["type_k"] == llama_cpp.GGML_TYPE_Q8_0 and ns["kw"]["flash_attn"] is True


def test_json_export_carries_the_measured_figures():
    d = json.loads(render("json", "fastest", _candidate(), MODEL, "s", {}))
    assert d["measured"]["tg_tps"] == pytest.approx(64.0, rel=0.01) and d["measured"]["repetitions"] == 4
    assert d["settings"]["n_ctx"] == 16384 and d["llama_cpp_python"]["type_k"] == "GGML_TYPE_Q8_0"


def test_a_ram_budget_below_llama_servers_prompt_cache_caps_it_in_the_command(tiny_model, tmp_path):
    """llama-server keeps up to 8 GiB of prompts in RAM (--cache-ram 8192) beyond what a measurement shows: where
    the study's RAM budget leaves less above the preset's peak and headroom, the command caps it to what is left."""
    from dataclasses import replace as dc_replace

    from llama_tuner.report.export import host_cache_mib, render_study_preset
    from llama_tuner.study.session import StudyRequest, open_tuner
    from llama_tuner.study.view import StudyView
    from llama_tuner.testing.fakes import FakeLauncher

    def study(budget: str) -> StudyView:
        launcher = FakeLauncher(peak_fn=lambda c: 1 << 30)
        env = dc_replace(launcher.env, physical_cores=2)  # a CPU machine: the budget is RAM
        t = open_tuner(StudyRequest(model=str(tiny_model), storage=f"sqlite:///{tmp_path}/{budget}.db",
                                    study_name="s", trials=3, seed=1, min_ctx=1024, vram_budget=budget,
                                    min_headroom="512MiB"), launcher=launcher, env=env)
        t.run()
        return StudyView(t.study)

    tight = study("4GiB")
    cand = tight.preset("fastest").candidate
    left = (4 * 1024 - 512) - cand.figures.peak_memory_bytes // 2**20
    assert host_cache_mib(tight, cand) == left and 0 < left < 8192
    assert f"--cache-ram {left}" in render_study_preset(tight, "llama-server", "fastest")
    roomy = study("30GiB")
    assert "--cache-ram" not in render_study_preset(roomy, "llama-server", "fastest")
