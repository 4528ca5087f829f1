"""Decisions a user can trust: a preset is a configuration confirmed in the race that beats the baseline beyond
the noise, or the baseline; gains are printed with their interval; a crash in the race disqualifies."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from click.testing import CliRunner

from llama_tuner.cli.main import cli
from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Environment, Interleaved, Rates, Status, TrialResult
from llama_tuner.study.comparison import compare
from llama_tuner.study.confirmation import confirm, confirm_leaders
from llama_tuner.study.keys import DEFAULTS_BASELINE, RACE_ATTR
from llama_tuner.study.objectives import is_feasible
from llama_tuner.study.presets import Candidate, choose_presets
from llama_tuner.study.session import StudyRequest, open_tuner
from llama_tuner.study.view import StudyView
from llama_tuner.testing.fakes import FakeLauncher

optuna.logging.set_verbosity(optuna.logging.WARNING)
ENV = Environment(host="fakehost", cpu="Fake CPU", physical_cores=8, ram_total_bytes=32 << 30,
                  llama_cpp_python="0.3.36", llama_cpp_build="fake")
DRIFT = (0.90, 1.04, 1.12, 0.95, 1.0, 0.97, 1.08, 0.93)  # the machine's speed, round by round


def raced(tg: float, pp: float = 1000.0, *, ctx: int = 32768, peak: int = 1 << 30, noise: float = 0.005,
          rounds: int = 8, batch: str | None = "race", trial: int = 0, baseline: str | None = None,
          seed: int = 0) -> Candidate:
    """A candidate measured one repetition per round, in ``batch``, on a machine that drifts by up to 12%."""
    rng = random.Random(seed)
    drift = DRIFT[:rounds]
    tg_ns = [int(1e9 * 128 / (tg * d * rng.gauss(1, noise))) for d in drift]
    pp_ns = [int(1e9 * 512 / (pp * d * rng.gauss(1, noise))) for d in drift]
    cfg = BenchConfig(n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=4, n_threads_batch=4, repetitions=rounds)
    r = TrialResult(Status.OK, cfg, "/m.gguf", tg=Rates(128, tg_ns), pp=Rates(512, pp_ns), peak_rss_bytes=peak,
                    interleaved=Interleaved(batch, 1) if batch else None)
    return Candidate(trial, r, r, baseline=baseline)


# -- the rules ------------------------------------------------------------------------------------------------

def test_a_candidate_inside_the_noise_of_the_baseline_leaves_the_baseline_as_the_preset():
    base = raced(100.0, trial=1, baseline=DEFAULTS_BASELINE, seed=1)
    close = raced(101.5, trial=2, noise=0.03, seed=2)  # 1.5% faster, rounds +-3%: inside the interval
    gap = compare(close.figures, base.figures, "tg")
    assert gap.paired and gap.verdict == "tie" and gap.text().startswith("tie (")
    p = choose_presets([close], [base], "tg")
    assert p["fastest"].candidate is base and "kept the baseline" in p["fastest"].why
    assert p["balanced"].candidate is base and p["max-context"].candidate is base


def test_a_gain_beyond_the_noise_wins_and_is_stated_with_its_interval():
    base = raced(100.0, trial=1, baseline=DEFAULTS_BASELINE, seed=1)
    faster = raced(110.0, trial=2, seed=2)  # 10% in every round despite 12% drift
    gap = compare(faster.figures, base.figures, "tg")
    assert gap.verdict == "better" and abs(gap.share - 0.10) < 0.02 and 0 < gap.half < 0.02
    assert gap.text() == f"+{100 * gap.share:.1f}% (±{100 * gap.half:.1f})"
    p = choose_presets([faster], [base], "tg")
    assert p["fastest"].candidate is faster and gap.text() in p["fastest"].why


def test_unpaired_figures_hide_what_paired_rounds_show():
    """The same 3% gap: paired in one race it is decided; measured apart, the drift hides it."""
    a, b = raced(103.0, seed=1), raced(100.0, seed=2)
    assert compare(a.figures, b.figures, "tg").verdict == "better"
    a2, b2 = raced(103.0, batch=None, seed=1), raced(100.0, batch=None, seed=2)
    assert compare(a2.figures, b2.figures, "tg").verdict == "tie"


def test_a_gain_in_tg_that_loses_pp_or_context_is_no_gain_over_the_baseline():
    base = raced(100.0, 1000.0, trial=1, baseline=DEFAULTS_BASELINE, seed=1)
    loses_pp = raced(110.0, 620.0, trial=2, seed=2)  # the make tune case: tg +10%, pp -38%
    assert choose_presets([loses_pp], [base], "tg")["fastest"].candidate is base
    loses_ctx = raced(110.0, 1000.0, ctx=4096, trial=3, seed=3)  # and 7/8 of the context
    assert choose_presets([loses_ctx], [base], "tg")["fastest"].candidate is base
    good = raced(108.0, 1000.0, trial=4, seed=4)
    assert choose_presets([loses_pp, loses_ctx, good], [base], "tg")["fastest"].candidate is good


def test_ties_among_candidates_go_to_pp_then_context_then_memory():
    base = raced(80.0, 800.0, trial=9, baseline=DEFAULTS_BASELINE, ctx=4096, seed=9)
    a = raced(100.0, 900.0, ctx=8192, peak=4 << 30, trial=1, noise=0.02, seed=1)
    b = raced(100.5, 1100.0, ctx=8192, peak=6 << 30, trial=2, noise=0.02, seed=2)  # tied on tg, 22% more pp
    p = choose_presets([a, b], [base], "tg", budget_bytes=24 << 30)
    assert p["fastest"].candidate is b and p["fastest"].ties == [1]  # pp first, although a saves 2 GiB
    c = raced(99.5, 1100.0, ctx=16384, peak=6 << 30, trial=3, noise=0.02, seed=3)  # tied on tg and pp, 2x context
    assert choose_presets([a, b, c], [base], "tg", budget_bytes=24 << 30)["fastest"].candidate is c
    d = raced(99.8, 1100.0, ctx=16384, peak=3 << 30, trial=4, noise=0.02, seed=4)  # tied on all three; 3 GiB less
    assert choose_presets([a, b, c, d], [base], "tg", budget_bytes=24 << 30)["fastest"].candidate is d
    c = raced(99.5, 1100.0, ctx=16384, peak=6 << 30, trial=3, noise=0.03, seed=3)
    e = raced(98.5, 1100.0, ctx=16384, peak=int(5.9 * 2**30), trial=5, noise=0.03, seed=6)  # 100 MiB less: < 1%
    assert compare(e.figures, c.figures, "tg").verdict == "tie" and e.figures.tg_mean < c.figures.tg_mean
    p = choose_presets([c, e], [base], "tg", budget_bytes=24 << 30)
    assert p["fastest"].candidate is c and "1%" in p["fastest"].why  # the faster mean, not the leaner
    assert choose_presets([c, e], [base], "tg", budget_bytes=8 << 30)["fastest"].candidate is e  # 1.2% of 8 GiB


def test_the_users_own_settings_are_kept_when_tied_with_the_defaults():
    defaults = raced(100.0, trial=1, baseline=DEFAULTS_BASELINE, seed=1)
    yours = raced(99.5, trial=2, baseline="yours", noise=0.03, seed=2)
    assert choose_presets([], [defaults, yours], "tg")["fastest"].candidate is yours
    slow = raced(80.0, trial=3, baseline="yours", seed=3)  # the defaults beat it: a real gain for the user
    assert choose_presets([], [defaults, slow], "tg")["fastest"].candidate is defaults


# -- in a study -------------------------------------------------------------------------------------------------

def tuner_for(model_path, tmp_path, launcher=None, **kw):
    kw.setdefault("trials", 8)
    kw.setdefault("seed", 1)
    kw.setdefault("pins", {"repack": "1"})
    request = StudyRequest(model=str(model_path), storage=f"sqlite:///{tmp_path}/studies.db", **kw)
    return open_tuner(request, launcher=launcher or FakeLauncher(env=ENV), env=ENV)


class FlatLauncher(FakeLauncher):
    """Every configuration runs at the same speed: nothing can beat llama-server's defaults."""

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        return 100.0, 1000.0


