"""``llama-tuner serve``: run a study's preset as an OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from pathlib import Path

import click

from llama_tuner.errors import UserError
from llama_tuner.measure.llama_server import find_llama_server, probe
from llama_tuner.study.presets import PRESET_NAMES
from llama_tuner.study.storage import DEFAULT_STORAGE

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port(host: str, port: int) -> None:
    """Refuse a port something else listens on, before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})", "pick another with --port") from None


def server_argv(view, preset: str, host: str, port: int, llama_server: str | None) -> tuple[list[str], str]:
    """The command that serves ``preset`` of the study, and which server it runs.

    llama-server (the program ``llama_server``) with the exported flags, spelled as its ``--help`` says; without
    one, llama-cpp-python's server with the same settings, where it can carry them.

    Raises:
        UserError: no such preset, the model file is missing here, ``llama_server`` is no llama-server or lacks a
            flag the preset needs, or there is no llama-server and the preset needs one (experts in host memory,
            several streams).
    """
    from llama_tuner.measure.llama_cpp_server import check_servable
    from llama_tuner.report.export import host_cache_mib, llama_server_args

    candidate = view.preset(preset).candidate
    cfg = candidate.figures.config
    if not Path(view.model_path).is_file():
        raise UserError(f"the study's model {view.model_path} is not on this machine", "copy it back to that path")
    if llama_server:
        server = probe(llama_server)
        for flag in ("--host", "--port"):
            server.require(flag)
        return llama_server_args(view.model_path, cfg, program=server.path, server=server,
                                 cache_ram_mib=host_cache_mib(view, candidate)) + \
            ["--host", host, "--port", str(port)], f"llama-server {server.version} ({server.path})"
    check_servable(cfg)
    settings = {**cfg.to_dict(), "model_path": view.model_path, "alias": Path(view.model_file).stem,
                "host": host, "port": port, "chat_format": _chat_format(view.model_path)}
    return [sys.executable, "-m", "llama_tuner.measure.llama_cpp_server", json.dumps(settings)], "llama-cpp-python"


def _chat_format(model_path: str) -> str | None:
    """The llama-cpp-python chat format to use: None where the GGUF has a chat template (it is used), else the
    family's own turn markers for Gemma (llama-cpp-python would fall back to Llama 2's, which Gemma ends at
    once) and llama-cpp-python's fallback for the rest. llama-server makes the same choice itself."""
    from llama_tuner.model.info import load_model_info

    info = load_model_info(model_path)
    if info.extra.get("chat_template"):
        return None
    return "gemma" if info.architecture.startswith("gemma") else None


@click.command()
@click.argument("study")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="fastest", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address (loopback unless told).")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--llama-server", "llama_server", help="llama-server to run (default: $LLAMA_TUNER_LLAMA_SERVER, "
                                                     "else on PATH, else `make llama-server`'s build; without one, "
                                                     "llama-cpp-python's OpenAI-compatible server, which cannot "
                                                     "serve --n-cpu-moe or --parallel presets, nor logprobs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the study's).")
@click.option("--no-mlflow", is_flag=True, help="Do not record the served preset in MLflow.")
def serve(study: str, preset: str, port: int, host: str, storage: str, llama_server: str | None,
          tracking_uri: str | None, no_mlflow: bool) -> None:
    """Serve a preset of STUDY (OpenAI-compatible, /v1/completions and /v1/chat/completions) until Ctrl-C."""
    from llama_tuner.cli.tracking import make_tracker
    from llama_tuner.study.keys import TRACKING_URI_ATTR
    from llama_tuner.study.storage import make_storage
    from llama_tuner.study.view import StudyView

    view = StudyView.load(make_storage(storage), study)
    exe = find_llama_server(llama_server)
    _check_port(host, port)
    argv, kind = server_argv(view, preset, host, port, exe)
    tracker = make_tracker(tracking_uri or view.attrs.get(TRACKING_URI_ATTR), no_mlflow)
    tracker.preset_served(view, preset, shlex.join(argv))
    trial = view.presets[preset].candidate.trial
    click.echo(f"serving {view.model_file}, preset {preset} (trial {trial}) with {kind} at "
               f"http://{host}:{port}/v1 (Ctrl-C stops it)", err=True)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: other machines can reach this server", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
