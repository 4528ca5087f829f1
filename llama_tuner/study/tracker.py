"""What the study tells a tracker (MLflow, or nothing): the interface the study layer owns.

The real implementation, :class:`llama_tuner.tracking.mlflow_tracker.MlflowTracker`, sits in
the layer above, so the study never imports MLflow.
"""

from __future__ import annotations

from typing import Any, Callable

from llama_tuner.measure.result import TrialResult


class Tracker:
    """Receives a study's lifecycle; this base class records nothing (``--no-mlflow``)."""

    enabled = False  # whether anything is recorded (an MLflow tracker that lost its server turns it off)

    def study_started(self, study_name: str, attrs: dict[str, Any],
                      remember: Callable[[str, Any], None] | None = None) -> None:
        """A study starts or resumes; ``remember`` stores a value on the study (the parent run id)."""

    def trial_measured(self, trial, result: TrialResult, constraints: dict[str, float]) -> str | None:
        """A trial has its result (the trial is still running); returns the run id if logged."""
        return None

    def study_finished(self, view) -> None:
        """The study ended (or was synced): write the parent run's summary and artifacts."""

    def preset_served(self, view, preset: str, command: str) -> None:
        """``llama-tuner serve`` started ``preset`` of the study with ``command``."""

    def preset_verified(self, view, preset: str, record: dict[str, Any], metrics: dict[str, float]) -> None:
        """``llama-tuner verify`` measured ``preset`` of the study in llama-server (``record``, summed up in
        ``metrics``)."""
