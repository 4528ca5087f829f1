"""Optuna storage and sampler construction for llama-tuner studies."""

from __future__ import annotations

import os
import warnings

import optuna
from llama_tuner.study.coordination import RetryStaleTrial
from llama_tuner.errors import UserError

HEARTBEAT_S, GRACE_S = 10, 60
DEFAULT_STORAGE = "sqlite:///studies/llama-tuner.db"
SAMPLERS = ("tpe", "random", "gp")


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage with heartbeats, so trials of dead workers are failed and retried.

    Connections are checked before use (``pool_pre_ping``), so a restarted
    PostgreSQL server is reconnected to instead of failing the worker.

    Raises:
        UserError: the storage URL cannot be opened.
    """
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, but they are what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryStaleTrial())
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad URL
        raise UserError(f"cannot open study storage {url}: {str(exc).splitlines()[0]}",
                        "check --storage (e.g. sqlite:///studies/llama-tuner.db or postgresql://...)") from None


def make_sampler(name: str, seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``--sampler``: tpe (default), random, or gp (needs PyTorch).

    Raises:
        UserError: an unknown sampler, or gp without PyTorch.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=max(5, min(10, trials // 4)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError("--sampler gp needs PyTorch", "pip install 'llama-tuner[gp]', or use tpe") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise UserError(f"unknown sampler {name!r}", "use tpe, random or gp")
