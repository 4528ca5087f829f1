"""Does the parent's memory polling add noise to tg? Three-way interleaved tg128 rounds.

Each round runs, in rotating order: ``llama-bench``, llama-tuner's launcher as the study
uses it (the parent polls the child's memory every 0.5 s on a CPU-only machine), and the
launcher with polling off (one sample per hour). All three time tg128 with 5 repetitions
at the given threads and flash attention, through the fidelity bench's own two measurement
functions (without their pp test); the script prints every round's mean and CV and
the medians, and writes ``bench/results/poll-noise-T-FA.json``.

Usage: python bench/poll_noise.py THREADS FA ROUNDS   (e.g. 2 1 15)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fidelity import run_llama_bench, run_tuner  # noqa: E402
from llama_bench_build import llama_bench_binary  # noqa: E402

from tuner.demo import demo_model  # noqa: E402
from tuner.launcher import SubprocessLauncher  # noqa: E402
from tuner.probe import detect_probe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure_tg(tool, *args) -> tuple[float, float]:
    """(mean t/s, CV) of tg128 with 5 repetitions, as the fidelity bench measures it, without its pp test."""
    out = tool(*args, n_prompt=0)
    return out["tg"], out["tg_cv"]


def main() -> None:
    threads, fa, rounds = (int(a) for a in sys.argv[1:4])
    model, binary = demo_model(), llama_bench_binary()
    c = dict(n_threads=threads, n_batch=128, flash_attn=bool(fa))
    polling, quiet = (SubprocessLauncher(detect_probe(), timeout_s=300, sample_interval=s) for s in (0.5, 3600.0))
    tools = {"llama-bench": lambda: measure_tg(run_llama_bench, binary, model, c),
             "llama-tuner": lambda: measure_tg(run_tuner, polling, model, c),
             "llama-tuner, no polling": lambda: measure_tg(run_tuner, quiet, model, c)}
    names = list(tools)
    res: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % 3:] + names[:i % 3]:  # rotate who goes first
            res[name].append(tools[name]())
        print(i, "  ".join(f"{n}: {res[n][-1][0]:.2f} t/s cv {100 * res[n][-1][1]:.2f}%" for n in names), flush=True)
    for name in names:
        cvs = [100 * cv for _, cv in res[name]]
        print(f"{name}: median tg {statistics.median(r for r, _ in res[name]):.2f} t/s, "
              f"median CV {statistics.median(cvs):.2f}%, mean CV {statistics.fmean(cvs):.2f}%")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"poll-noise-{threads}-{fa}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
