"""``llama-tuner tune``, ``export`` and ``report``: run a study, hand over its presets."""

from __future__ import annotations

import re

import click

from llama_tuner.errors import UserError
from llama_tuner.report.export import FORMATS, MULTI_FORMATS
from llama_tuner.study.presets import OBJECTIVES, PRESET_NAMES
from llama_tuner.study.quality_gate import DEFAULT_MAX_KLD
from llama_tuner.study.storage import DEFAULT_STORAGE, SAMPLERS
from llama_tuner.measure.config import ENGINES
from llama_tuner.measure.workloads import WORKLOADS


def _pairs(items: tuple[str, ...], option: str, sep: str = "=") -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition(sep)
        if not eq or not key.strip() or not value.strip():
            raise UserError(f"{option} {item!r} is not KEY{sep}VALUE", f"write {option} n_threads{sep}4")
        out[key.strip()] = value.strip()
    return out


def _ranges(items: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    out = {}
    for key, span in _pairs(items, "--range").items():
        m = re.fullmatch(r"(-?\d+):(-?\d+)", span)
        if not m:
            raise UserError(f"--range {key}={span!r} is not LO:HI", f"write --range {key}=1:8")
        out[key] = (int(m.group(1)), int(m.group(2)))
    return out


@click.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--study", "study_name", help="Study name (default: <model>@<hardware>); the same name resumes.")
@click.option("--trials", type=int, default=20, show_default=True, help="Configurations to measure.")
@click.option("--timeout", "timeout", help="Stop starting trials after this long, e.g. 20m.")
@click.option("--vram-budget", help="Peak memory allowed, e.g. 12GiB (RAM on CPU-only machines; default: all).")
@click.option("--min-headroom", default="512MiB", show_default=True, help="Memory to leave free at the peak.")
@click.option("--min-ctx", type=int, default=4096, show_default=True, help="Smallest context worth having.")
@click.option("--depth", type=int, default=0, show_default=True, help="Tokens already in the cache when measuring.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None,
              help="What 'fastest' means: generation, prompt processing, their geometric mean, or seconds to "
                   "answer (default: the workload's own: tg, or answer for chat, reasoning, long, custom).")
@click.option("--workload", type=click.Choice(WORKLOADS), default=None,
              help="What the model is for: pp-tg (llama-bench's tests), chat, reasoning, long, server, custom, or "
                   "scenarios (your requests answered for real: --prompts). Default: pp-tg, scenarios with --prompts.")
@click.option("--prompt-tokens", type=int, help="The workload's prompt tokens (custom, chat, reasoning, long).")
@click.option("--gen-tokens", type=int, help="The workload's generated tokens (custom, chat, reasoning, long).")
@click.option("--min-stream-tps", type=float, default=0.0,
              help="server: the generation t/s every stream must see (default: no floor).")
@click.option("--baseline", "baseline_flags", help='Your llama-server command line, e.g. "-c 2048 -b 512 -t 8".')
@click.option("--set", "pins", multiple=True, metavar="KEY=VALUE", help="Pin a setting (repeatable).")
@click.option("--range", "ranges", multiple=True, metavar="KEY=LO:HI", help="Narrow a searched setting.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
@click.option("--seed", type=int, help="Sampler seed.")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True, help="Optuna storage URL.")
@click.option("--trial-timeout", default="15m", show_default=True, help="Kill one measurement after this long.")
@click.option("--no-confirm", is_flag=True,
              help="Skip the confirmation race (presets are then the baselines only: nothing else is confirmed).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db).")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@click.option("--download", is_flag=True, help="Fetch an hf:ORG/REPO[:QUANT] model missing from the cache.")
@click.option("--max-kld", type=float, default=DEFAULT_MAX_KLD, show_default=True,
              help="No preset uses a KV cache whose KL divergence against f16 exceeds this (see `quality`).")
@click.option("--engine", type=click.Choice(ENGINES), default=None,
              help="What measures each trial: a child process through llama-cpp-python, or llama-server itself "
                   "over HTTP (its own timings; speculative decoding searched). Default: the child, llama-server "
                   "for the scenarios.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="--workload scenarios: your requests (JSONL, one a line: messages or prompt, optional max_tokens "
                   "and name), each answered for real; default: a bundled dozen (chat, summaries, code edits, "
                   "arithmetic, a long document).")
@click.option("--max-tokens", "max_tokens", type=int, metavar="N",
              help="--workload scenarios: cap every answer at N tokens (default: each line's max_tokens, 4096).")
@click.option("--max-capped", "max_capped", type=float, default=1.0,
              help="--workload scenarios: the largest share of answers that may hit their cap in a preset "
                   "(default 1: any).")
@click.option("--llama-server", "llama_server", metavar="PATH",
              help="The llama-server for --engine llama-server (default: $LLAMA_TUNER_LLAMA_SERVER, PATH, then "
                   "`make llama-server`'s build).")
@click.option("--tg-prompt", "tg_prompt", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="--engine llama-server: tg answers this request (a text file, one chat message); default: a "
                   "bundled code-editing request.")
@click.option("--draft-model", "draft_model", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="--engine llama-server: a smaller model of the same vocabulary, searched as speculative "
                   "decoding's draft (--spec-type draft-simple).")
def tune(model: str, study_name: str | None, trials: int, timeout: str | None, vram_budget: str | None,
         min_headroom: str, min_ctx: int, depth: int, objective: str, baseline_flags: str | None,
         pins: tuple[str, ...], ranges: tuple[str, ...], sampler: str, seed: int | None, storage: str,
         trial_timeout: str, no_confirm: bool, tracking_uri: str | None, no_mlflow: bool, download: bool,
         max_kld: float, workload: str, prompt_tokens: int | None, gen_tokens: int | None,
         min_stream_tps: float, engine: str, llama_server: str | None, tg_prompt: str | None,
         draft_model: str | None, prompts: str | None, max_tokens: int | None, max_capped: float) -> None:
    """Find the best llama.cpp settings for MODEL (a path, ollama:NAME[:TAG] or hf:ORG/REPO[:QUANT]) on this
    machine, then print its presets."""
    from llama_tuner.cli.tracking import make_tracker
    from llama_tuner.model.stores import resolve_model
    from llama_tuner.study.session import StudyRequest, open_tuner

    model = resolve_model(model, download=download)
    workload = workload or ("scenarios" if prompts or max_tokens is not None else "pp-tg")
    request = StudyRequest(model=model, study_name=study_name, trials=trials, timeout=timeout,
                           vram_budget=vram_budget, min_headroom=min_headroom, min_ctx=min_ctx, depth=depth,
                           objective=objective, baseline_flags=baseline_flags, pins=_pairs(pins, "--set"),
                           ranges=_ranges(ranges), sampler=sampler, seed=seed, storage=storage,
                           trial_timeout=trial_timeout, max_kld=max_kld, workload=workload,
                           prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, min_stream_tps=min_stream_tps,
                           engine=engine, llama_server=llama_server, tg_prompt=tg_prompt, draft_model=draft_model,
                           prompts=prompts, max_tokens=max_tokens, max_capped=max_capped)
    tuner = open_tuner(request, tracker=make_tracker(tracking_uri, no_mlflow))
    run_and_print(tuner, confirm=not no_confirm, max_kld=max_kld)


def run_and_print(tuner, confirm: bool, max_kld: float | None = None) -> None:
    """Run the study with a live display, confirm the top candidates, print presets and commands.

    With ``max_kld``, first measure (once per model and build) the KV caches' quality, so that no preset
    uses a cache over it.

    Raises:
        UserError: the run was interrupted (everything measured is saved).
    """
    from llama_tuner.cli.progress import make_progress
    from llama_tuner.report.export import host_cache_mib, llama_server_command
    from llama_tuner.report.study_report import header, kv_answers_table, presets_table, why_lines
    from llama_tuner.study.confirmation import confirm_leaders
    from llama_tuner.study.quality_gate import record_for_study
    from llama_tuner.study.view import StudyView

    crash = tuner.launcher.repack_crash() if tuner.space.fixed.get("repack") is False else None
    if crash:
        click.echo(f"note: llama.cpp's repacked (AMX) weights crash on this CPU ({crash.split(':')[0]}, "
                   "ggml-org/llama.cpp#26954): searching repack off only (llama-server --no-repack)", err=True)
    if tuner.space.fit_layers:
        click.echo("note: each trial offloads as many layers as the memory model says fit the budget "
                   "(--range n_gpu_layers=LO:HI searches them instead)", err=True)
    for note in tuner.notes:
        click.echo(f"note: {note}", err=True)
    already, target = tuner.measured_count(), tuner.target()
    if already:
        click.echo(f"resuming study {tuner.study.study_name}: {already} of {target} configurations "
                   "already measured", err=True)
    progress = make_progress(target, already, objective=tuner.settings.objective)
    tuner.observers.append(progress)
    try:
        with progress:
            if max_kld is not None:
                record_for_study(tuner, max_kld, on_phase=progress.phase)
            tuner.run()
            view = StudyView(tuner.study)
            # A resumed study that measured nothing new keeps its finished race: nothing is measured twice;
            # a race that Ctrl-C cut goes on where it stopped.
            race = view.race
            if confirm and view.candidates and (tuner.measured_count() > already or race is None
                                                or not race.get("complete")):
                confirm_leaders(tuner, on_pass=lambda top: progress.phase(_confirm_line(tuner, top)),
                                on_round=lambda *a: progress.phase(_round_line(view, *a)))
            if tuner.tracker.enabled:
                progress.phase("writing the study's summary to MLflow")
            tuner.tracker.study_finished(StudyView(tuner.study))
    except KeyboardInterrupt:
        raise UserError(f"interrupted after {tuner.measured_count()} measured configurations (all saved)",
                        "run the same command again to resume") from None
    view = StudyView(tuner.study)
    click.echo(header(view))
    click.echo("\npresets:\n" + presets_table(view))
    click.echo(why_lines(view))
    agreement = kv_answers_table(view)
    if agreement:
        click.echo("\n" + agreement)
    for name, p in view.presets.items():
        click.echo(f"\nllama-server ({name}):\n  " + llama_server_command(
            view.model_path, p.candidate.figures.config, cache_ram_mib=host_cache_mib(view, p.candidate)))


def _confirm_line(tuner, numbers: list[int]) -> str:
    """What the race measures, and about how long it takes at most (from the trials' own times)."""
    from llama_tuner.cli.progress import clock
    from llama_tuner.study.confirmation import MIN_ROUNDS, round_cost_s

    rounds = max(MIN_ROUNDS, tuner.settings.confirm_repetitions)
    cost = round_cost_s(tuner, numbers)
    return (f"confirming the leaders (trials {', '.join(map(str, numbers))}): one repetition each per round, "
            f"taking turns, until decided: {MIN_ROUNDS} to {rounds} rounds, "
            f"~{clock(MIN_ROUNDS * cost)} to ~{clock(rounds * cost)}")


def _round_line(view, done: int, rounds: int, verdict, left_s: float) -> str:
    """One round of the race: its number, the running verdict, and the time left at most."""
    from llama_tuner.cli.progress import clock

    bases = frozenset(c.trial for c in view.candidates if c.baseline)
    tail = "decided" if left_s == 0 else f"at most ~{clock(left_s)} left"
    return f"  round {done}/{rounds}: {verdict.describe(bases)} | {tail}"


@click.command()
@click.option("--study", "study_name", required=True, help="The study to join (created by `tune`).")
@click.option("--storage", required=True, help="The study's storage, e.g. postgresql://user@db/tuning.")
@click.option("--gpu", help="The GPU this worker measures on: an index as nvidia-smi numbers them, or a UUID "
                           "(GPU-...); sets CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER=PCI_BUS_ID.")
@click.option("--model", help="The model file's path on this machine, if not the study's path.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the study's).")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
def worker(study_name: str, storage: str, gpu: str | None, model: str | None, tracking_uri: str | None,
           no_mlflow: bool) -> None:
    """Join a study and measure its trials on this machine until it has its count."""
    from llama_tuner.cli.tracking import make_tracker
    from llama_tuner.study.keys import TRACKING_URI_ATTR
    from llama_tuner.study.worker import join_study

    tracker = make_tracker(tracking_uri or _study_attr(storage, study_name, TRACKING_URI_ATTR), no_mlflow)
    tuner = join_study(study_name, storage, gpu=gpu, model=model, tracker=tracker)
    before = tuner.measured_count()
    try:
        tuner.run(enqueue_baselines=False)
    except KeyboardInterrupt:
        raise UserError("worker interrupted; its trial will be retried", "start it again to rejoin") from None
    click.echo(f"{study_name}: {tuner.measured_count()}/{tuner.settings.trials} configurations measured "
               f"({tuner.measured_count() - before} while this worker ran)")


def _study_attr(storage: str, study_name: str, key: str):
    import optuna

    from llama_tuner.study.storage import make_storage

    try:
        return optuna.load_study(study_name=study_name, storage=make_storage(storage)).user_attrs.get(key)
    except KeyError:
        return None


@click.command()
@click.argument("studies", nargs=-1, required=True)
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="fastest", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS + MULTI_FORMATS), default="llama-server",
              show_default=True, help="llama-swap: one model per study, several studies at once.")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--llama-server", "llama_server", metavar="PATH",
              help="The llama-server the command is for: it runs it, spelled as its --help says (default: "
                   "llama-server, spelled as llama.cpp at llama-cpp-python's commit).")
