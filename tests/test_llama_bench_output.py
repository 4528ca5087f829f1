"""bench speaks llama-bench: its field names, order, types and formats, one row per test."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Environment, Rates, Status, TrialResult
from llama_tuner.measure.sweep import per_test_configs
from llama_tuner.model.twins import SHAPES, describe_shape
from llama_tuner.report.llama_bench_output import EXTRA_FIELDS, FIELDS, render, rows

ENV = Environment(host="h", cpu="Some CPU", physical_cores=2, ram_total_bytes=8 << 30, llama_cpp_python="0.3.36",
                  llama_cpp_build="ggml 0.25.3 (0c1e570-dirty)")
MODEL = describe_shape(SHAPES["tiny"], "q4_k_m", name="/models/tiny.gguf")
ASKED = BenchConfig(n_batch=2048, n_ubatch=512, n_threads=2, n_threads_batch=2, n_prompt=512, n_gen=128,
                    repetitions=2, flash_attn=True)


def measured(cfg: BenchConfig, status: Status = Status.OK) -> TrialResult:
    loaded = {"type": "llama ?B Q4_K - Medium", "size": 1073408, "n_params": 1705216}
    if status != Status.OK:
        return TrialResult(status, cfg, MODEL.path, reason="out of memory", env=ENV, loaded_model=loaded,
                           started_at="2026-12-01T23:00:00+00:00")
    return TrialResult(status, cfg, MODEL.path, env=ENV, loaded_model=loaded, started_at="2026-12-01T23:00:00+00:00",
                       pp=Rates(cfg.n_prompt, [10**9, 10**9]) if cfg.n_prompt else None,
                       tg=Rates(cfg.n_gen, [2 * 10**9, 10**9]) if cfg.n_gen else None,
                       peak_rss_bytes=50 << 20, bandwidth={"bytes_per_token": 1e6, "achieved_gbs": 0.1})


def test_without_a_context_each_test_runs_in_its_own_tokens_with_the_batch_clamped():
    pp, tg = per_test_configs(ASKED)
    assert (pp.n_prompt, pp.n_gen, pp.n_ctx, pp.n_batch, pp.n_ubatch) == (512, 0, 512, 512, 512)
    assert (tg.n_prompt, tg.n_gen, tg.n_ctx, tg.n_batch, tg.n_ubatch) == (0, 128, 128, 128, 128)
    deep = per_test_configs(BenchConfig(n_prompt=0, n_gen=64, n_depth=1000, n_batch=512, n_ubatch=256))
    assert [(c.n_ctx, c.n_batch, c.n_ubatch) for c in deep] == [(1064, 512, 256)]


def test_rows_carry_llama_bench_fields_and_meanings():
    pp_cfg, tg_cfg = per_test_configs(ASKED)
    table = rows(MODEL, measured(pp_cfg), ASKED) + rows(MODEL, measured(tg_cfg), ASKED)
    assert [(r["n_prompt"], r["n_gen"]) for r in table] == [(512, 0), (0, 128)]
    pp, tg = table
    assert pp["build_commit"] == "0c1e570" and pp["model_type"] == "llama ?B Q4_K - Medium"
    assert pp["n_batch"] == 2048 and pp["n_ubatch"] == 512  # as given, as llama-bench reports them
    assert pp["n_ctx"] == 512 and pp["test_time"] == "2026-12-01T23:00:00Z"
    assert pp["avg_ts"] == pytest.approx(512.0) and pp["avg_ns"] == 10**9 and pp["stddev_ns"] == 0
    assert tg["samples_ts"] == pytest.approx([64.0, 128.0]) and tg["avg_ts"] == pytest.approx(96.0)
    assert tg["bytes_per_token"] == 1e6 and pp["bytes_per_token"] is None  # bytes per token are of generation


def test_formats_keep_the_field_order_and_types_of_llama_bench():
    table = rows(MODEL, measured(per_test_configs(ASKED)[1]), ASKED)
    header = render("csv", table).splitlines()[0].split(",")
    assert tuple(header) == FIELDS + EXTRA_FIELDS
    [line] = list(csv.DictReader(io.StringIO(render("csv", table))))
    assert line["repack"] == "1" and line["avg_ts"] == "96.000000" and line["type_k"] == "f16"
    [j] = json.loads(render("json", table))
    assert list(j)[:len(FIELDS)] == list(FIELDS) and j["samples_ns"] == [2 * 10**9, 10**9]
    assert j["repack"] is True and j["flash_attn"] == 1 and isinstance(j["model_size"], int)
    assert json.loads(render("jsonl", table).splitlines()[0]) == j


def test_sql_output_loads_into_sqlite_as_llama_benchs_table():
    pp_cfg, tg_cfg = per_test_configs(ASKED)
    table = rows(MODEL, measured(pp_cfg), ASKED) + rows(MODEL, measured(tg_cfg, Status.OOM), ASKED)
    db = sqlite3.connect(":memory:")
    db.executescript(render("sql", table))
    columns = [r[1] for r in db.execute("PRAGMA table_info(llama_bench)")]
    assert tuple(columns[:len(FIELDS)]) == FIELDS
    got = db.execute("SELECT n_prompt, n_gen, avg_ts, status, typeof(avg_ts), typeof(n_batch) "
                     "FROM llama_bench").fetchall()
    assert got == [(512, 0, 512.0, "ok", "real", "integer"), (0, 128, 0.0, "oom", "real", "integer")]