def test_a_study_where_nothing_beats_the_defaults_keeps_the_defaults(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, FlatLauncher(env=ENV, noise=0.02))
    t.run()
    confirm_leaders(t)
    view = StudyView(t.study)
    for name, p in view.presets.items():
        assert p.candidate.baseline == DEFAULTS_BASELINE, name
    assert view.race["complete"]


def test_unconfirmed_configurations_are_no_presets(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path)
    t.run()
    view = StudyView(t.study)
    assert view.race is None and {p.candidate.baseline for p in view.presets.values()} == {DEFAULTS_BASELINE}
    from llama_tuner.report.study_report import why_lines
    assert "no confirmation race has run" in why_lines(view)


class CrashInRaceLauncher(FakeLauncher):
    """Configurations with flash attention are the fastest, and crash when measured one repetition at a time."""

    def speeds(self, c: BenchConfig) -> tuple[float, float]:
        tg, pp = super().speeds(c)
        return (tg * 2, pp * 2) if c.flash_attn else (tg, pp)


def test_a_leader_that_crashes_in_the_race_is_no_preset(long_context_model, tmp_path):
    launcher = CrashInRaceLauncher(env=ENV, noise=0.005)
    t = tuner_for(long_context_model, tmp_path, launcher, baseline_flags="-c 8192 -t 2 -fa off")
    t.run()
    launcher.fail = lambda c: Status.CRASH if c.flash_attn and c.repetitions == 1 else None
    confirm_leaders(t, passes=1)
    view = StudyView(t.study)
    crashed = [n for n, r in view.confirmations.items() if r.status == Status.CRASH]
    assert crashed  # the leaders crashed in the race
    assert view.presets and all(p.candidate.trial not in crashed for p in view.presets.values())
    assert all(not p.candidate.figures.config.flash_attn for p in view.presets.values())


