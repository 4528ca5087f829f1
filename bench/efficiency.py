"""How many trials does the study need? TPE vs random search vs the baselines, on a measured grid.

1. Every configuration of the CPU search space that ``llama-tuner tune DEMO
   --min-ctx 16384`` searches is measured once, for real, and cached in
   ``bench/results/efficiency-grid.json`` (raw samples kept), keyed by model file,
   hardware and llama.cpp build.
2. The study is then replayed against that cache (a launcher that answers from
   the grid) with TPE for several seeds, and random search with the same seeds
   and trial count; the baselines are measured first in both, as in ``tune``.

   The leaders are confirmed for real, together and taking turns, as ``tune`` does;
   each batch is kept in ``bench/results/efficiency-confirmations.json`` under the
   grid's key, so a later run (say, after a change to how presets are chosen)
   replays the same measurements and measures only batches it has not seen.
3. Each configuration measured once is noisy (3-4% per run on this VM, and the
   machine drifts by up to 10% over the hour the grid takes), so the maximum of
   288 single measurements overstates the best. The verdict therefore uses a
   verification: the grid's 8 fastest configurations, every preset the replays
   chose and the baselines are measured again, tg only, in ``--rounds``
   interleaved rounds (shuffled order, one child per round), and each
   configuration's verified tg is its rate relative to its round's median,
   averaged over rounds (``drift_free``).

Target: the fastest preset within 3% of the best verified tg using at most 25%
of the grid's trials, and never below the best baseline.

Usage: python bench/efficiency.py [--seeds 5] [--share 0.25] [--min-ctx 16384] [--rounds 10] [--merge EARLIER.json ...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent  # the demo model lives in ROOT/models, whatever the cwd
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from llama_tuner.measure.config import BenchConfig  # noqa: E402
from llama_tuner.model.demo import demo_model  # noqa: E402
from llama_tuner.measure.environment import build_environment, model_sha256  # noqa: E402
from llama_tuner.measure.launcher import Launcher, SubprocessLauncher  # noqa: E402
from llama_tuner.measure.probe import detect_probe  # noqa: E402
from llama_tuner.study.objectives import is_feasible  # noqa: E402
from llama_tuner.measure.result import TrialResult  # noqa: E402
from llama_tuner.study.session import StudyRequest, open_tuner  # noqa: E402
from llama_tuner.study.confirmation import confirm_leaders  # noqa: E402
from llama_tuner.study.view import StudyView  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRID_FILE = RESULTS / "efficiency-grid.json"
CONFIRM_FILE = RESULTS / "efficiency-confirmations.json"


class GridLauncher(Launcher):
    """Answers trials (one configuration per call) from the measured grid. A confirmation (several
    configurations in turns, see ``Tuner.confirm``) is measured for real, as ``tune`` does, and kept in
    ``confirmed`` so seeds that confirm the same leaders share the whole batch."""

    def __init__(self, grid: dict[str, TrialResult], confirmed: dict[str, list[TrialResult]] | None = None):
        self.grid = grid
        self.confirmed = {} if confirmed is None else confirmed
        self.real = SubprocessLauncher(detect_probe(), timeout_s=900)

    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        if len(configs) == 1:
            yield self.grid[configs[0].resolved().settings_key()]
            return
        batch = json.dumps([c.to_dict() for c in configs], sort_keys=True)
        if batch not in self.confirmed:
            self.confirmed[batch] = list(self.real.measure(model_path, configs))
        yield from self.confirmed[batch]


def load_confirmations(key: dict) -> dict[str, list[TrialResult]]:
    """Confirmation batches measured by earlier runs on the same model, hardware and build."""
    cache = json.loads(CONFIRM_FILE.read_text()) if CONFIRM_FILE.exists() else {}
    if cache.get("key") != key:
        return {}
    return {_rekey_batch(b): [TrialResult.from_dict(r) for r in rs] for b, rs in cache["batches"].items()}


def _rekey_batch(batch: str) -> str:
    """A batch key with every setting BenchConfig has now (results saved before ``repack`` lack it)."""
    return json.dumps([BenchConfig.from_dict(c).to_dict() for c in json.loads(batch)], sort_keys=True)


def save_confirmations(key: dict, confirmed: dict[str, list[TrialResult]]) -> None:
    """Keep every confirmation batch measured so far."""
    batches = {b: [r.to_dict() for r in rs] for b, rs in confirmed.items()}
    CONFIRM_FILE.write_text(json.dumps({"key": key, "batches": batches}))


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
    # Keys from today's settings_key (results saved before ``repack`` existed lack it: llama.cpp's default, on).
    cache["results"] = {BenchConfig.from_dict(r["config"]).settings_key(): r for r in cache["results"].values()}
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


def replay(request: StudyRequest, env, grid: dict[str, TrialResult], sampler: str, seed: int, trials: int,
           confirmed: dict[str, list[TrialResult]]) -> dict:
    """One study against the grid; the fastest preset and when the study first came within 3%."""
    with tempfile.TemporaryDirectory() as tmp:
        req = StudyRequest(**{**request.__dict__, "storage": f"sqlite:///{tmp}/s.db", "sampler": sampler,
                              "seed": seed, "trials": trials})
        tuner = open_tuner(req, launcher=GridLauncher(grid, confirmed), env=env)
        tuner.run()
        confirm_leaders(tuner)
        view = StudyView(tuner.study)
        preset = view.presets["fastest"]
        fastest = preset.candidate.figures
        best_so_far, reached = 0.0, None
        for n, t in enumerate(view.trials, 1):
            r = grid[BenchConfig.from_dict(t.user_attrs["result"]["config"]).settings_key()]
            if r.ok and is_feasible(r, view.limits):
                best_so_far = max(best_so_far, r.tg_mean)
            if reached is None and best_so_far >= 0.97 * max_tg(grid, view.limits):
                reached = n
        baselines = {n: c.figures.tg_mean for n, c in view.baselines.items() if c.figures.ok}
        return {"fastest_tg": fastest.tg_mean, "trials_to_3pct": reached, "baselines": baselines,
                "fastest_config": fastest.config.to_dict(), "why": preset.why,
                "baseline_configs": {n: c.figures.config.to_dict() for n, c in view.baselines.items()}}


def verify(model: str, configs: dict[str, BenchConfig], rounds: int) -> dict[str, dict]:
    """tg of each configuration over ``rounds`` interleaved rounds, one sample per round."""
    launcher = SubprocessLauncher(detect_probe(), timeout_s=900)
    rng = random.Random(0)
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(rounds):
        keys = list(configs)
        rng.shuffle(keys)
        tg_only = [BenchConfig(**{**configs[k].to_dict(), "n_prompt": 0, "repetitions": 3}) for k in keys]
        for key, r in zip(keys, launcher.measure(model, tg_only)):
            if r.ok:
                samples[key].append(r.tg_mean)
        print(f"  verification round {i + 1}/{rounds}", flush=True)
    return {k: {"config": configs[k].to_dict(), "samples": v} for k, v in samples.items()}


def describe(cfg: dict | None) -> str:
    """A configuration in llama-bench's flag names."""
    if not cfg:
        return ""
    return (f"-t {cfg['n_threads']} -tb {cfg['n_threads_batch']} -b {cfg['n_batch']} -ub {cfg['n_ubatch']} "
            f"-c {cfg['n_ctx']} -fa {int(cfg['flash_attn'])} -ctk {cfg['type_k']} -ctv {cfg['type_v']}")


