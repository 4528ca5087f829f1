"""Real measurements in real child processes with the CPU build of llama-cpp-python."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import version

import psutil
import pytest

from conftest import REPACK_WORKS, assert_one_line_error
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.launcher import SubprocessLauncher
from llama_tuner.measure.probe import NoGpuProbe
from llama_tuner.measure.repack_check import CHECK, cpu_has_amx, repack_crash_reason
from llama_tuner.measure.result import Status, TrialResult
from llama_tuner.report.llama_bench_output import FIELDS

FAST = dict(n_ctx=512, n_batch=128, n_ubatch=128, n_prompt=128, n_gen=16, repetitions=3, n_threads=1,
            repack=REPACK_WORKS)


def measure(model, configs, timeout_s=120, fault=None, **kw):
    env = {"LLAMA_TUNER_TEST_FAULT": fault} if fault else {}
    return list(SubprocessLauncher(NoGpuProbe(), timeout_s=timeout_s, extra_env=env, **kw).measure(str(model), configs))


@pytest.mark.slow
def test_measures_a_generated_model_like_llama_bench(tiny_model):
    [r] = measure(tiny_model, [BenchConfig(**FAST)])
    assert r.status == Status.OK, r.reason
    assert len(r.pp.samples_ns) == 3 and len(r.tg.samples_ns) == 3
    assert r.pp.n_tokens == 128 and r.tg.n_tokens == 16
    assert all(x > 0 for x in r.pp.rates + r.tg.rates)
    assert r.pp_mean > r.tg_mean  # batched prompt tokens are cheaper than single decodes
    assert r.load_time_s > 0 and r.context_time_s > 0
    assert r.peak_rss_bytes > 10 * 2**20 and r.headroom_bytes > 0
    assert r.env.llama_cpp_python == version("llama-cpp-python") and r.env.llama_cpp_build.startswith("ggml")
    assert r.env.gpu_offload is False and r.env.host and r.env.physical_cores >= 1
    assert r.config.n_threads_batch == 1  # resolved before launch, so "threads=1" is really one


@pytest.mark.slow
def test_context_only_changes_reuse_the_loaded_model(small_model):
    configs = [BenchConfig(**{**FAST, "flash_attn": fa}) for fa in (False, True)]
    configs.append(BenchConfig(**{**FAST, "n_depth": 64}))
    results = measure(small_model, configs)
    assert [r.status for r in results] == [Status.OK] * 3
    assert len({r.load_time_s for r in results}) == 1  # one load event served all three
    assert results[2].config.n_depth == 64 and results[2].tg_mean > 0


@pytest.mark.slow
def test_a_changed_model_setting_reloads(small_model):
    results = measure(small_model, [BenchConfig(**FAST), BenchConfig(**{**FAST, "use_mmap": False})])
    assert [r.status for r in results] == [Status.OK, Status.OK]
    assert results[0].load_time_s != results[1].load_time_s


THREADPOOL_CHECK = """
import json, sys
from llama_cpp import llama_cpp as C
from llama_tuner.measure.child import load_model, new_context
from llama_tuner.measure.timer import Timer
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.threadpool import attach_threadpools

