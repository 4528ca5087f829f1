"""``llama-tuner verify``: a study's preset in a real llama-server, beside llama-server's defaults.

Each round starts the preset's llama-server (its exported flags) and ``llama-server -m MODEL`` (its defaults), one
after the other, the preset first in odd rounds and the defaults first in even ones, and replays the study's
workload in each over HTTP (:mod:`llama_tuner.measure.server_bench`). What is printed is what the servers
report: their pp and tg against the study's figures, and the preset's gap over the defaults round by round
(Student's t over the paired rounds, :func:`llama_tuner.study.comparison.compare`), with each one's peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from llama_tuner.errors import UserError
from llama_tuner.study.presets import PRESET_NAMES
from llama_tuner.study.storage import DEFAULT_STORAGE
from llama_tuner.units import format_size

SAMPLING_GAP = 0.10  # a served tg up to 10% below the study's: llama-server's sampling (docs/benchmarks.md §11)
LABELS = ("preset", "defaults")


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _slots(props: dict) -> str:
    """", 4 slots of 32,768 tokens" from a server's /props."""
    if not props.get("total_slots") or not props.get("slot_n_ctx"):
        return ""
    n = props["total_slots"]
    return f", {n} slot{'s' * (n != 1)} of {props['slot_n_ctx']:,} tokens"


def _share(a: float | None, b: float | None) -> float | None:
    return a / b - 1 if a is not None and b else None


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:+.1f}%"


def other_llama_processes(own: set[int]) -> list[str]:
    """Other processes running llama.cpp now (a study's child, llama-server, llama-bench): "pid name" each."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"] or ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.info["pid"] in own:
            continue
        if name in ("llama-server", "llama-bench") or "llama_tuner.measure.child" in cmd:
            out.append(f"{p.info['pid']} {name}")
    return out


def summarize(rounds: list[dict], study: dict[str, dict[str, float | None]], replay, config, model_path: str
              ) -> dict[str, Any]:
    """The figures of the rounds (``ServedRun``s by label): for tg and pp, each side's mean and standard deviation
    over every repetition, its share against the study's figure (``study[label][figure]``), and the preset's gap
    over the defaults paired over the rounds both completed; each side's peak RSS (the largest of its rounds)."""
    from llama_tuner.measure.result import Interleaved, merge_rounds
    from llama_tuner.study.comparison import compare

    complete = [r for r in rounds if all(label in r and r[label].ok for label in LABELS)]
    interleaved = Interleaved(batch=f"verify:{time.time():.0f}", per_round=replay.repetitions)
    n = replay.n_parallel
    results = {}
    for label in LABELS:
        parts = [r[label].to_result(config, model_path, n_prompt=n * replay.n_prompt, n_gen=n * replay.n_gen)
                 for r in complete]
        results[label] = merge_rounds(parts, interleaved) if parts else None
    out: dict[str, Any] = {"complete_rounds": len(complete)}
    for figure in ("tg", "pp"):
        entry: dict[str, Any] = {}
        for label in LABELS:
            rates = [x for r in rounds if label in r and r[label].ok
                     for x in getattr(r[label], f"{figure}_rates")]
            mean = statistics.fmean(rates) if rates else None
            ref = study.get(label, {}).get(figure)
            entry[label] = {"mean": mean, "sd": statistics.stdev(rates) if len(rates) > 1 else 0.0 if rates else None,
                            "n": len(rates), "study": ref, "vs_study": _share(mean, ref)}
        a, b = results["preset"], results["defaults"]
        if a is not None and b is not None and a.ok and b.ok:
            entry["gap"] = _gap(compare(a, b, figure))
        out[figure] = entry
    if replay.scenarios:  # seconds per answer, the scenarios' figure: each side's median, and the paired gap
        entry = {}
        for label in LABELS:
            res = results[label]
            s = res.answer_summary if res is not None else None
            entry[label] = {"median_s": s.median_s if s else None, "p90_s": s.p90_s if s else None,
                            "written": s.generated_tokens if s else None, "capped": s.capped if s else None,
                            "study": study.get(label, {}).get("answer"),
                            "vs_study": _share(s.median_s, study.get(label, {}).get("answer")) if s else None}
        a, b = results["preset"], results["defaults"]
        if a is not None and b is not None:
            entry["gap"] = _gap(compare(a, b, "answer"))
        out["answer"] = entry
    out["peak_rss_bytes"] = {label: max((r[label].peak_rss_bytes or 0 for r in rounds if label in r), default=0)
                             or None for label in LABELS}
    out["peak_vram_bytes"] = {label: max((r[label].peak_vram_bytes or 0 for r in rounds if label in r), default=0)
                              or None for label in LABELS}
    out["study_peak_bytes"] = {label: study.get(label, {}).get("peak") for label in LABELS}
    return out