def test_a_baseline_that_breaks_a_pin_is_a_reference_never_a_preset(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, FlatLauncher(env=ENV, noise=0.02), pins={"repack": "1",
                                                                                         "n_threads": "3"})
    t.run()
    confirm_leaders(t)
    view = StudyView(t.study)
    defaults = view.baselines[DEFAULTS_BASELINE]
    assert defaults.figures.config.n_threads == 8 and "n_threads=3" in view.why_not_kept(defaults)
    assert view.presets and all(p.candidate.figures.config.n_threads == 3 for p in view.presets.values())
    from llama_tuner.report.study_report import presets_table
    assert "[reference: it breaks the pins (n_threads=3)]" in presets_table(view)


class CutRace(FakeLauncher):
    """Ctrl-C arrives while the race measures its ``cut_at``-th configuration."""

    cut_at: int = 0

    def measure(self, model_path, configs):
        for r in super().measure(model_path, configs):
            if self.cut_at and sum(1 for c in self.measured if c.repetitions == 1) == self.cut_at:
                raise KeyboardInterrupt
            yield r


def test_ctrl_c_in_the_race_keeps_its_rounds_and_the_next_tune_goes_on(long_context_model, tmp_path):
    launcher = CutRace(env=ENV, noise=0.05)
    t = tuner_for(long_context_model, tmp_path, launcher)
    t.run()
    leaders = StudyView(t.study).leaders(t.settings.confirm_top)
    launcher.cut_at = 2 * len(leaders) + 1  # in round 3
    with pytest.raises(KeyboardInterrupt):
        confirm(t, leaders)
    race = StudyView(t.study).race
    assert race == {**race, "trials": leaders, "rounds": 2, "complete": False}
    kept = StudyView(t.study).confirmations
    assert set(kept) == set(leaders) and all(r.config.repetitions == 2 for r in kept.values())
    launcher.cut_at = 0
    before = len(launcher.measured)
    merged = confirm(t, leaders)
    assert all(r.config.repetitions >= 3 for r in merged.values() if r.ok)  # rounds 1-2 kept, then 3 on
    assert len({r.interleaved for r in merged.values()}) == 1 and StudyView(t.study).race["complete"]
    assert len(launcher.measured) - before < 8 * len(leaders) - 2 * len(leaders) + 1


def test_cli_ctrl_c_in_the_race_saves_what_it_says(long_context_model, tmp_path, monkeypatch):
    from llama_tuner.cli.study import run_and_print

    launcher = CutRace(env=ENV, noise=0.05)
    t = tuner_for(long_context_model, tmp_path, launcher)
    t.run()
    launcher.cut_at = len(StudyView(t.study).leaders(t.settings.confirm_top)) + 2  # in round 2
    with pytest.raises(UserError, match="all saved"):
        run_and_print(t, confirm=True)
    assert t.study.user_attrs[RACE_ATTR]["rounds"] == 1 and not t.study.user_attrs[RACE_ATTR]["complete"]


# -- resume, limits and baselines -----------------------------------------------------------------------------

