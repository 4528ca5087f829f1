"""What a study is asked for and what makes its measurements comparable; who hears of its progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from optuna.trial import FrozenTrial

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Environment, TrialResult


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
    """What makes measurements comparable across studies: model file, hardware, build, test.

    ``hardware`` names the GPU (or, without one, the CPU) and is what a study and its workers must share.
    Where a configuration runs layers or experts on the CPU, the host also matters: :func:`reuse_key`
    adds it to the key under which a stored result is reused, so the fingerprint (and every stored
    study) stays as it was.
    """

    model_sha256: str
    hardware: str
    llama_cpp_build: str
    test: dict[str, int] = field(default_factory=dict)


def host_key(env: Environment) -> str:
    """What of the host a partial offload depends on: CPU model, physical cores, RAM in whole GiB."""
    return f"{env.cpu}|{env.physical_cores} cores|{round(env.ram_total_bytes / 2**30)} GiB"


def uses_cpu(config: BenchConfig, env: Environment, *, n_gpu_layers_all: int) -> bool:
    """True when some of ``config``'s model runs on the CPU: always where llama.cpp uses no GPU, else when
    layers (``n_gpu_layers`` below ``n_gpu_layers_all``; -1 means all), experts (``n_cpu_moe``) or the KV
    cache (``offload_kqv`` off) stay in host memory."""
    if not (env.gpu_name and env.gpu_offload):
        return True
    return 0 <= config.n_gpu_layers < n_gpu_layers_all or config.n_cpu_moe > 0 or not config.offload_kqv


def reuse_key(config: BenchConfig, env: Environment, *, n_gpu_layers_all: int) -> str:
    """The key under which a result of ``config`` measured in ``env`` is reused: its settings, and the host
    (:func:`host_key`) where the CPU takes part, so hosts with another CPU or RAM do not share it."""
    key = config.settings_key()
    return f"{key}|{host_key(env)}" if uses_cpu(config, env, n_gpu_layers_all=n_gpu_layers_all) else key
