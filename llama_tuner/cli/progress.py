"""The progress of ``tune``: trial n/N, elapsed, time left, best so far, the configuration measured now.

On a terminal (stdout and stderr both) one status block is redrawn in place; anywhere
else (a pipe, a CI log, nohup) each finished trial and each phase is one plain line on
stdout, so a log shows where a long run is and how long it has left.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.live import Live
from rich.text import Text

from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import TrialResult
from llama_tuner.study.keys import REUSED_ATTR, SKIPPED_ATTR
from llama_tuner.study.presets import speed


def describe(c: BenchConfig) -> str:
    """A compact one-line description of a configuration."""
    streams = f" np {c.n_parallel}" if c.workload == "server" else ""
    moe = f" ncmoe {c.n_cpu_moe}" if c.n_cpu_moe else ""
    return (f"ngl {c.n_gpu_layers}{moe} ctx {c.n_ctx}{streams} b {c.n_batch} ub {c.n_ubatch} "
            f"t {c.n_threads}/{c.n_threads_batch} fa {int(c.flash_attn)} kv {c.type_k}/{c.type_v}"
            + (f" spec {c.spec_type}" if c.speculative else ""))


def headline(r: TrialResult) -> str:
    """The figure a result's workload is judged by: seconds to answer, aggregate tg, or tg and pp."""
    if r.time_to_answer_s is not None:
        return f"answer {r.time_to_answer_s:.2f} s"
    if r.config.workload == "server":
        return f"tg {r.tg_mean:.2f} t/s aggregate"
    return f"tg {r.tg_mean:.2f} pp {r.pp_mean:.2f} t/s"


def figures(r: TrialResult) -> str:
    """The headline with the figures behind it: prompt and answer rates, or per-stream tg and pp."""
    s = r.answer_summary
    if s is not None:  # the scenarios
        drafts = f", {100 * s.acceptance:.0f}% drafts accepted" if s.draft_n else ""
        return (f"{s.median_s:.2f} s per answer (p90 {s.p90_s:.2f}), {s.generated_tokens:,.0f} tokens written "
                f"({s.thinking_tokens:,.0f} thinking), {s.capped}/{s.requests} capped{drafts}")
    if r.time_to_answer_s is not None:
        return f"{headline(r)} (prompt {r.pp_mean:.2f}, answer {r.tg_mean:.2f} t/s)"
    if r.config.workload == "server":
        return f"{headline(r)} ({r.stream_tg_mean:.2f} per stream) pp {r.pp_mean:.2f} t/s"
    return headline(r)


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """An observer of the study that counts measured trials, keeps the best and estimates the time left.

    Trials count toward n/N as the study counts them: a reused measurement or a trial skipped as
    predicted not to fit is not measured. The best so far is the fastest by the study's
    ``objective`` (tg, pp, balanced: their geometric mean, or answer: fewest seconds to answer).
    ``plain`` writes one line per finished trial and per phase to ``out``; otherwise a
    status block is redrawn on ``console`` (a terminal).
    """

    def __init__(self, target: int, already: int, *, plain: bool, objective: str = "tg", out: TextIO | None = None,
                 console: Console | None = None, now=time.monotonic):
        self.target, self.done, self.already, self.objective = target, already, already, objective
        self.plain, self.out, self.now = plain, out or sys.stdout, now
        self.start = now()
        self.best: tuple[float, int, str] | None = None  # score, trial, its figure
        self.current = self.last = ""
        self.console = console or Console(file=sys.stderr)
        self.live = None if plain else Live(self._render(), console=self.console, transient=False,
                                            auto_refresh=True, refresh_per_second=2)

    def __enter__(self) -> "Progress":
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.stop()

    def left_s(self) -> float | None:
        """Seconds left at this run's pace so far (None before its first measured trial)."""
        measured = self.done - self.already
        if measured <= 0:
            return None
        return (self.now() - self.start) / measured * max(0, self.target - self.done)

    def _timing(self) -> str:
        left = self.left_s()
        return f"elapsed {clock(self.now() - self.start)}, " + (f"~{clock(left)} left" if left is not None
                                                                 else "time left unknown yet")

    def _render(self) -> Text:
        best = f"{self.best[2]} (trial {self.best[1]})" if self.best else "-"
        return Text(f"trial {min(self.done + 1, self.target)}/{self.target}  {self._timing()}  best {best}\n"
                    f"now: {self.current or '-'}\nlast: {self.last or '-'}")

    def _show(self) -> None:
        if self.live:
            self.live.update(self._render())

    def phase(self, text: str) -> None:
        """A new phase of the run (confirming the leaders, writing to MLflow)."""
        if self.plain:
            print(text, file=self.out, flush=True)
        else:
            self.current = text
            self._show()

    def trial_started(self, number: int, config: BenchConfig) -> None:
        """Show the configuration being measured."""
        self.current = f"#{number} {describe(config)}"
        self._show()

    def trial_finished(self, trial: FrozenTrial, result: TrialResult, reused: bool) -> None:
        """Count the trial (if measured), update the best, and (plain) print its line."""
        skipped = SKIPPED_ATTR in trial.user_attrs
        if not reused and not skipped:
            self.done += 1
        feasible = all(v <= 0 for v in trial.constraints.values())
        score = speed(result, self.objective)[0] if result.ok else math.nan  # nan: the figure was not measured
        if feasible and not math.isnan(score) and (self.best is None or score > self.best[0]):
            self.best = (score, trial.number, headline(result))
        text = figures(result) if result.ok else f"{result.status.value}: {result.reason[:80]}"
        same = (f" (same as #{trial.user_attrs[REUSED_ATTR]})" if reused
                else " (skipped: predicted not to fit, not loaded)" if skipped else "")
        self.last = f"#{trial.number} {text}{same}"
        self.current = ""
        if self.plain:
            print(f"[{self.done}/{self.target}] trial {trial.number}: {text}{same}"
                  f"{'' if feasible else ' (infeasible)'} | {describe(result.config)} | {self._timing()}",
                  file=self.out, flush=True)
        self._show()


def make_progress(target: int, already: int, *, objective: str = "tg") -> Progress:
    """Redrawn in place where stdout and stderr are terminals, plain lines on stdout elsewhere; the best so far
    by ``objective`` (tg, pp, balanced or answer)."""
    plain = not (sys.stdout.isatty() and sys.stderr.isatty())
    return Progress(target, already, plain=plain, objective=objective)
