"""A worker process for distributed tests: joins a study and measures with the fake launcher.

Usage: python tests/fake_worker.py STUDY STORAGE_URL RECORD_FILE DELAY_S

Each measurement appends "start <pid> <settings key>" and "end <pid> <settings key>"
lines to RECORD_FILE, so a test can see which configurations were measured, by whom,
and kill a worker in the middle of one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402

from llama_tuner.testing.fakes import FakeLauncher  # noqa: E402
from llama_tuner.study.worker import join_study  # noqa: E402
from test_study import ENV  # noqa: E402


def main() -> None:
    study, url, record, delay = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def note(cfg) -> None:
        with open(record, "a") as f:
            f.write(f"start {os.getpid()} {cfg.settings_key()}\n")
        time.sleep(delay)
        with open(record, "a") as f:
            f.write(f"end {os.getpid()} {cfg.settings_key()}\n")

    tuner = join_study(study, url, launcher=FakeLauncher(env=ENV, on_measure=note), env=ENV,
                       heartbeat_s=1, grace_s=3)
    tuner.run(enqueue_baselines=False)


if __name__ == "__main__":
    main()
