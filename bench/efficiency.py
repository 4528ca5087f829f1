"""How many trials does the study need? TPE vs random search vs the baselines, on a measured grid.

1. Every configuration of the CPU search space that ``llama-tuner tune DEMO
   --min-ctx 16384`` searches is measured once, for real, and cached in
   ``bench/results/efficiency-grid.json`` (raw samples kept), keyed by model file,
   hardware and llama.cpp build.
2. The study is then replayed against that cache (a launcher that answers from
   the grid) with TPE for several seeds, and random search with the same seeds
   and trial count; the baselines are measured first in both, as in ``tune``.

Target: the fastest preset within 3% of the grid's best feasible tg using at
most 25% of the grid's trials, and never below the best baseline.

Usage: python bench/efficiency.py [--seeds 5] [--share 0.25] [--min-ctx 16384]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from tuner.config import BenchConfig  # noqa: E402
from tuner.demo import demo_model  # noqa: E402
from tuner.fingerprint import build_environment, model_sha256  # noqa: E402
from tuner.launcher import Launcher, SubprocessLauncher  # noqa: E402
from tuner.probe import detect_probe  # noqa: E402
from tuner.records import is_feasible  # noqa: E402
from tuner.result import TrialResult  # noqa: E402
from tuner.session import StudyRequest, open_tuner  # noqa: E402
from tuner.study_view import StudyView  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID_FILE = RESULTS / "efficiency-grid.json"


class GridLauncher(Launcher):
    """Answers from measured grid results; counts what it was asked."""

    def __init__(self, grid: dict[str, TrialResult]):
        self.grid, self.asked = grid, 0

    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        for cfg in configs:
            self.asked += 1
            yield self.grid[cfg.resolved().settings_key()]


def measure_grid(request: StudyRequest, env) -> dict:
    """Measure every configuration of the request's space (resumable: cached entries are kept)."""
    with tempfile.TemporaryDirectory() as tmp:
        space = open_tuner(StudyRequest(**{**request.__dict__, "storage": f"sqlite:///{tmp}/s.db"}),
                           launcher=GridLauncher({}), env=env).space
        configs = list(space.grid())
    key = {"model_sha256": model_sha256(request.model), "hardware": env.hardware_key(),
           "llama_cpp_build": env.llama_cpp_build, "min_ctx": request.min_ctx}
    cache = json.loads(GRID_FILE.read_text()) if GRID_FILE.exists() else {}
    if cache.get("key") != key:
        cache = {"key": key, "results": {}}
    todo = [c for c in configs if c.settings_key() not in cache["results"]]
    print(f"grid: {len(configs)} configurations, {len(todo)} to measure", flush=True)
    launcher = SubprocessLauncher(detect_probe(), timeout_s=600)
    t0 = time.monotonic()
    for i in range(0, len(todo), 24):  # one child per chunk; save as we go
        for r in launcher.measure(request.model, todo[i:i + 24]):
            cache["results"][r.config.settings_key()] = r.to_dict()
        RESULTS.mkdir(exist_ok=True)
        GRID_FILE.write_text(json.dumps(cache))
        print(f"  {min(i + 24, len(todo))}/{len(todo)} in {time.monotonic() - t0:.0f} s", flush=True)
    cache["n_configs"] = len(configs)
    GRID_FILE.write_text(json.dumps(cache))
    return cache


def replay(request: StudyRequest, env, grid: dict[str, TrialResult], sampler: str, seed: int, trials: int) -> dict:
    """One study against the grid; the fastest preset and when the study first came within 3%."""
    with tempfile.TemporaryDirectory() as tmp:
        req = StudyRequest(**{**request.__dict__, "storage": f"sqlite:///{tmp}/s.db", "sampler": sampler,
                              "seed": seed, "trials": trials})
        tuner = open_tuner(req, launcher=GridLauncher(grid), env=env)
        tuner.run()
        view = StudyView(tuner.study)
        tuner.confirm(view.top(3))
        view = StudyView(tuner.study)
        fastest = view.presets["fastest"].candidate.figures
        best_so_far, reached = 0.0, None
        for n, t in enumerate(view.trials, 1):
            r = grid[BenchConfig.from_dict(t.user_attrs["result"]["config"]).settings_key()]
            if r.ok and is_feasible(r, view.limits):
                best_so_far = max(best_so_far, r.tg_mean)
            if reached is None and best_so_far >= 0.97 * max_tg(grid, view.limits):
                reached = n
        baselines = {n: c.figures.tg_mean for n, c in view.baselines.items() if c.figures.ok}
        return {"fastest_tg": fastest.tg_mean, "trials_to_3pct": reached, "baselines": baselines,
                "fastest_config": fastest.config.to_dict()}


def max_tg(grid: dict[str, TrialResult], limits) -> float:
    """The best feasible tg of the whole grid."""
    return max(r.tg_mean for r in grid.values() if r.ok and is_feasible(r, limits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--min-ctx", type=int, default=16384)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = str(args.model or demo_model())
    env = build_environment(detect_probe(), None)
    request = StudyRequest(model=model, min_ctx=args.min_ctx, baseline_flags="-c 16384 -b 512 -ub 512 -t 1 -fa off")
    cache = measure_grid(request, env)
    grid = {k: TrialResult.from_dict(v) for k, v in cache["results"].items()}
    trials = int(args.share * cache["n_configs"])
    rows = {}
    for sampler in ("tpe", "random"):
        rows[sampler] = [replay(request, env, grid, sampler, seed, trials) for seed in range(1, args.seeds + 1)]
    with tempfile.TemporaryDirectory() as tmp:  # the limits, as the study computes them
        limits = open_tuner(StudyRequest(**{**request.__dict__, "storage": f"sqlite:///{tmp}/s.db"}),
                            launcher=GridLauncher(grid), env=env).limits
    best = max_tg(grid, limits)
    base = max(max(r["baselines"].values()) for r in rows["tpe"])
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": f"{env.cpu}, {env.physical_cores} cores",
               "model": Path(model).name, "grid_size": cache["n_configs"], "trials": trials,
               "grid_best_tg": best, "best_baseline_tg": base, "rows": rows}
    (RESULTS / "efficiency.json").write_text(json.dumps(summary, indent=2))
    print(f"\ngrid {cache['n_configs']} configs, best feasible tg {best:.2f} t/s; best baseline {base:.2f} t/s; "
          f"study budget {trials} trials ({100 * trials / cache['n_configs']:.0f}%)\n")
    print("| sampler | seed | fastest preset tg | vs grid best | vs best baseline | trials to within 3% |")
    print("| --- | --: | --: | --: | --: | --: |")
    for sampler, rs in rows.items():
        for seed, r in enumerate(rs, 1):
            print(f"| {sampler} | {seed} | {r['fastest_tg']:.2f} | {100 * (r['fastest_tg'] / best - 1):+.1f}% "
                  f"| {100 * (r['fastest_tg'] / base - 1):+.1f}% | {r['trials_to_3pct'] or '-'} |")
        med = statistics.median(r["fastest_tg"] for r in rs)
        print(f"| {sampler} | median | {med:.2f} | {100 * (med / best - 1):+.1f}% | {100 * (med / base - 1):+.1f}% "
              f"| {statistics.median(r['trials_to_3pct'] or trials + 1 for r in rs)} |")
    ok = all(r["fastest_tg"] >= 0.97 * best and r["fastest_tg"] >= base for r in rows["tpe"])
    print(f"\ntarget (TPE, every seed within 3% of the grid's best, not below the best baseline): "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