def export(studies: tuple[str, ...], preset: str, fmt: str, storage: str, llama_server: str | None) -> None:
    """Print a preset of STUDY as a llama-server command, Python kwargs, an Ollama Modelfile or JSON,
    or the presets of several STUDIES as one llama-swap configuration."""
    from llama_tuner.measure.llama_server import find_llama_server, probe
    from llama_tuner.report.export import llama_swap_config, render_study_preset
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    if fmt not in MULTI_FORMATS and len(studies) != 1:
        raise UserError(f"--format {fmt} exports one study, not {len(studies)}",
                        "name one study, or use --format llama-swap for several")
    if llama_server and fmt not in ("llama-server", "json", "llama-swap"):
        raise UserError(f"--llama-server is for a llama-server command; --format {fmt} has none",
                        "use --format llama-server, json or llama-swap, or leave --llama-server out")
    exe = find_llama_server(llama_server) if llama_server else None
    store = make_storage(storage)
    views = [StudyView.load(store, name) for name in studies]
    server = probe(exe) if exe else None
    if fmt == "llama-swap":
        click.echo(llama_swap_config(views, preset, server=server), nl=False)
    else:
        click.echo(render_study_preset(views[0], fmt, preset, server=server), nl=False)


@click.command()
@click.argument("study")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
def report(study: str, storage: str) -> None:
    """Print STUDY's trials and presets, with each preset's gain over the baselines."""
    from llama_tuner.report.study_report import full_report
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    click.echo(full_report(StudyView.load(make_storage(storage), study)))
