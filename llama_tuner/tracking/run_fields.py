"""What MLflow shows of a study: its experiment's kind, the parent run's params, and each trial run's
name, tags, times and metrics, chosen so that the MLflow UI is worth browsing without setup."""

from __future__ import annotations

import datetime as dt
from typing import Any

from llama_tuner import __version__
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import TrialResult
from llama_tuner.study.keys import (BASELINE_ATTR, FINGERPRINT_ATTR, LIMITS_ATTR, MODEL_FACTS_ATTR, MODEL_FILE_ATTR,
                              OBJECTIVE_ATTR, REQUEST_ATTR, REUSED_ATTR, SKIPPED_ATTR)

STUDY_TAG, TRIAL_TAG, KIND_TAG = "llama_tuner.study", "optuna_trial", "llama_tuner.kind"
# A trial's run is whole once it has this tag: it is written last, after the run's metrics, params, tags and final
# status, so a run whose writing was cut (MLflow went away, the process died) lacks it and ``sync`` rewrites it.
COMPLETE_TAG, COMPLETE = "llama_tuner.complete", "true"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's runs view, not its GenAI one
DECIMALS = {"tg_tps": 2, "tg_tps_stddev": 2, "pp_tps": 2, "pp_tps_stddev": 2, "load_time_s": 3, "context_time_s": 3,
            "wall_time_s": 3, "achieved_gbs": 2, "bandwidth_share": 4, "time_to_answer_s": 3, "tg_aggregate_tps": 2,
            "tg_per_stream_tps": 2, "seconds_per_answer": 3, "seconds_per_answer_p90": 3,
            "tokens_written_per_answer": 1, "thinking_tokens_per_answer": 1, "capped_share": 3, "draft_acceptance": 3}


def run_name(c: BenchConfig, user_attrs: dict[str, Any]) -> str:
    """A trial's settings as its run's name, e.g. ``ngl41 c16384 q8_0 fa b512/ub512 t8``."""
    kv = c.type_k if c.type_k == c.type_v else f"{c.type_k}/{c.type_v}"
    threads = f"t{c.n_threads}" if c.n_threads == c.n_threads_batch else f"t{c.n_threads}/{c.n_threads_batch}"
    moe = f" ncmoe{c.n_cpu_moe}" if c.n_cpu_moe else ""
    name = (f"ngl{c.n_gpu_layers}{moe} c{c.n_ctx} {kv} {'fa' if c.flash_attn else 'nofa'} b{c.n_batch}/ub{c.n_ubatch} "
            f"{threads}" + ("" if c.repack else " norepack"))
    return name + (f" ({user_attrs[BASELINE_ATTR]})" if BASELINE_ATTR in user_attrs else "")


def run_status(result: TrialResult, user_attrs: dict[str, Any]) -> str:
    """ok, oom, crash, timeout, load_error, invalid, or skipped (predicted over the budget, never loaded)."""
    return "skipped" if SKIPPED_ATTR in user_attrs else result.status.value


def run_times(result: TrialResult) -> tuple[int | None, int | None]:
    """The measurement's own start and end, in ms since the epoch (None where unknown)."""
    if not result.started_at:
        return None, None
    start = int(dt.datetime.fromisoformat(result.started_at).timestamp() * 1000)
    return start, start + int(1000 * (result.wall_time_s or 0))


