"""The live progress display of ``tune``: trial n/N, elapsed, best so far, current configuration."""

from __future__ import annotations

import sys
import time

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.live import Live
from rich.text import Text

from tuner.config import BenchConfig
from tuner.records import REUSED_ATTR
from tuner.result import TrialResult


def describe(c: BenchConfig) -> str:
    """A compact one-line description of a configuration."""
    return (f"ngl {c.n_gpu_layers} ctx {c.n_ctx} b {c.n_batch} ub {c.n_ubatch} t {c.n_threads}/{c.n_threads_batch} "
            f"fa {int(c.flash_attn)} kv {c.type_k}/{c.type_v}")


class LiveProgress:
    """An observer that redraws one status block on a terminal, and stays silent otherwise."""

    def __init__(self, target: int, already: int, console: Console | None = None):
        self.console = console or Console(file=sys.stderr)
        self.enabled = self.console.is_terminal
        self.target, self.done = target, already
        self.start = time.monotonic()
        self.best: tuple[float, int] | None = None
        self.current = ""
        self.last = ""
        self.live = Live(self._render(), console=self.console, transient=False, auto_refresh=True,
                         refresh_per_second=2) if self.enabled else None

    def __enter__(self) -> "LiveProgress":
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.stop()

    def _render(self) -> Text:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.start))
        best = f"{self.best[0]:.2f} t/s (trial {self.best[1]})" if self.best else "-"
        return Text(f"trial {min(self.done + 1, self.target)}/{self.target}  elapsed {elapsed}  best tg {best}\n"
                    f"now: {self.current or '-'}\nlast: {self.last or '-'}")

    def trial_started(self, number: int, config: BenchConfig) -> None:
        """Show the configuration being measured."""
        self.current = f"#{number} {describe(config)}"
        if self.live:
            self.live.update(self._render())

    def trial_finished(self, trial: FrozenTrial, result: TrialResult, reused: bool) -> None:
        """Count the trial and update the best."""
        if not reused:
            self.done += 1
        feasible = all(v <= 0 for v in trial.constraints.values())
        if result.ok and feasible and (self.best is None or result.tg_mean > self.best[0]):
            self.best = (result.tg_mean, trial.number)
        figures = f"tg {result.tg_mean:.2f} pp {result.pp_mean:.2f}" if result.ok else result.status.value
        self.last = f"#{trial.number} {figures}" + (f" (same as #{trial.user_attrs[REUSED_ATTR]})" if reused else "")
        self.current = ""
        if self.live:
            self.live.update(self._render())