def max_tg(grid: dict[str, TrialResult], limits) -> float:
    """The best feasible tg of the whole grid."""
    return max(r.tg_mean for r in grid.values() if r.ok and is_feasible(r, limits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--min-ctx", type=int, default=16384)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rounds", type=int, default=10, help="verification rounds")
    ap.add_argument("--report", action="store_true", help="print the tables of the last run and measure nothing")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="earlier efficiency.json files whose verification rounds (same configurations) are added")
    args = ap.parse_args()
    if args.report:
        return report(merge_rounds(json.loads((RESULTS / "efficiency.json").read_text()), args.merge))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = str(args.model or demo_model(ROOT / "models"))
    env = build_environment(detect_probe(), None)
    # The grid keeps llama.cpp's default repack (on), as it was measured; where that crashes, off.
    repack = int(SubprocessLauncher(detect_probe()).repack_crash() is None)
    request = StudyRequest(model=model, min_ctx=args.min_ctx, baseline_flags="-c 16384 -b 512 -ub 512 -t 1 -fa off",
                           pins={"repack": str(repack)})
    cache = measure_grid(request, env)
    grid = {k: TrialResult.from_dict(v) for k, v in cache["results"].items()}
    trials = int(args.share * cache["n_configs"])
    rows, confirmed = {}, load_confirmations(cache["key"])
    print(f"{len(confirmed)} confirmation batches from earlier runs", flush=True)
    for sampler in ("tpe", "random"):
        rows[sampler] = []
        for seed in range(1, args.seeds + 1):
            t0 = time.monotonic()
            rows[sampler].append(replay(request, env, grid, sampler, seed, trials, confirmed))
            save_confirmations(cache["key"], confirmed)
            print(f"  {sampler} seed {seed}: fastest preset {describe(rows[sampler][-1]['fastest_config'])}, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    print(f"{len(confirmed)} confirmation batches in all", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the limits, as the study computes them
        limits = open_tuner(StudyRequest(**{**request.__dict__, "storage": f"sqlite:///{tmp}/s.db"}),
                            launcher=GridLauncher(grid), env=env).limits
    feasible = sorted((r for r in grid.values() if r.ok and is_feasible(r, limits)), key=lambda r: -r.tg_mean)
    to_verify = {r.config.settings_key(): r.config for r in feasible[:8]}
    for r in rows["tpe"] + rows["random"]:
        for cfg in [r["fastest_config"], *r["baseline_configs"].values()]:
            c = BenchConfig.from_dict(cfg)
            to_verify[c.settings_key()] = c
    print(f"verifying {len(to_verify)} configurations in {args.rounds} rounds", flush=True)
    verified = verify(model, to_verify, args.rounds)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": f"{env.cpu}, {env.physical_cores} cores",
               "model": Path(model).name, "grid_size": cache["n_configs"], "trials": trials, "rounds": args.rounds,
               "grid_best_tg": max_tg(grid, limits), "verified": verified, "rows": rows}
    (RESULTS / "efficiency.json").write_text(json.dumps(summary, indent=2))
    report(merge_rounds(summary, args.merge))


