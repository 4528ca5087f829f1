"""``llama-tuner sync``, ``ui`` and ``compare``: MLflow, the dashboards, and models side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import click

from tuner.cli import cli
from tuner.cli_study import DEFAULT_STORAGE
from tuner.errors import UserError
from tuner.tracking import DEFAULT_TRACKING_URI, default_tracking_uri


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    click.echo(f"warning: {message}", err=True)


def make_tracker(tracking_uri: str | None, no_mlflow: bool):
    """The MLflow tracker for ``tune``, or a silent one with --no-mlflow."""
    from tuner.tracking import MlflowTracker, Tracker

    return Tracker() if no_mlflow else MlflowTracker(tracking_uri or default_tracking_uri(), warn)


@cli.command()
@click.argument("study")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--tracking-uri", help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}).")
def sync(study: str, storage: str, tracking_uri: str | None) -> None:
    """Write STUDY's trials that MLflow lacks (after MLflow was unreachable); never duplicates."""
    from tuner.optuna_setup import make_storage
    from tuner.study_view import StudyView
    from tuner.tracking import MlflowTracker

    view = StudyView.load(make_storage(storage), study)
    uri = tracking_uri or default_tracking_uri()
    tracker = MlflowTracker(uri, warn)
    from tuner.tracking import sync as sync_runs

    try:
        created, present = sync_runs(view, tracker)
    except Exception as exc:  # noqa: BLE001 - one line, whatever MLflow raised
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"MLflow at {uri} is not reachable: {first}", "start it, or pass --tracking-uri") from None
    click.echo(f"{view.name}: {created} runs written, {present} already in MLflow at {uri}")


@cli.command()
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
    click.echo(f"serving on http://127.0.0.1:{port} (Ctrl-C to stop)", err=True)
    try:
        sys.exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
@click.argument("studies", nargs=-1, required=True)
@click.option("--preset", type=click.Choice(["fastest", "max-context", "balanced"]), default="fastest",
              show_default=True)
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
def compare(studies: tuple[str, ...], preset: str, storage: str) -> None:
    """Compare the presets of several studies (models) and explain their speed."""
    from tuner.compare import compare_text, row_for
    from tuner.optuna_setup import make_storage
    from tuner.study_view import StudyView

    store = make_storage(storage)
    rows = []
    for name in studies:
        row = row_for(StudyView.load(store, name), preset)
        if row is None:
            raise UserError(f"study {name!r} has no feasible configuration", f"see `llama-tuner report {name}`")
        rows.append(row)
    click.echo(compare_text(rows), nl=False)
