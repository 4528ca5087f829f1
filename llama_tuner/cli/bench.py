"""``llama-tuner bench``: measure configurations like llama-bench, each in a safe child."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from llama_tuner.errors import UserError
from llama_tuner.measure.config import ENGINES
from llama_tuner.measure.workloads import SCENARIOS, WORKLOADS
from llama_tuner.report.llama_bench_output import FORMATS as OUTPUTS, AsGiven

if TYPE_CHECKING:
    from llama_tuner.measure.config import BenchConfig
    from llama_tuner.model.info import ModelInfo


TG_PROMPT_CTX = 4096  # the context of a --tg-prompt bench without -c: the request and the answer in one
# (short flag, long flag, BenchConfig field, help)
BENCH_FLAGS = [
    ("-ngl", "--n-gpu-layers", "n_gpu_layers", "Layers to offload; -1 = all (default -1, as llama-bench)."),
    ("-ncmoe", "--n-cpu-moe", "n_cpu_moe", "Keep the expert tensors of the first N layers in host memory (default 0)."),
    ("-mmp", "--mmap", "use_mmap", "Memory-map the model: 0 or 1 (default: llama.cpp's auto load mode, which maps "
                                   "it where every device can)."),
    (None, "--repack", "repack", "Repacked/AMX CPU weight buffers: 0 or 1 (default 1)."),
    ("-c", "--ctx-size", "n_ctx", "Context size (default: each test's own tokens, as llama-bench)."),
    ("-b", "--batch-size", "n_batch", "Logical batch size (default 2048)."),
    ("-ub", "--ubatch-size", "n_ubatch", "Physical batch size (default 512)."),
    ("-t", "--threads", "n_threads", "Generation threads (default: physical cores)."),
    ("-tb", "--threads-batch", "n_threads_batch", "Prompt threads (default: same as -t)."),
    ("-fa", "--flash-attn", "flash_attn", "Flash attention: on, off or auto (1, 0, -1; default auto, as llama-bench: "
                                          "on where the backend has it)."),
    ("-ctk", "--cache-type-k", "type_k", "K cache type (default f16)."),
    ("-ctv", "--cache-type-v", "type_v", "V cache type (default f16)."),
    ("-p", "--n-prompt", "n_prompt", "Prompt tokens to process (default 512)."),
    ("-n", "--n-gen", "n_gen", "Tokens to generate (default 128)."),
    ("-d", "--n-depth", "n_depth", "Tokens already in the cache before each test (default 0)."),
    ("-r", "--repetitions", "repetitions", "Timed repetitions (default 5)."),
    ("-np", "--parallel", "n_parallel", "Concurrent streams, as llama-server --parallel (implies --workload server)."),
    (None, "--spec-type", "spec_type", "Speculative decoding, as llama-server --spec-type: none, ngram-mod, "
                                       "ngram-simple, ngram-map-k, ngram-map-k4v, draft-simple (with -md); needs "
                                       "--engine llama-server (default none)."),
    ("-md", "--spec-draft-model", "draft_model", "Draft model for --spec-type draft-simple (llama-server -md)."),
    (None, "--spec-draft-n-max", "spec_draft_n_max", "Tokens the draft model drafts (default: llama.cpp's, 3)."),
]


def _bench_options(f):
    for short, long, field, help_text in reversed(BENCH_FLAGS):
        decls = [d for d in (short, long) if d]  # --repack has no short form in llama-bench either
        f = click.option(*decls, field, default=None, metavar="LIST", help=help_text)(f)
    return f


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@_bench_options
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds one configuration may take (load and measure) before it is killed.")
@click.option("-o", "--output", "output", type=click.Choice(OUTPUTS), default="md", show_default=True,
              help="llama-bench's output formats, with its field names; ours (peak memory, bandwidth) follow.")
@click.option("--json", "as_json", is_flag=True, help="Print llama-tuner's own results (raw samples) as JSON.")
@click.option("--download", is_flag=True, help="Fetch an hf:ORG/REPO[:QUANT] model missing from the cache.")
@click.option("--workload", type=click.Choice(WORKLOADS), default=None,
              help="What to measure (default pp-tg, llama-bench's tests); -p/-n/-d change its sizes. "
                   "See `llama-tuner bench --help` and the README's workloads.")
@click.option("--engine", type=click.Choice(ENGINES), default=None,
              help="What measures: a child process through llama-cpp-python (as llama-bench), or llama-server "
                   "itself over HTTP (its own timings; speculative decoding). Default: the child, llama-server for "
                   "the scenarios.")
@click.option("--llama-server", "llama_server", metavar="PATH",
              help="The llama-server for --engine llama-server (default: $LLAMA_TUNER_LLAMA_SERVER, PATH, then "
                   "`make llama-server`'s build).")
@click.option("--tg-prompt", "tg_prompt", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="With --engine llama-server: tg answers this request (a text file, sent as one chat message), "
                   "real text where speculative decoding is judged; default: random token ids, as llama-bench.")
@click.option("--prompts", "prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Your requests (JSONL: {\"messages\": [...]} or {\"prompt\": \"...\"} a line, optional "
                   "max_tokens and name), each answered for real in llama-server: the scenarios workload. "
                   "--workload scenarios without it answers the bundled file.")
@click.option("--max-tokens", "max_tokens", type=int, default=None, metavar="N",
              help="Scenarios: cap every answer at N tokens (lower than a line's own max_tokens; default: the "
                   "file's, 4096 where a line gives none).")
def bench(model: str, timeout_s: float, output: str, as_json: bool, download: bool, workload: str | None,
          engine: str | None, llama_server: str | None, tg_prompt: str | None, prompts: str | None,
          max_tokens: int | None, **values) -> None:
    """Measure MODEL like llama-bench. Comma-separated values sweep every combination.

    Each configuration runs in a child process that is killed after --timeout;
    a crash or out-of-memory is reported as that row's result. Settings that only
    change the context reuse the loaded model. Without -c, as llama-bench, pp and
    tg are measured apart, each in a context of its own tokens (plus -d).

    Workloads: chat (-p 1024 -n 256), reasoning (-p 512 -n 4096) and long (-p 16384
    -n 256) measure a depth curve and predict the seconds to the answer; server
    (-np N) decodes N streams together and reports aggregate and per-stream tg.
    """
    from llama_tuner.measure.bandwidth import bandwidth_of
    from llama_tuner.measure.launcher import SubprocessLauncher
    from llama_tuner.measure.server_engine import ServerLauncher
    from llama_tuner.model.facts import ModelFacts
    from llama_tuner.model.info import load_model_info
    from llama_tuner.model.stores import resolve_model
    from llama_tuner.measure.probe import detect_probe
    from llama_tuner.measure.sweep import per_test_configs
    from llama_tuner.report import llama_bench_output
    from llama_tuner.report.tables import markdown_table, result_rows

    model = resolve_model(model, download=download)
    info = load_model_info(model)
    scenarios: tuple = ()
    if prompts or workload == SCENARIOS or max_tokens is not None:
        scenarios, values = _scenario_values(info, prompts, workload, engine, max_tokens, tg_prompt, values)
        workload, engine = SCENARIOS, "llama-server"
    engine = engine or "child"
    if engine == "llama-server" and tg_prompt and values.get("n_ctx") is None:
        values = {**values, "n_ctx": str(TG_PROMPT_CTX)}  # the request's tokens are known only to the server
    swept = sweep_as_given(workload_values(values, workload), info)
    requested = [cfg for cfg, _ in swept]
    # Each measured configuration, with the one the user asked for (llama-bench reports its batch sizes) and the
    # settings as given (llama-bench reports -ngl -1 and -fa auto so).
    tests = ([(t, cfg, given) for cfg, given in swept for t in per_test_configs(cfg)] if values.get("n_ctx") is None
             else [(cfg, cfg, given) for cfg, given in swept])
    if any(cfg.workload != "pp-tg" for cfg in requested) and output not in ("md",) and not as_json:
        raise UserError(f"-o {output} speaks llama-bench, which has no {requested[0].workload} workload",
                        "use the default table or --json")
    server = None
    if engine == "llama-server":
        server = llama_server_for_engine(llama_server)
        text = _read_prompt(tg_prompt) if tg_prompt else ""
        if text and any(cfg.workload != "pp-tg" for cfg in requested):
            raise UserError("--tg-prompt is for the pp-tg test", "leave --workload out, or drop --tg-prompt")
        launcher = ServerLauncher(server, detect_probe(), timeout_s=timeout_s, tg_prompt=text, scenarios=scenarios)
    else:
        if llama_server or tg_prompt:
            raise UserError(f"{'--llama-server' if llama_server else '--tg-prompt'} is for --engine llama-server",
                            "add --engine llama-server")
        if any(cfg.speculative for cfg in requested):
            raise UserError("--spec-type measures llama-server's speculative decoding, which the child has not",
                            "add --engine llama-server")
        launcher = SubprocessLauncher(detect_probe(), timeout_s=timeout_s)
    facts = ModelFacts.of(info)
    results, rows, bench_rows = [], [], []
    for r, (_, asked, given) in zip(launcher.measure(model, [t for t, _, _ in tests]), tests):
        r.bandwidth = bandwidth_of(r, facts, r.env)
        results.append(r)
        rows.extend(result_rows(info, r))
        bench_rows.extend(llama_bench_output.rows(info, r, asked, given=given))
        click.echo(f"[{len(results)}/{len(tests)}] {r.status.value}", err=True)
    if as_json:
        click.echo(json.dumps([_json_result(r) for r in results], indent=2))
    elif scenarios:
        from llama_tuner.report.scenario_tables import ANSWER_COLUMNS, answer_rows, result_summary

        for r in results:
            c = r.config
            click.echo(f"\n{'  '.join(f'{k} {v}' for k, v in _scenario_settings(c).items())}:")
            if not r.ok:
                click.echo(f"  {r.status.value}: {r.reason}")
                continue
            click.echo(markdown_table(answer_rows(r.answers), ANSWER_COLUMNS))
            click.echo(result_summary(r))
        env = results[0].env if results else None
        if env:
            click.echo(f"\nanswered by llama-server {env.llama_server} ({server.path}), streamed, greedy unless a "
                       f"line says otherwise; {env.gpu_name or env.cpu}")
    elif output != "md":
        click.echo(llama_bench_output.render(output, bench_rows), nl=False)
    else:
        click.echo(markdown_table(rows))
        notes = [bandwidth_line(r) for r in results if r.bandwidth]
        if notes:
            click.echo("\n" + "\n".join(notes))
        env = results[0].env if results else None
        if env and env.engine == "llama-server":
            click.echo(f"\nmeasured by llama-server {env.llama_server} ({server.path}) over HTTP: its own timings"
                       f"{'; tg answers ' + tg_prompt if tg_prompt else ''}; {env.gpu_name or env.cpu}")
        elif env:
            click.echo(f"\nbuild: llama-cpp-python {env.llama_cpp_python}, {env.llama_cpp_build}; "
                       f"{env.gpu_name or env.cpu}")


def llama_server_for_engine(explicit: str | None):
    """The llama-server ``--engine llama-server`` measures with, probed (version, flags).

    Raises:
        UserError: none is found, or the one given does not run.
    """
    from llama_tuner.measure.llama_server import BUILD_HINT, find_llama_server, probe

    path = find_llama_server(explicit)
    if path is None:
        raise UserError("--engine llama-server: no llama-server here", f"give --llama-server PATH, or {BUILD_HINT}")
    return probe(path)


def _read_prompt(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().strip()
    if not text:
        raise UserError(f"--tg-prompt {path} is empty", "give a file with the request in words")
    return text


def bandwidth_line(r) -> str:
    """How much memory bandwidth one result's generation achieved, and its share of the peak."""
    c, bw = r.config, r.bandwidth
    share = f" = {100 * bw['bandwidth_share']:.0f}% of the peak" if "bandwidth_share" in bw else ""
    return (f"tg{c.n_gen} at ngl {c.n_gpu_layers}, t {c.n_threads}, fa {int(c.flash_attn)}, {c.type_k}/{c.type_v}: "
            f"{bw['bytes_per_token'] / 2**20:,.0f} MiB read per token "
            f"({bw['gpu_bytes_per_token'] / 2**20:,.0f} MiB on the GPU) -> {bw['achieved_gbs']:,.1f} GB/s{share}")


