"""The space's up-front checks: --range within each setting's domain, pins that leave a valid configuration,
and which of a baseline's KV cache types join the space."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error
from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.model.info import load_model_info
from llama_tuner.study.space import Machine, SearchSpace, SpaceOptions, _ladder, check_ranges
from llama_tuner.testing.fakes import FakeLauncher


@pytest.fixture
def long_model(long_context_model):
    return load_model_info(long_context_model)


def test_the_ladder_always_ends():
    assert _ladder(0, 100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert _ladder(-3, 4)[-2:] == [2, 4] and _ladder(512, 512) == [512]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("span,needle", [
    ("n_batch=0:100", "--range n_batch=0:100 is out of range (n_batch is at least 1)"),
    ("n_ubatch=-64:512", "--range n_ubatch=-64:512 is out of range"),
    ("n_threads=0:4", "--range n_threads=0:4 is out of range"),
    ("n_threads_batch=1:99999", "--range n_threads_batch=1:99999 is out of range"),
    ("n_ctx=64:8192", "holds the test's 512 tokens"),
    ("n_ctx=4096:999999", "at most the model's training context"),
    ("n_batch=512:256", "is empty"),
])
def test_a_range_outside_its_domain_is_one_line_and_quick(cli, tiny_model, tmp_path, no_work_before_checks, span,
                                                          needle):
    r = cli("tune", tiny_model, "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow", "--range", span)
    assert_one_line_error(r, needle)


def test_layer_and_expert_ranges_are_checked_against_the_model(long_model):
    with pytest.raises(InvalidConfig, match=r"n_gpu_layers=-1:3 is out of range \(the model has 4 layers \+ output"):
        check_ranges({"n_gpu_layers": (-1, 3)}, long_model)
    with pytest.raises(InvalidConfig, match=r"0 <= LO <= HI <= 5"):
        SearchSpace(long_model, Machine(8, gpu_offload=True), SpaceOptions(ranges={"n_gpu_layers": (0, 99)}))
    with pytest.raises(InvalidConfig, match="n_cpu_moe=0:9 is out of range"):
        check_ranges({"n_cpu_moe": (0, 9)}, long_model)
    check_ranges({"n_gpu_layers": (0, 5), "n_ctx": (4096, 131072)}, long_model, need=640)  # within: no error


def test_a_pin_and_a_range_of_one_setting_are_refused(long_model):
    with pytest.raises(InvalidConfig, match="--set n_threads and --range n_threads both given"):
        SearchSpace(long_model, Machine(8, False), SpaceOptions(pins={"n_threads": 4}, ranges={"n_threads": (1, 2)}))


@pytest.mark.parametrize("pins,needle", [
    ({"flash_attn": False, "type_v": "q8_0"}, "--set flash_attn=0 --set type_v=q8_0 conflict"),
    ({"type_k": "q9_9"}, "unknown type_k 'q9_9'"),
    ({"n_ctx": 256}, "--set n_ctx=256 leaves no valid configuration: n_ctx 256 is too small"),
    ({"n_cpu_moe": 2}, "needs a mixture-of-experts model"),
    ({"n_parallel": 4}, "n_parallel 4 needs the server workload"),
])
def test_pins_that_leave_no_valid_configuration_are_refused(long_model, pins, needle):
    with pytest.raises(InvalidConfig, match=needle.replace("(", r"\(")):
        SearchSpace(long_model, Machine(8, False), SpaceOptions(pins=pins))


def test_pins_that_clamp_are_not_conflicts(long_model):
    s = SearchSpace(long_model, Machine(8, False), SpaceOptions(pins={"n_batch": 256, "flash_attn": False,
                                                                      "type_k": "q8_0"},
                                                                ranges={"n_ubatch": (512, 1024)}))
    assert all(c.n_ubatch <= 256 and not c.flash_attn for c in s.grid())  # llama.cpp clamps the ubatch


def test_conflicting_pins_exit_2_through_the_cli_before_anything_is_measured(cli, tiny_model, tmp_path,
                                                                           monkeypatch):
    from llama_tuner.measure.probe import NoGpuProbe
    from test_study import ENV

    calls = []

    class Counting(FakeLauncher):
        def measure(self, model_path, configs):
            calls.append(list(configs))
            return super().measure(model_path, calls[-1])

    def no_quality(*args, **kw):
        calls.append("quality")
        return {}

    fake = Counting(env=ENV)
    monkeypatch.setattr("llama_tuner.study.session.SubprocessLauncher", lambda *a, **kw: fake)
    monkeypatch.setattr("llama_tuner.study.session.detect_probe", NoGpuProbe)
    monkeypatch.setattr("llama_tuner.study.session.build_environment", lambda *a, **kw: ENV)
    monkeypatch.setattr("llama_tuner.study.quality_gate.kv_quality", no_quality)
    r = cli("tune", tiny_model, "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow", "--trials", "2",
            "--no-confirm", "--set", "flash_attn=0", "--set", "type_v=q8_0")
    assert_one_line_error(r, "--set flash_attn=0 --set type_v=q8_0 conflict", "set flash_attn=1, or type_v=f16")
    assert calls == [] and fake.measured == []


# -- a baseline's KV cache types ----------------------------------------------------

def test_a_baselines_cache_types_join_the_space_only_where_the_space_searches_them(long_model):
    mixed = BenchConfig(n_ctx=8192, flash_attn=True, type_k="q8_0", type_v="q4_0", n_threads=4, n_threads_batch=4)
    other = BenchConfig(n_ctx=8192, flash_attn=True, type_k="q5_1", type_v="q5_1", n_threads=4, n_threads_batch=4)
    s = SearchSpace(long_model, Machine(8, False), SpaceOptions(), (mixed, other))
    assert "fa1:q8_0/q4_0" in s.choices["attention"]  # types whose quality the study measures and gates
    assert not any("q5_1" in c for c in s.choices["attention"])  # never measured before the space: not searched
    assert s.config_of(s.params_of(other)).type_v != "q5_1"  # the baseline itself is measured as it is (CONFIG_ATTR)

