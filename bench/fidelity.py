"""Does llama-tuner measure what llama-bench measures? And how noisy, how costly is it?

For each configuration of the demo model (threads 1/2 x batch 128/512 x flash
attention off/on), llama.cpp's own ``llama-bench`` (built from the same llama.cpp
commit, see ``llama_bench_build.py``) and ``llama-tuner``'s launcher each measure
pp512 and tg128 with 5 repetitions. llama-tuner runs llama-bench's two test
instances as they are: pp512 in a 512-token context, tg128 in a 128-token one.

Shared machines drift by several percent between runs (llama-bench alone varies
by +-2.7% between back-to-back runs here), so each round runs both tools back to
back (alternating who goes first) and yields one ratio per test; the figure per
configuration is the median of those paired ratios, with a bootstrap 95% interval.
Rounds continue until both intervals are narrower than +-1.5% (at least
``--rounds``, at most ``--max-rounds``). Target: every pp and tg within 3%.

It also reports the tg coefficient of variation over 5 repetitions (target <= 2%
on an idle machine) and the launch overhead of one measurement (spawn, import,
model load, context), and writes everything to ``bench/results/``.

Usage: python bench/fidelity.py [--rounds 5] [--max-rounds 15] [--model PATH] [--only T,B,FA] [--out NAME]
       python bench/fidelity.py --report FILE [FILE ...]   (rounds of several runs pooled)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the demo model lives in ROOT/models, whatever the cwd
sys.path.insert(0, str(ROOT))

from llama_bench_build import llama_bench_binary  # noqa: E402

from llama_tuner.measure.config import BenchConfig  # noqa: E402
from llama_tuner.model.demo import demo_model  # noqa: E402
from llama_tuner.measure.launcher import SubprocessLauncher  # noqa: E402
from llama_tuner.measure.probe import cpu_name, detect_probe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [dict(n_threads=t, n_batch=b, flash_attn=fa) for t in (1, 2) for b in (128, 512) for fa in (False, True)]
N_PROMPT, N_GEN, REPS = 512, 128, 5


def run_llama_bench(binary: Path, model: Path, c: dict, n_prompt: int = N_PROMPT) -> dict:
    """pp and tg mean t/s from one llama-bench run of configuration ``c`` (tg only when ``n_prompt`` is 0)."""
    cmd = [str(binary), "-m", str(model), "-t", str(c["n_threads"]), "-b", str(c["n_batch"]),
           "-ub", str(c["n_batch"]), "-fa", str(int(c["flash_attn"])), "-p", str(n_prompt), "-n", str(N_GEN),
           "-r", str(REPS), "--repack", str(int(c.get("repack", True))), "-o", "json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    pp = next((x["avg_ts"] for x in out if n_prompt and x["n_prompt"] == n_prompt), None)
    tg = next(x for x in out if x["n_gen"] == N_GEN)
    return {"pp": pp, "tg": tg["avg_ts"], "tg_cv": tg["stddev_ts"] / tg["avg_ts"]}


def run_tuner(launcher: SubprocessLauncher, model: Path, c: dict, n_prompt: int = N_PROMPT) -> dict:
    """pp and tg mean t/s from llama-tuner, with llama-bench's contexts (n_prompt, resp. n_gen tokens;
    tg only when ``n_prompt`` is 0)."""
    tg_batch = min(c["n_batch"], N_GEN)  # llama.cpp clamps the batch to the context
    tg_cfg = BenchConfig(**{**c, "n_batch": tg_batch}, n_ctx=N_GEN, n_ubatch=tg_batch, n_prompt=0, n_gen=N_GEN,
                         repetitions=REPS)
    pp_cfgs = [BenchConfig(n_ctx=n_prompt, n_ubatch=c["n_batch"], n_prompt=n_prompt, n_gen=0, repetitions=REPS,
                           **c)] if n_prompt else []
    *pp, tg = launcher.measure(str(model), pp_cfgs + [tg_cfg])
    for r in pp + [tg]:
        if not r.ok:
            raise RuntimeError(f"llama-tuner failed on {c}: {r.status.value} {r.reason}")
    return {"pp": pp[0].pp_mean if pp else None, "tg": tg.tg_mean, "tg_cv": tg.tg.cv}


def bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``ratios``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def ci_width(ratios: list[float]) -> float:
    """Half the width of the 95% interval of the median ratio (inf for fewer than 3 rounds)."""
    if len(ratios) < 3:
        return float("inf")
    lo, hi = bootstrap_ci(ratios)
    return (hi - lo) / 2


def launch_overhead(launcher: SubprocessLauncher, model: Path, n: int = 5) -> dict:
    """Seconds from spawning a child to its first timed token: spawn+import, load, context."""
    cfg = BenchConfig(n_ctx=256, n_batch=256, n_ubatch=256, n_prompt=0, n_gen=1, repetitions=1)
    samples = []
    for _ in range(n):
        [r] = launcher.measure(str(model), [cfg])
        measured = sum(r.tg.samples_ns) / 1e9 * 2  # the warmup token and the timed one
        samples.append({"total_s": r.wall_time_s, "load_s": r.load_time_s, "context_s": r.context_time_s,
                        "spawn_import_s": r.wall_time_s - r.load_time_s - r.context_time_s - measured})
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def summarize(c: dict, lb: list[dict], ours: list[dict]) -> dict:
    """One configuration's row from its paired rounds: medians, median paired ratio with its interval, CVs."""
    row = {**c, "n_rounds": len(lb)}
    for test in ("pp", "tg"):
        row[f"lb_{test}"] = statistics.median(x[test] for x in lb)
        row[f"ours_{test}"] = statistics.median(x[test] for x in ours)
        ratios = [o[test] / b[test] for o, b in zip(ours, lb)]
        row[f"diff_{test}_pct"] = 100 * (statistics.median(ratios) - 1)
        lo, hi = bootstrap_ci(ratios)
        row[f"ci_{test}_pct"] = (100 * (lo - 1), 100 * (hi - 1))
    row["ours_tg_cv_pct"] = 100 * statistics.median(x["tg_cv"] for x in ours)
    row["lb_tg_cv_pct"] = 100 * statistics.median(x["tg_cv"] for x in lb)
    row["rounds"] = {"llama_bench": lb, "llama_tuner": ours}
    return row