def trial_tags(number: int, user_attrs: dict[str, Any], result: TrialResult, constraints: dict[str, float],
               study_name: str, attrs: dict[str, Any], parent_id: str | None) -> dict[str, str]:
    """The tags of a trial's run: its name, model, hardware, versions, status and where it belongs."""
    env, fp = result.env, attrs.get(FINGERPRINT_ATTR, {})
    facts = attrs.get(MODEL_FACTS_ATTR, {})
    tags = {
        STUDY_TAG: study_name, TRIAL_TAG: str(number), KIND_TAG: "trial",
        "mlflow.runName": run_name(result.config, user_attrs),
        "model_file": attrs.get(MODEL_FILE_ATTR, ""), "model_sha256": fp.get("model_sha256", ""),
        "architecture": facts.get("architecture", ""), "quant": facts.get("quant", ""),
        "gpu_name": env.gpu_name or "none", "gpu_driver": env.gpu_driver or "none",
        "llama_cpp_python": env.llama_cpp_python, "llama_cpp_build": env.llama_cpp_build,
        "llama_tuner": __version__, "host": env.host, "status": run_status(result, user_attrs),
        "failure_reason": result.reason[:500], "feasible": str(all(v <= 0 for v in constraints.values())),
    }
    for key in (BASELINE_ATTR, REUSED_ATTR):
        if key in user_attrs:
            tags[key] = str(user_attrs[key])
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return tags


def trial_metrics(result: TrialResult) -> dict[str, float]:
    """Means, deviations, memory and times of a result (only those measured), rounded to what they resolve."""
    out = {"tg_tps": result.tg_mean, "tg_tps_stddev": result.tg.stddev if result.tg else None,
           "pp_tps": result.pp_mean, "pp_tps_stddev": result.pp.stddev if result.pp else None,
           "peak_vram_bytes": result.peak_vram_bytes, "peak_rss_bytes": result.peak_rss_bytes,
           "headroom_bytes": result.headroom_bytes, "load_time_s": result.load_time_s,
           "context_time_s": result.context_time_s, "wall_time_s": result.wall_time_s}
    out.update(result.bandwidth or {})
    if result.ok and result.time_to_answer_s is not None:
        out["time_to_answer_s"] = result.time_to_answer_s
    if result.ok and result.config.workload == "server":
        out["tg_aggregate_tps"], out["tg_per_stream_tps"] = result.tg_mean, result.stream_tg_mean
    if result.predicted_peak_bytes is not None:
        out["predicted_peak_bytes"] = result.predicted_peak_bytes
    summary = result.answer_summary if result.ok else None
    if summary is not None:  # the scenarios: seconds per answer, tokens written, capped answers, drafts
        out.update({"seconds_per_answer": summary.median_s, "seconds_per_answer_p90": summary.p90_s,
                    "tokens_written_per_answer": summary.generated_tokens,
                    "thinking_tokens_per_answer": summary.thinking_tokens, "capped_share": summary.capped_share})
        if summary.acceptance is not None:
            out["draft_acceptance"] = summary.acceptance
    return {k: round(float(v), DECIMALS.get(k, 0)) for k, v in out.items() if v is not None}


def study_params(attrs: dict[str, Any]) -> dict[str, str]:
    """The study's request as the parent run's params: model, budget, limits, objective, test, trials."""
    request, limits = attrs.get(REQUEST_ATTR, {}), attrs.get(LIMITS_ATTR, {})
    test = attrs.get(FINGERPRINT_ATTR, {}).get("test", {})
    params = {"model": attrs.get(MODEL_FILE_ATTR, ""), "objective": attrs.get(OBJECTIVE_ATTR, ""),
              "vram_budget": request.get("vram_budget") or "all", "budget_bytes": limits.get("budget_bytes"),
              "min_headroom": request.get("min_headroom"), "min_ctx": limits.get("min_ctx"),
              "workload": f"{request.get('workload') or 'pp-tg'}: pp{test.get('n_prompt', '?')}+tg"
                          f"{test.get('n_gen', '?')}" + (f"@d{test['n_depth']}" if test.get("n_depth") else ""),
              "repetitions": test.get("repetitions"), "trials": request.get("trials"),
              "sampler": request.get("sampler"), "seed": request.get("seed"),
              "baseline": request.get("baseline_flags") or "none"}
    return {k: str(v) for k, v in params.items() if v is not None}


def answers_jsonl(result: TrialResult) -> str:
    """A scenarios result's answers as JSONL, one a line: the request's name and pass, its figures, its text."""
    import json

    return "".join(json.dumps(a.record(tokens=False), ensure_ascii=False) + "\n" for a in result.answers or [])
