"""``llama-tuner sync``, ``ui`` and ``compare``: MLflow, the dashboards, and models side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import click

from llama_tuner.measure.workloads import WORKLOADS

from llama_tuner.errors import UserError
from llama_tuner.study.presets import PRESET_NAMES
from llama_tuner.study.storage import DEFAULT_STORAGE
from llama_tuner.tracking.mlflow_tracker import DEFAULT_TRACKING_URI, default_tracking_uri


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
    """Start the MLflow UI (or optuna-dashboard) on 127.0.0.1 over this project's stores."""
    if dashboard:
        exe = shutil.which("optuna-dashboard", path=os.path.dirname(sys.executable))
        if exe is None:
            raise UserError("optuna-dashboard is not installed", "pip install optuna-dashboard")
        cmd = [exe, storage, "--host", "127.0.0.1", "--port", str(port)]
    else:
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
    try:
        sys.exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        sys.exit(0)


@click.command()
@click.argument("studies", nargs=-1, required=True)
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="fastest", show_default=True)
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--workload", type=click.Choice(WORKLOADS), default=None,
              help="Compare seconds per answer of this workload (default: the studies' own).")
def compare(studies: tuple[str, ...], preset: str, storage: str, workload: str | None) -> None:
    """Compare the presets of several studies (models) and explain their speed: for a chat, reasoning, long or
    custom workload, the seconds each takes to answer, with its KV cache's quality."""
    from llama_tuner.report.compare import compare_text, row_for, workload_sizes
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    store = make_storage(storage)
    views = [StudyView.load(store, name) for name in studies]
    workload = workload or views[0].workload
    sizes = workload_sizes(views, preset, workload)
    rows = []
    for name, view in zip(studies, views):
        row = row_for(view, preset, workload, sizes)
        if row is None:
            raise UserError(f"study {name!r} has no feasible configuration", f"see `llama-tuner report {name}`")
        rows.append(row)
    click.echo(compare_text(rows), nl=False)
