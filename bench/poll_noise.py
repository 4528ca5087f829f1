"""Does the parent's memory polling add noise to tg? Three-way interleaved tg128 rounds.

Each round runs, in rotating order: ``llama-bench``, llama-tuner's launcher as the study
uses it (the parent polls the child's memory every 0.5 s on a CPU-only machine), and the
launcher with polling off (one sample per hour). All three time tg128 with 5 repetitions
at the given threads and flash attention; the script prints every round's mean and CV and
the medians, and writes ``bench/results/poll-noise-T-FA.json``.

Usage: python bench/poll_noise.py THREADS FA ROUNDS   (e.g. 2 1 15)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_bench_build import llama_bench_binary  # noqa: E402

from tuner.config import BenchConfig  # noqa: E402
from tuner.demo import demo_model  # noqa: E402
from tuner.launcher import SubprocessLauncher  # noqa: E402
from tuner.probe import detect_probe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def llama_bench_tg(binary: Path, model: Path, threads: int, fa: int) -> tuple[float, float]:
    """(mean t/s, CV) of one llama-bench tg128 run with 5 repetitions."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-b", "128", "-ub", "128", "-fa", str(fa),
           "-p", "0", "-n", "128", "-r", "5", "-o", "json"]
    [out] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out["avg_ts"], out["stddev_ts"] / out["avg_ts"]


def tuner_tg(model: Path, threads: int, fa: int, interval: float) -> tuple[float, float]:
    """(mean t/s, CV) of one llama-tuner tg128 measurement, the parent polling every ``interval`` s."""
    launcher = SubprocessLauncher(detect_probe(), timeout_s=300, sample_interval=interval)
    cfg = BenchConfig(n_threads=threads, n_threads_batch=threads, n_batch=128, n_ubatch=128, n_ctx=128,
                      flash_attn=bool(fa), n_prompt=0, n_gen=128, repetitions=5)
    [r] = launcher.measure(str(model), [cfg])
    if not r.ok:
        raise RuntimeError(f"llama-tuner failed: {r.status.value} {r.reason}")
    return r.tg_mean, r.tg.cv


def main() -> None:
    threads, fa, rounds = (int(a) for a in sys.argv[1:4])
    model, binary = demo_model(), llama_bench_binary()
    tools = {"llama-bench": lambda: llama_bench_tg(binary, model, threads, fa),
             "llama-tuner": lambda: tuner_tg(model, threads, fa, 0.5),
             "llama-tuner, no polling": lambda: tuner_tg(model, threads, fa, 3600.0)}
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
