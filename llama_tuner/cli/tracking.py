"""``llama-tuner sync``, ``ui`` and ``compare``: MLflow, the dashboards, and models side by side."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import click
import psutil

from llama_tuner.measure.workloads import WORKLOADS

from llama_tuner.errors import UserError
from llama_tuner.study.presets import PRESET_NAMES
from llama_tuner.study.storage import DEFAULT_STORAGE
from llama_tuner.tracking.mlflow_tracker import DEFAULT_TRACKING_URI, default_tracking_uri

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0  # how long a server may take to stop on SIGTERM before it is killed
# MLflow 3 starts a job runner and its huey consumers beside the server (~250 MB each) unless told not to:
# the UI of llama-tuner's studies runs no jobs.
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    click.echo(f"warning: {message}", err=True)


def make_tracker(tracking_uri: str | None, no_mlflow: bool):
    """The MLflow tracker for ``tune``, or a silent one with --no-mlflow."""
    from llama_tuner.report.artifacts import write_tables
    from llama_tuner.report.study_report import study_description
    from llama_tuner.study.tracker import Tracker
    from llama_tuner.tracking.mlflow_tracker import MlflowTracker

    if no_mlflow:
        return Tracker()
    return MlflowTracker(tracking_uri or default_tracking_uri(), warn, write_files=write_tables,
                         describe=study_description)


@click.command()
@click.argument("study")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--tracking-uri", help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}).")
def sync(study: str, storage: str, tracking_uri: str | None) -> None:
    """Write STUDY's trials that MLflow lacks (after MLflow was unreachable); never duplicates."""
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView
    from llama_tuner.tracking.mlflow_tracker import sync as sync_runs

    view = StudyView.load(make_storage(storage), study)
    uri = tracking_uri or default_tracking_uri()
    tracker = make_tracker(uri, no_mlflow=False)

    try:
        created, present = sync_runs(view, tracker)
    except Exception as exc:  # noqa: BLE001 - one line, whatever MLflow raised
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"MLflow at {uri} is not reachable: {first}", "start it, or pass --tracking-uri") from None
    click.echo(f"{view.name}: {created} runs written, {present} already in MLflow at {uri}")


@click.command()
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--dashboard", is_flag=True, help="Start optuna-dashboard on the study storage instead.")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True, help="Study storage (for --dashboard).")
@click.option("--tracking-uri", help="MLflow backend store to browse.")
def ui(port: int, dashboard: bool, storage: str, tracking_uri: str | None) -> None:
    """Start the MLflow UI (or optuna-dashboard) on 127.0.0.1 over this project's stores; a SIGTERM, SIGINT or
    SIGHUP stops the server with every process it started."""
    env = dict(os.environ)
    if dashboard:
        from llama_tuner.study.storage import make_storage

        exe = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
        if exe is None:
            raise UserError("optuna-dashboard is not installed", "pip install optuna-dashboard")
        make_storage(storage)  # a bad URL is one line, and a new store gets its tables (the dashboard fails without)
        cmd = [exe, storage, "--host", "127.0.0.1", "--port", str(port)]
    else:
        env = {**NO_JOBS, **env}  # unless the user's environment asks for MLflow's jobs
        uri = tracking_uri or default_tracking_uri()
        if uri.startswith("http"):
            raise UserError(f"{uri} is already an MLflow server", "open it in a browser")
        if uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port)]
    where = f"http://127.0.0.1:{port}"
    # MLflow 3 opens experiments in its GenAI workspace unless the URL asks for the model-training one.
    runs = "" if dashboard else f"; studies: {where}/#/experiments?workflowType=machine_learning"
    click.echo(f"serving on {where}{runs} (Ctrl-C to stop)", err=True)
    sys.exit(run_server(cmd, env=env))


class _Stop(Exception):
    """A stop signal reached ``run_server`` while it waited for its server."""


