"""MLflow tracking: one parent run per study, one nested run per trial, artifacts at the end.

The Optuna storage is the source of truth. When MLflow cannot be reached, or its
SQLite file is locked, the tracker warns once and stops trying for this run; the
study goes on, and ``llama-tuner sync STUDY`` later writes what is missing. Every
write first looks the run up by its tags (study, trial number), so syncing twice,
or after a crash between creating a run and recording its id, never duplicates.
A trial's run is whole only once its last write, the tag ``COMPLETE_TAG``, is in:
a run cut before it (created, but its metrics, params or final status not all
written) is deleted and written anew, so each trial ends with exactly one run.
What the parent run's files say (presets, commands, tables) is the report layer's
business: the caller hands the tracker a writer for them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llama_tuner import __version__
from llama_tuner.measure.result import TrialResult
from llama_tuner.study.keys import (ENVIRONMENT_ATTR, FINGERPRINT_ATTR, KV_QUALITY_ATTR, MODEL_FILE_ATTR,
                                    OBJECTIVE_ATTR, PARENT_RUN_ATTR, RESULT_ATTR, STUDY_RUN_PREFIX, TRACKING_URI_ATTR)
from llama_tuner.study.objectives import constraints as constraints_of
from llama_tuner.study.objectives import result_of
from llama_tuner.study.quality_gate import cache_kld
from llama_tuner.study.tracker import Tracker
from llama_tuner.tracking.plots import write_plots
from llama_tuner.tracking.run_fields import (COMPLETE, COMPLETE_TAG, EXPERIMENT_KIND, KIND_TAG, STUDY_TAG, TRIAL_TAG,
                                             answers_jsonl, run_times, study_params, trial_metrics, trial_tags)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
ArtifactWriter = Callable[[Any, Path], dict[str, float]]  # (study view, folder) -> summary metrics
Describer = Callable[[Any], str]  # study view -> the parent run's description (markdown)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def _experiment_name(attrs: dict[str, Any]) -> str:
    return Path(attrs.get(MODEL_FILE_ATTR, "model")).stem


class MlflowTracker(Tracker):
    """Logs to MLflow at ``uri``; degrades to a warning when MLflow is unavailable."""

    def __init__(self, uri: str, warn: Callable[[str], None], *, write_files: ArtifactWriter | None = None,
                 describe: Describer | None = None, artifact_root: str | None = None):
        """Log to ``uri``; ``warn`` hears of failures, ``write_files`` writes the parent run's files and
        ``describe`` its description."""
        if uri.startswith("http"):
            # Fail fast instead of MLflow's default minutes of retries: the study must not wait on tracking.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            artifact_root = artifact_root or str(Path(uri.removeprefix("sqlite:///")).parent.resolve() / "artifacts")
        self.uri, self.warn, self.artifact_root, self.write_files = uri, warn, artifact_root, write_files
        self.describe = describe
        self.enabled = True
        self._client = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.study_name = ""
        self.attrs: dict[str, Any] = {}
        self.remember: Callable[[str, Any], None] | None = None

    @property
    def client(self):
        """The MLflow client (imported lazily: mlflow is slow to import)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any MLflow failure must leave the study running
            self.enabled = False
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            self.warn(f"MLflow at {self.uri} failed while {what} ({first}); the study goes on, "
                      f"run `llama-tuner sync {self.study_name}` once MLflow is back")
            return None

    # -- lifecycle ----------------------------------------------------------
    def study_started(self, study_name: str, attrs: dict[str, Any],
                      remember: Callable[[str, Any], None] | None = None) -> None:
        self.study_name, self.attrs, self.remember = study_name, attrs, remember
        self._guard("opening the experiment", self._open)

    def _open(self) -> None:
        name = _experiment_name(self.attrs)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = exp.experiment_id
            if not EXPERIMENT_KIND.keys() <= exp.tags.keys():  # made by an older llama-tuner
                for key, value in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(self.experiment_id, key, value)
        # Workers of one study share the parent run its creator made (stored on the study).
        known = self.attrs.get(PARENT_RUN_ATTR) if self.attrs.get(TRACKING_URI_ATTR) == self.uri else None
        found = known or self._find({STUDY_TAG: self.study_name, KIND_TAG: "study"})
        if found:
            self.parent_id = found
            self._fill_params(found)
            return
        env = self.attrs.get(ENVIRONMENT_ATTR, {})
        tags = {STUDY_TAG: self.study_name, KIND_TAG: "study", "mlflow.runName": self.study_name,
                "model_file": self.attrs.get(MODEL_FILE_ATTR, ""), "objective": self.attrs.get(OBJECTIVE_ATTR, ""),
                "model_sha256": self.attrs.get(FINGERPRINT_ATTR, {}).get("model_sha256", ""),
                "gpu_name": env.get("gpu_name") or "", "host": env.get("host", ""), "llama_tuner": __version__}
        self.parent_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self._fill_params(self.parent_id)
        if self.remember:
            self.remember(PARENT_RUN_ATTR, self.parent_id)
            self.remember(TRACKING_URI_ATTR, self.uri)

    def _fill_params(self, parent_id: str) -> None:
        """Log the study's params that the parent run lacks (all of them, unless its writing was cut after
        creating it); those it has stay as they are, since MLflow never lets a param change."""
        from mlflow.entities import Param

        have = self.client.get_run(parent_id).data.params
        missing = [Param(k, v) for k, v in study_params(self.attrs).items() if k not in have]
        if missing:
            self.client.log_batch(parent_id, params=missing)

    def _search(self, tags: dict[str, str], max_results: int) -> list:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=max_results)

    def _find(self, tags: dict[str, str]) -> str | None:
        runs = self._search(tags, 1)
        return runs[0].info.run_id if runs else None

    def complete_run(self, number: int) -> str | None:
        """The id of trial ``number``'s whole run (one with the last write, ``COMPLETE_TAG``), or None; runs of
        that trial whose writing was cut are deleted, so that writing it again leaves exactly one.

        Raises:
            Exception: whatever MLflow raises when it cannot be reached.
        """
        runs = self._search({STUDY_TAG: self.study_name, TRIAL_TAG: str(number)}, 100)
        whole = [r.info.run_id for r in runs if r.data.tags.get(COMPLETE_TAG) == COMPLETE]
        for run in runs:
            if run.info.run_id not in whole:
                self.client.delete_run(run.info.run_id)
        return whole[0] if whole else None

    def trial_measured(self, trial, result: TrialResult, constraints: dict[str, float]) -> str | None:
        run_id = self._guard(f"logging trial {trial.number}",
                             lambda: self.log_trial(trial.number, trial.user_attrs, result, constraints))
        return run_id

    def log_trial(self, number: int, user_attrs: dict[str, Any], result: TrialResult,
                  constraints: dict[str, float]) -> str:
        """Find the trial's whole nested run, or create it and log everything; returns its run id.

        Raises:
            Exception: whatever MLflow raises when it cannot be reached.
        """
        if self.parent_id is None:
            self._open()
        return self.complete_run(number) or self.write_trial(number, user_attrs, result, constraints)

    def write_trial(self, number: int, user_attrs: dict[str, Any], result: TrialResult,
                    constraints: dict[str, float]) -> str:
        """Create the trial's nested run and log everything, ``COMPLETE_TAG`` last; returns its run id.

        Raises:
            Exception: whatever MLflow raises when it cannot be reached (the run then lacks ``COMPLETE_TAG``).
        """
        from mlflow.entities import Metric, Param, RunTag

        start, end = run_times(result)
        run = self.client.create_run(self.experiment_id, start_time=start,
                                     tags=trial_tags(number, user_attrs, result, constraints, self.study_name,
                                                     self.attrs, self.parent_id))
        now = end or int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in trial_metrics(result).items()]
        kld = cache_kld(result.config, self.attrs.get(KV_QUALITY_ATTR))
        if kld is not None:  # the answer quality of the trial's KV cache, beside its speed
            metrics.append(Metric("kv_kld_mean", round(kld, 5), now, 0))
        for key, rates in (("tg_tps_rep", result.tg), ("pp_tps_rep", result.pp)):
            if rates:
                metrics += [Metric(key, round(r, 2), now, i) for i, r in enumerate(rates.rates)]
        if result.ok and result.curve:  # the depth curve, as a chart of each trial's run: step = depth in tokens
            metrics += [Metric("tg_tps_at_depth", round(tg, 2), now, d)
                        for d, tg in zip(result.curve.depths, result.curve.tg_rates())]
        params = [Param(k, str(v)) for k, v in result.config.to_dict().items()]
        tags = [RunTag(f"constraint.{k}", f"{v:.4g}") for k, v in constraints.items()]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
        if result.answers:  # what each request was answered, beside its figures: a user reads them in the run
            self.client.log_text(run.info.run_id, answers_jsonl(result), "answers.jsonl")
        self.client.set_terminated(run.info.run_id, "FINISHED" if result.ok else "FAILED", end_time=end)
        self.client.set_tag(run.info.run_id, COMPLETE_TAG, COMPLETE)  # last: the run is whole
        return run.info.run_id

    def study_finished(self, view) -> None:
        self._guard("writing the study's artifacts", lambda: self.log_study_artifacts(view))

    def preset_served(self, view, preset: str, command: str) -> None:
        """Tag the study's parent run with the preset served last, when, and how."""
        def tag() -> None:
            self.study_name, self.attrs, self.remember = view.name, view.attrs, view.study.set_user_attr
            self._open()
            for key, value in {"served_preset": preset, "served_command": command[:5000],
                               "served_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
                self.client.set_tag(self.parent_id, key, value)

        self._guard("recording the served preset", tag)

    def preset_verified(self, view, preset: str, record: dict[str, Any], metrics: dict[str, float]) -> None:
        """Log what ``llama-tuner verify`` measured of ``preset`` on the study's parent run: ``metrics``, the tag
        ``verified_preset`` and the whole record as the artifact ``verify/<preset>.json``."""
        def log() -> None:
            from mlflow.entities import Metric

            self.study_name, self.attrs, self.remember = view.name, view.attrs, view.study.set_user_attr
            self._open()
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
            self.client.set_tag(self.parent_id, "verified_preset", preset)
            self.client.log_dict(self.parent_id, record, f"verify/{preset}.json")

        self._guard("recording the verified preset", log)

    def log_study_artifacts(self, view) -> None:
        """The plots, and the files of ``write_files`` (trials, presets, commands), on the parent run."""
        if self.parent_id is None:
            self._open()
        with tempfile.TemporaryDirectory(prefix="llama-tuner-artifacts-") as tmp:
            summary = self.write_files(view, Path(tmp)) if self.write_files else {}
            write_plots(view, Path(tmp))
            self.client.log_artifacts(self.parent_id, tmp)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        if self.describe:
            self.client.set_tag(self.parent_id, "mlflow.note.content", self.describe(view))
        self.client.set_terminated(self.parent_id, "FINISHED")  # a resumed study may still log to it


def sync(view, tracker: MlflowTracker) -> tuple[int, int]:
    """Write the runs MLflow lacks for ``view``'s study, and rewrite those whose writing was cut; returns
    (written, already there and whole).

    Raises:
        Exception: whatever MLflow raises when it cannot be reached (the caller reports it in one line).
    """
    tracker.study_name, tracker.attrs, tracker.remember = view.name, view.attrs, view.study.set_user_attr
    tracker._open()
    created = present = 0
    for t in view.study.get_trials(deepcopy=False):
        if RESULT_ATTR not in t.user_attrs or t.state.name != "COMPLETE":
            continue
        if tracker.complete_run(t.number):
            present += 1
            continue
        result = result_of(t)
        run_id = tracker.write_trial(t.number, t.user_attrs, result, constraints_of(result, view.limits))
        view.study.set_user_attr(f"{STUDY_RUN_PREFIX}{t.number}", run_id)
        created += 1
    tracker.log_study_artifacts(view)
    return created, present
