"""Repetition noise of tg, llama-tuner vs llama-bench, in rotating rounds on the same minutes.

Each round runs every chosen tool once, the order rotating from round to round. Every
tool times tg128 with 5 repetitions at the given threads and flash attention (batch 128,
a 128-token context), through the fidelity bench's own two measurement functions
without their pp test. Tools:

- ``lb``: ``llama-bench``;
- ``llama_tuner``: llama-tuner's launcher as a study uses it (memory polled every 0.5 s);
- ``quiet``: the same with polling off (one sample an hour);
- ``old``: llama-tuner's child from another checkout (``--old DIR``, e.g. a git worktree
  of an earlier commit), run by this launcher with ``PYTHONPATH=DIR``.

It prints each round's mean and CV per tool, then per tool the median CV, the share of
rounds at most 2%, and in how many rounds it was noisier than ``llama-bench`` (with a
two-sided sign test), and writes ``bench/results/tg-noise-T-FA[-TAG].json``.

Usage: python bench/tg_noise.py THREADS FA ROUNDS [--tools lb,tuner,quiet] [--old DIR]
       [--repack 0|1] [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the demo model lives in ROOT/models, whatever the cwd
sys.path.insert(0, str(ROOT))

from fidelity import run_llama_bench, run_tuner  # noqa: E402
from llama_bench_build import llama_bench_binary  # noqa: E402

from llama_tuner.model.demo import demo_model  # noqa: E402
from llama_tuner.measure.launcher import SubprocessLauncher  # noqa: E402
from llama_tuner.measure.probe import detect_probe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure_tg(tool, *args) -> tuple[float, float]:
    """(mean t/s, CV) of tg128 with 5 repetitions, as the fidelity bench measures it, without its pp test."""
    out = tool(*args, n_prompt=0)
    return out["tg"], out["tg_cv"]


def sign_test(k: int, n: int) -> float:
    """Two-sided p of k or more (or as few) successes in n fair coin flips."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("threads", type=int)
    ap.add_argument("fa", type=int, choices=(0, 1))
    ap.add_argument("rounds", type=int)
    ap.add_argument("--tools", default="lb,tuner,quiet")
    ap.add_argument("--old", type=Path, help="checkout whose llama_tuner.measure.child the 'old' tool runs")
    ap.add_argument("--repack", type=int, choices=(0, 1), help="default: on unless it crashes here")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    names = args.tools.split(",")
    if "old" in names and not args.old:
        ap.error("the 'old' tool needs --old DIR")
    model = demo_model(ROOT / "models")
    probe = detect_probe()
    polling = SubprocessLauncher(probe, timeout_s=300, sample_interval=0.5)
    repack = bool(args.repack) if args.repack is not None else polling.repack_crash() is None
    c = dict(n_threads=args.threads, n_batch=128, flash_attn=bool(args.fa), repack=repack)
    launchers = {"llama_tuner": polling, "quiet": SubprocessLauncher(probe, timeout_s=300, sample_interval=3600.0)}
    if args.old:
        launchers["old"] = SubprocessLauncher(probe, timeout_s=300, sample_interval=0.5,
                                              extra_env={"PYTHONPATH": str(args.old.resolve())})
    binary = llama_bench_binary() if "lb" in names else None
    res: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            res[name].append(measure_tg(run_llama_bench, binary, model, c) if name == "lb"
                             else measure_tg(run_tuner, launchers[name], model, c))
        print(i, "  ".join(f"{n}: {res[n][-1][0]:.2f} t/s cv {100 * res[n][-1][1]:.2f}%" for n in names), flush=True)
    for name in names:
        cvs = [100 * cv for _, cv in res[name]]
        line = (f"{name}: median tg {statistics.median(r for r, _ in res[name]):.2f} t/s, median CV "
                f"{statistics.median(cvs):.2f}%, {100 * sum(cv <= 2 for cv in cvs) / len(cvs):.0f}% of rounds <= 2%")
        if "lb" in res and name != "lb":
            k = sum(cv > lb for (_, cv), (_, lb) in zip(res[name], res["lb"]))
            line += (f"; noisier than llama-bench in {k} of {len(cvs)} rounds "
                     f"(sign test p = {sign_test(k, len(cvs)):.3f})")
        print(line)
    RESULTS.mkdir(exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    out = {"config": c, "tools": names, "old": str(args.old) if args.old else None, "rounds": res}
    (RESULTS / f"tg-noise-{args.threads}-{args.fa}{tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