def merge_rounds(summary: dict, earlier: list[Path]) -> dict:
    """``summary`` with the verification rounds of earlier runs added: more rounds, less noise in the
    truth. Rounds are normalised by their median over all configurations, so an earlier run must have
    verified exactly the same configurations."""
    summary["verified"] = rekey_verified(summary["verified"])
    for path in earlier:
        other = rekey_verified(json.loads(path.read_text())["verified"])
        if set(other) != set(summary["verified"]):
            sys.exit(f"{path}: verified other configurations than this run; its rounds cannot be merged")
        for k, v in summary["verified"].items():
            v["samples"] = other[k]["samples"] + v["samples"]
        summary["rounds"] += min(len(v["samples"]) for v in other.values())
    return summary


def rekey_verified(verified: dict[str, dict]) -> dict[str, dict]:
    """Verified configurations keyed by today's settings_key (saved before ``repack`` existed, they lack it)."""
    return {BenchConfig.from_dict(v["config"]).settings_key(): v for v in verified.values()}


def relative_rounds(verified: dict[str, dict]) -> tuple[dict[str, list[float]], float]:
    """Each configuration's tg in each round relative to that round's median over all configurations,
    and the median round in t/s to scale back with: a slow or fast period of the machine cancels out."""
    keys = [k for k, v in verified.items() if v["samples"]]
    rounds = min(len(verified[k]["samples"]) for k in keys)
    refs = [statistics.median(verified[k]["samples"][i] for k in keys) for i in range(rounds)]
    return {k: [verified[k]["samples"][i] / refs[i] for i in range(rounds)] for k in keys}, statistics.median(refs)


def drift_free(rel: dict[str, list[float]], scale: float) -> dict[str, float]:
    """Each configuration's drift-free tg: its relative rate (``relative_rounds``) averaged over all rounds, in t/s."""
    return {k: scale * statistics.fmean(v) for k, v in rel.items()}


def held_out_best(rel: dict[str, list[float]], scale: float) -> float:
    """The best configuration's tg without the winner's curse: the maximum of many noisy means is
    biased upward, so the best is picked on the odd rounds and measured on the even ones, and the
    other way round, and the two figures are averaged."""
    halves = [slice(0, None, 2), slice(1, None, 2)]
    figures = []
    for pick, judge in (halves, halves[::-1]):
        best = max(rel, key=lambda k: statistics.fmean(rel[k][pick]))
        figures.append(scale * statistics.fmean(rel[best][judge]))
    return statistics.fmean(figures)