def run_server(cmd: list[str], *, env: dict[str, str], grace_s: float = STOP_GRACE_S) -> int:
    """Run the server ``cmd`` in a session of its own until it exits, or until this process gets SIGTERM, SIGINT
    or SIGHUP (or fails); then stop the server's whole process tree: SIGTERM, and SIGKILL to what is left after
    ``grace_s`` (or at a second signal). Returns the exit code to leave with: the server's, 128 + the signal
    that killed it, or 0 when Ctrl-C stopped it.

    Raises:
        OSError: ``cmd`` cannot be started.
    """
    received: list[int] = []
    started: list[subprocess.Popen] = []
    waiting = False

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if waiting and len(received) == 1:  # break out of wait(); later signals only hurry the stop
            raise _Stop

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        # Its own session and process group: a signal to this process does not reach the server by itself
        # (nor does the terminal's Ctrl-C), so this process stops it, and all of it, always.
        started.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        waiting = True
        if received:  # a signal came while the server was being started
            raise _Stop
        code = started[0].wait()
    except _Stop:
        code = None
    finally:
        waiting = False
        if started:
            stopped = stop_tree(started[0], grace_s=grace_s, hurry=lambda: len(received) > 1)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code is None:
        code = 0 if received[0] == signal.SIGINT else stopped
    return 128 - code if code < 0 else code


def stop_tree(proc: subprocess.Popen, *, grace_s: float, hurry=lambda: False) -> int:
    """Stop ``proc`` (the leader of its own process group) and every process it started: SIGTERM to its group
    and to each descendant (one that left the group too), then SIGKILL to those alive after ``grace_s``, or as
    soon as ``hurry()`` is true. Returns ``proc``'s return code (negative: the signal that ended it)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def running() -> bool:
        if proc.poll() is None:
            return True
        for p in family:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                pass
        return False

    if running():
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while running() and time.monotonic() < deadline and not hurry():
            time.sleep(0.1)
        if running():
            send(signal.SIGKILL)
    return proc.wait()


@click.command()
@click.argument("studies", nargs=-1, required=True)
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="fastest", show_default=True)
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--workload", type=click.Choice(WORKLOADS), default=None,
              help="Compare seconds per answer of this workload (default: the studies' own).")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help="Compare the answers to these requests (JSONL, as tune --prompts): per request and in all, "
                   "seconds, tokens written (thinking apart), capped answers, and why one takes longer. A "
                   "scenarios study's own answers to requests of the same names are used; the rest are answered "
                   "now by each preset in llama-server.")
@click.option("--max-tokens", "max_tokens", type=int, metavar="N",
              help="With --prompts: cap every answer measured now at N tokens.")
@click.option("--llama-server", "llama_server", metavar="PATH",
              help="With --prompts: the llama-server that answers (default: as tune --engine llama-server finds "
                   "it).")
def compare(studies: tuple[str, ...], preset: str, storage: str, workload: str | None, prompts: str | None,
            max_tokens: int | None, llama_server: str | None) -> None:
    """Compare the presets of several studies (models) and explain their speed: for a chat, reasoning, long or
    custom workload, the seconds each takes to answer, with its KV cache's quality; with --prompts, their answers
    to your requests side by side."""
    from llama_tuner.report.compare import compare_text, row_for, workload_sizes
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    store = make_storage(storage)
    views = [StudyView.load(store, name) for name in studies]
    if prompts or max_tokens is not None or llama_server:
        from llama_tuner.cli.scenario_compare import compare_scenarios

        if workload is not None:
            raise UserError("--workload and --prompts compare different things", "give one of them")
        click.echo(compare_scenarios(views, preset, prompts, max_tokens=max_tokens, llama_server=llama_server),
                   nl=False)
        return
    workload = workload or views[0].workload
    sizes = workload_sizes(views, preset, workload)
    rows = []
    for name, view in zip(studies, views):
        row = row_for(view, preset, workload, sizes)
        if row is None:
            raise UserError(f"study {name!r} has no feasible configuration", f"see `llama-tuner report {name}`")
        rows.append(row)
    click.echo(compare_text(rows), nl=False)