def _gap(g) -> dict[str, Any]:
    """A paired gap (:func:`llama_tuner.study.comparison.compare`) as the record keeps it."""
    return {"share": g.share, "half_width": None if math.isinf(g.half) else g.half, "verdict": g.verdict,
            "paired_rounds": g.rounds if g.paired else 0, "text": g.text()}


def summary_lines(summary: dict[str, Any], *, n_vocab: int, failures: list[str]) -> list[str]:
    """What verify prints: one line per figure, the paired gap, peak memory, the cause of a served tg below the
    study's where sampling explains it, and each failure."""
    lines = []
    for figure in ("tg", "pp"):
        e = summary[figure]
        p, d = e["preset"], e["defaults"]
        study = f" (study {_fmt(p['study'])}, {_pct(p['vs_study'])})" if p["study"] else ""
        dstudy = f" (study {_fmt(d['study'])}, {_pct(d['vs_study'])})" if d["study"] else ""
        lines.append(f"served {figure} {_fmt(p['mean'])} +- {_fmt(p['sd'])} t/s{study}; "
                     f"defaults {_fmt(d['mean'])} +- {_fmt(d['sd'])}{dstudy}")
    if "answer" in summary:
        p, d = summary["answer"]["preset"], summary["answer"]["defaults"]
        study = f" (study {_fmt(p['study'], 2)} s, {_pct(p['vs_study'])})" if p["study"] else ""
        lines.append(f"served seconds per answer (median over the requests) {_fmt(p['median_s'], 2)} s, p90 "
                     f"{_fmt(p['p90_s'], 2)} s, {_fmt(p['written'], 0)} tokens written per answer, {p['capped']} "
                     f"capped{study}; defaults {_fmt(d['median_s'], 2)} s, p90 {_fmt(d['p90_s'], 2)} s, "
                     f"{_fmt(d['written'], 0)} written, {d['capped']} capped")
    gaps = [f"{fig} {summary[fig]['gap']['text']}" for fig in ("answer", "tg", "pp")
            if fig in summary and "gap" in summary[fig]]
    if gaps:
        rounds = summary["complete_rounds"]
        lines.append(f"preset vs defaults over {rounds} paired round{'s' * (rounds != 1)}: {', '.join(gaps)}")
    rss, study_peak, vram = summary["peak_rss_bytes"], summary["study_peak_bytes"], summary["peak_vram_bytes"]

    def mem(label: str) -> str:
        ref = f" (study {format_size(study_peak[label])})" if study_peak.get(label) else ""
        gpu = f", VRAM {format_size(vram[label])}" if vram.get(label) else ""
        return f"{label} {format_size(rss[label])}{ref}{gpu}"

    lines.append(f"peak RSS: {mem('preset')}, {mem('defaults')}")
    tg = summary["tg"]["preset"]
    share = tg["vs_study"]
    if share is not None and share < -0.01 and tg["mean"]:
        served_ms, study_ms = 1e3 / tg["mean"], 1e3 / tg["study"]
        if share >= -SAMPLING_GAP:
            lines.append(f"why served tg is {_pct(share)} off the study's: llama-server samples every token over the "
                         f"model's {n_vocab:,} logits, the study's child only decodes: {served_ms - study_ms:.2f} ms "
                         f"more per token ({served_ms:.2f} against {study_ms:.2f} ms)")
        else:
            lines.append(f"served tg is {_pct(share)} off the study's, more than llama-server's sampling over "
                         f"{n_vocab:,} logits explains ({served_ms - study_ms:.2f} ms more per token): did something "
                         "else run on this machine meanwhile, or has it changed since the study?")
    lines += failures
    return lines


def _study_figures(view, candidate) -> dict[str, dict[str, float | None]]:
    from llama_tuner.study.keys import DEFAULTS_BASELINE

    out = {}
    for label, cand in (("preset", candidate), ("defaults", view.baselines.get(DEFAULTS_BASELINE))):
        f = cand.figures if cand is not None else None
        if f is not None and f.ok:
            out[label] = {"tg": f.tg_mean, "pp": f.pp_mean, "peak": f.peak_memory_bytes,
                          "answer": f.answer_summary.median_s if f.answer_summary else None}
    return out