def worst_diff(rows: list[dict]) -> float:
    """The largest absolute paired difference (%), pp or tg, over the configurations."""
    return max(max(abs(r["diff_pp_pct"]), abs(r["diff_tg_pct"])) for r in rows)


def pooled(summaries: list[dict]) -> list[dict]:
    """The rows of several results files, of the same code and machine, with their rounds pooled per
    configuration. Each round is a self-contained pair (both tools back to back), so rounds from runs
    hours apart can be pooled."""
    key = lambda r: (r["n_threads"], r["n_batch"], r["flash_attn"])  # noqa: E731
    rounds: dict[tuple, tuple[list, list]] = {}
    for summary in summaries:
        for r in summary["rows"]:
            lb, ours = rounds.setdefault(key(r), ([], []))
            lb += r["rounds"]["llama_bench"]
            ours += r["rounds"]["llama_tuner"]
    return [summarize(dict(n_threads=k[0], n_batch=k[1], flash_attn=k[2]), lb, ours)
            for k, (lb, ours) in rounds.items()]


def noise_rows(rows: list[dict]) -> list[tuple[str, list[float], list[float]]]:
    """Per configuration, then over all rounds: the tg CVs (%) of every round, llama-tuner's and llama-bench's."""
    out = []
    for r in rows:
        rounds = r["rounds"]
        out.append((f"| {r['n_threads']} | {r['n_batch']} | {int(r['flash_attn'])}",
                    [100 * x["tg_cv"] for x in rounds["llama_tuner"]],
                    [100 * x["tg_cv"] for x in rounds["llama_bench"]]))
    out.append((f"| all {sum(len(r['rounds']['llama_tuner']) for r in rows)} rounds | |",
                [cv for _, ours, _ in out for cv in ours], [cv for _, _, lb in out for cv in lb]))
    return out


