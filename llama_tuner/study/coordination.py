"""How many workers share one study without losing or repeating a measurement.

Optuna's RDB heartbeats fail the trials of workers that went silent; around them
this module adds what a study of expensive, non-repeatable measurements needs:

- :class:`Heartbeat` keeps beating through a database restart. Optuna's own thread
  dies at its first failed write, after which other workers would fail a trial that
  is still being measured, and measure its configuration a second time.
- :func:`requeue` queues a cut-off trial's configuration again with clean attributes.
  (Optuna's ``RetryHeartbeatStaleTrialCallback`` copies every attribute, including
  constraints, which ``Trial.set_constraint`` then refuses to overwrite.)
- :class:`OrphanSweeper` fails trials that ``study.ask()`` created but never handed
  back because the database went away in the middle of it: they have no heartbeat,
  so Optuna never sees them as stale, and they would hold a slot of the study forever.
- :func:`twins_ahead` names the earlier running trials a new trial must wait for so
  that two workers never measure the same settings at once.
- :func:`give_back` queues again what a surplus trial popped from the queue (a baseline,
  a retry), so failing the surplus trial loses no queued configuration.
- :class:`PendingResults` keeps a measurement on this machine from the moment it is
  taken until its trial is told, so a storage outage in between costs no measurement.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from llama_tuner.measure.environment import read_json_cache, write_json_atomic
from llama_tuner.study.keys import (BASELINE_ATTR, CONFIG_ATTR, RETRY_ATTR, SETTINGS_ATTR, START_ATTR, SURPLUS_ATTR,
                                    WORKER_ATTR)

_KEPT_ON_RETRY = (BASELINE_ATTR, CONFIG_ATTR)
_QUEUED_ATTRS = (BASELINE_ATTR, CONFIG_ATTR, RETRY_ATTR, START_ATTR)  # what enqueue_trial gives a queued trial


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue ``trial``'s configuration again as a new trial; False when there is nothing to retry.

    A retry that is cut off again is not retried once more: its configuration may be
    what kills the worker. A sampled trial cut off before it drew its parameters holds
    no configuration, so nothing is lost by not retrying it.
    """
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    if not params or RETRY_ATTR in trial.user_attrs:
        return False
    attrs = {RETRY_ATTR: trial.number, **{k: trial.user_attrs[k] for k in _KEPT_ON_RETRY if k in trial.user_attrs}}
    study.enqueue_trial(params, user_attrs=attrs)
    return True


def give_back(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue again what ``trial`` popped from the queue (its fixed parameters and queued attributes), because
    it ends without measuring them (a surplus trial); False when it was a sampled trial, which popped nothing."""
    fixed = trial.system_attrs.get("fixed_params")
    if not fixed:
        return False
    study.enqueue_trial(fixed, user_attrs={k: trial.user_attrs[k] for k in _QUEUED_ATTRS if k in trial.user_attrs})
    return True


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials whose configuration was queued again."""
    return {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}


class RetryStaleTrial:
    """Optuna's stale-trial callback: queue again the configuration of a trial whose worker went silent."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.number not in retried_numbers(study.get_trials(deepcopy=False)):
            requeue(study, trial)


class Heartbeat:
    """A trial's heartbeat, recorded every interval by a thread that outlives storage errors.

    Use as a context manager around the measurement. ``first_beat`` records the first
    heartbeat before the thread starts, through the caller's storage-outage retry, so a
    trial that carries a worker attribute always has a heartbeat Optuna can judge.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int,
                 first_beat: Callable[[Callable[[], None]], None] = lambda beat: beat()):
        self.storage, self.trial_id, self.first_beat = storage, trial_id, first_beat
        self.interval = _heartbeat_interval(storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.interval is not None:
            self.first_beat(lambda: self.storage.record_heartbeat(self.trial_id))
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - the database is away; beat again at the next interval
                pass


class OrphanSweeper:
    """Fails running trials that no worker ever claimed, once they have been seen unclaimed for a grace period.

    A claimed trial carries :data:`WORKER_ATTR`, set right after ``ask()`` returns. Times
    are this process's own monotonic clock, so hosts with skewed clocks do not matter.
    """

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic):
        self.grace_s, self.clock = grace_s, clock
        self._first_seen: dict[int, float] = {}

    def sweep(self, study: optuna.Study) -> list[int]:
        """Fail (and requeue, where they held a queued configuration) the orphans; return their numbers."""
        now, failed = self.clock(), []
        unclaimed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if WORKER_ATTR not in t.user_attrs]
        self._first_seen = {t._trial_id: self._first_seen.get(t._trial_id, now) for t in unclaimed}
        for t in unclaimed:
            if now - self._first_seen[t._trial_id] < self.grace_s:
                continue
            try:
                if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    failed.append(t.number)
                    requeue(study, t)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its owner finished it after all, or another worker swept it first
        return failed


def fail_stale(study: optuna.Study) -> None:
    """Optuna's check for trials whose heartbeat stopped (no-op without heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def twins_ahead(running: list[FrozenTrial], number: int, key: str) -> list[FrozenTrial]:
    """The earlier running trials that measure ``key`` or have not yet said what they measure.

    Waiting only for earlier trials (lower numbers) cannot deadlock; waiting for the
    ones that have no key yet closes the race in which a later trial publishes first.
    """
    return [t for t in running if t.number < number and not t.user_attrs.get(SURPLUS_ATTR)
            and t.user_attrs.get(SETTINGS_ATTR, key) == key]


def grace_period(storage: optuna.storages.BaseStorage, default: float) -> float:
    """The storage's heartbeat grace period in seconds, or ``default`` without heartbeats."""
    return float(getattr(storage, "grace_period", None) or default)


def _heartbeat_interval(storage: optuna.storages.BaseStorage) -> float | None:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter else None


class PendingResults:
    """Measurements taken on this machine whose trial has not been told yet, one JSON file per reuse key.

    A result is saved as soon as it is measured and dropped once its trial is COMPLETE in the storage. If
    the storage stays away in between (or the process dies), the file remains: the retry of that trial,
    queued on resume, takes the result from here instead of measuring it again. ``directory`` holds the
    results of one fingerprint (model file, hardware, build, test), so a result is only ever taken for
    the same measurement.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def for_fingerprint(cls, root: Path, fingerprint: dict[str, Any]) -> "PendingResults":
        """The pending results under ``root`` of the study fingerprint ``fingerprint`` (a dict)."""
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        return cls(root / digest)

    def path(self, key: str) -> Path:
        """The file of reuse key ``key``."""
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def save(self, key: str, result: dict[str, Any]) -> None:
        """Keep ``result`` (a TrialResult dict) for ``key``, atomically; a failure to write is ignored
        (the measurement is then only as safe as it was without this record)."""
        try:
            write_json_atomic(self.path(key), {"key": key, "result": result})
        except OSError:
            pass

    def get(self, key: str) -> dict[str, Any] | None:
        """The result kept for ``key``; None when there is none, or its file is unreadable or cut short."""
        data = read_json_cache(self.path(key))
        return data["result"] if data.get("key") == key and isinstance(data.get("result"), dict) else None

    def drop(self, key: str) -> None:
        """Forget the result of ``key`` (it is stored on a completed trial now)."""
        try:
            self.path(key).unlink()
        except OSError:
            pass