def significantly_below(rel: dict[str, list[float]], a: str, b: str) -> bool:
    """True when ``a`` is slower than ``b`` by more than 2 standard errors of their per-round differences."""
    diffs = [x - y for x, y in zip(rel[a], rel[b])]
    if a == b or len(diffs) < 2:
        return False
    return statistics.fmean(diffs) + 2 * statistics.stdev(diffs) / len(diffs) ** 0.5 < 0


def report(summary: dict) -> None:
    """Print the verdict table of a summary (also with ``--report``, from bench/results/efficiency.json)."""
    rel, scale = relative_rounds(summary["verified"])
    rows, truth = summary["rows"], drift_free(rel, scale)
    key = lambda cfg: BenchConfig.from_dict(cfg).settings_key()  # noqa: E731
    v_best, h_best = max(truth.values()), held_out_best(rel, scale)
    for r in rows["tpe"] + rows["random"]:
        r["verified_tg"] = truth[key(r["fastest_config"])]
        r["verified_baselines"] = {n: truth[key(c)] for n, c in r["baseline_configs"].items()}
        best_base = max(r["baseline_configs"].values(), key=lambda c: truth[key(c)])
        r["below_baseline"] = significantly_below(rel, key(r["fastest_config"]), key(best_base))
    v_base = max(max(r["verified_baselines"].values()) for r in rows["tpe"])
    trials = summary["trials"]
    print(f"\ngrid {summary['grid_size']} configs, single-shot best tg {summary['grid_best_tg']:.2f} t/s; "
          f"study budget {trials} trials ({100 * trials / summary['grid_size']:.0f}%)\n"
          f"verified ({summary['rounds']} rounds, {len(truth)} configs, drift-free): best tg {v_best:.2f} t/s "
          f"(held out: {h_best:.2f}), best baseline {v_base:.2f} t/s\n")
    print("| sampler | seed | preset tg (single shot) | preset tg (verified) | vs verified best "
          "| vs held-out best | vs best baseline | trials to within 3% (single shot) |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: |")
    for sampler, rs in rows.items():
        for seed, r in enumerate(rs, 1):
            mark = " (below, >2 SE)" if r["below_baseline"] else ""
            print(f"| {sampler} | {seed} | {r['fastest_tg']:.2f} | {r['verified_tg']:.2f} "
                  f"| {100 * (r['verified_tg'] / v_best - 1):+.1f}% | {100 * (r['verified_tg'] / h_best - 1):+.1f}% "
                  f"| {100 * (r['verified_tg'] / v_base - 1):+.1f}%{mark} | {r['trials_to_3pct'] or '-'} |")
        med = statistics.median(r["verified_tg"] for r in rs)
        print(f"| {sampler} | median | {statistics.median(r['fastest_tg'] for r in rs):.2f} | {med:.2f} "
              f"| {100 * (med / v_best - 1):+.1f}% | {100 * (med / h_best - 1):+.1f}% "
              f"| {100 * (med / v_base - 1):+.1f}% "
              f"| {statistics.median(r['trials_to_3pct'] or trials + 1 for r in rs)} |")
    print("\nverified configurations (tg t/s per round, drift-free tg):")
    for k, v in sorted(summary["verified"].items(), key=lambda kv: -truth.get(kv[0], 0)):
        print(f"  {describe(v.get('config')) or k}: {' '.join(f'{x:.1f}' for x in v['samples'])} "
              f"-> {truth.get(k, float('nan')):.2f}")
    tpe = rows["tpe"]
    strict = all(r["verified_tg"] >= 0.97 * v_best and r["verified_tg"] >= v_base for r in tpe)
    held = all(r["verified_tg"] >= 0.97 * h_best and not r["below_baseline"] for r in tpe)
    print(f"\ntarget, TPE, every seed within 3% of the best and not below the best baseline:\n"
          f"  strict (maximum of the verified means; any shortfall against the baseline): "
          f"{'PASS' if strict else 'FAIL'}\n"
          f"  noise-aware (held-out best; below the baseline only by > 2 SE of paired rounds): "
          f"{'PASS' if held else 'FAIL'}")


if __name__ == "__main__":
    main()
