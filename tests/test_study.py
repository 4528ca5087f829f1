"""The study with a fake launcher: space, constraints, presets, resume, no repeats, baselines."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from llama_tuner.study.baselines import parse_server_flags
from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.errors import UserError
from llama_tuner.testing.fakes import FakeLauncher
from llama_tuner.model.info import load_model_info
from llama_tuner.study.keys import RESULT_ATTR, REUSED_ATTR, WORKER_ATTR
from llama_tuner.study.objectives import Limits, constraints, measured_trials, result_of
from llama_tuner.measure.result import Environment, Interleaved, Rates, Status, TrialResult
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.space import Machine, SearchSpace, SpaceOptions
from llama_tuner.study.keys import INTERRUPTED_ATTR
from llama_tuner.study.worker import join_study
from llama_tuner.study.confirmation import MIN_ROUNDS, confirm, confirm_leaders, verdict
from llama_tuner.study.view import StudyView

optuna.logging.set_verbosity(optuna.logging.WARNING)
ENV = Environment(host="fakehost", cpu="Fake CPU", physical_cores=8, ram_total_bytes=32 << 30,
                  llama_cpp_python="0.3.36", llama_cpp_build="fake")


@pytest.fixture
def long_model(long_context_model):
    return load_model_info(long_context_model)


def tuner_for(model_path, tmp_path, launcher=None, **kw):
    kw.setdefault("trials", 12)
    kw.setdefault("seed", 1)
    request = StudyRequest(model=str(model_path), storage=f"sqlite:///{tmp_path}/studies.db", **kw)
    return open_tuner(request, launcher=launcher or FakeLauncher(env=ENV), env=ENV)


# -- the search space ---------------------------------------------------------

def test_space_follows_the_model_and_the_machine(long_model):
    cpu = SearchSpace(long_model, Machine(8, gpu_offload=False), SpaceOptions(min_ctx=8192))
    assert cpu.fixed["n_gpu_layers"] == 0 and "n_gpu_layers" not in cpu.ints
    assert cpu.ints["n_threads"] == (1, 8) and cpu.choices["n_ctx"] == [8192, 16384, 32768, 65536, 131072]
    gpu = SearchSpace(long_model, Machine(8, gpu_offload=True), SpaceOptions())
    # On a GPU the layers are fitted to the budget per trial (tests/test_memory.py), unless searched.
    assert gpu.fit_layers and "n_gpu_layers" not in gpu.ints and gpu.fixed["n_gpu_layers"] == long_model.n_layer + 1
    searched = SearchSpace(long_model, Machine(8, gpu_offload=True), SpaceOptions(ranges={"n_gpu_layers": (2, 5)}))
    assert not searched.fit_layers and searched.ints["n_gpu_layers"] == (2, 5)
    pinned = SearchSpace(long_model, Machine(8, gpu_offload=True), SpaceOptions(pins={"n_gpu_layers": 3}))
    assert not pinned.fit_layers and pinned.fixed["n_gpu_layers"] == 3
    assert not cpu.fit_layers
    assert max(gpu.choices["n_ubatch"]) == 2048
    every = list(cpu.grid())
    assert len(every) == len(set(every)) == 8 * 8 * 3 * 3 * 5 * 4 * 2  # ... * attention * repack
    assert all(c.n_ubatch <= c.n_batch <= c.n_ctx for c in every)
    assert all(c.flash_attn or c.type_v == "f16" for c in every)  # every point is valid


def test_repack_is_searched_where_it_runs_and_off_where_it_crashes(long_model):
    works = SearchSpace(long_model, Machine(8, False), SpaceOptions())
    assert works.choices["repack"] == [True, False] and "repack" not in works.fixed
    broken = SearchSpace(long_model, Machine(8, False, repack_works=False), SpaceOptions())
    assert broken.fixed["repack"] is False and "repack" not in broken.choices
    assert {c.repack for c in broken.grid()} == {False}
    assert parse_server_flags("-c 4096 -nr", long_model).repack is False
    assert parse_server_flags("-c 4096 --repack", long_model).repack is True


def test_pins_and_ranges_shape_the_space(long_model):
    opts = SpaceOptions(pins={"n_threads": 4, "flash_attn": True}, ranges={"n_ctx": (8192, 32768),
                                                                           "n_threads_batch": (2, 4)})
    s = SearchSpace(long_model, Machine(8, False), opts)
    assert s.fixed["n_threads"] == 4 and "n_threads" not in s.ints
    assert all(a.startswith("fa1") for a in s.choices["attention"])
    assert s.choices["n_ctx"] == [8192, 16384, 32768] and s.ints["n_threads_batch"] == (2, 4)
    with pytest.raises(InvalidConfig, match="unknown setting 'nosuch'"):
        SearchSpace(long_model, Machine(8, False), SpaceOptions(pins={"nosuch": 1}))
    with pytest.raises(InvalidConfig, match="cannot offload"):
        SearchSpace(long_model, Machine(8, False), SpaceOptions(ranges={"n_gpu_layers": (0, 4)}))
    with pytest.raises(UserError, match="exceeds the model's training context"):
        SearchSpace(long_model, Machine(8, False), SpaceOptions(min_ctx=1 << 20))


def test_baseline_values_join_the_space(long_model):
    base = parse_server_flags("llama-server -m x.gguf -c 6000 -b 768 -ub 96 -t 12 -fa on -ctk q8_0 -ctv f16",
                              long_model)
    s = SearchSpace(long_model, Machine(8, False), SpaceOptions(), (base,))
    assert 6000 in s.choices["n_ctx"] and 768 in s.choices["n_batch"] and 96 in s.choices["n_ubatch"]
    assert s.ints["n_threads"] == (1, 12) and "fa1:q8_0/f16" in s.choices["attention"]
    assert s.config_of(s.params_of(base)) == BenchConfig(**{**base.to_dict(), **{k: s.fixed[k] for k in s.fixed}})


# -- baselines from llama-server command lines ----------------------------------

def test_llama_server_flags_are_parsed(long_model):
    c = parse_server_flags("llama-server -m '/models/a b.gguf' --ctx-size 2048 --batch-size 512 "
                           "--n-gpu-layers 49 --threads 8 --parallel 1 --host 0.0.0.0 --port 8080 --jinja",
                           long_model)
    assert (c.n_ctx, c.n_batch, c.n_ubatch, c.n_threads, c.n_threads_batch) == (2048, 512, 512, 8, 8)
    assert c.n_gpu_layers == long_model.n_gpu_layers_all  # 49 > 4 layers + output means all
    assert c.flash_attn is True  # llama-server's default is auto
    c2 = parse_server_flags("-c 0 -fa off --no-mmap -ngl auto -t 4 -tb 2", long_model)
    assert c2.n_ctx == long_model.n_ctx_train and not c2.flash_attn and not c2.use_mmap
    assert (c2.n_threads, c2.n_threads_batch) == (4, 2)


@pytest.mark.parametrize("flags,needle", [
    ("-c 2048 --override-tensor x=CPU", "unsupported llama-server flag --override-tensor"),
    ("-np 4", "serves several sequences"),
    ("-c abc", "not a number"),
    ("-fa maybe", "unknown --flash-attn value"),
    ("-ctv q8_0 -fa off", "needs flash attention"),
    ("-c 'unclosed", "cannot be parsed"),
])
def test_bad_baselines_are_refused_by_name(long_model, flags, needle):
    with pytest.raises(UserError, match=needle):
        parse_server_flags(flags, long_model)


# -- constraints and presets ----------------------------------------------------

def _result(tg=50.0, pp=500.0, peak=8 << 30, ctx=8192, status=Status.OK, sd=0.0, free=30 << 30):
    cfg = BenchConfig(n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=4, n_threads_batch=4, repetitions=4)
    if status != Status.OK:
        return TrialResult(status, cfg, "/m.gguf", reason="boom", ram_available_before_bytes=free)

    def rates(rate, n):
        return Rates(n, [int(1e9 * n / (rate + d)) for d in (-sd, sd, -sd, sd)])

    return TrialResult(Status.OK, cfg, "/m.gguf", pp=rates(pp, 512), tg=rates(tg, 128), peak_rss_bytes=peak,
                       ram_available_before_bytes=free)


def test_constraints_cover_budget_headroom_context_and_failure():
    lim = Limits(budget_bytes=12 << 30, min_headroom_bytes=1 << 30, min_ctx=4096)
    ok = constraints(_result(peak=10 << 30), lim)
    assert all(v <= 0 for v in ok.values())
    assert constraints(_result(peak=13 << 30), lim)["memory_budget"] > 0
    assert constraints(_result(peak=11.5 * 2**30), lim)["headroom"] > 0  # within budget, but < 1 GiB left
    assert constraints(_result(peak=8 << 30, free=int(8.5 * 2**30)), lim)["headroom"] > 0  # others use memory
    assert constraints(_result(peak=8 << 30, free=9 << 30), lim)["headroom"] == 0  # exactly 1 GiB left is enough
    assert constraints(_result(ctx=2048), lim)["min_ctx"] > 0
    assert constraints(_result(status=Status.OOM), lim)["ran_ok"] == 1


# The presets' rules are in tests/test_decisions.py.


# -- the study loop ---------------------------------------------------------------

def test_a_study_measures_n_distinct_configs_and_baselines_first(long_context_model, tmp_path):
    launcher = FakeLauncher(env=ENV)
    t = tuner_for(long_context_model, tmp_path, launcher, baseline_flags="-c 8192 -b 512 -t 2")
    t.run()
    trials = t.study.get_trials(deepcopy=False)
    measured = measured_trials(trials)
    assert len(measured) == 12 and t.measured_count() == 12
    keys = [c.settings_key() for c in launcher.measured]
    assert len(keys) == len(set(keys)) == 12  # nothing measured twice
    assert [tr.user_attrs.get("baseline") for tr in trials[:2]] == ["llama-server defaults (fit)", "yours"]
    assert launcher.measured[1].n_threads == 2 and launcher.measured[1].n_ctx == 8192  # exactly as given
    view = StudyView(t.study)
    assert set(view.presets) == {"fastest", "max-context", "balanced"}
    assert set(view.baselines) == {"llama-server defaults (fit)", "yours"}
    assert view.presets["fastest"].candidate.figures.tg_mean >= max(b.figures.tg_mean for b in view.baselines.values())


def test_running_the_same_command_again_measures_nothing_new(long_context_model, tmp_path):
    first = FakeLauncher(env=ENV)
    tuner_for(long_context_model, tmp_path, first).run()
    again = FakeLauncher(env=ENV)
    t = tuner_for(long_context_model, tmp_path, again)
    t.run()
    assert again.measured == [] and t.measured_count() == 12
    more = FakeLauncher(env=ENV)
    t = tuner_for(long_context_model, tmp_path, more, trials=15)
    t.run()
    assert len(more.measured) == 3 and t.measured_count() == 15
    old = {c.settings_key() for c in first.measured}
    assert not old & {c.settings_key() for c in more.measured}


class OpposedLauncher(FakeLauncher):
    """Repacked weights make generation faster and prompts slower: the objectives disagree."""

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        return (100.0, 1000.0) if c.repack else (80.0, 1200.0)


def test_resuming_with_another_objective_changes_what_the_presets_rank_by(long_context_model, tmp_path):
    tuner_for(long_context_model, tmp_path, OpposedLauncher(env=ENV), trials=6).run()
    before = StudyView(tuner_for(long_context_model, tmp_path, trials=6).study)
    assert before.objective == "tg"
    was = before.top(10)  # the order the leaders race in for the presets
    again = OpposedLauncher(env=ENV)
    t = tuner_for(long_context_model, tmp_path, again, trials=6, objective="pp")
    assert t.notes == ["objective changed from tg to pp: presets now rank by pp"]
    t.run()
    view = StudyView(t.study)
    assert view.objective == "pp" and again.measured == []  # nothing to measure again: every trial has pp
    figures = {c.trial: c.figures for c in view.candidates}
    ranked = view.top(10)
    assert {figures[n].config.repack for n in ranked} == {True, False}  # the objectives disagree here
    assert [figures[n].pp_mean for n in ranked] == sorted((figures[n].pp_mean for n in ranked), reverse=True)
    assert [figures[n].tg_mean for n in was] == sorted((figures[n].tg_mean for n in was), reverse=True)
    assert not figures[ranked[0]].config.repack and figures[was[0]].config.repack


def test_a_later_trials_count_reaches_workers_that_are_already_running(long_context_model, tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    creator = tuner_for(long_context_model, tmp_path, trials=4, study_name="s")
    creator.run()
    worker = join_study("s", url, launcher=FakeLauncher(env=ENV), env=ENV)
    assert worker.target() == 4
    more = tuner_for(long_context_model, tmp_path, trials=7, study_name="s")
    assert more.notes == ["--trials changed from 4 to 7; workers of this study follow"]
    assert worker.target() == 7  # read from the study, not from what the worker was started with
    worker.run(enqueue_baselines=False)
    assert worker.measured_count() == 7
    assert join_study("s", url, launcher=FakeLauncher(env=ENV), env=ENV).target() == 7


def test_failures_are_recorded_constraints_not_scores(long_context_model, tmp_path):
    launcher = FakeLauncher(env=ENV, fail=lambda c: Status.OOM if c.n_ctx >= 65536 else None)
    t = tuner_for(long_context_model, tmp_path, launcher, trials=20)
    t.run()
    oom = [tr for tr in t.study.trials if tr.user_attrs.get(RESULT_ATTR, {}).get("status") == "oom"]
    assert oom, "the space has OOM configs; some should have been tried"
    for tr in oom:
        assert tr.state == TrialState.COMPLETE and tr.constraints["ran_ok"] == 1
        assert tr.values[0] > 0 and tr.user_attrs["imputed_values"] is True  # never a 0.0 score
    view = StudyView(t.study)
    assert all(c.figures.ok for c in view.candidates) and t.measured_count() == 20


def test_a_killed_trial_is_failed_and_retried_on_resume(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, trials=5)
    t.run()
    # Simulate `kill -9` mid-trial: a RUNNING trial owned by a process that no longer exists.
    trial = t.study.ask({"n_threads": optuna.distributions.IntDistribution(1, 8)})
    t.study._storage.set_trial_user_attr(trial._trial_id, WORKER_ATTR, {"host": __import__("socket").gethostname(),
                                                                         "pid": 999_999_999})
    # and a trial cut by Ctrl-C
    cut = t.study.ask({"n_threads": optuna.distributions.IntDistribution(1, 8)})
    t.study._storage.set_trial_user_attr(cut._trial_id, INTERRUPTED_ATTR, True)
    t.study.tell(cut, state=TrialState.FAIL)
    launcher = FakeLauncher(env=ENV)
    t2 = tuner_for(long_context_model, tmp_path, launcher, trials=8)
    t2.run()
    states = {tr.number: tr.state for tr in t2.study.trials}
    assert states[trial.number] == TrialState.FAIL
    retries = [tr.user_attrs.get("retry_of") for tr in t2.study.trials]
    assert trial.number in retries and cut.number in retries
    assert t2.measured_count() == 8 and len(measured_trials(t.study.trials)) >= 5  # nothing completed is lost


def test_another_study_on_the_same_model_reuses_measurements(long_context_model, tmp_path):
    tuner_for(long_context_model, tmp_path, study_name="first", trials=10).run()
    launcher = FakeLauncher(env=ENV)
    t = tuner_for(long_context_model, tmp_path, launcher, study_name="second", trials=10)
    t.run()
    reused = [tr for tr in t.study.trials if REUSED_ATTR in tr.user_attrs]
    assert reused, "the baselines at least are shared with the first study"
    measured_keys = {c.settings_key() for c in launcher.measured}
    assert len(launcher.measured) == 10  # a reused result is not one of the 10 measurements
    first = optuna.load_study(study_name="first", storage=f"sqlite:///{tmp_path}/studies.db")
    for tr in reused:  # a copy of the first study's result of the same settings, and not measured again
        copy, source = result_of(tr), result_of(first.trials[tr.user_attrs[REUSED_ATTR]])
        assert copy.config.settings_key() == source.config.settings_key() not in measured_keys
        assert copy.tg.samples_ns == source.tg.samples_ns


def test_a_study_refuses_another_model_under_its_name(long_context_model, tiny_model, tmp_path):
    tuner_for(long_context_model, tmp_path, study_name="s", trials=2).run()
    with pytest.raises(UserError, match="another model file"):
        tuner_for(tiny_model, tmp_path, study_name="s", trials=2, min_ctx=512)


def test_the_timeout_stops_starting_trials(long_context_model, tmp_path):
    clock = iter(range(0, 10_000, 60))
    t = tuner_for(long_context_model, tmp_path, trials=50, timeout="2m")
    t.clock = lambda: next(clock)
    t.run()
    assert 1 <= t.measured_count() <= 3


class LuckyFirstLauncher(FakeLauncher):
    """Configurations without flash attention read 10x too fast the first time, and true on re-measurement."""

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        tg, pp = super().speeds(c)
        first = [m.settings_key() for m in self.measured].count(c.settings_key()) == 1
        return (tg * 10, pp) if not c.flash_attn and first else (tg, pp)


def test_leaders_are_confirmed_until_a_lucky_measurement_no_longer_leads(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, LuckyFirstLauncher(env=ENV, noise=0.0), trials=16,
                  pins={"repack": "1"})
    t.run()
    lucky = [c for c in StudyView(t.study).candidates if not c.result.config.flash_attn]
    assert len(lucky) > t.settings.confirm_top  # one round of confirmations cannot clear them all
    confirm_leaders(t, passes=10)
    view = StudyView(t.study)
    fastest = view.presets["fastest"].candidate
    assert fastest.confirm is not None and fastest.figures.config.flash_attn
    assert all(n in view.confirmations for n in view.top(t.settings.confirm_top))


class SlowDefaultsLauncher(FakeLauncher):
    """llama.cpp's default batch sizes (-b 2048 -ub 512) read 20% slower in tg."""

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        tg, pp = super().speeds(c)
        return (tg * 0.8, pp) if (c.n_batch, c.n_ubatch) == (2048, 512) else (tg, pp)