def _json_result(r) -> dict:
    d = r.to_dict()
    d["pp_mean"], d["tg_mean"] = r.pp_mean, r.tg_mean
    d["pp_stddev"] = r.pp.stddev if r.pp else None
    d["tg_stddev"] = r.tg.stddev if r.tg else None
    d["headroom_bytes"] = r.headroom_bytes
    if r.config.workload == "server":
        d["tg_aggregate_mean"], d["tg_per_stream_mean"] = r.tg_mean, r.stream_tg_mean
        d["pp_aggregate_mean"] = r.pp_mean
    if r.curve:
        d["time_to_answer_s"] = r.time_to_answer_s
        d["depth_curve"] = r.curve.points()
    s = r.answer_summary
    if s is not None:
        d["scenarios"] = {"requests": s.requests, "seconds_per_answer_median": s.median_s,
                          "seconds_per_answer_p90": s.p90_s, "seconds_in_all": s.total_s,
                          "tokens_written_per_answer": s.generated_tokens,
                          "thinking_tokens_per_answer": s.thinking_tokens, "capped": s.capped,
                          "capped_share": s.capped_share, "draft_n": s.draft_n, "draft_accepted": s.draft_accepted,
                          "acceptance": s.acceptance}
        d["answers"] = [a.record() for a in r.answers]
    return d


