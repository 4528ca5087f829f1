"""The tuning study: Optuna over llama.cpp settings, with baselines, resume and no repeats.

:class:`Tuner` owns one Optuna study (3 objectives: tg, pp, context; constraints
in :mod:`llama_tuner.study.objectives`). Each trial proposes a point of the :class:`SearchSpace`,
measures it with a :class:`~llama_tuner.measure.launcher.Launcher` (or reuses the measurement of
the same settings on the same model file, hardware and llama.cpp build), stores
the TrialResult on the trial and tells Optuna the objectives and constraints.

``--trials N`` counts configurations measured, so a study that reaches N has N
distinct measurements. Trials left RUNNING by a killed process on this host, or
failed by Ctrl-C, are marked failed on resume and their configuration retried;
trials of dead workers elsewhere are failed by Optuna's RDB heartbeat and retried
(:mod:`llama_tuner.study.coordination` keeps workers from losing or repeating measurements).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable

import optuna
import psutil
from optuna.trial import FrozenTrial, Trial, TrialState

from llama_tuner.measure.config import BenchConfig
from llama_tuner.errors import UserError
from llama_tuner.measure.launcher import Launcher
from llama_tuner.model.info import ModelInfo
from llama_tuner.measure.probe import host_name
from llama_tuner.measure.bandwidth import bandwidth_of
from llama_tuner.measure.environment import hash_cache_file
from llama_tuner.study.coordination import (Heartbeat, OrphanSweeper, PendingResults, fail_stale, give_back,
                                            grace_period, requeue, retried_numbers, twins_ahead)
from llama_tuner.study.keys import (BASELINE_ATTR, CONFIG_ATTR, DEFAULTS_BASELINE, IMPUTED_ATTR, INTERRUPTED_ATTR,
                              MEMORY_PRIOR_ATTR, RESULT_ATTR, REUSED_ATTR, RUN_ID_ATTR, SETTINGS_ATTR, SKIPPED_ATTR,
                              START_ATTR, SURPLUS_ATTR, WORKER_ATTR, ENVIRONMENT_ATTR, FINGERPRINT_ATTR, LIMITS_ATTR,
                              MODEL_FACTS_ATTR, MODEL_FILE_ATTR, MODEL_PATH_ATTR, OBJECTIVE_ATTR, OBJECTIVE_NAMES,
                              REQUEST_ATTR, SCHEMA_ATTR, SCHEMA_VERSION)
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.memory_model import MemoryModel
from llama_tuner.study.placement import Placement
from llama_tuner.study.storage import GRACE_S, make_sampler
from llama_tuner.study.objectives import (Limits, constraints, measured_trials, objective_values, result_of,
                                    worst_rates)
from llama_tuner.measure.result import Environment, Status, TrialResult
from llama_tuner.study.space import SearchSpace
from llama_tuner.study.tracker import Tracker
from llama_tuner.study.settings import Fingerprint, Observer, StudySettings, SurplusTrial, reuse_key

MAX_CONSECUTIVE_REPEATS = 30


class Tuner:
    """Runs (or resumes) one study; see the module docstring."""

    def __init__(self, *, storage: optuna.storages.BaseStorage, study_name: str, model: ModelInfo,
                 space: SearchSpace, launcher: Launcher, env: Environment, fingerprint: Fingerprint,
                 limits: Limits, settings: StudySettings, baselines: dict[str, BenchConfig] | None = None,
                 observers: list[Observer] | None = None, clock: Callable[[], float] = time.monotonic,
                 tracker: Tracker | None = None, gpu_index: int | None = None):
        """Create study ``study_name`` in ``storage``, or open it to resume.

        Raises:
            UserError: the stored study was measured with another model file, hardware, llama.cpp build
                or test sizes, or by a newer llama-tuner (its schema version is unknown here).
        """
        self.gpu_index = gpu_index
        self.storage, self.model, self.space, self.launcher = storage, model, space, launcher
        self.tracker = tracker or Tracker()
        self.env, self.fingerprint, self.limits, self.settings = env, fingerprint, limits, settings
        self.baselines = baselines or {}
        self.observers = observers or []
        self.clock = clock
        self.reconnect_s = 60.0
        self.facts = ModelFacts.of(model)
        self.memory = MemoryModel(self.facts, on_gpu=bool(env.gpu_name and env.gpu_offload))
        self.placement = Placement(memory=self.memory, space=space, limits=limits, launcher=launcher, model=model)
        self.notes: list[str] = []  # what resuming changed, for the caller to show
        self.study = optuna.create_study(
            study_name=study_name, storage=storage, load_if_exists=True, directions=["maximize"] * 3,
            sampler=make_sampler(settings.sampler, settings.seed, settings.trials))
        self._check_identity()
        self._repeats = 0
        self._calibrated = False  # llama.cpp's dry runs have set the memory model's prior (Tuner.run)
        self._surplus_seen = False
        self._other_studies: dict[str, tuple[int, TrialResult]] | None = None
        self._orphans = OrphanSweeper(grace_period(storage, GRACE_S))
        # Measurements not yet told to the storage, kept on this machine (see coordination.PendingResults).
        self.pending = PendingResults.for_fingerprint(hash_cache_file().parent / "pending", asdict(fingerprint))
        self._unsaved: str | None = None  # the reuse key of this trial's measurement while it is pending

    # -- identity and resume ------------------------------------------------
    def _check_identity(self) -> None:
        attrs = self.study.user_attrs
        fp = asdict(self.fingerprint)
        if FINGERPRINT_ATTR not in attrs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(list(OBJECTIVE_NAMES))
            for key, value in {SCHEMA_ATTR: SCHEMA_VERSION, FINGERPRINT_ATTR: fp, MODEL_PATH_ATTR: self.model.path,
                               MODEL_FILE_ATTR: self.model.file_name, MODEL_FACTS_ATTR: self.facts.to_dict(),
                               LIMITS_ATTR: asdict(self.limits), OBJECTIVE_ATTR: self.settings.objective,
                               ENVIRONMENT_ATTR: asdict(self.env)}.items():
                self.study.set_user_attr(key, value)
            return
        if attrs.get(SCHEMA_ATTR, 1) > SCHEMA_VERSION:
            raise UserError(f"study {self.study.study_name!r} was written by a newer llama-tuner (schema "
                            f"{attrs[SCHEMA_ATTR]}, this one reads {SCHEMA_VERSION})", "upgrade llama-tuner")
        old = attrs[FINGERPRINT_ATTR]
        for key, what in (("model_sha256", "model file"), ("hardware", "hardware"),
                          ("llama_cpp_build", "llama.cpp build"), ("test", "test sizes (--depth)")):
            if old.get(key) != fp[key]:
                raise UserError(f"study {self.study.study_name!r} was measured with another {what} "
                                f"({old.get(key)} vs {fp[key]})", "choose a new name with --study")
        limits = asdict(self.limits)
        if attrs.get(LIMITS_ATTR) != limits:  # the new limits judge every trial, old ones included
            old_limits = attrs.get(LIMITS_ATTR) or {}
            changed = ", ".join(f"{k} {old_limits.get(k)} -> {v}" for k, v in limits.items() if old_limits.get(k) != v)
            self.study.set_user_attr(LIMITS_ATTR, limits)
            self.notes.append(f"limits changed ({changed}): presets and the report now use the new ones")
        stored = attrs.get(OBJECTIVE_ATTR, "tg")
        if stored != self.settings.objective:  # every trial has tg and pp: only the presets' ranking changes
            self.study.set_user_attr(OBJECTIVE_ATTR, self.settings.objective)
            self.notes.append(f"objective changed from {stored} to {self.settings.objective}: presets now rank "
                              f"by {self.settings.objective}")

    def recover(self) -> list[int]:
        """Fail this host's trials whose process is gone, and those cut by Ctrl-C; retry their configs."""
        retried = []
        trials = self.study.get_trials(deepcopy=False)
        already = retried_numbers(trials)
        host = host_name()
        for t in trials:
            w = t.user_attrs.get(WORKER_ATTR) or {}
            dead = (t.state == TrialState.RUNNING and w.get("host") == host and not _alive(w.get("pid")))
            if dead:
                try:
                    self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker finished it between our read and this write (and requeued it)
            cut = dead or (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR))
            if cut and t.number not in already and requeue(self.study, t):
                retried.append(t.number)
        return retried

    def enqueue_baselines(self) -> None:
        """Queue each baseline once in the study's lifetime, ahead of sampled trials."""
        trials = self.study.get_trials(deepcopy=False)
        # A baseline is queued again when its command line changed (a --baseline edited on resume).
        done = {(t.user_attrs.get(BASELINE_ATTR), json.dumps(t.user_attrs.get(CONFIG_ATTR), sort_keys=True))
                for t in trials}
        for name, cfg in self.baselines.items():
            if (name, json.dumps(cfg.to_dict(), sort_keys=True)) not in done:
                self.study.enqueue_trial(self.space.params_of(cfg),
                                         user_attrs={BASELINE_ATTR: name, CONFIG_ATTR: cfg.to_dict()})
        start = (None if any(t.user_attrs.get(START_ATTR) for t in trials)
                 else self.placement.start_point(self.baselines.get(DEFAULTS_BASELINE)))
        if start is not None:
            self.study.enqueue_trial(self.space.params_of(start), user_attrs={START_ATTR: True})

    # -- the trial loop -----------------------------------------------------
    def measured_count(self) -> int:
        """Configurations measured so far (reused copies do not count)."""
        return len(measured_trials(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))

    def target(self) -> int:
        """Configurations the study is to measure: the latest ``tune --trials`` stored on the study (a
        worker sees a later increase while it runs), else this Tuner's own setting."""
        return int(self.study.user_attrs.get(REQUEST_ATTR, {}).get("trials", self.settings.trials))

    def run(self, enqueue_baselines: bool = True) -> None:
        """Measure until ``trials`` configurations are measured, the timeout passes, or the space runs dry.

        Workers joining a study pass ``enqueue_baselines=False``: the study's creator queues them once.
        """
        self._with_storage(self.recover)
        if enqueue_baselines:
            self._with_storage(self.enqueue_baselines)
        if not self._calibrated and self.memory.correction is None:  # once, before this process measures
            self._calibrated = True
            pairs = self.memory.calibrate(self.launcher.dry_run(self.model.path, self.space.corners()))
            if pairs:
                self._with_storage(lambda: self.study.set_user_attr(MEMORY_PRIOR_ATTR, pairs))
        self.tracker.study_started(self.study.study_name, self.study.user_attrs, self.study.set_user_attr)
        start = self.clock()
        while (self._with_storage(self.measured_count) < self._with_storage(self.target)
               or self._with_storage(self._baselines_waiting)):
            if self.settings.timeout_s is not None and self.clock() - start >= self.settings.timeout_s:
                break
            if self._repeats >= MAX_CONSECUTIVE_REPEATS:
                break  # the sampler keeps proposing measured points: the space is exhausted
            self._surplus_seen = False
            self._with_storage(self._run_one)
            if self._surplus_seen:  # others hold the last trials: wait for them (or for them to go stale)
                time.sleep(1.0)

    def _baselines_waiting(self) -> bool:
        """True while a queued baseline is unmeasured: baselines are measured even when the study has its
        count (one added on resume)."""
        return any(BASELINE_ATTR in t.user_attrs
                   for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _with_storage(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn``, riding out a storage outage (a database restart) for up to ``reconnect_s``."""
        from sqlalchemy.exc import SQLAlchemyError

        waited, delay = 0.0, 0.5
        while True:
            try:
                return fn()
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
                if waited >= self.reconnect_s:
                    first = str(exc).strip().splitlines()[0][:160]
                    raise UserError(f"lost the study storage for {waited:.0f} s ({first})",
                                    "check the database; completed trials are saved, run the same command to resume")
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def _run_one(self) -> None:
        """One trial: ask, measure with a heartbeat, tell (retried through a storage outage).

        Optuna's ``study.optimize`` masks a storage error during its final bookkeeping
        with an UnboundLocalError (optuna 5.0), so the trial loop is ours; it keeps
        Optuna's stale-trial check, with a heartbeat that survives a database restart.
        """
        self._clear_dead()
        with warnings.catch_warnings():  # we do beat (coordination.Heartbeat), just not via optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = self.study.ask()
        values, state, self._unsaved = None, TrialState.COMPLETE, None
        with Heartbeat(self.storage, trial._trial_id, first_beat=self._with_storage):
            try:
                values = self._objective(trial)
            except SurplusTrial:
                state = TrialState.FAIL
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # failed by another worker while we were cut off from the database; it was requeued
            except KeyboardInterrupt:
                self._tell(trial, None, TrialState.FAIL)
                raise
            self._saving(lambda: self._tell(trial, values, state), trial)  # still beating: the trial is ours
        frozen = self._saving(lambda: self.storage.get_trial(trial._trial_id), trial)
        if self._unsaved is not None and frozen.state == TrialState.COMPLETE:
            self.pending.drop(self._unsaved)  # else (failed by another worker meanwhile) its retry takes it
        self._finished(self.study, frozen)

    def _saving(self, fn: Callable[[], Any], trial: Trial) -> Any:
        """:meth:`_with_storage` for a write after a measurement: where the storage stays away, the error
        says that the measurement is kept on this machine and is not measured again on resume.

        Raises:
            UserError: the storage was away for over ``reconnect_s``.
        """
        try:
            return self._with_storage(fn)
        except UserError as exc:
            if self._unsaved is None:
                raise
            raise UserError(exc.problem, f"{exc.fix}; the measurement of trial {trial.number} is kept in "
                                         f"{self.pending.path(self._unsaved)} and is not measured again") from None

    def _clear_dead(self) -> None:
        """Fail the trials of silent workers and the orphans of interrupted asks, so no slot is held forever."""
        fail_stale(self.study)
        self._orphans.sweep(self.study)

    def _tell(self, trial: Trial, values, state: TrialState) -> None:
        # Finished already: an earlier attempt landed before the connection broke, or the database was
        # away for longer than the grace period and another worker failed (and requeued) the trial.
        try:
            self.study.tell(trial, values, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def _finished(self, study: optuna.Study, trial: FrozenTrial) -> None:
        result = result_of(trial)
        if result is not None and trial.state == TrialState.COMPLETE:
            for o in self.observers:
                o.trial_finished(trial, result, REUSED_ATTR in trial.user_attrs)

    def _cache(self) -> dict[str, tuple[int, TrialResult]]:
        """Measured results by reuse key (settings, and the host where the CPU takes part): this study's
        (read afresh, other workers add to it), then those of other studies with the same fingerprint
        (read once per run)."""
        if self._other_studies is None:
            self._other_studies = {}
            fp = asdict(self.fingerprint)
            for summary in optuna.get_all_study_summaries(storage=self.storage, include_best_trial=False):
                if summary.study_name != self.study.study_name and summary.user_attrs.get(FINGERPRINT_ATTR) == fp:
                    other = optuna.load_study(study_name=summary.study_name, storage=self.storage)
                    self._other_studies.update(_results_by_key(other, self.model.n_gpu_layers_all))
        return {**self._other_studies, **_results_by_key(self.study, self.model.n_gpu_layers_all)}

    def _objective(self, trial: Trial) -> list[float]:
        trial.set_user_attr(WORKER_ATTR, {"host": host_name(), "pid": os.getpid(), "gpu": self.env.gpu_name,
                                          "gpu_index": self.gpu_index, "hardware": self.env.hardware_key()})
        cfg = self.space.suggest(trial)
        if CONFIG_ATTR in trial.user_attrs:  # a baseline: measured exactly as given
            cfg = BenchConfig.from_dict(trial.user_attrs[CONFIG_ATTR])
        elif self.space.fit_layers:
            cfg = self.placement.fit(cfg)
        trial.set_user_attr(SETTINGS_ATTR, cfg.settings_key())
        if self._surplus(trial):
            self._surplus_seen = True
            trial.set_user_attr(SURPLUS_ATTR, True)
            give_back(self.study, self.storage.get_trial(trial._trial_id))  # a queued baseline or retry
            raise SurplusTrial("enough configurations are measured or being measured")
        self._wait_for_twin(trial, cfg.settings_key())
        key = reuse_key(cfg, self.env, n_gpu_layers_all=self.model.n_gpu_layers_all)
        hit = self._cache().get(key)
        kept = self.pending.get(key) if hit is None else None  # measured here, its trial never told
        if hit is not None:
            self.pending.drop(key)  # stored after all (its trial completed before the process went)
        for o in self.observers:
            o.trial_started(trial.number, cfg)
        predicted = self.memory.predict(cfg)
        if hit is not None:
            self._repeats += 1
            number, result = hit
            trial.set_user_attr(REUSED_ATTR, number)
        elif kept is not None:
            self._repeats = 0
            self._unsaved, result = key, TrialResult.from_dict(kept)
            self._saving(lambda: self._refit_memory(result), trial)
        elif BASELINE_ATTR not in trial.user_attrs and self.placement.too_big(predicted):
            self._repeats += 1
            trial.set_user_attr(SKIPPED_ATTR, True)
            result = TrialResult(Status.INVALID, cfg, self.model.path, predicted_peak_bytes=predicted, env=self.env,
                                 reason=f"predicted peak {predicted / 2**30:.2f} GiB exceeds the budget "
                                        f"{self.limits.budget_bytes / 2**30:.2f} GiB; not loaded")
        else:
            self._repeats = 0
            try:
                [result] = list(self.launcher.measure(self.model.path, [cfg]))
            except KeyboardInterrupt:
                trial.set_user_attr(INTERRUPTED_ATTR, True)
                raise
            result.predicted_peak_bytes = predicted  # made before measuring, to judge the model honestly
            result.bandwidth = bandwidth_of(result, self.memory.facts, self.env)
            self._unsaved = key
            self.pending.save(key, result.to_dict())  # before any write that the storage could refuse
            self._saving(lambda: self._refit_memory(result), trial)
        # Each write is retried on its own through a storage outage, so none asks a new trial.
        self._saving(lambda: trial.set_user_attr(RESULT_ATTR, result.to_dict()), trial)
        cons = constraints(result, self.limits)
        self._saving(lambda: self._set_constraints(trial, cons), trial)
        run_id = self.tracker.trial_measured(trial, result, cons)
        if run_id:
            self._saving(lambda: trial.set_user_attr(RUN_ID_ATTR, run_id), trial)
        worst = self._saving(lambda: worst_rates(self.study.get_trials(deepcopy=False)), trial)
        values, imputed = objective_values(result, worst)
        if imputed:
            self._saving(lambda: trial.set_user_attr(IMPUTED_ATTR, True), trial)
        return values

    def _set_constraints(self, trial: Trial, cons: dict[str, float]) -> None:
        """Set the trial's constraints; those an earlier, cut-off attempt already wrote are left alone."""
        written = self.storage.get_trial(trial._trial_id).system_attrs
        for key, value in cons.items():
            if f"constraints:{key}" not in written:
                trial.set_constraint(key, value)

    def _refit_memory(self, latest: TrialResult) -> None:
        measured = [r for r in (result_of(t) for t in measured_trials(self.study.get_trials(deepcopy=False))) if r]
        self.memory.fit(measured + [latest])

    def _wait_for_twin(self, trial: Trial, key: str) -> None:
        """If an earlier trial measures the same settings right now (or may: it has not said yet), wait for it."""
        deadline = time.monotonic() + self.settings.trial_timeout_s + grace_period(self.storage, GRACE_S)
        delay = 0.02
        while time.monotonic() < deadline:
            if not twins_ahead(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), trial.number, key):
                return
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
            if delay >= 1.0:
                self._clear_dead()

    def _surplus(self, trial: Trial) -> bool:
        """True when measured trials plus earlier running ones already reach the target; never for a
        baseline, which is measured whatever the count (a surplus baseline would be queued again and
        popped again for as long as it waits)."""
        if BASELINE_ATTR in trial.user_attrs:
            return False
        trials = self.study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number < trial.number
                   and not t.user_attrs.get(SURPLUS_ATTR)]
        return len(measured_trials(trials)) + len(running) >= self.target()


def _results_by_key(study: optuna.Study, n_gpu_layers_all: int) -> dict[str, tuple[int, TrialResult]]:
    """The study's measured results by :func:`reuse_key`, each keyed with the host that measured it."""
    out: dict[str, tuple[int, TrialResult]] = {}
    for t in measured_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        r = result_of(t)
        out.setdefault(reuse_key(r.config, r.env, n_gpu_layers_all=n_gpu_layers_all), (t.number, r))
    return out


def _alive(pid: Any) -> bool:
    try:
        return bool(pid) and psutil.pid_exists(int(pid)) and int(pid) != 0
    except (TypeError, ValueError):
        return False
