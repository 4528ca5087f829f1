"""How a TrialResult lives in an Optuna study: objectives, constraints and attributes.

Objectives (all maximized): generation t/s, prompt t/s, context length.
Constraints (feasible when <= 0), set with ``trial.set_constraint``:

- ``ran_ok``: 0 when the measurement completed, 1 when it crashed, ran out of
  memory, timed out or could not load;
- ``memory_budget``: (peak - budget) / budget, the peak being VRAM on a GPU and
  RSS on a CPU-only machine;
- ``headroom``: (min_headroom - headroom) / budget, headroom being what the peak
  leaves of min(budget, memory free before the trial);
- ``min_ctx``: (min_ctx - n_ctx) / min_ctx;
- ``min_stream_tps`` (server workload with --min-stream-tps): (min - per-stream tg) / min;
- ``max_capped`` (scenarios with --max-capped below 1): the share of answers that hit their cap, less the most
  allowed.

A failed trial has no rates. Optuna's samplers still need numbers, so it carries
the study's worst measured rates, flagged ``imputed``: TPE and NSGA-II ignore the
values of infeasible trials, and the GP sampler sees "as bad as the worst seen".
Reports and presets only ever read the stored TrialResult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from optuna.trial import FrozenTrial, TrialState

from llama_tuner.measure.result import Status, TrialResult
from llama_tuner.study.keys import BASELINE_ATTR, RESULT_ATTR, REUSED_ATTR, SKIPPED_ATTR



@dataclass(frozen=True)
class Limits:
    """The study's memory and context requirements."""

    budget_bytes: int
    min_headroom_bytes: int
    min_ctx: int
    min_stream_tps: float = 0.0  # server workload: the generation rate every stream must see
    max_capped: float = 1.0  # scenarios: the share of answers that may hit their cap (1: any)


def constraints(result: TrialResult, limits: Limits) -> dict[str, float]:
    """Constraint values of a result (feasible when every value is <= 0)."""
    out = {"ran_ok": 0.0 if result.ok else 1.0,
           "min_ctx": (limits.min_ctx - result.config.n_ctx) / limits.min_ctx}
    if limits.min_stream_tps:
        stream = result.stream_tg_mean if result.ok else None
        out["min_stream_tps"] = (limits.min_stream_tps - stream) / limits.min_stream_tps if stream else 1.0
    if limits.max_capped < 1:
        summary = result.answer_summary if result.ok else None
        out["max_capped"] = summary.capped_share - limits.max_capped if summary else 1.0
    peak = result.peak_memory_bytes if result.ok else None
    if peak is None and result.predicted_peak_bytes is not None:
        peak = result.predicted_peak_bytes
    budget = limits.budget_bytes
    if peak is None:
        out["memory_budget"] = out["headroom"] = 0.0
        return out
    out["memory_budget"] = (peak - budget) / budget
    free = result.vram_free_before_bytes if result.env.uses_gpu else result.ram_available_before_bytes
    available = min(budget, free) if free is not None else budget
    out["headroom"] = (limits.min_headroom_bytes - (available - peak)) / budget
    return out


def is_feasible(result: TrialResult, limits: Limits) -> bool:
    """True when the result completed and meets every constraint."""
    return all(v <= 0 for v in constraints(result, limits).values())


def objective_values(result: TrialResult, worst: tuple[float, float] | None) -> tuple[list[float], bool]:
    """(tg, pp, n_ctx) for Optuna, and whether tg/pp were imputed (see module doc)."""
    if result.ok and result.tg_mean is not None and result.pp_mean is not None:
        return [result.tg_mean, result.pp_mean, float(result.config.n_ctx)], False
    tg, pp = worst if worst else (1.0, 1.0)
    return [tg, pp, float(result.config.n_ctx)], True


def result_of(trial: FrozenTrial) -> TrialResult | None:
    """The TrialResult stored on a trial, if any."""
    data = trial.user_attrs.get(RESULT_ATTR)
    return TrialResult.from_dict(data) if data else None


def measured_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials that measured their configuration (not copies, not skipped as too big)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and RESULT_ATTR in t.user_attrs
            and REUSED_ATTR not in t.user_attrs and SKIPPED_ATTR not in t.user_attrs]


def worst_rates(trials: Iterable[FrozenTrial]) -> tuple[float, float] | None:
    """The lowest measured tg and pp of the study, for imputing failed trials."""
    ok = [r for r in (result_of(t) for t in measured_trials(trials)) if r and r.ok]
    if not ok:
        return None
    return min(r.tg_mean for r in ok), min(r.pp_mean for r in ok)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """Flat description of a trial for tables and CSV."""
    r = result_of(trial)
    c = r.config if r else None
    return {
        "trial": trial.number, "state": trial.state.name.lower(),
        "status": r.status.value if r else None, "baseline": trial.user_attrs.get(BASELINE_ATTR),
        "reused_from": trial.user_attrs.get(REUSED_ATTR),
        "n_gpu_layers": c and c.n_gpu_layers, "n_ctx": c and c.n_ctx, "n_batch": c and c.n_batch,
        "n_ubatch": c and c.n_ubatch, "n_threads": c and c.n_threads, "n_threads_batch": c and c.n_threads_batch,
        "flash_attn": c and c.flash_attn, "type_k": c and c.type_k, "type_v": c and c.type_v,
        "tg_tps": r and r.tg_mean, "tg_sd": r and r.tg and r.tg.stddev,
        "pp_tps": r and r.pp_mean, "pp_sd": r and r.pp and r.pp.stddev,
        "peak_bytes": r and r.peak_memory_bytes, "headroom_bytes": r and r.headroom_bytes,
        "feasible": all(v <= 0 for v in trial.constraints.values()) if trial.constraints else None,
        "reason": r.reason if r and r.status != Status.OK else "",
    }
