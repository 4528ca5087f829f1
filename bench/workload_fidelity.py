"""Is a workload's predicted time to answer what a real generation takes? And does -np pay?

1. ``reasoning``: ``bench --workload reasoning`` predicts the seconds from a 512-token prompt to
   the end of 4,096 generated tokens from a depth curve (llama_tuner.measure.workloads). The direct
   run does it: the same prompt length decoded in n_batch chunks, then 4,096 tokens generated
   one at a time, each sampled (greedy, in llama.cpp) from the last one's logits and fed back,
   timed from the first prompt token to the last generated one. Each round runs both, back to
   back, alternating which goes first; the figure is the median of the paired ratios.
   Target: within 5%.
2. ``server``: ``bench -np 1,4`` on the demo model: aggregate tg with 4 streams over 1 stream.
   Target: above 1.2x.

Usage: python bench/workload_fidelity.py [--rounds 3] [--model PATH] [--threads 2] [--out NAME]
       python bench/workload_fidelity.py --direct MODEL THREADS PROMPT GEN   (one direct run; prints seconds)
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = dict(n_threads=2, n_threads_batch=2, repack=False, flash_attn=False, n_batch=2048, n_ubatch=512)


def direct(model: str, threads: int, n_prompt: int, n_gen: int) -> float:
    """One real generation in this process: prompt, then n_gen greedy tokens fed back; seconds."""
    import ctypes

    from llama_cpp import llama_cpp as C

    from llama_tuner.measure.threadpool import attach_threadpools

    quiet = C.llama_log_callback(lambda level, text, user_data: None)  # kept alive while llama.cpp runs
    C.llama_log_set(quiet, ctypes.c_void_p(0))
    C.llama_backend_init()
    mp = C.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = SETTINGS["repack"]
    model_p = C.llama_model_load_from_file(model.encode(), mp)
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_prompt + n_gen + 16, SETTINGS["n_batch"], SETTINGS["n_ubatch"]
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.swa_full = False
    ctx = C.llama_init_from_model(model_p, cp)
    pools = attach_threadpools(ctx, threads, threads)
    vocab = C.llama_model_get_vocab(model_p)
    n_vocab = C.llama_vocab_n_tokens(vocab)
    rng = random.Random(7)
    prompt = [C.llama_vocab_bos(vocab)] + [rng.randrange(n_vocab) for _ in range(n_prompt - 1)]
    sampler = C.llama_sampler_init_greedy()
    # warmup, as every measurement has one
    warm = (C.llama_token * 32)(*prompt[:32])
    C.llama_decode(ctx, C.llama_batch_get_one(warm, 32))
    C.llama_memory_clear(C.llama_get_memory(ctx), False)
    t0 = time.perf_counter()
    for lo in range(0, n_prompt, SETTINGS["n_batch"]):
        chunk = prompt[lo:lo + SETTINGS["n_batch"]]
        arr = (C.llama_token * len(chunk))(*chunk)  # the batch points into it: it must outlive the decode
        assert C.llama_decode(ctx, C.llama_batch_get_one(arr, len(chunk))) == 0
    one = (C.llama_token * 1)()
    for _ in range(n_gen):
        one[0] = C.llama_sampler_sample(sampler, ctx, -1)
        assert C.llama_decode(ctx, C.llama_batch_get_one(one, 1)) == 0
    C.llama_synchronize(ctx)
    seconds = time.perf_counter() - t0
    C.llama_sampler_free(sampler)
    C.llama_free(ctx)
    pools.free()
    C.llama_model_free(model_p)
    return seconds


def _run_direct(model: str, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--direct", model, str(threads), "512", "4096"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _run_bench(model: str, threads: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "llama_tuner", "bench", model, "-t", str(threads), "--repack", "0", "-fa", "0",
           "--json", *extra]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=str(ROOT / "models" / "gemma-3-270m-Q4_K_M.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="workload_fidelity")
    ap.add_argument("--direct", nargs=4, metavar=("MODEL", "THREADS", "PROMPT", "GEN"))
    args = ap.parse_args()
    if args.direct:
        m, t, p, g = args.direct
        print(direct(m, int(t), int(p), int(g)))
        return
    rounds = []
    for r in range(args.rounds):
        first_direct = r % 2 == 1
        order = ["direct", "bench"] if first_direct else ["bench", "direct"]
        got = {}
        for what in order:
            if what == "direct":
                got["direct_s"] = _run_direct(args.model, args.threads)
            else:
                res = _run_bench(args.model, args.threads, "--workload", "reasoning", "-r", "1")[0]
                got["predicted_s"] = res["time_to_answer_s"]
                got["depth_curve"] = res["depth_curve"]
        got["ratio"] = got["predicted_s"] / got["direct_s"]
        rounds.append(got)
        print(f"round {r + 1}: predicted {got['predicted_s']:.2f} s, direct {got['direct_s']:.2f} s, "
              f"ratio {got['ratio']:.3f}", flush=True)
    ratio = statistics.median(g["ratio"] for g in rounds)
    server = _run_bench(args.model, args.threads, "-np", "1,4", "-r", "3")
    agg = {r["config"]["n_parallel"]: r["tg_aggregate_mean"] for r in server}
    per = {r["config"]["n_parallel"]: r["tg_per_stream_mean"] for r in server}
    print(f"reasoning: median predicted/direct {ratio:.3f} over {len(rounds)} paired rounds (target within 5%)")
    print(f"server: aggregate tg {agg[1]:.1f} t/s with 1 stream, {agg[4]:.1f} with 4 ({per[4]:.1f} per stream): "
          f"{agg[4] / agg[1]:.2f}x (target above 1.2x)")
    out = ROOT / "bench" / "results" / f"{args.out}.json"
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.processor() or
                               platform.machine(), "threads": args.threads, "rounds": rounds, "median_ratio": ratio,
                               "server": {"aggregate": agg, "per_stream": per}}, indent=2))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
