"""llama-bench-style sweeps: comma-separated values expand to every combination of configurations.
Their results print as llama-bench's table (:mod:`llama_tuner.report.tables`)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from llama_tuner.measure.config import CONTEXT_KEYS, MODEL_KEYS, SERVER_KEYS, TEST_KEYS, BenchConfig, InvalidConfig
from llama_tuner.model.info import ModelInfo

SWEEP_ORDER = MODEL_KEYS + CONTEXT_KEYS + SERVER_KEYS + TEST_KEYS


def expand_sweep(values: dict[str, str | None]) -> list[dict[str, str]]:
    """Every combination of comma-separated values, model settings varying slowest.

    Model-load settings lead the product, as in llama-bench, so consecutive
    configurations share a loaded model as long as possible.

    Raises:
        InvalidConfig: an empty value in a comma-separated list.
    """
    keys = [k for k in SWEEP_ORDER if values.get(k) not in (None, "")]
    lists = []
    for k in keys:
        items = [v.strip() for v in str(values[k]).split(",")]
        if any(not v for v in items):
            raise InvalidConfig(f"empty value in {k}={values[k]!r}", "separate values with single commas, e.g. 1,2")
        lists.append(items)
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def build_configs(values: dict[str, str | None], model: ModelInfo | None) -> list[BenchConfig]:
    """Validated, machine-resolved configurations for a sweep; InvalidConfig on the first bad one.

    Batch sizes the user did not give follow the ones given, as llama.cpp's own
    clamping would (batch <= context, ubatch <= batch); given values are checked.

    Raises:
        InvalidConfig: a combination llama.cpp would reject.
    """
    configs = []
    defaults = BenchConfig()
    for combo in expand_sweep(values):
        cfg = BenchConfig.from_dict(combo)
        if "n_ctx" not in combo and cfg.workload != "pp-tg":
            cfg = replace(cfg, n_ctx=cfg.context_needed())
        if "n_batch" not in combo:
            cfg = replace(cfg, n_batch=min(defaults.n_batch, cfg.n_ctx))
        if "n_ubatch" not in combo:
            cfg = replace(cfg, n_ubatch=min(defaults.n_ubatch, cfg.n_batch))
        configs.append(cfg.resolved(model))
    return configs


def per_test_configs(cfg: BenchConfig) -> list[BenchConfig]:
    """llama-bench's tests of ``cfg``: pp and tg measured apart, each in a context of its own tokens
    (``n_prompt`` or ``n_gen``, plus ``n_depth``), the batch sizes clamped to it as llama.cpp clamps them.
    This is what ``bench`` measures unless ``-c`` is given."""
    if cfg.workload != "pp-tg":  # one test of all its tokens
        n_ctx = cfg.context_needed()
        n_batch = min(cfg.n_batch, n_ctx)
        return [replace(cfg, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(cfg.n_ubatch, n_batch))]
    out = []
    for n_prompt, n_gen in ((cfg.n_prompt, 0), (0, cfg.n_gen)):
        if n_prompt or n_gen:
            n_ctx = n_prompt + n_gen + cfg.n_depth
            n_batch = min(cfg.n_batch, n_ctx)
            out.append(replace(cfg, n_prompt=n_prompt, n_gen=n_gen, n_ctx=n_ctx, n_batch=n_batch,
                               n_ubatch=min(cfg.n_ubatch, n_batch)))
    return out
