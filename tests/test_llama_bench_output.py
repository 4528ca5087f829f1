"""bench speaks llama-bench: its field names, order, types, defaults and formats, one row per test.

What llama-bench writes is read from its source, not restated: tests/data/llama-bench-0c1e570.cpp holds excerpts
of tools/llama-bench/llama-bench.cpp (its defaults, fields, field types and SQL printer) and
tests/data/compare-llama-bench-0c1e570.py.txt the pairing of scripts/compare-llama-bench.py, both of llama.cpp
commit 0c1e570, the one llama-cpp-python 0.3.36 vendors.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest

from conftest import assert_one_line_error
from llama_tuner.cli.bench import sweep_as_given
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Environment, Rates, Status, TrialResult
from llama_tuner.measure.sweep import per_test_configs
from llama_tuner.model.twins import SHAPES, describe_shape
from llama_tuner.report.llama_bench_output import render, rows

DATA = Path(__file__).parent / "data"
LLAMA_BENCH = (DATA / "llama-bench-0c1e570.cpp").read_text()
COMPARE = (DATA / "compare-llama-bench-0c1e570.py.txt").read_text()

ENV = Environment(host="h", cpu="Some CPU", physical_cores=2, ram_total_bytes=8 << 30, llama_cpp_python="0.3.36",
                  llama_cpp_build="ggml 0.25.3 (0c1e570-dirty)")
MODEL = describe_shape(SHAPES["tiny"], "q4_k_m", name="/models/tiny.gguf")
DESC = {"type": "llama ?B Q4_K - Medium", "size": 1073408, "n_params": 1705216}  # what llama_model_desc says
ASKED = BenchConfig(n_batch=2048, n_ubatch=512, n_threads=2, n_threads_batch=2, n_prompt=512, n_gen=128,
                    repetitions=2, flash_attn=True)


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i:text.index(end, i)]


def upstream_fields() -> list[str]:
    """llama-bench's fields, in order (test::get_fields)."""
    return re.findall(r'"(\w+)"', _between(LLAMA_BENCH, "get_fields() {", "return fields;"))


def upstream_types() -> dict[str, str]:
    """Each field's type, STRING, BOOL, INT or FLOAT (test::get_field_type; STRING where no test names it)."""
    body = _between(LLAMA_BENCH, "get_field_type(const std::string & field) {", "return STRING;\n    }")
    types = dict.fromkeys(upstream_fields(), "STRING")
    for cond, kind in re.findall(r"if \((.*?)\) \{\s*return (\w+);", body, re.S):
        types.update(dict.fromkeys((f for f in re.findall(r'field == "(\w+)"', cond) if f in types), kind))
    return types


def upstream_defaults() -> dict[str, str]:
    """cmd_params_defaults, each member's initializer as written (e.g. ``{ -1 }``)."""
    body = _between(LLAMA_BENCH, "cmd_params_defaults = {", "\n};")
    return {name: value.strip() for name, value in re.findall(r"/\* (\w+)\s*\*/ (.*?),?\s*$", body, re.M)}


# How test::get_values writes the defaults' enums and containers (llama.h's enum values, llama_load_mode_name,
# split_mode_str, ggml_type_name, the "%.2f" of tensor_split, "none" for no buffer-type override).
WRITTEN = {"LLAMA_FLASH_ATTN_TYPE_AUTO": "-1", "LLAMA_LOAD_MODE_AUTO": "auto", "LLAMA_SPLIT_MODE_LAYER": "layer",
           "GGML_TYPE_F16": "f16", "false": "0", "true": "1"}


def default_written(member: str) -> str:
    """A default of llama-bench as it writes it in a row."""
    value = upstream_defaults()[member].strip("{} ")
    if member == "tensor_split":
        return "0.00"
    if member == "tensor_buft_overrides":
        return "none"
    return WRITTEN.get(value, value.strip('"'))


