"""The ``llama-tuner`` command line: a click group whose errors are one line, exit code 2."""

from __future__ import annotations

import logging
import os
import sys

import click

from llama_tuner import __version__
from llama_tuner.errors import UserError


def quiet_libraries() -> None:
    """Keep Optuna's and MLflow's INFO lines out of the output: the progress display says what happens."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna  # its logger is configured on import; set the level after

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class TunerGroup(click.Group):
    """A click group that reports bad input as one line and exit code 2, never a traceback."""

    def main(self, args=None, prog_name=None, **extra):  # noqa: D102 - click's signature
        quiet_libraries()
        try:
            return super().main(args=args, prog_name=prog_name or "llama-tuner", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "llama-tuner"
            click.echo(f"error: {exc.format_message()}; see `{where} --help`", err=True)
            sys.exit(UserError.exit_code)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=TunerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llama-tuner")
def cli() -> None:
    """Find the fastest llama.cpp settings for a GGUF model on this machine."""


def _register() -> None:
    from llama_tuner.cli.bench import bench
    from llama_tuner.cli.model_commands import demo, inspect, models, quality, synth
    from llama_tuner.cli.serve import serve
    from llama_tuner.cli.study import export, report, tune, worker
    from llama_tuner.cli.tracking import compare, sync, ui
    from llama_tuner.cli.verify import verify

    for command in (tune, worker, report, export, serve, compare, bench, inspect, models, quality, synth, demo, sync,
                    ui):
        cli.add_command(command)
    cli.add_command(verify)


_register()


def main() -> None:
    """Console-script entry point."""
    cli.main()
