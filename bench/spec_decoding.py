"""Speculative decoding in llama-server on real text: tg with and without a --spec-type, paired rounds.

Each round runs ``llama-tuner bench MODEL --engine llama-server --spec-type A,B`` (the two types in one bench, so
one after the other), the order alternating between rounds so that a machine that drifts hits both alike; tg is
the answer to ``--tg-prompt`` (a request whose answer repeats its prompt: the bundled code edit by default).
Prints, per type, each round's tg, the median over rounds, the acceptance rate, and the median of the per-round
ratios against the first type, as docs/benchmarks.md §12 reports them.

    python bench/spec_decoding.py [MODEL] [--types none,ngram-mod] [--rounds 5] [-n 256] [-r 3] [--tg-prompt FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def bench_once(model: str, types: list[str], args) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "llama_tuner", "bench", model, "--engine", "llama-server", "--spec-type",
           ",".join(types), "-p", str(args.p), "-n", str(args.n), "-r", str(args.r), "-t", str(args.threads),
           "--json"] + (["--tg-prompt", args.tg_prompt] if args.tg_prompt else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {r["config"]["spec_type"]: r for r in json.loads(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--types", default="none,ngram-mod")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg-prompt")
    args = ap.parse_args()
    if args.tg_prompt is None:
        from llama_tuner.measure.server_engine import TG_PROMPT_FILE

        args.tg_prompt = TG_PROMPT_FILE
    model = args.model or subprocess.run([sys.executable, "-m", "llama_tuner", "demo"], capture_output=True,
                                         text=True, check=True).stdout.strip()
    types = args.types.split(",")
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        order = types if i % 2 == 0 else types[::-1]
        t0 = time.monotonic()
        rounds.append(bench_once(model, order, args))
        tg = ", ".join(f"{t} {rounds[-1][t]['tg_mean']:.2f}" for t in types)
        print(f"round {i + 1}/{args.rounds} ({' first, '.join(order)} second): tg {tg} t/s "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    first = types[0]
    print(f"\nmodel {model}; tg {args.n} answering {args.tg_prompt}; {args.rounds} rounds x {args.r} repetitions")
    for t in types:
        tgs = [r[t]["tg_mean"] for r in rounds]
        pps = [r[t]["pp_mean"] for r in rounds]
        drafted = sum(r[t]["draft_n"] or 0 for r in rounds)
        accepted = sum(r[t]["draft_accepted"] or 0 for r in rounds)
        ratio = statistics.median(r[t]["tg_mean"] / r[first]["tg_mean"] for r in rounds)
        acc = f"{100 * accepted / drafted:.1f}% of {drafted:,} drafted accepted" if drafted else "nothing drafted"
        print(f"{t:>12}: tg median {statistics.median(tgs):.2f} t/s (rounds {', '.join(f'{x:.2f}' for x in tgs)}), "
              f"pp median {statistics.median(pps):.1f}, tg x{ratio:.2f} of {first} (median of per-round ratios); {acc}")


if __name__ == "__main__":
    main()