def test_the_fastest_baseline_is_confirmed_with_the_leaders(long_context_model, tmp_path):
    slow_defaults = SlowDefaultsLauncher(env=ENV, noise=0.0)
    t = tuner_for(long_context_model, tmp_path, slow_defaults, trials=12, baseline_flags="-c 8192 -b 512 -t 1")
    t.run()
    view = StudyView(t.study)
    bases = [c.trial for c in view.candidates if c.baseline]
    top = view.top(t.settings.confirm_top)
    assert len(bases) == 2 and not set(bases) & set(top)  # the test needs baselines outside the top 3
    leaders = view.leaders(t.settings.confirm_top)
    assert leaders[:len(top)] == top and set(bases) <= set(leaders)  # every baseline a preset may be races
    confirm_leaders(t)
    view = StudyView(t.study)
    batch = {view.confirmations[n].interleaved for n in view.leaders(t.settings.confirm_top)}
    assert len(batch) == 1 and None not in batch  # one batch, paired with today's settings


def test_leaders_race_in_paired_rounds_taking_turns(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, trials=10, pins={"repack": "1"})
    t.run()
    top = StudyView(t.study).top(3)
    calls = len(t.launcher.measured)
    rounds_seen = []
    out = confirm(t, top, on_round=lambda r, cap, v, left: rounds_seen.append((r, cap, v, left)))
    plan = t.launcher.measured[calls:]
    assert all(c.repetitions == 1 for c in plan)  # one repetition each per round
    keys = {result_of(t.study.trials[n]).config.settings_key(): n for n in top}
    order = [keys[c.settings_key()] for c in plan]
    assert sorted(order[:3]) == sorted(top) and order[:3] != order[3:6]  # every one in round 1; the order rotates
    assert len(rounds_seen) >= MIN_ROUNDS and [r for r, *_ in rounds_seen] == list(range(1, len(rounds_seen) + 1))
    racing = list(top)
    for r, cap, v, left in rounds_seen:
        racing = v.open(racing)
        if r < len(rounds_seen):  # it went on only while undecided, with rounds (and seconds) to go
            assert len(racing) > 1 and left > 0, (r, v.describe())
        else:  # and stopped when decided, or at the cap
            assert len(racing) <= 1 or r == cap, (r, v.describe())
    assert len({r.interleaved for r in out.values()}) == 1
    assert StudyView(t.study).confirmations.keys() == set(top)
    confirm_leaders(t)  # all leaders (top 3, the max-context and balanced ones, the baselines) race together once
    measured = len(t.launcher.measured)
    assert measured > calls + len(plan)
    confirm_leaders(t)  # they are one confirmed batch now: nothing is measured
    assert len(t.launcher.measured) == measured


