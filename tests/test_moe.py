"""Mixture of experts: what the header says of experts, where a placement puts their bytes, and fitting
placements and llama-server's defaults to a budget (fake GPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.model.facts import ModelFacts
from llama_tuner.model.experts import is_expert_tensor
from llama_tuner.model.info import load_model_info
from llama_tuner.model.twins import SHAPES, describe_shape
from llama_tuner.report.export import llama_cpp_python_snippet, llama_server_args, ollama_modelfile
from llama_tuner.study.baselines import parse_server_flags
from llama_tuner.study.confirmation import confirm_leaders
from llama_tuner.study.memory_model import FIT_MARGIN, MemoryModel

GIB = 2**30


@pytest.fixture(scope="module")
def qwen3_moe():
    return describe_shape(SHAPES["qwen3-30b-a3b"], "q4_k_m")


def test_the_header_tells_experts_and_their_bytes_per_layer(qwen3_moe):
    m = qwen3_moe
    assert (m.n_expert, m.n_expert_used, m.is_moe) == (128, 8, True)
    assert len(m.expert_bytes) == 48 and all(0 < e < b for e, b in zip(m.expert_bytes, m.layer_bytes))
    assert 15 * GIB < sum(m.expert_bytes) < 17 * GIB  # Qwen3-30B-A3B Q4_K_M: about 17.3 GiB in all
    two = m.expert_tensors(2)
    assert sorted(two) == sorted(f"blk.{i}.ffn_{k}_exps.weight" for i in (0, 1) for k in ("gate", "up", "down"))
    assert sum(two.values()) == m.expert_bytes[0] + m.expert_bytes[1]
    assert not is_expert_tensor("blk.0.ffn_gate_inp.weight") and not is_expert_tensor("blk.0.ffn_up.weight")
    dense = describe_shape(SHAPES["qwen3-8b"], "q4_k_m")
    assert not dense.is_moe and dense.expert_tensors(4) == {}


def test_the_tiny_moe_twin_is_written_and_read_back(tmp_path):
    from llama_tuner.model.twins import write_synthetic_gguf

    path = write_synthetic_gguf(tmp_path / "moe.gguf", SHAPES["tiny-moe"], "q4_k_m")
    info = load_model_info(path)
    planned = describe_shape(SHAPES["tiny-moe"], "q4_k_m")
    assert info.expert_bytes == planned.expert_bytes and info.n_expert == 8 and info.n_expert_used == 2
    shapes = {t.name: t.shape for t in info.extra["tensors"]}
    assert shapes["blk.0.ffn_up_exps.weight"] == (256, 256, 8) and shapes["blk.0.ffn_down_exps.weight"] == (256, 256, 8)


def test_n_cpu_moe_moves_the_first_layers_experts_to_host_memory(qwen3_moe):
    mm = MemoryModel(ModelFacts.of(qwen3_moe), on_gpu=True)
    cfg = BenchConfig(n_gpu_layers=49, n_ctx=4096, flash_attn=True)
    every, ten = mm.allocations(cfg), mm.allocations(replace(cfg, n_cpu_moe=10))
    moved = sum(qwen3_moe.expert_bytes[:10])
    assert every.gpu_weights - ten.gpu_weights == moved and ten.host_weights - every.host_weights == moved
    # A token reads the 8 experts of 128 it is routed to: bytes per token are far below the weights.
    cost = mm.facts.token_cost(49, "f16", "f16", 0)
    assert cost.total < 0.2 * sum(qwen3_moe.layer_bytes)
    assert mm.facts.token_cost(49, "f16", "f16", 0, n_cpu_moe=10).cpu_weights == pytest.approx(moved * 8 / 128, 1e-6)


def test_a_fitted_placement_offloads_every_layer_and_the_fewest_experts_to_host_memory(qwen3_moe):
    mm = MemoryModel(ModelFacts.of(qwen3_moe), on_gpu=True)
    limit = 12 * GIB - 512 * 2**20
    cfg = BenchConfig(n_ctx=16384, flash_attn=True, type_k="q8_0", type_v="q8_0")
    placed = mm.fit_placement(cfg, limit)
    assert placed.n_gpu_layers == 49 and 0 < placed.n_cpu_moe < 48
    assert mm.predict(placed) <= limit
    assert mm.predict(replace(placed, n_cpu_moe=placed.n_cpu_moe - 1)) > limit  # one more expert layer breaks it
    # When even every expert in host memory does not fit, layers leave the GPU, experts still in host memory.
    short = mm.predict(replace(cfg, n_gpu_layers=49, n_cpu_moe=48)) - 1
    tiny = mm.fit_placement(cfg, short)
    assert tiny.n_cpu_moe == 48 and tiny.n_gpu_layers == 48 and mm.predict(tiny) <= short


def test_the_fit_baseline_shrinks_the_context_then_moves_experts_then_layers(qwen3_moe):
    from llama_tuner.study.baselines import server_defaults

    dense = describe_shape(SHAPES["mistral-small-24b"], "q2_k")
    mm = MemoryModel(ModelFacts.of(dense), on_gpu=True)
    limit = 12 * GIB - FIT_MARGIN
    base = server_defaults(dense, 8, gpu_offload=True)
    assert base.n_ctx == 32768 and mm.predict(base) > limit  # what the defaults baseline measured before: 13.9 GiB
    fitted = mm.fit_like_llama_server(base, limit)
    assert fitted.n_gpu_layers == 41 and 4096 <= fitted.n_ctx < 32768 and mm.predict(fitted) <= limit
    assert mm.predict(replace(fitted, n_ctx=fitted.n_ctx + 256)) > limit  # the context first, no more than needed
    squeezed = mm.fit_like_llama_server(base, 8 * GIB)  # even 4096 does not fit all layers: then layers
    assert squeezed.n_ctx == 4096 and squeezed.n_gpu_layers < 41 and mm.predict(squeezed) <= 8 * GIB

    mm = MemoryModel(ModelFacts.of(qwen3_moe), on_gpu=True)
    base = server_defaults(qwen3_moe, 8, gpu_offload=True)
    fitted = mm.fit_like_llama_server(base, limit)  # 17 GiB of experts: 4096 context, then experts
    assert fitted.n_ctx == 4096 and fitted.n_gpu_layers == 49 and 0 < fitted.n_cpu_moe < 48
    assert mm.predict(fitted) <= limit < mm.predict(replace(fitted, n_cpu_moe=fitted.n_cpu_moe - 1))
    roomy = mm.fit_like_llama_server(base, 40 * GIB)  # what fits is left as llama-server leaves it
    assert roomy.n_cpu_moe == 0 and roomy.n_gpu_layers == 49 and roomy.n_ctx > 4096


def test_exports_carry_the_expert_placement(qwen3_moe):
    cfg = BenchConfig(n_gpu_layers=49, n_cpu_moe=2, use_mmap=False, n_threads=8, n_threads_batch=8)
    args = llama_server_args("/m.gguf", cfg)
    assert args[args.index("--n-cpu-moe") + 1] == "2"
    assert args[args.index("--load-mode") + 1] == "none"
    assert "--n-cpu-moe 2" in llama_cpp_python_snippet("/m.gguf", cfg)
    assert "Ollama has no expert placement" in ollama_modelfile("/m.gguf", cfg)
    parsed = parse_server_flags("llama-server -ngl 99 --n-cpu-moe 12 --no-mmap", qwen3_moe)
    assert (parsed.n_cpu_moe, parsed.use_mmap) == (12, False)
    assert parse_server_flags("llama-server -ngl 99 --cpu-moe", qwen3_moe).n_cpu_moe == 48


def test_n_cpu_moe_needs_experts_and_at_most_every_layer(qwen3_moe):
    dense = describe_shape(SHAPES["qwen3-8b"], "q4_k_m")
    with pytest.raises(InvalidConfig, match="needs a mixture-of-experts model"):
        BenchConfig(n_cpu_moe=2, n_threads=1, n_threads_batch=1).validate(dense)
    with pytest.raises(InvalidConfig, match="at most 48"):
        BenchConfig(n_cpu_moe=49, n_threads=1, n_threads_batch=1).validate(qwen3_moe)


def test_a_moe_study_on_a_12_gib_gpu_fits_experts_per_trial_and_fits_the_defaults(qwen3_moe, tiny_model, tmp_path,
                                                                                  monkeypatch):
    from test_memory import FAKE_GPU

    from llama_tuner.study.keys import DEFAULTS_BASELINE
    from llama_tuner.study.objectives import result_of
    from llama_tuner.study.session import StudyRequest, open_tuner
    from llama_tuner.study.view import StudyView
    from llama_tuner.testing.fakes import FakeGpuProbe, FakeLauncher

    info = replace(qwen3_moe, path=str(tiny_model))
    monkeypatch.setattr("llama_tuner.study.session.load_model_info", lambda path: info)
    truth = MemoryModel(ModelFacts.of(info), on_gpu=True)
    env = replace(FAKE_GPU, vram_total_bytes=12 * GIB)
    launcher = FakeLauncher(env=env, n_layer=48, peak_fn=lambda c: int(truth.predict(c) * 1.01),
                            free_bytes=12 * GIB - 300 * 2**20)
    request = StudyRequest(model=str(tiny_model), storage=f"sqlite:///{tmp_path}/s.db", trials=10, seed=0,
                           vram_budget="12GiB", min_ctx=8192)
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    defaults = t.baselines[DEFAULTS_BASELINE]
    assert defaults.n_ctx == 4096 and defaults.n_gpu_layers == 49 and defaults.n_cpu_moe > 0  # as --fit places it
    t.run()
    sampled = [result_of(tr) for tr in t.study.trials if "baseline" not in tr.user_attrs]
    assert {r.config.use_mmap for r in sampled} == {True, False}  # the load mode is searched where experts move
    for r in sampled:
        if r.ok:
            c = r.config
            assert c.n_gpu_layers == 49 and c.n_cpu_moe > 0
            assert r.peak_memory_bytes <= 12 * GIB - 512 * 2**20
    confirm_leaders(t)
    fastest = StudyView(t.study).presets["fastest"].candidate.figures.config
    assert fastest.n_cpu_moe > 0


# -- real llama.cpp (CPU) -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from llama_tuner.model.twins import write_synthetic_gguf

    return write_synthetic_gguf(tmp_path_factory.mktemp("moe") / "tiny-moe-q4_k_m.gguf", SHAPES["tiny-moe"], "q4_k_m")


@pytest.mark.slow
def test_bench_sweeps_n_cpu_moe_and_records_what_llama_cpp_placed_by_override(run_cli, tiny_moe):
    import json

    from conftest import REPACK_WORKS

    r = run_cli("bench", tiny_moe, "-ncmoe", "0,2", "-t", "1", "-p", 32, "-n", 8, "-r", 2, "-c", 256,
                "--repack", int(REPACK_WORKS), "--json")
    assert r.code == 0, r.err
    none, two = json.loads(r.out)
    assert none["status"] == two["status"] == "ok"
    assert (none["config"]["n_cpu_moe"], two["config"]["n_cpu_moe"]) == (0, 2)
    assert none["overridden"] is None
    predicted = load_model_info(tiny_moe).expert_tensors(2)  # what `inspect` says --n-cpu-moe 2 keeps in RAM
    assert {n: t["bytes"] for n, t in two["overridden"].items()} == predicted
    assert {t["buffer"] for t in two["overridden"].values()} <= {"CPU", "CPU_REPACK"}


@pytest.mark.slow
def test_tune_a_moe_with_n_cpu_moe_pinned_and_export_it(run_cli, tiny_moe, tmp_path):
    from conftest import NO_REPACK

    storage = f"sqlite:///{tmp_path}/s.db"
    r = run_cli("tune", tiny_moe, "--study", "moe", "--trials", "3", "--storage", storage, "--no-mlflow",
                "--min-ctx", "512", "--set", "n_cpu_moe=2", "--set", "n_prompt=32", "--set", "n_gen=8",
                "--set", "repetitions=2", "--no-confirm", "--baseline", "-c 512 -b 512 -t 1 -ncmoe 2" + NO_REPACK)
    assert r.code == 0, r.err
    e = run_cli("export", "moe", "--format", "llama-server", "--storage", storage)
    assert e.code == 0 and "--n-cpu-moe 2" in e.out


def test_llama_cpps_dry_runs_calibrate_the_prior():
    from llama_tuner.measure.result import Status, TrialResult

    info = describe_shape(SHAPES["tiny"], "q4_k_m")
    mm = MemoryModel(ModelFacts.of(info), on_gpu=False)
    configs = [BenchConfig(n_ctx=c, n_ubatch=u, n_batch=2048, flash_attn=fa, n_threads=1, n_threads_batch=1)
               for c in (4096, 8192) for u in (128, 512) for fa in (False, True)]
    # What llama.cpp reports in a dry run: 0 MiB of weights; the KV cache, and compute 10 MiB over the formula.
    dry = []
    for c in configs:
        a = mm.allocations(c)
        dry.append(TrialResult(Status.OK, c, "/m.gguf", buffers={
            "model": {"CPU": 0}, "kv": {"CPU": a.host_kv}, "compute": {"CPU": a.host_compute + (10 << 20)}}))
    pairs = mm.calibrate(dry)
    assert [d - f for f, d in pairs] == [10 << 20] * 8  # the formula's prior against the dry run
    for c, r in zip(configs, dry):  # afterwards the formula says what llama.cpp says
        a = mm.allocations(c)
        assert abs(a.host_kv + a.host_compute + mm.prior_offset - r.allocated_bytes("host", kinds=("kv", "compute"))) \
            < 2**20


def test_experts_are_fitted_on_a_gpu_unless_pinned_or_searched(qwen3_moe):
    from llama_tuner.study.space import Machine, SearchSpace, SpaceOptions

    gpu, cpu = Machine(16, gpu_offload=True), Machine(16, gpu_offload=False)
    fitted = SearchSpace(qwen3_moe, gpu, SpaceOptions())
    assert fitted.fit_experts and fitted.choices["use_mmap"] == [True, False]
    assert not SearchSpace(qwen3_moe, gpu, SpaceOptions(pins={"n_cpu_moe": 2})).fit_experts
    searched = SearchSpace(qwen3_moe, gpu, SpaceOptions(ranges={"n_cpu_moe": (4, 20)}))
    assert not searched.fit_experts and searched.ints["n_cpu_moe"] == (4, 20)
    assert not SearchSpace(qwen3_moe, cpu, SpaceOptions()).fit_experts
    assert not SearchSpace(describe_shape(SHAPES["qwen3-8b"], "q4_k_m"), gpu, SpaceOptions()).fit_experts
