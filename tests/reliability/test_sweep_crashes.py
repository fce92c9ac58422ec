"""Check 5: a sweep survives jobs that raise, diverge, ``os._exit`` or SIGKILL themselves.

Each job of a ``--multirun`` sweep trains in a forked child supervised by the Hydra job
(``supervise=auto``), so a hard crash is recorded as ``failed`` with its exit code or signal
and the launcher goes on. The faults come from the test-only config group ``fault``
(``tests/reliability/conf/fault``); the ``*_at_step`` hooks fire in a run's first attempt
only, so re-running the same command shows the recovery.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from benchmarks.harness import supervise
from benchmarks.harness.train import run

from .conftest import TINY, cli, jobs, record

FAULTS = {
    "clean": (),
    "exception": ("faults.fail_at_step=7",),
    "nan_loss": ("faults.nan_at_step=7",),
    "os_exit": ("faults.exit_at_step=7",),
    "sigkill": ("faults.kill_at_step=7",),
}


def _assert_first_outcomes(recs: dict[str, dict]) -> None:
    assert recs["clean"]["status"] == "completed"
    assert recs["exception"]["status"] == "failed"
    assert "injected failure" in recs["exception"]["reason"]
    assert recs["nan_loss"]["status"] == "diverged" and recs["nan_loss"]["last_step"] == 6
    assert recs["os_exit"]["status"] == "failed"
    assert "exited with 3" in recs["os_exit"]["reason"]
    assert recs["sigkill"]["status"] == "failed"
    assert "killed by SIGKILL" in recs["sigkill"]["reason"]


def test_supervised_jobs_record_hard_crashes_and_the_sweep_goes_on(tiny, tmp_path: Path):
    """Fault: five supervised jobs run one after another in this process (as the basic
    launcher does): clean, a Python exception, a NaN loss, ``os._exit(3)``, SIGKILL.
    Property: this process survives every job; statuses are exact (completed, failed with
    the message, diverged, failed "exited with 3", failed "killed by SIGKILL"); launching
    the same jobs again resumes the failed ones to completion and skips the others."""
    dirs = {name: tmp_path / name for name in FAULTS}
    for name, overrides in FAULTS.items():
        supervise.launch(run, tiny(*overrides), dirs[name], multirun=True)  # never raises
    _assert_first_outcomes({name: record(d) for name, d in dirs.items()})
    for name, overrides in FAULTS.items():
        supervise.launch(run, tiny(*overrides), dirs[name], multirun=True)
    final = {name: record(d) for name, d in dirs.items()}
    assert {k: r["status"] for k, r in final.items()} == {
        "clean": "completed", "exception": "completed", "nan_loss": "diverged",
        "os_exit": "completed", "sigkill": "completed",
    }  # fmt: skip
    for name in ("exception", "os_exit", "sigkill"):
        assert final[name]["resumed_from"] == [5] and final[name]["attempts"] == 2


def test_a_supervised_single_run_raises_when_its_child_crashes(tiny, tmp_path: Path) -> None:
    """Fault: SIGKILL in a supervised single run (``supervise=true``, not a sweep). Property:
    the failure is recorded and raised (a single run exits non-zero)."""
    with pytest.raises(supervise.RunFailedError, match="killed by SIGKILL"):
        supervise.launch(run, tiny("supervise=true", "faults.kill_at_step=3"), tmp_path)
    assert record(tmp_path)["status"] == "failed"


LAUNCHERS = {
    "basic": (),
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    "submitit_local": (
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        "hydra.sweeper.max_batch_size=2",
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sweep_with_hard_crashes_finishes_every_other_job_and_a_rerun_finishes_the_rest(
    tmp_path: Path, launcher: str
) -> None:
    """Fault: one ``--multirun`` sweep of five jobs: clean, exception, NaN, ``os._exit``,
    SIGKILL, under the basic, joblib and submitit_local launchers (the last in batches of
    two, so a job that raised would stop later batches). Property: every other job
    completes, statuses are exact, the sweep exits 1 and names the unfinished jobs; one
    re-run of the same command finishes them (exit 0)."""
    sweep = tmp_path / "sweep"
    faults = "+fault=clean,exception,nan_loss,os_exit,sigkill"
    args = (
        *TINY,
        "steps=10",
        "threads=1",
        *LAUNCHERS[launcher],
        faults,
        f"hydra.sweep.dir={sweep}",
    )
    proc = cli(*args, cwd=tmp_path, multirun=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    first = jobs(sweep)
    assert sorted(first) == sorted(FAULTS)
    _assert_first_outcomes(first)
    assert "3 job(s)" in proc.stderr + proc.stdout
    proc = cli(*args, cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = jobs(sweep)
    assert {k: r["status"] for k, r in final.items()} == {
        "clean": "completed", "exception": "completed", "nan_loss": "diverged",
        "os_exit": "completed", "sigkill": "completed",
    }  # fmt: skip
    assert final["clean"]["attempts"] == 1


@pytest.mark.slow
def test_supervision_adds_little_time_per_job(tiny, tmp_path: Path, record_property) -> None:
    """Measurement: the wall time of a 20-step debug run launched supervised (forked child)
    minus unsupervised (in-process), median of 7 interleaved pairs. Property: the per-job
    overhead of supervision is below 0.25 s (it is a fork and a wait; the first-run lazy
    imports are done once in the supervisor)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(8):
        for supervised in (False, True):
            cfg = tiny(f"supervise={str(supervised).lower()}", f"seed={i}")
            start = time.perf_counter()
            assert supervise.launch(run, cfg, tmp_path / f"{supervised}{i}", multirun=True)
            times[supervised].append(time.perf_counter() - start)
    sup, plain = statistics.median(times[True][1:]), statistics.median(times[False][1:])
    record_property("supervised_s", sup)
    record_property("unsupervised_s", plain)
    print(f"per job: supervised {sup:.3f} s, in-process {plain:.3f} s ({sup - plain:+.3f} s)")
    assert sup - plain < 0.25
