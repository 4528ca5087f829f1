"""What a person watching `tune` sees: one plain line per trial and per phase, with the time left."""

from __future__ import annotations

import io
from types import SimpleNamespace

from llama_tuner.cli.progress import Progress, clock
from llama_tuner.measure.config import BenchConfig
from llama_tuner.measure.result import Rates, Status, TrialResult


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def trial(number: int, ok: bool = True, reused_from: int | None = None):
    attrs = {"reused_from": reused_from} if reused_from is not None else {}
    return SimpleNamespace(number=number, constraints={"ran_ok": 0.0 if ok else 1.0}, user_attrs=attrs)


def result(ok: bool = True) -> TrialResult:
    cfg = BenchConfig(n_ctx=4096, n_threads=2, n_threads_batch=2)
    if not ok:
        return TrialResult(Status.OOM, cfg, "m.gguf", reason="out of memory: cudaMalloc failed")
    return TrialResult(Status.OK, cfg, "m.gguf", pp=Rates(512, [10**9]), tg=Rates(128, [2 * 10**9]))


def test_plain_progress_prints_one_line_per_trial_with_the_time_left():
    out, now = io.StringIO(), Clock()
    p = Progress(10, 2, plain=True, out=out, now=now)  # resumed: 2 of 10 already measured
    with p:
        now.t += 30
        p.trial_finished(trial(5), result(), reused=False)
        now.t += 30
        p.trial_finished(trial(6, ok=False), result(ok=False), reused=False)
        p.trial_finished(trial(7, reused_from=5), result(), reused=True)
        p.phase("confirming the leaders")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[3/10] trial 5: tg 64.00 pp 512.00 t/s | ngl 0 ctx 4096")
    assert "elapsed 0:30, ~3:30 left" in lines[0]  # 30 s for 1 trial, 7 to go
    assert lines[1].startswith("[4/10] trial 6: oom: out of memory") and "(infeasible)" in lines[1]
    assert "~3:00 left" in lines[1]  # 60 s for 2 trials, 6 to go
    assert lines[2].startswith("[4/10] trial 7: tg 64.00") and "(same as #5)" in lines[2]  # reused: not counted
    assert lines[3] == "confirming the leaders"
    assert p.best == (64.0, 5, "tg 64.00 pp 512.00 t/s")


def test_no_estimate_before_the_first_measured_trial_and_clock_format():
    p = Progress(5, 0, plain=True, out=io.StringIO(), now=Clock())
    assert p.left_s() is None
    assert (clock(59), clock(61), clock(3725)) == ("0:59", "1:01", "1:02:05")