def _metrics(preset: str, summary: dict[str, Any]) -> dict[str, float]:
    """The record in MLflow metrics: ``verify.<preset>.<figure>_tps`` and the like."""
    out: dict[str, float] = {}
    for figure in ("tg", "pp"):
        e = summary[figure]
        for label, key in (("preset", ""), ("defaults", "defaults_")):
            if e[label]["mean"] is not None:
                out[f"verify.{preset}.{key}{figure}_tps"] = round(e[label]["mean"], 3)
        if e["preset"]["vs_study"] is not None:
            out[f"verify.{preset}.{figure}_vs_study_pct"] = round(100 * e["preset"]["vs_study"], 3)
        if "gap" in e and not math.isnan(e["gap"]["share"]):
            out[f"verify.{preset}.{figure}_gain_pct"] = round(100 * e["gap"]["share"], 3)
    for label, key in (("preset", ""), ("defaults", "defaults_")):
        if summary["peak_rss_bytes"][label]:
            out[f"verify.{preset}.{key}peak_rss_bytes"] = summary["peak_rss_bytes"][label]
    return out


@click.command()
@click.argument("study")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="fastest", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Paired rounds: each starts the preset's llama-server and the defaults', taking turns first.")
@click.option("--repetitions", type=click.IntRange(min=1),
              help="Repetitions of each test per server and round (default: the study's).")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--llama-server", "llama_server", help="llama-server to run (default: $LLAMA_TUNER_LLAMA_SERVER, "
                                                     "else on PATH, else `make llama-server`'s build).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the study's).")
@click.option("--no-mlflow", is_flag=True, help="Do not record the verification in MLflow.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record (every round's figures) as JSON.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Answer these requests (JSONL, as tune --prompts) in both servers and compare seconds per answer "
                   "(default: a scenarios study's own requests).")
