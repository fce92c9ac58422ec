"""Check 1: a run SIGKILLed anywhere and restarted equals an uninterrupted run.

Kill steps and write sites are drawn from a seeded generator (fixed seeds: never tuned), so
every run of the suite kills at the same places and a failure is reproducible.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness.train import run
from benchmarks.records.files import FAULT_ENV

from .conftest import FAMILIES, TINY, assert_same_run, cli, in_child, record

#: Files written during a 20-step run, and how often (checkpoints at 5, 10, 15, 20).
WRITES = {"checkpoint.pt": 4, "metrics.parquet": 4, "run.json": 6}


def _kill_points(seed: int) -> tuple[int, str]:
    """A seeded kill step in [1, 20] and a seeded write to die in (site:n:phase)."""
    rng = np.random.default_rng(seed)
    step = int(rng.integers(1, 21))
    site = str(rng.choice(sorted(WRITES)))
    n = int(rng.integers(1, WRITES[site] + 1))
    phase = str(rng.choice(["before_fsync", "before_replace"]))
    return step, f"{site}:{n}:{phase}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sigkill_at_a_random_step_or_write_then_resume_equals_an_uninterrupted_run(
    tiny, reference_runs, tmp_path: Path, family: str
) -> None:
    """Fault: SIGKILL of the training process (a) at a seeded random step
    (``faults.kill_at_step``) and (b) inside a seeded random atomic write, after the temporary
    file is written and before it is fsynced or moved into place (``GRADBENCH_FAULT``).
    Property: re-running the same config in the same directory gives metrics (every step, no
    gap, no duplicate row) and final parameters identical to an uninterrupted CPU run."""
    overrides = FAMILIES[family]
    step, write = _kill_points(seed=sorted(FAMILIES).index(family))
    reference = reference_runs(*overrides)

    killed = tmp_path / "at_step"
    code = in_child(run, tiny(*overrides, f"faults.kill_at_step={step}"), killed)
    assert code == -signal.SIGKILL
    assert record(killed)["status"] == "running" and record(killed)["last_step"] < step
    assert run(tiny(*overrides), killed) == "completed"
    assert_same_run(killed, reference)

    torn = tmp_path / "in_write"
    code = in_child(run, tiny(*overrides), torn, env={FAULT_ENV: write})
    assert code == -signal.SIGKILL, f"{write} did not kill the run"
    assert run(tiny(*overrides), torn) == "completed"
    assert_same_run(torn, reference)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_runs_killed_from_outside_and_in_writes_resume_to_the_uninterrupted_result(
    tmp_path: Path, family: str
) -> None:
    """Fault: the command-line run (``python -m benchmarks.train``) is SIGKILLed (a) from
    outside right after a seeded random number of checkpoint files appeared, (b) by itself at
    a seeded random step, (c) inside a seeded random write. Property: the same command re-run
    in the same directory finishes with the metrics and final parameters of an uninterrupted
    command-line run."""
    import subprocess
    import sys

    from .conftest import env_for_cli

    args = [*TINY, *FAMILIES[family], "steps=60", "checkpoint_every=5", "log_every=5"]
    rng = np.random.default_rng(100 + sorted(FAMILIES).index(family))
    whole = tmp_path / "whole"
    assert cli(*args, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0

    # (a) from outside, once a random number of checkpoints is recorded
    outside = tmp_path / "outside"
    target = 5 * int(rng.integers(1, 6))
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.train", *args, f"hydra.run.dir={outside}"],
        cwd=tmp_path, env=env_for_cli(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (outside / "run.json").exists() and record(outside).get("last_step", 0) >= target:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and record(outside)["status"] == "running"
    # (b) at a random step, (c) in a random write
    step = int(rng.integers(1, 61))
    at_step = tmp_path / "at_step"
    proc = cli(*args, f"faults.kill_at_step={step}", f"hydra.run.dir={at_step}", cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    site = str(rng.choice(["checkpoint.pt", "metrics.parquet", "run.json"]))
    write = f"{site}:{int(rng.integers(1, 8))}:{rng.choice(['before_fsync', 'before_replace'])}"
    in_write = tmp_path / "in_write"
    proc = cli(*args, f"hydra.run.dir={in_write}", cwd=tmp_path, env={FAULT_ENV: write})
    assert proc.returncode == -signal.SIGKILL, write

    for run_dir in (outside, at_step, in_write):
        proc = cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_run(run_dir, whole)