class TwoSpeedsLauncher(FakeLauncher):
    """tg depends only on flash attention: ``gap`` faster with it."""

    gap: float = 0.2

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        return (100.0 * (1 + self.gap) if c.flash_attn else 100.0), 1000.0


def _race(tmp_path, model, gap: float, noise: float) -> list[int]:
    launcher = TwoSpeedsLauncher(env=ENV, noise=noise)
    launcher.gap = gap
    t = tuner_for(model, tmp_path, launcher, trials=8, pins={"repack": "1"})
    t.run()
    cands = StudyView(t.study).candidates
    pair = [next(c.trial for c in cands if c.result.config.flash_attn),
            next(c.trial for c in cands if not c.result.config.flash_attn)]
    seen = []
    confirm(t, pair, on_round=lambda r, cap, v, left: seen.append(v))
    other = pair[1] if seen[-1].leader == pair[0] else pair[0]
    return [len(seen), seen[-1].leader == pair[0], seen[-1].settled.get(other)]


def test_a_clear_race_stops_early_a_tie_is_called_and_a_close_race_runs_to_its_cap(long_context_model, tmp_path):
    assert _race(tmp_path / "clear", long_context_model, gap=0.2, noise=0.01) == [MIN_ROUNDS, True, "slower"]
    rounds, _, state = _race(tmp_path / "tie", long_context_model, gap=0.0, noise=0.002)
    assert rounds == MIN_ROUNDS and state == "tie"
    rounds, _, state = _race(tmp_path / "close", long_context_model, gap=0.01, noise=0.08)
    assert rounds == 8 and state is None  # settings.confirm_repetitions rounds, still open: presets call it a tie