def llama_bench_sql(row: dict[str, str]) -> str:
    """llama-bench's -o sql of one row, as its sql_printer writes it (header, then an INSERT of every field)."""
    sql_type = {"STRING": "TEXT", "BOOL": "INTEGER", "INT": "INTEGER", "FLOAT": "REAL"}  # get_sql_field_type
    fields, types = upstream_fields(), upstream_types()
    head = "CREATE TABLE IF NOT EXISTS llama_bench (\n" + ",\n".join(f"  {f} {sql_type[types[f]]}" for f in fields)
    values = ", ".join(f"'{row[f]}'" for f in fields)
    return f"{head}\n);\n\nINSERT INTO llama_bench ({', '.join(fields)}) VALUES ({values});\n"


def llama_bench_default_row(n_prompt: int, n_gen: int, **machine: str) -> dict[str, str]:
    """A row of llama-bench's default run, its settings from cmd_params_defaults; ``machine`` the facts of the
    machine, build and model, which both tools read alike."""
    members = {"n_batch", "n_ubatch", "type_k", "type_v", "cpu_mask", "cpu_strict", "poll", "n_gpu_layers",
               "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn", "tensor_split",
               "tensor_buft_overrides", "load_mode", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack"}
    row = {f: default_written(f) for f in members if f in upstream_defaults()}
    row["lazy_mode"] = "auto"  # LLAMA_LAZY_MODE_AUTO, as lazy_mode_str writes it
    row["repack"] = "1"  # llama_model_default_params().use_extra_bufts
    row.update(fit_target=default_written("fit_params_target"), fit_min_ctx=default_written("fit_params_min_ctx"),
               devices="auto", build_number="0", n_depth="0", n_prompt=str(n_prompt),
               n_gen=str(n_gen), test_time="2026-12-01T22:00:00Z", avg_ns="1000000", stddev_ns="0",
               avg_ts="100.000000", stddev_ts="0.000000", **machine)
    return row


def measured(cfg: BenchConfig, status: Status = Status.OK) -> TrialResult:
    if status != Status.OK:
        return TrialResult(status, cfg, MODEL.path, reason="out of memory", env=ENV, loaded_model=DESC,
                           started_at="2026-12-01T23:00:00+00:00")
    return TrialResult(status, cfg, MODEL.path, env=ENV, loaded_model=DESC, started_at="2026-12-01T23:00:00+00:00",
                       pp=Rates(cfg.n_prompt, [10**9, 10**9]) if cfg.n_prompt else None,
                       tg=Rates(cfg.n_gen, [2 * 10**9, 10**9]) if cfg.n_gen else None,
                       peak_rss_bytes=50 << 20, bandwidth={"bytes_per_token": 1e6, "achieved_gbs": 0.1})


def default_bench(model) -> list[dict]:
    """Our rows of ``bench MODEL`` given no setting (all values None, as the CLI passes them)."""
    out = []
    for cfg, given in sweep_as_given({"n_gpu_layers": None, "flash_attn": None, "use_mmap": None}, model):
        for test in per_test_configs(cfg):
            out += rows(model, measured(test), cfg, given=given)
    return out


def test_the_fixture_is_llama_benchs_source():
    fields, types = upstream_fields(), upstream_types()
    assert fields[:3] == ["build_commit", "build_number", "cpu_info"] and fields[-1] == "stddev_ts"
    assert len(fields) == 42 and types["avg_ts"] == "FLOAT" and types["repack"] == "BOOL"
    assert upstream_defaults()["n_gpu_layers"] == "{ -1 }"


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


def test_csv_and_json_have_llama_benchs_fields_in_its_order_and_types_then_ours():
    table = rows(MODEL, measured(per_test_configs(ASKED)[1]), ASKED)
    fields, types = upstream_fields(), upstream_types()
    header = render("csv", table).splitlines()[0].split(",")
    assert header[:len(fields)] == fields and "n_ctx" in header[len(fields):]
    [line] = list(csv.DictReader(io.StringIO(render("csv", table))))
    assert line["repack"] == "1" and line["avg_ts"] == "96.000000" and line["type_k"] == "f16"
    [j] = json.loads(render("json", table))
    assert list(j)[:len(fields) + 2] == fields + ["samples_ns", "samples_ts"] and j["samples_ns"] == [2 * 10**9, 10**9]
    json_type = {"STRING": str, "BOOL": bool, "INT": int, "FLOAT": float}  # llama-bench's format_json_value
    assert {f: type(j[f]) for f in fields} == {f: json_type[types[f]] for f in fields}
    assert json.loads(render("jsonl", table).splitlines()[0]) == j


def test_bench_defaults_are_llama_benchs(tiny_model):
    from llama_tuner.model.info import load_model_info

    model = load_model_info(tiny_model)
    [(cfg, given)] = sweep_as_given({"n_gpu_layers": None, "flash_attn": None, "use_mmap": None}, model)
    d = upstream_defaults()
    assert (cfg.n_prompt, cfg.n_gen, cfg.n_batch, cfg.n_ubatch, cfg.repetitions) == tuple(
        int(d[k].strip("{} ")) for k in ("n_prompt", "n_gen", "n_batch", "n_ubatch", "reps"))
    assert (str(given.n_gpu_layers), str(given.flash_attn), given.load_mode) == tuple(
        default_written(k) for k in ("n_gpu_layers", "flash_attn", "load_mode"))
    # measured: every layer (on a CPU build llama.cpp offloads nothing), flash attention as auto chooses it here
    assert cfg.n_gpu_layers == model.n_gpu_layers_all and cfg.flash_attn is True and cfg.use_mmap is True


@pytest.mark.parametrize("given,ngl,fa", [({"n_gpu_layers": "99", "flash_attn": "off"}, 99, 0),
                                          ({"n_gpu_layers": "0", "flash_attn": "-1"}, 0, -1),
                                          ({"flash_attn": "on"}, -1, 1)])
def test_bench_writes_settings_as_given_and_measures_them_resolved(tiny_model, given, ngl, fa):
    from llama_tuner.model.info import load_model_info

    model = load_model_info(tiny_model)
    [(cfg, as_given)] = sweep_as_given(given, model)
    assert (as_given.n_gpu_layers, as_given.flash_attn) == (ngl, fa)
    assert cfg.n_gpu_layers == (0 if ngl == 0 else model.n_gpu_layers_all) and cfg.flash_attn is (fa != 0)
    [pp, _] = [r for t in per_test_configs(cfg) for r in rows(model, measured(t), cfg, given=as_given)]
    assert (pp["n_gpu_layers"], pp["flash_attn"], pp["load_mode"]) == (ngl, fa, "auto")


def test_bench_flash_attention_must_be_on_off_or_auto(cli, tiny_model):
    assert_one_line_error(cli("bench", tiny_model, "-fa", "maybe"), "flash_attn must be on, off or auto")


def _llama_bench_db_row(db: sqlite3.Connection, model_type: str) -> None:
    db.executescript(llama_bench_sql(llama_bench_default_row(
        512, 0, build_commit="1234abc", cpu_info="Some CPU", gpu_info="", backends="CPU",
        model_filename=MODEL.path, model_type=model_type, model_size="1073408", model_n_params="1705216",
        n_threads="2")))


def test_sql_appends_to_a_database_llama_bench_made():
    db = sqlite3.connect(":memory:")
    _llama_bench_db_row(db, DESC["type"])
    pp_cfg, tg_cfg = per_test_configs(ASKED)
    db.executescript(render("sql", rows(MODEL, measured(pp_cfg), ASKED) + rows(MODEL, measured(tg_cfg), ASKED)))
    assert [r[1] for r in db.execute("PRAGMA table_info(llama_bench)")] == upstream_fields()
    got = db.execute("SELECT build_commit, n_prompt, n_gen, avg_ts, typeof(avg_ts), typeof(n_batch) FROM llama_bench "
                     "ORDER BY rowid").fetchall()
    assert got == [("1234abc", 512, 0, 100.0, "real", "integer"), ("0c1e570", 512, 0, 512.0, "real", "integer"),
                   ("0c1e570", 0, 128, 96.0, "real", "integer")]
    ours = db.execute("SELECT b.n_gen, t.n_ctx, t.status, t.peak_memory_bytes FROM llama_tuner t "
                      "JOIN llama_bench b ON b.rowid = t.bench_rowid ORDER BY b.rowid").fetchall()
    assert ours == [(0, 512, "ok", 50 << 20), (128, 128, "ok", 50 << 20)]


def test_llama_bench_appends_to_a_database_we_made_and_its_table_is_its_own():
    db = sqlite3.connect(":memory:")
    pp_cfg, tg_cfg = per_test_configs(ASKED)
    db.executescript(render("sql", rows(MODEL, measured(pp_cfg), ASKED) + rows(MODEL, measured(tg_cfg, Status.OOM),
                                                                               ASKED)))
    _llama_bench_db_row(db, DESC["type"])
    sql_type = {"STRING": "TEXT", "BOOL": "INTEGER", "INT": "INTEGER", "FLOAT": "REAL"}
    assert [(r[1], r[2]) for r in db.execute("PRAGMA table_info(llama_bench)")] == [
        (f, sql_type[upstream_types()[f]]) for f in upstream_fields()]
    # the failed test is not in llama-bench's table, whose rows are all measurements; it is in ours
    assert db.execute("SELECT build_commit, n_gen, avg_ts FROM llama_bench ORDER BY rowid").fetchall() == [
        ("0c1e570", 0, 512.0), ("1234abc", 0, 100.0)]
    assert db.execute("SELECT n_gen, status, reason, bench_rowid FROM llama_tuner ORDER BY n_gen").fetchall() == [
        (0, "ok", "", 1), (128, "oom", "out of memory", None)]


def compare_rows(db: sqlite3.Connection, baseline: str, compare: str) -> Sequence[tuple]:
    """compare-llama-bench.py's own query (its _get_rows_llama_bench, run from the fixture) over ``db``."""
    keys = re.findall(r'"(\w+)"', _between(COMPARE, "LLAMA_BENCH_KEY_PROPERTIES = [", "]"))
    source = textwrap.dedent(COMPARE[COMPARE.index("    def _get_rows_llama_bench"):])
    scope = {"LLAMA_BENCH_KEY_PROPERTIES": keys, "Sequence": Sequence}
    exec(source, scope)  # noqa: S102 - llama.cpp's code, copied into the fixture
    data = SimpleNamespace(cursor=db.cursor(), table_name="llama_bench")
    return scope["_get_rows_llama_bench"](data, ["model_type"], baseline, compare)


@pytest.mark.parametrize("ours_first", [False, True])
def test_compare_llama_bench_pairs_default_runs_of_both_tools(tiny_model, ours_first):
    from llama_tuner.model.info import load_model_info
    from llama_tuner.measure.config import physical_cores

    model = load_model_info(tiny_model)
    machine = dict(build_commit="1234abc", cpu_info=ENV.cpu, gpu_info="", backends="CPU", model_filename=model.path,
                   model_type=DESC["type"], model_size=str(DESC["size"]), model_n_params=str(DESC["n_params"]),
                   n_threads=str(physical_cores()))
    theirs = "".join(llama_bench_sql(llama_bench_default_row(p, n, **machine)) for p, n in ((512, 0), (0, 128)))
    ours = render("sql", default_bench(model))
    db = sqlite3.connect(":memory:")
    for script in ((ours, theirs) if ours_first else (theirs, ours)):
        db.executescript(script)
    got = compare_rows(db, "1234abc", "0c1e570")
    # (model_type, n_prompt, n_gen, n_depth, llama-bench's t/s, ours): each test of one paired with the other's
    assert [(r[:5], r[5] > 0) for r in got] == [((DESC["type"], 512, 0, 0, 100.0), True),
                                                 ((DESC["type"], 0, 128, 0, 100.0), True)]
