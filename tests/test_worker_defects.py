"""Workers that lose nothing: a storage error after a measurement, recover's race, surplus trials, --gpu,
results reused only where the host matches, caches written atomically."""

from __future__ import annotations

import io
import json
import socket

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from conftest import assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.environment import model_sha256, read_json_cache, write_json_atomic
from llama_tuner.measure.probe import GpuInfo, visible_gpu_index
from llama_tuner.measure.result import Environment
from llama_tuner.study.coordination import requeue
from llama_tuner.study.keys import (BASELINE_ATTR, DEFAULTS_BASELINE, RESULT_ATTR, RETRY_ATTR, REUSED_ATTR,
                                    SETTINGS_ATTR, WORKER_ATTR)
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.settings import reuse_key
from llama_tuner.study.storage import make_storage
from llama_tuner.study.worker import gpu_choice, join_study
from llama_tuner.testing.fakes import FakeGpuProbe, FakeLauncher
from test_study import ENV

optuna.logging.set_verbosity(optuna.logging.ERROR)
GPU_ENV = Environment(**{**ENV.__dict__, "gpu_name": "Fake RTX 4070", "vram_total_bytes": 12 * 2**30,
                         "gpu_offload": True})
TWO_GPUS = FakeGpuProbe(info=[GpuInfo(index=i, name="Fake RTX 4070", driver="555.42", total_bytes=12 * 2**30,
                                      uuid=f"GPU-{c * 8}-1111") for i, c in enumerate("ab")])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """This test's own cache directory (sha256 and KV-quality caches, pending measurements)."""
    monkeypatch.setenv("LLAMA_TUNER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _request(model, tmp_path, **kw) -> StudyRequest:
    kw.setdefault("trials", 4)
    kw.setdefault("seed", 1)
    return StudyRequest(model=str(model), storage=f"sqlite:///{tmp_path}/studies.db", **kw)


def _operational_error():
    from sqlalchemy.exc import OperationalError

    return OperationalError("UPDATE trial_user_attributes", {}, Exception("server closed the connection"))


def _fail_result_writes(storage, monkeypatch, times: int) -> list[int]:
    """Make the first ``times`` writes of a trial's result fail as during a database restart; returns the
    ids of the trials whose write failed."""
    real, failed = storage.set_trial_user_attr, []

    def flaky(trial_id, key, value):
        if key == RESULT_ATTR and len(failed) < times:
            failed.append(trial_id)
            raise _operational_error()
        return real(trial_id, key, value)

    monkeypatch.setattr(storage, "set_trial_user_attr", flaky)
    return failed


def _keys(configs: list[BenchConfig]) -> list[str]:
    return [c.settings_key() for c in configs]


# -- 10: a storage error right after a measurement ------------------------------------------------------

def test_a_storage_error_after_a_measurement_neither_loses_it_nor_asks_a_new_trial(long_context_model, tmp_path,
                                                                                   monkeypatch, own_cache):
    storage = make_storage(f"sqlite:///{tmp_path}/studies.db", heartbeat_s=1, grace_s=2)
    failed = _fail_result_writes(storage, monkeypatch, times=1)
    launcher = FakeLauncher(env=ENV)
    tuner = open_tuner(_request(long_context_model, tmp_path), launcher=launcher, env=ENV, storage=storage)
    tuner.run()
    assert len(failed) == 1
    hit = storage.get_trial(failed[0])
    assert hit.state == TrialState.COMPLETE and RESULT_ATTR in hit.user_attrs  # the write was retried
    keys = _keys(launcher.measured)
    assert len(keys) == len(set(keys)) == 4 and tuner.measured_count() == 4  # nothing measured twice
    assert not list(own_cache.glob("pending/*/*.json"))  # every measurement is in the storage now


def test_a_measurement_outlives_a_long_outage_and_is_not_measured_again_on_resume(long_context_model, tmp_path,
                                                                                   monkeypatch, own_cache):
    url = f"sqlite:///{tmp_path}/studies.db"
    storage = make_storage(url)
    _fail_result_writes(storage, monkeypatch, times=1)
    first = FakeLauncher(env=ENV)
    tuner = open_tuner(_request(long_context_model, tmp_path), launcher=first, env=ENV, storage=storage)
    tuner.reconnect_s = 0  # the storage stays away longer than the worker waits
    with pytest.raises(UserError, match="is kept in .* and is not measured again"):
        tuner.run()
    [lost] = first.measured
    monkeypatch.setattr("llama_tuner.study.tuner._alive", lambda pid: False)  # the process is gone now
    again = FakeLauncher(env=ENV)
    resumed = open_tuner(_request(long_context_model, tmp_path), launcher=again, env=ENV, storage=make_storage(url))
    resumed.run()
    assert lost.settings_key() not in _keys(again.measured)  # the kept measurement was not taken again
    assert resumed.measured_count() == 4 and len(again.measured) == 3
    [retry] = [t for t in resumed.study.trials if RETRY_ATTR in t.user_attrs]
    assert retry.state == TrialState.COMPLETE and REUSED_ATTR not in retry.user_attrs  # a measurement, not a copy
    assert retry.user_attrs[RESULT_ATTR]["config"] == lost.to_dict()
    assert not list(own_cache.glob("pending/*/*.json"))


# -- 11a: recover() racing another worker ---------------------------------------------------------------

def test_recover_tolerates_a_trial_another_worker_finished_meanwhile(long_context_model, tmp_path, monkeypatch):
    tuner = open_tuner(_request(long_context_model, tmp_path), launcher=FakeLauncher(env=ENV), env=ENV)
    dead = tuner.study.ask({"n_threads": IntDistribution(1, 8)})
    tuner.storage.set_trial_user_attr(dead._trial_id, WORKER_ATTR, {"host": socket.gethostname(), "pid": 999_999_999})
    real = tuner.storage.set_trial_state_values

    def racing(trial_id, state, values=None):
        real(trial_id, TrialState.FAIL)  # another worker failed it as stale (and queued it again) ...
        requeue(tuner.study, tuner.storage.get_trial(trial_id))
        return real(trial_id, state, values)  # ... between our read and this write

    monkeypatch.setattr(tuner.storage, "set_trial_state_values", racing)
    assert tuner.recover() == []
    retries = [t for t in tuner.study.trials if t.user_attrs.get(RETRY_ATTR) == dead.number]
    assert len(retries) == 1 and tuner.study.trials[dead.number].state == TrialState.FAIL


# -- 11b: a surplus trial gives back what it popped --------------------------------------------------------

def _elsewhere_running(tuner) -> None:
    """A trial another worker is measuring: with it the study's target of 1 is reached."""
    other = tuner.study.ask()
    tuner.storage.set_trial_user_attr(other._trial_id, WORKER_ATTR, {"host": "elsewhere", "pid": 1})
    tuner.storage.set_trial_user_attr(other._trial_id, SETTINGS_ATTR, "other settings")


def test_a_surplus_trial_queues_again_the_retry_it_popped(long_context_model, tmp_path):
    launcher = FakeLauncher(env=ENV)
    tuner = open_tuner(_request(long_context_model, tmp_path, trials=1), launcher=launcher, env=ENV)
    _elsewhere_running(tuner)
    params = tuner.space.params_of(tuner.baselines[DEFAULTS_BASELINE])
    tuner.study.enqueue_trial(params, user_attrs={RETRY_ATTR: 0})
    tuner._run_one()
    surplus = tuner.study.trials[1]
    assert surplus.state == TrialState.FAIL and launcher.measured == []
    [waiting] = tuner.study.get_trials(states=(TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"] == surplus.params and waiting.user_attrs == {RETRY_ATTR: 0}


def test_a_baseline_is_measured_even_where_the_target_is_reached(long_context_model, tmp_path):
    launcher = FakeLauncher(env=ENV)
    tuner = open_tuner(_request(long_context_model, tmp_path, trials=1), launcher=launcher, env=ENV)
    _elsewhere_running(tuner)
    tuner.enqueue_baselines()
    tuner._run_one()  # not a surplus trial, which would queue the baseline again and pop it again forever
    assert tuner.study.trials[1].user_attrs[BASELINE_ATTR] == DEFAULTS_BASELINE
    assert tuner.study.trials[1].state == TrialState.COMPLETE and len(launcher.measured) == 1


# -- 11c: --gpu takes an index or a UUID --------------------------------------------------------------------

def test_gpu_choice_finds_a_gpu_by_index_or_uuid_and_orders_cuda_as_nvml_does():
    uuid = TWO_GPUS.info[1].uuid
    assert gpu_choice("1", TWO_GPUS) == (1, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert gpu_choice(uuid, TWO_GPUS) == (1, {"CUDA_VISIBLE_DEVICES": uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert gpu_choice(None, TWO_GPUS) == (None, {})
    for bad in ("2", "GPU-nope", "fast"):
        with pytest.raises(UserError, match=f"--gpu {bad}: no such GPU .*NVML sees 0 .*GPU-a"):
            gpu_choice(bad, TWO_GPUS)


def test_a_worker_on_a_gpu_named_by_uuid_measures_and_reads_that_gpu(long_context_model, tmp_path, monkeypatch):
    request = _request(long_context_model, tmp_path, study_name="s")
    open_tuner(request, launcher=FakeLauncher(env=GPU_ENV), env=GPU_ENV, probe=TWO_GPUS)
    made = {}
    monkeypatch.setattr("llama_tuner.study.worker.SubprocessLauncher",
                        lambda probe, **kw: made.update(kw) or FakeLauncher(env=GPU_ENV))
    uuid = TWO_GPUS.info[1].uuid
    worker = join_study("s", request.storage, gpu=uuid, probe=TWO_GPUS, env=GPU_ENV)
    assert worker.gpu_index == made["gpu_index"] == 1  # NVML reads the GPU the children run on
    assert made["extra_env"] == {"CUDA_VISIBLE_DEVICES": uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_a_worker_with_an_unknown_gpu_stops_with_one_line_before_any_work(cli, long_context_model, tmp_path,
                                                                          monkeypatch):
    request = _request(long_context_model, tmp_path, study_name="s")
    open_tuner(request, launcher=FakeLauncher(env=ENV), env=ENV)

    def work(*args, **kw):
        raise AssertionError("expensive work before the --gpu check")

    monkeypatch.setattr("llama_tuner.study.worker.detect_probe", lambda: TWO_GPUS)
    monkeypatch.setattr("llama_tuner.study.worker.build_environment", work)
    result = cli("worker", "--study", "s", "--storage", request.storage, "--gpu", "GPU-nope", "--no-mlflow")
    assert_one_line_error(result, "--gpu GPU-nope", "no such GPU")


def test_cuda_visible_devices_given_as_a_uuid_is_that_gpus_nvml_index(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", TWO_GPUS.info[1].uuid)
    assert visible_gpu_index(TWO_GPUS) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert visible_gpu_index(TWO_GPUS) == 1


# -- 11d: a result is reused only where the host it depends on matches -------------------------------------

def test_the_reuse_key_holds_the_host_wherever_the_cpu_takes_part():
    partial, full = BenchConfig(n_gpu_layers=2), BenchConfig(n_gpu_layers=-1)
    other_cpu = Environment(**{**GPU_ENV.__dict__, "cpu": "Another CPU"})
    more_ram = Environment(**{**GPU_ENV.__dict__, "ram_total_bytes": 64 << 30})
    other_host = Environment(**{**GPU_ENV.__dict__, "host": "elsewhere"})  # same CPU and RAM: alike
    key = reuse_key(partial, GPU_ENV, n_gpu_layers_all=5)
    assert key != reuse_key(partial, other_cpu, n_gpu_layers_all=5)
    assert key != reuse_key(partial, more_ram, n_gpu_layers_all=5)
    assert key == reuse_key(partial, other_host, n_gpu_layers_all=5)
    assert reuse_key(full, GPU_ENV, n_gpu_layers_all=5) == reuse_key(full, other_cpu, n_gpu_layers_all=5)
    assert (reuse_key(BenchConfig(n_gpu_layers=5, n_cpu_moe=1), GPU_ENV, n_gpu_layers_all=5)
            != reuse_key(BenchConfig(n_gpu_layers=5, n_cpu_moe=1), other_cpu, n_gpu_layers_all=5))
    cpu_only, other_ram = ENV, Environment(**{**ENV.__dict__, "ram_total_bytes": 64 << 30})
    assert reuse_key(full, cpu_only, n_gpu_layers_all=5) != reuse_key(full, other_ram, n_gpu_layers_all=5)


def test_hosts_with_another_cpu_do_not_share_a_partial_offload(long_context_model, tmp_path):
    first = FakeLauncher(env=GPU_ENV)
    flags = "-ngl 2 -c 4096"  # 2 of the model's 5 layers on the GPU: the rest runs on the CPU
    open_tuner(_request(long_context_model, tmp_path, trials=2, study_name="a", baseline_flags=flags),
               launcher=first, env=GPU_ENV).run()
    partial = next(c for c in first.measured if c.n_gpu_layers == 2).settings_key()
    full = next(c for c in first.measured if c.n_gpu_layers == 5).settings_key()  # the fitted defaults

    def second(name: str, env: Environment) -> FakeLauncher:
        launcher = FakeLauncher(env=env)
        open_tuner(_request(long_context_model, tmp_path, trials=2, study_name=name, baseline_flags=flags),
                   launcher=launcher, env=env).run()
        return launcher

    other_cpu = second("b", Environment(**{**GPU_ENV.__dict__, "cpu": "Another CPU", "host": "other"}))
    assert partial in _keys(other_cpu.measured) and full not in _keys(other_cpu.measured)
    alike = second("c", Environment(**{**GPU_ENV.__dict__, "host": "twin"}))  # same CPU and RAM
    assert partial not in _keys(alike.measured) and full not in _keys(alike.measured)


# -- 11e: caches are written atomically and survive a damaged file ------------------------------------------

def _disk_full_midway(mp: pytest.MonkeyPatch) -> None:
    """Every text file opened for writing takes half of its first write, then the disk is full."""
    real = io.open

    def opener(file, mode="r", *args, **kw):
        f = real(file, mode, *args, **kw)
        if "w" in mode and "b" not in mode:
            def half(text: str, f=f) -> int:
                f.buffer.write(text[:len(text) // 2].encode())
                f.buffer.flush()
                raise OSError(28, "No space left on device")
            f.write = half
        return f

    mp.setattr(io, "open", opener)
    mp.setattr("builtins.open", opener)


def test_a_cache_write_that_fails_midway_leaves_the_old_file_whole(tiny_model, own_cache, tmp_path):
    cache = own_cache / "sha256-cache.json"
    digest = model_sha256(tiny_model)
    before = cache.read_text()
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_model.read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        _disk_full_midway(mp)
        assert model_sha256(copy) == digest  # hashed all the same; only its cache entry is not written
    assert cache.read_text() == before and sorted(p.name for p in own_cache.iterdir()) == [cache.name]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError):
        _disk_full_midway(mp)
        write_json_atomic(own_cache / "kv-quality.json", {"k": 1})
    assert sorted(p.name for p in own_cache.iterdir()) == [cache.name]  # no partial file, no temporary left


@pytest.mark.parametrize("damage", ["", '{"a": "b', "[1, 2]", "null", "\xff\xfe"])
def test_a_damaged_cache_file_reads_as_empty_and_is_rewritten(tiny_model, own_cache, damage):
    cache = own_cache / "sha256-cache.json"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(damage.encode("latin-1"))
    assert read_json_cache(cache) == {}
    digest = model_sha256(tiny_model)
    assert len(digest) == 64 and list(json.loads(cache.read_text()).values()) == [digest]
