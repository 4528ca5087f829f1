"""What a person watching `tune` sees: one plain line per trial and per phase, with the time left."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

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


def skipped_trial(number: int):
    """A trial the memory model predicted not to fit: recorded as INVALID, never loaded."""
    return SimpleNamespace(number=number, constraints={"ran_ok": 1.0}, user_attrs={"skipped": True})


def rates(tg_s: float, pp_s: float, workload: str = "bench") -> TrialResult:
    """A result of 128 generated and 512 prompt tokens in tg_s and pp_s seconds."""
    cfg = BenchConfig(n_ctx=4096, n_threads=2, n_threads_batch=2, workload=workload)
    return TrialResult(Status.OK, cfg, "m.gguf", pp=Rates(512, [int(pp_s * 1e9)]), tg=Rates(128, [int(tg_s * 1e9)]))


def test_skipped_trials_are_not_counted_as_measured():
    out, now = io.StringIO(), Clock()
    p = Progress(3, 0, plain=True, out=out, now=now)
    skipped = TrialResult(Status.INVALID, BenchConfig(n_ctx=4096), "m.gguf",
                          reason="predicted peak 30.00 GiB exceeds the budget 24.00 GiB; not loaded")
    with p:
        now.t += 10
        p.trial_finished(trial(0), result(), reused=False)
        for number in (1, 2, 3):  # the study goes on until 3 are measured: these do not bring it closer
            p.trial_finished(skipped_trial(number), skipped, reused=False)
        now.t += 10
        p.trial_finished(trial(4), result(), reused=False)
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == ["[1/3]", "[1/3]", "[1/3]", "[1/3]", "[2/3]"]
    assert "skipped: predicted not to fit, not loaded" in lines[1]
    assert "~0:10 left" in lines[-1]  # 20 s for the 2 measured trials, 1 to go


@pytest.mark.parametrize("objective,winner", [("tg", 1), ("pp", 2), ("balanced", 3)])
def test_the_best_so_far_is_the_fastest_by_the_studys_objective(objective, winner):
    p = Progress(10, 0, plain=True, objective=objective, out=io.StringIO(), now=Clock())
    # tg, pp t/s: #1 128, 64; #2 32, 1024; #3 64, 640 (their geometric means: 90.5, 181, 202)
    for number, (tg_s, pp_s) in ((1, (1.0, 8.0)), (2, (4.0, 0.5)), (3, (2.0, 0.8))):
        p.trial_finished(trial(number), rates(tg_s, pp_s), reused=False)
    assert p.best[1] == winner


def test_the_best_answer_takes_the_fewest_seconds():
    p = Progress(10, 0, plain=True, objective="answer", out=io.StringIO(), now=Clock())
    p.trial_finished(trial(1), rates(4.0, 1.0, workload="chat"), reused=False)  # 5 s to answer
    p.trial_finished(trial(2), rates(1.0, 3.5, workload="chat"), reused=False)  # 4.5 s, though tg is 4x faster
    p.trial_finished(trial(3), rates(0.5, 6.0, workload="chat"), reused=False)  # 6.5 s, the fastest tg
    assert p.best[1:] == (2, "answer 4.50 s")


def test_a_speculative_configuration_says_its_spec_type_in_the_progress_line():
    from llama_tuner.cli.progress import describe
    from llama_tuner.measure.config import BenchConfig

    assert describe(BenchConfig(spec_type="ngram-mod", n_threads=2, n_threads_batch=2)).endswith(" spec ngram-mod")
    assert "spec" not in describe(BenchConfig(n_threads=2, n_threads_batch=2))
