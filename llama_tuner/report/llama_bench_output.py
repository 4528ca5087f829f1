"""``bench -o csv|json|jsonl|sql``: rows with llama-bench's field names and meanings, one per test.

The fields and their order are llama-bench's (``test::get_fields()`` of the llama.cpp that
llama-cpp-python 0.3.36 vendors), so scripts written for llama-bench, such as llama.cpp's
``scripts/compare-llama-bench.py``, read them. llama-tuner's own figures follow as extra
fields: the peak memory, bandwidth, and how the measurement ended (a failed test is a row
with no samples and its ``status`` and ``reason``, where llama-bench would print nothing).

Settings llama-bench writes as the user gave them (``-ngl -1``, ``-fa auto``, the load mode
``auto``) are written so, from :class:`AsGiven`, though llama-tuner measures their resolved
values; so ``compare-llama-bench.py`` pairs a row of ours with llama-bench's row of the same
command. SQL keeps llama-bench's table as llama-bench creates it, so that either tool's output
appends to a database the other made, and writes every test, with our fields, to a second
table, ``llama_tuner`` (see :func:`render`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Rates, TrialResult
from llama_tuner.model.info import ModelInfo
from llama_tuner.report.tables import backend

FORMATS = ("md", "csv", "json", "jsonl", "sql")
FIELDS = ("build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
          "model_size", "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
          "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload",
          "flash_attn", "devices", "tensor_split", "tensor_buft_overrides", "load_mode", "lazy_mode",
          "embeddings", "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx", "n_prompt", "n_gen",
          "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts")
INT_FIELDS = {"build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params",
              "n_gpu_layers", "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "no_op_offload",
              "n_cpu_moe", "fit_target", "fit_min_ctx", "flash_attn"}
BOOL_FIELDS = {"no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"}
FLOAT_FIELDS = {"avg_ts", "stddev_ts"}
EXTRA_FIELDS = ("n_ctx", "n_threads_batch", "peak_memory_bytes", "bytes_per_token", "achieved_gbs",
                "bandwidth_share", "status", "reason", "engine", "spec_type", "draft_n", "draft_accepted")
EXTRA_INT = {"n_ctx", "n_threads_batch", "peak_memory_bytes", "bytes_per_token", "draft_n", "draft_accepted"}
EXTRA_FLOAT = {"achieved_gbs", "bandwidth_share"}
# The SQL table of llama-tuner's rows: every test, llama-bench's fields then ours; bench_rowid is the test's row
# in llama_bench (NULL for a failed test, which llama-bench's table does not get).
TUNER_TABLE = "llama_tuner"


@dataclass(frozen=True, kw_only=True)
class AsGiven:
    """What llama-bench writes for settings llama-tuner measures resolved: ``n_gpu_layers`` as given (-1 or 99
    for all, where the configuration holds the model's layer count), ``flash_attn`` -1 for auto, 0 off or 1 on
    (the configuration holds on or off), and the ``load_mode`` name (auto, mmap or none)."""

    n_gpu_layers: int
    flash_attn: int
    load_mode: str

    @classmethod
    def of(cls, config: BenchConfig) -> "AsGiven":
        """The fields of a configuration given in full, with nothing left to llama.cpp to decide."""
        return cls(n_gpu_layers=config.n_gpu_layers, flash_attn=int(config.flash_attn),
                   load_mode="mmap" if config.use_mmap else "none")


def _commit(build: str) -> str:
    """The llama.cpp commit in llama-cpp-python's build string, e.g. "ggml 0.25.3 (0c1e570-dirty)", or in
    llama-server's version, "llama-server 0.5.0-dev (build 1, commit 0c1e570)"."""
    m = re.search(r"commit ([0-9a-f]{6,40})|\(([0-9a-f]{6,40})", build or "")  # llama-server's or ggml's
    return (m.group(1) or m.group(2)) if m else "unknown"


def _tests(result: TrialResult) -> list[tuple[int, int, Rates | None]]:
    """(n_prompt, n_gen, rates) of each llama-bench test in a result: pp then tg, those it ran."""
    c = result.config
    tests = []
    if c.n_prompt:
        tests.append((c.n_prompt, 0, result.pp))
    if c.n_gen:
        tests.append((0, c.n_gen, result.tg))
    return tests


def rows(model: ModelInfo, result: TrialResult, requested: BenchConfig, *,
         given: AsGiven | None = None) -> list[dict[str, Any]]:
    """One row per test of ``result``; ``requested`` is the configuration as the user gave it (llama-bench
    reports the batch sizes given, before llama.cpp clamps them to the context), ``given`` the settings as the
    user wrote them where llama-bench reports those (default: ``requested``'s)."""
    c, env = result.config, result.env
    given = given or AsGiven.of(requested)
    loaded = result.loaded_model or {}
    started = result.started_at and dt.datetime.fromisoformat(result.started_at).astimezone(dt.timezone.utc)
    common = {
        "build_commit": _commit(env.llama_cpp_build), "build_number": 0, "cpu_info": env.cpu,
        "gpu_info": env.gpu_name or "", "backends": backend(result),
        "model_filename": model.path, "model_type": loaded.get("type", f"{model.architecture} {model.quant}"),
        "model_size": loaded.get("size", model.file_size), "model_n_params": loaded.get("n_params", model.n_params),
        "n_batch": requested.n_batch, "n_ubatch": requested.n_ubatch, "n_threads": c.n_threads, "cpu_mask": "0x0",
        "cpu_strict": False, "poll": 50, "type_k": c.type_k, "type_v": c.type_v, "n_gpu_layers": given.n_gpu_layers,
        "n_cpu_moe": c.n_cpu_moe, "split_mode": "layer", "main_gpu": 0, "no_kv_offload": not c.offload_kqv,
        "flash_attn": given.flash_attn, "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none",
        "load_mode": given.load_mode, "lazy_mode": "auto", "embeddings": False,
        "no_op_offload": 0, "no_host": False, "repack": c.repack, "fit_target": 0, "fit_min_ctx": 0,
        "n_depth": c.n_depth, "test_time": started.strftime("%Y-%m-%dT%H:%M:%SZ") if started else "",
        "n_ctx": c.n_ctx, "n_threads_batch": c.n_threads_batch, "peak_memory_bytes": result.peak_memory_bytes,
        "status": result.status.value, "reason": result.reason, "engine": env.engine, "spec_type": c.spec_type,
    }
    out = []
    for n_prompt, n_gen, rates in _tests(result):
        samples = list(rates.samples_ns) if rates and result.ok else []
        ts = [(n_prompt + n_gen) * 1e9 / ns for ns in samples]
        row = {**common, "n_prompt": n_prompt, "n_gen": n_gen,
               "avg_ns": int(sum(samples) / len(samples)) if samples else 0,
               "stddev_ns": int(statistics.stdev(samples)) if len(samples) > 1 else 0,
               "avg_ts": rates.mean if samples else 0.0, "stddev_ts": rates.stddev if samples else 0.0,
               "samples_ns": samples, "samples_ts": ts}
        row.update(draft_n=result.draft_n if n_gen else None, draft_accepted=result.draft_accepted if n_gen else None)
        bw = result.bandwidth if n_gen else None  # bytes per token are of generation
        row.update({k: (bw or {}).get(k) for k in ("bytes_per_token", "achieved_gbs", "bandwidth_share")})
        out.append(row)
    return out


def _text(field: str, value: Any) -> str:
    """A value as llama-bench prints it in CSV and SQL (booleans as 0/1, floats with six decimals)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if field in FLOAT_FIELDS or field in EXTRA_FLOAT:
        return f"{value:.6f}"
    return str(value)


def _json_value(field: str, value: Any) -> Any:
    if field in BOOL_FIELDS:
        return bool(value)
    if field in INT_FIELDS or field in EXTRA_INT:
        return None if value is None else int(value)
    return value


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    keys = FIELDS + ("samples_ns", "samples_ts") + EXTRA_FIELDS
    return {k: _json_value(k, row.get(k)) for k in keys}


def _sql_type(field: str) -> str:
    """The column type llama-bench's SQL printer gives a field (booleans are integers)."""
    if field in INT_FIELDS or field in BOOL_FIELDS or field in EXTRA_INT or field == "bench_rowid":
        return "INTEGER"
    return "REAL" if field in FLOAT_FIELDS or field in EXTRA_FLOAT else "TEXT"


def _create_table(name: str, columns: tuple[str, ...]) -> list[str]:
    lines = [f"CREATE TABLE IF NOT EXISTS {name} ("]
    lines += [f"  {k} {_sql_type(k)}{',' if i < len(columns) - 1 else ''}" for i, k in enumerate(columns)]
    return lines + [");", ""]


def _sql_values(columns: tuple[str, ...], row: dict[str, Any]) -> str:
    """The row's values as llama-bench writes them, each a quoted string (NULL where we have no value)."""
    return ", ".join("NULL" if row.get(k) is None else "'" + _text(k, row.get(k)).replace("'", "''") + "'"
                     for k in columns)


def _sql(table: list[dict[str, Any]]) -> str:
    """llama-bench's ``CREATE TABLE IF NOT EXISTS llama_bench`` with its columns only, and an INSERT of each measured
    test, so that the script appends to a database llama-bench made and llama-bench to one this made; then every
    test with llama-tuner's fields in :data:`TUNER_TABLE`, keyed by the llama_bench row."""
    tuner_columns = ("bench_rowid",) + FIELDS + EXTRA_FIELDS
    lines = _create_table("llama_bench", FIELDS) + _create_table(TUNER_TABLE, tuner_columns)
    for r in table:
        measured = bool(r.get("samples_ns"))
        if measured:  # llama-bench prints no row for a test that failed; its table has no column to say so
            lines.append(f"INSERT INTO llama_bench ({', '.join(FIELDS)}) VALUES ({_sql_values(FIELDS, r)});")
        rowid = "last_insert_rowid()" if measured else "NULL"
        lines.append(f"INSERT INTO {TUNER_TABLE} ({', '.join(tuner_columns)}) "
                     f"VALUES ({rowid}, {_sql_values(FIELDS + EXTRA_FIELDS, r)});")
    return "\n".join(lines) + "\n"


def render(fmt: str, table: Iterable[dict[str, Any]]) -> str:
    """The rows in ``fmt`` (csv, json, jsonl or sql), as llama-bench writes that format; SQL as :func:`_sql`.

    Raises:
        ValueError: an unknown format.
    """
    table = list(table)
    columns = FIELDS + EXTRA_FIELDS
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        buf.write(",".join(columns) + "\n")
        for r in table:
            w.writerow([_text(k, r.get(k)) for k in columns])
        return buf.getvalue()
    if fmt == "json":
        return json.dumps([_ordered(r) for r in table], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(_ordered(r)) + "\n" for r in table)
    if fmt == "sql":
        return _sql(table)
    raise ValueError(f"unknown format {fmt!r}")
