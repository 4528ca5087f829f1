"""Workers sharing one study: heartbeats through outages, orphans, clean retries, twin waits."""

from __future__ import annotations

import threading
import time

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from llama_tuner.study.coordination import (RETRY_ATTR, SETTINGS_ATTR, SURPLUS_ATTR, WORKER_ATTR, Heartbeat,
                                            OrphanSweeper, RetryStaleTrial, requeue, twins_ahead)
from llama_tuner.testing.fakes import FakeLauncher
from llama_tuner.study.storage import make_storage
from llama_tuner.study.objectives import BASELINE_ATTR, measured_trials
from llama_tuner.study.session import StudyRequest, open_tuner
from test_study import ENV

optuna.logging.set_verbosity(optuna.logging.ERROR)
X = {"x": IntDistribution(0, 9)}


def _running(number: int, **attrs) -> optuna.trial.FrozenTrial:
    t = create_trial(state=TrialState.RUNNING, params={"x": 1}, distributions=X, user_attrs=attrs)
    t.number = number
    return t


def test_a_trial_waits_for_earlier_trials_with_its_key_or_no_key_yet():
    running = [_running(1, **{SETTINGS_ATTR: "k"}), _running(2), _running(3, **{SETTINGS_ATTR: "other"}),
               _running(4, **{SETTINGS_ATTR: "k", SURPLUS_ATTR: True}), _running(9, **{SETTINGS_ATTR: "k"})]
    assert [t.number for t in twins_ahead(running, 5, "k")] == [1, 2]  # not 3 (other), 4 (surplus), 9 (later)
    assert twins_ahead(running, 1, "k") == []  # the earliest never waits: no deadlock


def test_requeue_keeps_the_configuration_and_the_baseline_but_nothing_measured():
    study = optuna.create_study(directions=["maximize"])
    cut = create_trial(state=TrialState.FAIL, params={"x": 3}, distributions=X,
                       user_attrs={BASELINE_ATTR: "yours", "result": {"tg": 1}, SURPLUS_ATTR: True},
                       system_attrs={"constraints:ran_ok": 1.0})
    study.add_trial(cut)
    assert requeue(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs == {"fixed_params": {"x": 3}}
    assert retry.user_attrs == {RETRY_ATTR: 0, BASELINE_ATTR: "yours"}
    assert not requeue(study, retry)  # a retry that is cut again is not retried: it may be the killer
    no_params = create_trial(state=TrialState.FAIL, params={}, distributions={})
    study.add_trial(no_params)
    assert not requeue(study, study.trials[2])  # it never drew a configuration: nothing is lost


def test_a_stale_trial_is_retried_once_without_its_constraints(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_s=1, grace_s=1)
    study = optuna.create_study(storage=storage, directions=["maximize"])
    trial = study.ask()
    trial.suggest_int("x", 0, 9)
    trial.set_constraint("ran_ok", -1.0)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.2)
    optuna.storages.fail_stale_trials(study)  # fails it and calls make_storage's RetryStaleTrial
    RetryStaleTrial()(study, study.trials[0])  # called again (another worker): no second retry
    retries = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(retries) == 1 and retries[0].user_attrs == {RETRY_ATTR: 0}
    assert not any(k.startswith("constraints") for k in retries[0].system_attrs)


class _FlakyStorage:
    """record_heartbeat fails while ``down`` is set, as during a database restart."""

    def __init__(self):
        self.down, self.beats, self.lock = True, 0, threading.Lock()

    def get_heartbeat_interval(self):
        return 0.02

    def record_heartbeat(self, trial_id):
        if self.down:
            raise ConnectionError("server closed the connection")
        with self.lock:
            self.beats += 1


def test_the_heartbeat_keeps_beating_after_the_database_comes_back():
    storage = _FlakyStorage()
    first = []
    with Heartbeat(storage, 7, first_beat=lambda beat: first.append(beat)):  # the caller retries the first beat
        time.sleep(0.1)  # every beat fails: Optuna's own thread would be dead now
        storage.down = False
        time.sleep(0.2)
    assert len(first) == 1 and storage.beats >= 3


def test_an_unclaimed_running_trial_is_failed_after_the_grace_period(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", directions=["maximize"])
    study.enqueue_trial({"x": 4}, user_attrs={BASELINE_ATTR: "yours"})
    orphan = study.ask()  # an ask that "failed" after the trial was created: nobody claims it
    claimed = study.ask()
    claimed.set_user_attr(WORKER_ATTR, {"pid": 1})
    now = [0.0]
    sweeper = OrphanSweeper(grace_s=60, clock=lambda: now[0])
    assert sweeper.sweep(study) == []
    now[0] = 61.0
    assert sweeper.sweep(study) == [orphan.number]
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL and states[claimed.number] == TrialState.RUNNING
    retry = study.trials[-1]  # the orphan held a queued baseline: it is queued again, not lost
    assert retry.state == TrialState.WAITING and retry.user_attrs[BASELINE_ATTR] == "yours"


def test_a_study_completes_despite_an_orphan_holding_a_slot(long_context_model, tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    request = StudyRequest(model=str(long_context_model), storage=url, trials=4, seed=1)
    storage = make_storage(url, heartbeat_s=1, grace_s=2)
    tuner = open_tuner(request, launcher=FakeLauncher(env=ENV), env=ENV, storage=storage)
    tuner.run()
    request.trials = 6
    tuner = open_tuner(request, launcher=FakeLauncher(env=ENV), env=ENV, storage=storage)
    orphan = tuner.study.ask()  # counts as running: without the sweep the last slot would be held forever
    done = threading.Event()
    worker = threading.Thread(target=lambda: (tuner.run(), done.set()), daemon=True)
    worker.start()
    assert done.wait(60), "the study hung on the orphaned trial"
    assert len(measured_trials(tuner.study.trials)) == 6
    assert tuner.study.trials[orphan.number].state == TrialState.FAIL