C.llama_backend_init()
model, _ = load_model(sys.argv[1], {"n_gpu_layers": 0, "repack": sys.argv[2] == "1"})
out = {}
for threads, batch in ((1, 1), (1, 2)):
    cfg = BenchConfig(n_ctx=256, n_batch=64, n_ubatch=64, n_prompt=64, n_gen=4, repetitions=1,
                      n_threads=threads, n_threads_batch=batch).to_dict()
    ctx = new_context(model, cfg)
    pools = attach_threadpools(ctx, threads, batch)
    timings = Timer(ctx, model, cfg).run()
    C.llama_free(ctx)
    n = len(pools.pools)
    pools.free()
    pools.free()
    out[f"{threads},{batch}"] = [n, len(timings["pp_ns"]), len(timings["tg_ns"]), len(pools.pools)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_contexts_get_cpu_threadpools_as_in_llama_bench(tiny_model):
    """One pool when batches use as many threads as generation, a second one when not; both time."""
    proc = subprocess.run([sys.executable, "-c", THREADPOOL_CHECK, str(tiny_model), str(int(REPACK_WORKS))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"1,1": [1, 1, 1, 0], "1,2": [2, 1, 1, 0]}
    assert proc.stderr.count("attach_threadpool: call") == 2  # llama.cpp's own debug line


@pytest.mark.slow
def test_invalid_config_is_recorded_not_launched(tiny_model):
    results = measure(tiny_model, [BenchConfig(**{**FAST, "type_v": "q4_0"}), BenchConfig(**FAST)])
    assert results[0].status == Status.INVALID and "flash attention" in results[0].reason
    assert results[0].wall_time_s is None and results[1].status == Status.OK


@pytest.mark.slow
@pytest.mark.parametrize("fault,status,signal_name", [
    ("abort@pp#0", Status.CRASH, "SIGABRT"),
    ("segv@tg#0", Status.CRASH, "SIGSEGV"),
    ("sigill@pp#0", Status.CRASH, "SIGILL"),
])
def test_a_crashing_child_is_a_result_and_the_next_config_still_runs(tiny_model, fault, status, signal_name):
    results = measure(tiny_model, [BenchConfig(**FAST), BenchConfig(**{**FAST, "n_threads": 2})], fault=fault)
    assert results[0].status == status and results[0].signal == signal_name
    assert signal_name in results[0].reason and "test fault" in results[0].log_tail
    assert results[1].status == Status.OK  # measured by a fresh child


@pytest.mark.slow
def test_sigill_names_the_amx_kernels_and_the_fix(tiny_model):
    [r] = measure(tiny_model, [BenchConfig(**FAST)], fault="sigill@pp")
    assert r.status == Status.CRASH and "ggml-org/llama.cpp#26954" in r.reason and "--repack 0" in r.reason


@pytest.mark.slow
def test_the_repack_check_agrees_with_a_real_measurement(tiny_model):
    """Repack off always runs; repack on crashes exactly where the check says it does."""
    on, off = measure(tiny_model, [BenchConfig(**{**CHECK.to_dict(), "repack": r}) for r in (True, False)])
    assert off.status == Status.OK, off.reason
    if on.status == Status.OK:
        assert SubprocessLauncher(NoGpuProbe()).repack_crash() is None
    else:
        assert on.status == Status.CRASH and on.signal in ("SIGILL", "SIGSEGV"), on.reason
        assert cpu_has_amx() and SubprocessLauncher(NoGpuProbe()).repack_crash() == on.reason


def test_repack_is_said_to_crash_only_when_on_dies_of_a_signal_and_off_runs():
    cfg = BenchConfig(**FAST)
    died = TrialResult(Status.CRASH, cfg, "m", reason="child died of SIGSEGV", signal="SIGSEGV")
    ran = TrialResult(Status.OK, cfg, "m")
    assert repack_crash_reason(died, ran) == "child died of SIGSEGV"
    assert repack_crash_reason(ran, ran) is None
    assert repack_crash_reason(died, died) is None  # both crash: repack is not the cause
    assert repack_crash_reason(TrialResult(Status.CRASH, cfg, "m", reason="exit 3", exit_code=3), ran) is None


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    (tmp_path / "amx").write_text("processor : 0\nflags : fpu sse avx512f amx_bf16 amx_tile amx_int8\n")
    (tmp_path / "plain").write_text("processor : 0\nflags : fpu sse avx2\n")
    assert cpu_has_amx(str(tmp_path / "amx")) and not cpu_has_amx(str(tmp_path / "plain"))
    assert not cpu_has_amx(str(tmp_path / "missing"))


@pytest.mark.slow
def test_a_child_that_exits_without_a_result_is_a_crash(tiny_model):
    [r] = measure(tiny_model, [BenchConfig(**FAST)], fault="exit@context")
    assert r.status == Status.CRASH and r.exit_code == 3 and "code 3" in r.reason


@pytest.mark.slow
def test_a_hanging_child_is_killed_at_the_timeout(tiny_model):
    t0 = time.monotonic()
    [r] = measure(tiny_model, [BenchConfig(**FAST)], timeout_s=3, fault="hang@pp")
    assert r.status == Status.TIMEOUT and "3 s" in r.reason
    assert time.monotonic() - t0 < 30
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "llama_tuner.measure.child" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(120)  # before the fix the launcher waited for such a child forever
def test_a_child_that_hangs_after_sending_its_results_is_killed_and_its_results_kept(tiny_model):
    t0 = time.monotonic()
    [r] = measure(tiny_model, [BenchConfig(**FAST)], fault="hang@shutdown", exit_grace_s=1)
    assert r.status == Status.OK, r.reason
    assert time.monotonic() - t0 < 60
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "llama_tuner.measure.child" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


@pytest.mark.slow
def test_an_unknown_architecture_is_a_load_error(unknown_arch_model):
    [r] = measure(unknown_arch_model, [BenchConfig(**FAST)])
    assert r.status == Status.LOAD_ERROR and "unknown model architecture" in r.reason


@pytest.mark.slow
def test_running_out_of_memory_is_oom(long_context_model):
    # Under a 1.5 GiB cap the 4096-token context fits; the full 2 GiB KV cache cannot.
    configs = [BenchConfig(**{**FAST, "n_ctx": 4096}), BenchConfig(**{**FAST, "n_ctx": 131072})]
    small, full = measure(long_context_model, configs, ram_limit_bytes=1536 * 2**20)
    assert small.status == Status.OK, small.reason
    assert full.status == Status.OOM and "allocate" in full.reason, (full.status, full.reason)


@pytest.mark.slow
def test_bench_cli_sweeps_and_prints_a_table(run_cli, tiny_model):
    r = run_cli("bench", tiny_model, "-t", "1,2", "-c", 512, "-b", 128, "-p", 64, "-n", 8, "-r", 2,
                "--repack", int(REPACK_WORKS))
    assert r.code == 0, r.err
    rows = [ln for ln in r.out.splitlines() if ln.startswith("| llama")]
    assert len(rows) == 4 and sum("pp64" in x for x in rows) == 2 and sum("tg8" in x for x in rows) == 2
    j = run_cli("bench", tiny_model, "-fa", "0,1", "-c", 512, "-b", 128, "-p", 64, "-n", 8, "-r", 2, "--json",
                "--repack", int(REPACK_WORKS))
    results = json.loads(j.out)
    assert [x["config"]["flash_attn"] for x in results] == [False, True]
    assert all(x["status"] == "ok" and len(x["tg"]["samples_ns"]) == 2 for x in results)


@pytest.mark.slow
def test_bench_speaks_llama_bench_in_jsonl_and_sql(run_cli, tiny_model, tmp_path):
    common = ("-t", "1", "-p", 64, "-n", 8, "-r", 2, "--repack", int(REPACK_WORKS))
    j = run_cli("bench", tiny_model, *common, "-o", "jsonl")
    assert j.code == 0, j.err
    pp, tg = [json.loads(line) for line in j.out.splitlines()]
    assert list(pp)[:len(FIELDS)] == list(FIELDS)
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (64, 0, 0, 8)
    assert (pp["n_ctx"], tg["n_ctx"]) == (64, 8)  # llama-bench's per-test context: its own tokens
    assert pp["model_type"].startswith("llama") and pp["model_n_params"] > 0 and len(tg["samples_ns"]) == 2
    assert tg["avg_ts"] > 0 and pp["build_commit"] not in ("", "unknown")
    sql = run_cli("bench", tiny_model, *common, "-o", "sql")
    assert sql.code == 0, sql.err
    db = tmp_path / "bench.sqlite"
    if shutil.which("sqlite3"):  # the sqlite3 shell, as compare-llama-bench.py's users feed it
        subprocess.run(["sqlite3", str(db)], input=sql.out, text=True, check=True)
    else:
        sqlite3.connect(db).executescript(sql.out)
    con = sqlite3.connect(db)
    assert tuple(r[1] for r in con.execute("PRAGMA table_info(llama_bench)"))[:len(FIELDS)] == FIELDS
    assert con.execute("SELECT COUNT(*), MIN(avg_ts) > 0 FROM llama_bench").fetchone() == (2, 1)


@pytest.mark.parametrize("args,needle", [
    (("--nosuch", "1"), "no such option"),
    (("-t", "abc"), "n_threads must be an integer"),
    (("-b", "512", "-ub", "1024"), "n_ubatch 1024 > n_batch 512"),
    (("-ctv", "q8_0", "-fa", "0"), "needs flash attention"),
    (("-c", "99999"), "training context"),
    (("-t", "1,,2"), "empty value"),
])
def test_bench_cli_bad_input_is_one_line(cli, tiny_model, args, needle):
    assert_one_line_error(cli("bench", tiny_model, *args), needle)


def test_children_number_gpus_by_pci_bus_as_nvml_does():
    from llama_tuner.measure.launcher import child_environment

    env = child_environment({"CUDA_VISIBLE_DEVICES": "1", "PATH": "/bin"}, {})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "1"  # CUDA's default: fastest
    assert child_environment({"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, {})[
        "CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"  # the user's own order is theirs
    assert "CUDA_DEVICE_ORDER" not in child_environment({"PATH": "/bin"}, {"X": "1"})