def _scenario_settings(c) -> dict:
    """The settings a scenario result names in its heading (those a user sets)."""
    out = {"-c": c.n_ctx, "-b": c.n_batch, "-ub": c.n_ubatch, "-t": c.n_threads, "-fa": "on" if c.flash_attn else "off",
           "-ctk": c.type_k, "-ctv": c.type_v, "-ngl": c.n_gpu_layers}
    if c.speculative:
        out["--spec-type"] = c.spec_type
    return out


def _scenario_values(model: ModelInfo, prompts: str | None, workload: str | None, engine: str | None,
                     max_tokens: int | None, tg_prompt: str | None, values: dict) -> tuple[tuple, dict]:
    """The requests of --prompts (or the bundled file) and the sweep's values for them: the scenarios workload,
    a context that holds the longest request and the largest cap (-c where not given), one pass unless -r.

    Raises:
        UserError: another workload or engine named, a twin, a bad file (its line), or --max-tokens below 1.
    """
    from llama_tuner.measure.scenarios import capped_to, context_for, load_scenarios, refuse_twin, test_sizes

    if workload not in (None, SCENARIOS):
        raise UserError(f"--prompts answers requests: the scenarios workload, not {workload}",
                        "leave --workload out (or use --workload scenarios)")
    if engine == "child":
        raise UserError("the scenarios are answered by llama-server; the child engine cannot answer them",
                        "leave --engine out (or use --engine llama-server)")
    if tg_prompt:
        raise UserError("--tg-prompt is for the pp-tg test, not the scenarios", "drop --tg-prompt")
    if values.get("n_parallel"):
        raise UserError("-np is for the server workload, not the scenarios", "drop -np")
    refuse_twin(model)
    scenarios = capped_to(load_scenarios(prompts), max_tokens)
    n_prompt, n_gen = test_sizes(scenarios)
    out = {**values, "workload": SCENARIOS, "n_prompt": str(n_prompt), "n_gen": str(n_gen), "n_depth": "0"}
    if out.get("n_ctx") is None:
        out["n_ctx"] = str(context_for(scenarios))
    if out.get("repetitions") is None:
        out["repetitions"] = "1"
    return scenarios, out


