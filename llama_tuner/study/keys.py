"""Every key llama-tuner stores on an Optuna study or trial, in one place, with the schema's version.

A study is read back by other processes (workers, ``report``, ``export``, ``sync``)
and by later versions of llama-tuner, so what it stores is a format: a key is never
renamed or given another meaning without raising :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

SCHEMA_VERSION = 1  # 1: the layout of llama-tuner 0.1 (studies made before this key existed are version 1)

# -- on the study -------------------------------------------------------------
SCHEMA_ATTR = "schema_version"
FINGERPRINT_ATTR = "fingerprint"  # model sha256, hardware, llama.cpp build, test sizes: what makes figures comparable
MODEL_PATH_ATTR = "model_path"
MODEL_FILE_ATTR = "model_file"
MODEL_FACTS_ATTR = "model_facts"  # tuner.model.facts.ModelFacts as a dict: reports need no model file
LIMITS_ATTR = "limits"  # tuner.study.objectives.Limits as a dict
OBJECTIVE_ATTR = "objective"  # what "fastest" means: tg, pp or balanced
ENVIRONMENT_ATTR = "environment"  # tuner.measure.result.Environment as a dict
REQUEST_ATTR = "request"  # the options of `tune` (llama_tuner.study.session.StudyRequest), for workers
KV_QUALITY_ATTR = "kv_quality"  # tuner.study.quality_gate's record: each cache type's KLD, and --max-kld
CONFIRM_PREFIX = "confirm:"  # + trial number: its interleaved re-measurement (a TrialResult dict)
RACE_ATTR = "race"  # the latest confirmation race: {batch, trials, rounds, complete}, written every round
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRACKING_URI_ATTR = "mlflow_tracking_uri"
STUDY_RUN_PREFIX = "mlflow_run:"  # + trial number: the MLflow run that `sync` wrote for it
VERIFY_PREFIX = "verify:"  # + preset name: its latest `verify` in llama-server (cli/verify.py's record)

# -- on a trial ---------------------------------------------------------------
RESULT_ATTR = "result"  # tuner.measure.result.TrialResult as a dict
REUSED_ATTR = "reused_from"  # the trial whose measurement of the same settings this one reuses
IMPUTED_ATTR = "imputed_values"  # the objective values are the study's worst (a failed trial)
BASELINE_ATTR = "baseline"  # the baseline's name (DEFAULTS_BASELINE, "yours")
SCENARIOS_ATTR = "scenarios"  # the scenarios workload: the requests every trial answered (their lines, as dicts)
TG_PROMPT_ATTR = "tg_prompt"  # llama-server engine: the request in words whose answer tg measured
MEMORY_PRIOR_ATTR = "memory_prior"  # [(formula, llama.cpp's dry run)] bytes of the space's corners, before measuring
DEFAULTS_BASELINE = "llama-server defaults (fit)"  # what llama-server runs when given only the model
SKIPPED_ATTR = "skipped"  # predicted not to fit the budget; never loaded
INTERRUPTED_ATTR = "interrupted"  # cut by Ctrl-C: retried on resume
START_ATTR = "start_point"  # the first sampled point on a GPU (Placement.start_point)
WORKER_ATTR = "worker"  # host, pid and GPU of the process measuring the trial; set first thing
CONFIG_ATTR = "config"  # a baseline's exact configuration
RETRY_ATTR = "retry_of"  # the trial whose cut-off measurement this one retries
SURPLUS_ATTR = "surplus"  # started when the target was already reached elsewhere
SETTINGS_ATTR = "settings_key"  # BenchConfig.settings_key(): which trials measure the same thing
RUN_ID_ATTR = "mlflow_run_id"

OBJECTIVE_NAMES = ("tg_tps", "pp_tps", "n_ctx")  # Optuna's metric names, all maximized