def test_resuming_with_a_new_budget_or_min_ctx_judges_presets_by_the_new_limits(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, min_ctx=4096)
    t.run()
    confirm_leaders(t)
    again = tuner_for(long_context_model, tmp_path, min_ctx=16384, vram_budget="20GiB")
    assert any("limits changed" in n for n in again.notes)
    view = StudyView(again.study)
    assert view.limits.min_ctx == 16384 and view.limits.budget_bytes == 20 << 30
    assert view.presets and all(p.candidate.n_ctx >= 16384 for p in view.presets.values())
    assert all(is_feasible(c.figures, view.limits) for c in view.entrants)


def test_a_baseline_added_or_changed_on_resume_is_measured(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, trials=4)
    t.run()
    assert "yours" not in StudyView(t.study).baselines
    again = tuner_for(long_context_model, tmp_path, trials=4, baseline_flags="-c 8192 -t 2")
    again.run()
    yours = StudyView(again.study).baselines["yours"]
    assert yours.figures.config.n_threads == 2 and yours.figures.ok
    third = tuner_for(long_context_model, tmp_path, trials=4, baseline_flags="-c 8192 -t 3")
    third.run()
    assert StudyView(third.study).baselines["yours"].figures.config.n_threads == 3


def test_the_study_stores_the_models_absolute_path(long_context_model, tmp_path, monkeypatch):
    import os
    monkeypatch.chdir(os.path.dirname(long_context_model))
    t = tuner_for(os.path.basename(long_context_model), tmp_path)
    assert StudyView(t.study).model_path == os.path.abspath(long_context_model)


def test_a_gpu_beside_a_cpu_build_says_so_and_the_budget_limits_ram(long_context_model, tmp_path):
    from llama_tuner.testing.fakes import FakeGpuProbe

    env = Environment(**{**ENV.__dict__, "gpu_name": "Fake RTX 4070", "vram_total_bytes": 12 << 30,
                         "gpu_offload": False})
    launcher = FakeLauncher(env=env, weights_bytes=40 << 30)  # every trial holds 40 GiB of RAM
    request = StudyRequest(model=str(long_context_model), storage=f"sqlite:///{tmp_path}/s.db", trials=3,
                           vram_budget="12GiB", pins={"repack": "1"})
    t = open_tuner(request, launcher=launcher, env=env, probe=FakeGpuProbe())
    assert any("CPU build" in n and "make tune CUDA=1" in n for n in t.notes)
    t.run()
    view = StudyView(t.study)
    results = [c.figures for c in view.baselines.values()] + [view.figures(tr) for tr in view.trials]
    assert results and all(r.peak_memory_bytes >= 40 << 30 for r in results if r.ok)
    assert view.candidates == []  # 40 GiB of RAM is over a 12 GiB budget, whatever the GPU holds


def test_trial_timeout_zero_is_refused(long_context_model, tmp_path):
    with pytest.raises(UserError, match="--trial-timeout 0"):
        tuner_for(long_context_model, tmp_path, trial_timeout="0")


def test_report_on_a_study_llama_tuner_did_not_make_is_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/foreign.db"
    optuna.create_study(study_name="someone-elses", storage=url)
    out = CliRunner().invoke(cli, ["report", "someone-elses", "--storage", url], prog_name="llama-tuner")
    assert out.exit_code == 2 and "not made by llama-tuner" in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) <= 2


def test_report_export_and_compare_state_gains_with_intervals(long_context_model, tmp_path):
    t = tuner_for(long_context_model, tmp_path, trials=10, baseline_flags="-c 8192 -t 1 -b 512")
    t.run()
    confirm_leaders(t)
    view = StudyView(t.study)
    from llama_tuner.report.export import render_study_preset, study_preset_json
    from llama_tuner.report.study_report import presets_table
    table = presets_table(view)
    assert "%" in table and ("±" in table)  # every gain has its interval
    js = study_preset_json(view, "fastest")
    for figures in js["gain_over_baselines"].values():
        for g in figures.values():
            assert g["verdict"] in ("better", "worse", "tie") and (g["half_width"] is None or g["half_width"] >= 0)
            lo, hi = g["share"] - (g["half_width"] or math.inf), g["share"] + (g["half_width"] or math.inf)
            assert (g["verdict"] == "tie") == (lo <= 0 <= hi)
    ollama = render_study_preset(view, "ollama", "fastest")
    assert "# why: " in ollama and view.presets["fastest"].why in ollama