def print_report(rows: list[dict], overhead: dict) -> None:
    """The fidelity table and the repetition-noise table, as docs/benchmarks.md shows them."""
    print("| threads | batch | fa | rounds | pp llama-bench | pp llama-tuner | pp diff [95% CI] | tg llama-bench "
          "| tg llama-tuner | tg diff [95% CI] | tg CV (5 reps) |")
    print("| --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for r in rows:
        ci = {t: f"[{r[f'ci_{t}_pct'][0]:+.1f}, {r[f'ci_{t}_pct'][1]:+.1f}]" for t in ("pp", "tg")}
        print(f"| {r['n_threads']} | {r['n_batch']} | {int(r['flash_attn'])} | {r['n_rounds']} | {r['lb_pp']:.1f} "
              f"| {r['ours_pp']:.1f} | {r['diff_pp_pct']:+.1f}% {ci['pp']} | {r['lb_tg']:.2f} | {r['ours_tg']:.2f} "
              f"| {r['diff_tg_pct']:+.1f}% {ci['tg']} | {r['ours_tg_cv_pct']:.2f}% |")
    worst = worst_diff(rows)
    within = sum(abs(r[f"diff_{t}_pct"]) <= 3 for r in rows for t in ("pp", "tg"))
    print(f"\n{within} of {2 * len(rows)} differences within 3%, worst {worst:.1f}% "
          f"({'PASS' if worst <= 3 else 'FAIL'}); launch overhead: "
          + ", ".join(f"{k} {v:.3f}" for k, v in overhead.items()))
    print("\n| threads | batch | fa | llama-tuner median CV (min-max) | llama-bench median CV (min-max) |")
    print("| --: | --: | --: | --: | --: |")
    for label, ours, lb in noise_rows(rows):
        cells = [f"{statistics.median(v):.2f}% ({min(v):.2f}-{max(v):.2f}), "
                 f"{sum(cv <= 2 for cv in v) / len(v):.0%} of rounds <= 2%" for v in (ours, lb)]
        print(f"{label} | {cells[0]} | {cells[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="at least this many paired rounds")
    ap.add_argument("--max-rounds", type=int, default=15)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--only", action="append", metavar="T,B,FA",
                    help="measure only this configuration (threads,batch,flash-attn 0/1); repeatable")
    ap.add_argument("--out", default=f"fidelity-{datetime.date.today()}.json",
                    help="results file name under bench/results/ (default: dated)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                    help="print the tables of results files (rounds pooled per configuration), measure nothing")
    args = ap.parse_args()
    if args.report:
        summaries = [json.loads(f.read_text()) for f in args.report]
        print_report(pooled(summaries), summaries[0]["launch_overhead"])  # the first file's overhead
        return
    configs = CONFIGS
    if args.only:
        wanted = {tuple(int(x) for x in o.split(",")) for o in args.only}
        configs = [c for c in CONFIGS if (c["n_threads"], c["n_batch"], int(c["flash_attn"])) in wanted]
        if len(configs) != len(wanted):
            ap.error(f"--only takes threads (1|2), batch (128|512), fa (0|1), e.g. 1,512,0; got {args.only}")
    model = args.model or demo_model(ROOT / "models")
    binary = llama_bench_binary()
    launcher = SubprocessLauncher(detect_probe(), timeout_s=900)
    # Both tools crash with repack on where llama.cpp's AMX kernels do (llama_tuner.measure.repack_check).
    configs = [{**c, "repack": launcher.repack_crash() is None} for c in configs]
    rows = []
    for c in configs:
        lb, ours = [], []
        for i in range(args.max_rounds):
            # Alternate who goes first, so slow drift of the machine hits both alike.
            pair = [("lb", lambda: run_llama_bench(binary, model, c)), ("ours", lambda: run_tuner(launcher, model, c))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                (lb if name == "lb" else ours).append(fn())
            widths = [ci_width([o[t] / b[t] for o, b in zip(ours, lb)]) for t in ("pp", "tg")]
            if i + 1 >= args.rounds and max(widths) <= 0.015:
                break
        row = summarize(c, lb, ours)
        rows.append(row)
        print(f"t={c['n_threads']} b={c['n_batch']} fa={int(c['flash_attn'])}: "
              f"pp {row['ours_pp']:.1f} vs {row['lb_pp']:.1f} (paired {row['diff_pp_pct']:+.1f}%), "
              f"tg {row['ours_tg']:.2f} vs {row['lb_tg']:.2f} (paired {row['diff_tg_pct']:+.1f}%), "
              f"tg cv {row['ours_tg_cv_pct']:.2f}%", flush=True)
    overhead = launch_overhead(launcher, model)
    worst = worst_diff(rows)
    summary = {"machine": f"{cpu_name()} ({platform.node()})", "model": str(model), "rounds": args.rounds,
               "date": time.strftime("%Y-%m-%d"), "worst_abs_diff_pct": worst, "pass_3pct": worst <= 3.0,
               "max_tg_cv_pct": max(r["ours_tg_cv_pct"] for r in rows), "launch_overhead": overhead, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(summary, indent=2))
    print()
    print_report(rows, overhead)


if __name__ == "__main__":
    main()