def test_verdict_pairs_the_rounds_two_candidates_ran_together():
    def raced(rates: list[float]) -> TrialResult:
        cfg = BenchConfig(n_ctx=8192, n_batch=512, n_ubatch=512, n_threads=4, n_threads_batch=4,
                          repetitions=len(rates))
        return TrialResult(Status.OK, cfg, "/m.gguf", tg=Rates(128, [int(1e9 * 128 / x) for x in rates]),
                           pp=Rates(512, [10**9] * len(rates)), interleaved=Interleaved("b", 1))
    drift = [0.9, 1.1, 1.0, 0.95]
    v = verdict({1: raced([100 * d for d in drift]), 2: raced([97 * d for d in drift[:3]]),
                 3: raced([100 * d for d in drift[:2]])}, "tg")
    assert v.leader == 1 and v.settled == {2: "slower"}  # 3% in each of 3 rounds despite 20% drift; 3: too few
    assert abs(v.gaps[2][0] - 0.03) < 1e-6 and v.gaps[2][1] < 1e-6


def test_where_repack_crashes_the_study_searches_repack_off(long_context_model, tmp_path):
    fake = FakeLauncher(env=ENV, repack_crash_reason="child died of SIGILL (AMX)")
    t = tuner_for(long_context_model, tmp_path, launcher=fake, trials=8)
    t.run()
    results = [result_of(tr) for tr in t.study.trials if tr.user_attrs]
    crashed = [r for r in results if r.status == Status.CRASH]
    assert len(crashed) == 1 and crashed[0].config.repack  # llama.cpp's defaults, measured as they are
    assert len(results) == 8 and all(not r.config.repack for r in results if r.ok)
    confirm_leaders(t)
    presets = StudyView(t.study).presets
    assert presets and all(not p.candidate.figures.config.repack for p in presets.values())


def test_a_resumed_study_that_measured_nothing_new_does_not_measure_its_leaders_again(long_context_model, tmp_path,
                                                                                         capsys):
    from llama_tuner.cli.study import run_and_print

    first = tuner_for(long_context_model, tmp_path, trials=6)
    first.run()
    ranked = sorted(StudyView(first.study).candidates, key=lambda c: c.figures.tg_mean)
    confirm(first, [ranked[0].trial, ranked[1].trial])  # the leaders left unconfirmed, as when the passes run out
    again = FakeLauncher(env=ENV)
    run_and_print(tuner_for(long_context_model, tmp_path, again, trials=6), confirm=True)
    assert again.measured == [] and "confirming the leaders" not in capsys.readouterr().out
    more = FakeLauncher(env=ENV)
    run_and_print(tuner_for(long_context_model, tmp_path, more, trials=8), confirm=True)
    assert len(more.measured) > 2  # two new configurations, then their leaders confirmed
