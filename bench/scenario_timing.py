"""Is ``bench --prompts``'s seconds per answer what a plain HTTP client waits? Paired rounds against one.

Each round runs ``llama-tuner bench MODEL --prompts FILE --json`` (its own llama-server, streamed requests) and,
in a llama-server started with the same flags, a plain client: ``urllib`` posting each request of FILE unstreamed
(same body, ``stream`` off) and timing it from send to the last byte with ``time.perf_counter``. The order
alternates between rounds. Prints per round both medians over the file (seconds per answer) and their ratio, then
the median of the ratios, as docs/benchmarks.md §14 reports it.

    python bench/scenario_timing.py [MODEL] [--prompts FILE] [--rounds 3] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request


def ours(model: str, args) -> dict:
    cmd = [sys.executable, "-m", "llama_tuner", "bench", model, "--json", "-t", str(args.threads)]
    cmd += ["--prompts", args.prompts] if args.prompts else ["--workload", "scenarios"]
    cmd += ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
    [result] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return result


def plain(argv: list[str], scenarios, port: int) -> dict[str, float]:
    """Each request's wall seconds, unstreamed, in a server started with ``argv``."""
    from llama_tuner.measure.server_bench import GREEDY, _Server, _wait_healthy

    server = _Server(argv, "127.0.0.1", port, None)
    try:
        _wait_healthy(server, 300)
        out = {}
        for s in scenarios:
            if s.is_chat:
                path, body = "/v1/chat/completions", {"messages": list(s.messages), "max_tokens": s.max_tokens}
            else:
                path, body = "/completion", {"prompt": s.prompt, "n_predict": s.max_tokens}
            body.update({"stream": False, "cache_prompt": False, **(s.sampling or GREEDY)})
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=3600) as resp:
                resp.read()
            out[s.name] = time.perf_counter() - t0
        return out
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--prompts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llama_tuner.measure.config import BenchConfig
    from llama_tuner.measure.llama_server import find_llama_server, probe
    from llama_tuner.measure.scenarios import capped_to, load_scenarios
    from llama_tuner.measure.server_args import llama_server_args
    from llama_tuner.measure.server_bench import free_port
    from llama_tuner.model.demo import demo_model

    model = args.model or str(demo_model())
    scenarios = capped_to(load_scenarios(args.prompts), args.max_tokens)
    server = probe(find_llama_server(None))
    ratios, cfg = [], None
    for r in range(1, args.rounds + 1):
        order = ["ours", "plain"] if r % 2 else ["plain", "ours"]
        got = {}
        for who in order:
            if who == "ours":
                result = ours(model, args)
                got["ours"] = {a["name"]: a["seconds"] for a in result["answers"]}
                cfg = BenchConfig.from_dict(result["config"])
            else:
                # the flags bench resolved (round 1 runs bench first, so later rounds have them)
                argv = llama_server_args(os.path.abspath(model), cfg, program=server.path, server=server)
                got["plain"] = plain(argv, scenarios, free_port())
        a, b = statistics.median(got["ours"].values()), statistics.median(got["plain"].values())
        ratios.append(a / b)
        per = ", ".join(f"{n} {got['ours'][n]:.2f}/{got['plain'][n]:.2f}" for n in got["ours"])
        print(f"round {r} ({' then '.join(order)}): seconds per answer (median of {len(scenarios)}) bench "
              f"{a:.3f} s, plain client {b:.3f} s, ratio {a / b:.4f}; per request bench/plain: {per}", flush=True)
    print(f"median ratio bench/plain over {args.rounds} rounds: {statistics.median(ratios):.4f} "
          f"(rounds: {', '.join(f'{x:.4f}' for x in ratios)})")


if __name__ == "__main__":
    main()
