"""How well does the memory model predict the measured peak? Over the efficiency grid.

For every configuration of ``bench/results/efficiency-grid.json`` (288 measured
configurations of the demo model on CPU), the memory model predicts the peak
(host RSS here) before loading: once with its prior, and once refitted from 8
configurations drawn at random (as a study refits after its first trials), the
error then judged on the other 280. Prints median and max |error| in % of the
measured peak.

Usage: python bench/memory_error.py [--fit 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the demo model lives in ROOT/models, whatever the cwd
sys.path.insert(0, str(ROOT))

from llama_tuner.model.demo import demo_model  # noqa: E402
from llama_tuner.model.facts import ModelFacts  # noqa: E402
from llama_tuner.study.memory_model import MemoryModel  # noqa: E402
from llama_tuner.model.info import load_model_info  # noqa: E402
from llama_tuner.measure.result import TrialResult  # noqa: E402

GRID_FILE = Path(__file__).resolve().parent / "results" / "efficiency-grid.json"


def summary(errors: list[float]) -> str:
    """Median and max of |error| in %, and the signed range."""
    a = [abs(e) for e in errors]
    return (f"median {statistics.median(a):.2f}%, max {max(a):.2f}% "
            f"(from {min(errors):+.1f}% to {max(errors):+.1f}%, n={len(errors)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = [TrialResult.from_dict(v) for v in json.loads(GRID_FILE.read_text())["results"].values()]
    results = [r for r in results if r.ok and r.peak_memory_bytes]
    facts = ModelFacts.of(load_model_info(demo_model(ROOT / "models")))
    prior = MemoryModel(facts, on_gpu=False)
    print("prior:   ", summary(prior.errors(results)))
    rng = random.Random(args.seed)
    fitted_on = rng.sample(results, args.fit)
    model = MemoryModel(facts, on_gpu=False)
    model.fit(fitted_on)
    rest = [r for r in results if r not in fitted_on]
    print(f"refitted on {args.fit}:", summary(model.errors(rest)))
    peaks = [r.peak_memory_bytes / 2**20 for r in results]
    by_rss = sum(1 for r in results if (r.peak_rss_bytes or 0) >= r.peak_memory_bytes)
    print(f"measured peaks: {min(peaks):.0f}-{max(peaks):.0f} MiB; the peak RSS was the larger figure in {by_rss} "
          f"of {len(results)} (else base RSS + llama.cpp's reserved buffers)")


if __name__ == "__main__":
    main()