def workload_values(values: dict, workload: str | None) -> dict:
    """The sweep's values with the workload's test sizes where -p/-n/-d do not give them; -np means server."""
    from llama_tuner.measure.workloads import PRESETS

    if workload is None:
        workload = "server" if values.get("n_parallel") else "pp-tg"
    preset = PRESETS[workload]
    out = {**values, "workload": workload}
    for key in ("n_prompt", "n_gen", "n_depth"):
        if out.get(key) is None and workload not in ("pp-tg", SCENARIOS):
            out[key] = str(getattr(preset, key))
    return out


# llama-bench's defaults where they differ from BenchConfig's (tools/llama-bench/llama-bench.cpp,
# cmd_params_defaults): every layer offloaded, flash attention and the load mode left to llama.cpp.
LLAMA_BENCH_DEFAULTS = {"n_gpu_layers": "-1", "flash_attn": "auto"}
_FA = {**dict.fromkeys(("on", "enabled", "true", "1"), "1"), **dict.fromkeys(("off", "disabled", "false", "0"), "0"),
       **dict.fromkeys(("auto", "-1"), "auto")}  # llama.cpp's is_truthy, is_falsey and is_autoy


def sweep_as_given(values: dict, model: ModelInfo | None) -> list[tuple[BenchConfig, AsGiven]]:
    """Each configuration of the sweep, validated and resolved, with the settings as llama-bench writes them.

    Settings not given take llama-bench's defaults (:data:`LLAMA_BENCH_DEFAULTS`). Flash attention ``auto``
    is measured on, which is what llama.cpp's auto chooses where the backend has it (the CPU, CUDA); the load
    mode not given is measured mapped, as auto maps the file where every device can.

    Raises:
        UserError: a flash attention value that is not on, off or auto.
        InvalidConfig: a combination llama.cpp would reject.
    """
    from llama_tuner.measure.sweep import build_configs, expand_sweep

    values = {k: LLAMA_BENCH_DEFAULTS.get(k) if v is None else v for k, v in values.items()}
    values.update({k: v for k, v in LLAMA_BENCH_DEFAULTS.items() if k not in values})
    out = []
    for combo in expand_sweep(values):
        fa = _FA.get(combo["flash_attn"].lower())
        if fa is None:
            raise UserError(f"flash_attn must be on, off or auto, got {combo['flash_attn']!r}",
                            "use -fa on, off or auto (or 1, 0, -1, as llama-bench)")
        [cfg] = build_configs({**combo, "flash_attn": "1" if fa == "auto" else fa}, model)
        load_mode = "auto" if "use_mmap" not in combo else ("mmap" if cfg.use_mmap else "none")
        out.append((cfg, AsGiven(n_gpu_layers=int(combo["n_gpu_layers"]), flash_attn=-1 if fa == "auto" else int(fa),
                                 load_mode=load_mode)))
    return out