@click.option("--max-tokens", "max_tokens", type=int, metavar="N", help="With the scenarios: cap every answer at N.")
def verify(study: str, preset: str, rounds: int, repetitions: int | None, storage: str, llama_server: str | None,
           tracking_uri: str | None, no_mlflow: bool, as_json: bool, prompts: str | None,
           max_tokens: int | None) -> None:
    """Run STUDY's preset in llama-server beside `llama-server -m MODEL` and compare what the servers report
    with the study's figures."""
    from llama_tuner.cli.tracking import make_tracker, warn
    from llama_tuner.measure.llama_server import find_llama_server, probe
    from llama_tuner.measure.probe import detect_probe, visible_gpu_index
    from llama_tuner.measure.server_bench import Replay, run_rounds, vocabulary
    from llama_tuner.measure.server_args import llama_server_args
    from llama_tuner.report.export import host_cache_mib
    from llama_tuner.study.keys import TG_PROMPT_ATTR, TRACKING_URI_ATTR, VERIFY_PREFIX
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    view = StudyView.load(make_storage(storage), study)
    candidate = view.preset(preset).candidate
    cfg = candidate.figures.config
    if not Path(view.model_path).is_file():
        raise UserError(f"the study's model {view.model_path} is not on this machine", "copy it back to that path")
    exe = find_llama_server(llama_server)
    if exe is None:
        raise UserError("no llama-server found (not on PATH, none built by `make llama-server`)",
                        "pass --llama-server PATH, or run `make llama-server`")
    server = probe(exe)
    preset_argv = llama_server_args(view.model_path, cfg, program=server.path, server=server,
                                    cache_ram_mib=host_cache_mib(view, candidate))
    defaults_argv = [server.path, "-m", view.model_path]
    for flag in ("--host", "--port"):
        server.require(flag)
    scenarios = _scenarios(view, prompts, max_tokens)
    if scenarios:
        from dataclasses import replace

        from llama_tuner.measure.scenarios import test_sizes

        n_prompt, n_gen = test_sizes(scenarios)
        cfg = replace(cfg, workload="scenarios", n_prompt=n_prompt, n_gen=n_gen, n_depth=0)
    replay = Replay.of(cfg, repetitions=repetitions or candidate.result.config.repetitions,
                       text=view.attrs.get(TG_PROMPT_ATTR) or "", scenarios=scenarios)
    vocab = vocabulary(view.model_path)
    gpu = detect_probe()
    gpu_index = visible_gpu_index(gpu) if gpu.gpus() else None

    busy = other_llama_processes({os.getpid()})
    if busy:
        warn(f"other llama.cpp processes run ({', '.join(busy[:4])}): they slow both servers")
    load = os.getloadavg()
    click.echo(f"verifying preset {preset} ({candidate.label}) of {view.model_file} in llama-server {server.version}"
               f" ({server.path}) beside `llama-server -m {Path(view.model_path).name}`: {rounds} rounds of "
               f"{replay.describe()} (load average {load[0]:.2f})", err=True)

    def progress(r: int, run) -> None:
        if run.ok and run.answers:
            from llama_tuner.measure.scenarios import summarize as answers_summary

            a = answers_summary(run.answers)
            click.echo(f"round {r}/{rounds} {run.label}: {a.median_s:.2f} s per answer, {a.generated_tokens:,.0f} "
                       f"tokens written, {a.capped}/{a.requests} capped, peak RSS {format_size(run.peak_rss_bytes)}",
                       err=True)
        elif run.ok:
            click.echo(f"round {r}/{rounds} {run.label}: tg {_fmt(_mean(run.tg_rates))}, "
                       f"pp {_fmt(_mean(run.pp_rates))} t/s, peak RSS {format_size(run.peak_rss_bytes)}, "
                       f"ready in {run.load_time_s:.1f} s{_slots(run.props)}", err=True)
        else:
            click.echo(f"round {r}/{rounds} {run.label} {run.outcome()}", err=True)

    done = run_rounds(preset_argv, defaults_argv, replay, vocab, rounds=rounds, on_run=progress,
                      version=server.version, probe=gpu, gpu_index=gpu_index)
    summary = summarize(done, _study_figures(view, candidate), replay, cfg, view.model_path)
    failures = [f"{run.label} {run.outcome()} (round {i})" for i, r in enumerate(done, 1) for run in r.values()
                if not run.ok]
    notes = list(dict.fromkeys(n for r in done for run in r.values() for n in run.notes))
    record = {"preset": preset, "trial": candidate.trial, "baseline": candidate.baseline,
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "llama_server": {"path": server.path, "version": server.version}, "replay": asdict(replay),
              "rounds_asked": rounds, "load_average": list(load), "preset_argv": preset_argv,
              "defaults_argv": defaults_argv, "summary": summary, "failures": failures, "notes": notes,
              "rounds": [{label: run.to_dict() for label, run in r.items()} for r in done]}
    view.study.set_user_attr(f"{VERIFY_PREFIX}{preset}", record)
    tracker = make_tracker(tracking_uri or view.attrs.get(TRACKING_URI_ATTR), no_mlflow)
    tracker.preset_verified(view, preset, record, _metrics(preset, summary))
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        for line in summary_lines(summary, n_vocab=vocab.n_vocab, failures=failures) + [f"note: {n}" for n in notes]:
            click.echo(line)
        drafted = [(sum(run.draft_n), sum(run.draft_accepted)) for r in done for run in r.values()
                   if run.label == "preset" and run.ok]
        n, accepted = sum(d for d, _ in drafted), sum(a for _, a in drafted)
        if cfg.speculative:
            study_share = candidate.figures.acceptance
            click.echo(f"speculative decoding ({cfg.spec_type}): {100 * accepted / n:.0f}% of {n:,} drafted tokens "
                       f"accepted" if n else f"speculative decoding ({cfg.spec_type}): nothing drafted")
            if study_share is not None:
                click.echo(f"  (study: {100 * study_share:.0f}%)")
    sys.stdout.flush()
    if failures:
        sys.exit(1)


def _scenarios(view, prompts: str | None, max_tokens: int | None) -> tuple:
    """The requests verify answers: --prompts, else a scenarios study's own (capped at --max-tokens); () for the
    other workloads.

    Raises:
        UserError: a bad file, a twin, or --max-tokens without scenarios.
    """
    from llama_tuner.measure.scenarios import capped_to, load_scenarios, refuse_twin, scenarios_of
    from llama_tuner.model.info import load_model_info
    from llama_tuner.study.keys import SCENARIOS_ATTR

    if prompts:
        scenarios = load_scenarios(prompts)
    elif view.attrs.get(SCENARIOS_ATTR):
        scenarios = scenarios_of(view.attrs[SCENARIOS_ATTR])
    elif max_tokens is not None:
        raise UserError("--max-tokens caps the scenarios' answers, and this study has none",
                        "add --prompts FILE, or leave --max-tokens out")
    else:
        return ()
    refuse_twin(load_model_info(view.model_path))
    return capped_to(scenarios, max_tokens)
