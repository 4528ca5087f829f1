"""What a study is asked for and what makes its measurements comparable; who hears of its progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from optuna.trial import FrozenTrial

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import TrialResult


@dataclass(kw_only=True)
class StudySettings:
    """What the user asked the study for (stored on the study, checked on resume)."""

    trials: int
    objective: str = "tg"
    sampler: str = "tpe"
    seed: int | None = None
    timeout_s: float | None = None
    confirm_top: int = 3
    confirm_repetitions: int = 8  # the most rounds of a confirmation race (one repetition each)
    trial_timeout_s: float = 900.0


class SurplusTrial(Exception):
    """Raised in a trial started when the target was already reached by other workers; it ends FAILED."""


class Observer(Protocol):
    """Hears about the study's progress (the live display, MLflow tracking)."""

    def trial_started(self, number: int, config: BenchConfig) -> None:
        """Trial ``number`` is about to measure (or reuse) ``config``."""

    def trial_finished(self, trial: FrozenTrial, result: TrialResult, reused: bool) -> None:
        """A trial completed with ``result`` (``reused``: copied from an earlier measurement)."""


@dataclass
class Fingerprint:
    """What makes measurements comparable across studies: model file, hardware, build, test."""

    model_sha256: str
    hardware: str
    llama_cpp_build: str
    test: dict[str, int] = field(default_factory=dict)
