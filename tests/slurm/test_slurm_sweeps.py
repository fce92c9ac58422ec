"""Sweeps on a real SLURM cluster (``hydra/launcher=slurm``, submitit), one test per fault.

Each fault test runs a two-job sweep (``seed=0,1``) of tiny runs, hits job 1 while it trains,
and checks the exact statuses, the sweep's summary (the "not finished" list and exit 1) and
that one re-run of the same command finishes every job with records identical to an
uninterrupted run; when SLURM requeues the job, that the sweep waited for it and finished
every job identical to an uninterrupted run itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import slurm
from tests.reliability.conftest import TINY, assert_same_run, record
from tests.slurm.conftest import (
    SEEDS,
    Sweep,
    child_of,
    env,
    not_finished,
    run_sweep,
    slow,
    statuses,
    training,
    until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("cluster")]


def assert_rerun_finishes(sweep: Path, reference, *args: str) -> None:
    """One re-run of the sweep (no slowdown) exits 0; both jobs are identical to
    uninterrupted runs."""
    code, out = run_sweep(sweep, SEEDS, *args)
    assert code == 0, out
    assert not_finished(out) == []
    assert statuses(sweep) == {"0": "completed", "1": "completed"}
    for job in ("0", "1"):
        assert_same_run(sweep / job, reference(f"seed={job}"))


def assert_summary(code: int, out: str, sweep: Path, status: str) -> str:
    """The sweep exited 1 listing exactly job 1 as ``status``; its recorded reason."""
    assert code == 1, out
    assert "Traceback" not in out, out
    lines = not_finished(out)
    assert len(lines) == 1 and lines[0].startswith(f"{sweep / '1'}: {status}: "), out
    assert statuses(sweep) == {"0": "completed", "1": status}
    return record(sweep / "1")["reason"]


def test_preset_defaults_2x2_sweep_and_strict_report(tmp_path: Path) -> None:
    """The preset's own defaults (CPUs from threads, memory from the model, no GPU, the
    default partition) fit a 2-CPU node: a 2 x 2 sweep completes and the report is strict."""
    sweep = tmp_path / "sweep"
    code, out = run_sweep(sweep, "seed=0,1", "estimator=reinforce,rloo")
    assert code == 0, out
    assert set(statuses(sweep).values()) == {"completed"} and len(statuses(sweep)) == 4
    report = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(sweep), "--strict", "--n-boot", "50",
         "--out", str(tmp_path / "report")],
        env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr


def test_kill_9_of_the_training_process(tmp_path: Path, reference) -> None:
    """``kill -9`` of job 1's training process: its supervisor records ``failed``."""
    sweep = tmp_path / "sweep"
    run = Sweep(sweep, SEEDS, *slow(0.5))
    os.kill(child_of(training(sweep / "1")), signal.SIGKILL)
    reason = assert_summary(*run.finish(), sweep, "failed")
    assert "killed by SIGKILL" in reason
    assert_rerun_finishes(sweep, reference)


def test_kill_9_of_the_supervisor(tmp_path: Path, reference) -> None:
    """``kill -9`` of job 1's supervisor (the submitit process): the job ends without a
    result; the launcher records ``failed`` saying so, and keeps waiting for job 0."""
    sweep = tmp_path / "sweep"
    run = Sweep(sweep, SEEDS, *slow(0.5))
    os.kill(training(sweep / "1"), signal.SIGKILL)
    reason = assert_summary(*run.finish(), sweep, "failed")
    assert "supervising process died" in reason
    assert_rerun_finishes(sweep, reference)


def test_scancel(tmp_path: Path, reference) -> None:
    """``scancel`` of job 1: the run checkpoints and records ``failed`` (SIGTERM)."""
    sweep = tmp_path / "sweep"
    run = Sweep(sweep, SEEDS, *slow(0.5))
    training(sweep / "1")
    slurm.slurm("scancel", run.job_ids(2)[1])
    reason = assert_summary(*run.finish(), sweep, "failed")
    assert "terminated by SIGTERM" in reason
    assert_rerun_finishes(sweep, reference)


def test_time_limit_signal_requeues_and_the_sweep_waits(tmp_path: Path, reference) -> None:
    """``scancel --signal=USR2`` (SLURM's time-limit warning) to job 1: it checkpoints,
    records ``timeout``, submitit requeues it, and the sweep waits for the requeued attempt,
    which resumes and completes: the sweep exits 0."""
    sweep = tmp_path / "sweep"
    run = Sweep(sweep, SEEDS, *slow(0.5))
    training(sweep / "1")
    slurm.slurm("scancel", "--signal=USR2", run.job_ids(2)[1])
    code, out = run.finish()
    assert code == 0, out
    assert not_finished(out) == [] and "Traceback" not in out
    for job in ("0", "1"):  # the sweep itself finished them: no re-run needed
        assert_same_run(sweep / job, reference(f"seed={job}"))


def test_requeue_budget_spent(tmp_path: Path, reference) -> None:
    """The time-limit signal with no requeue left (``max_num_timeout=0``): ``timeout``, and
    the reason says it was not requeued (not that submitit requeues it)."""
    sweep = tmp_path / "sweep"
    limits = ("hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=0")
    run = Sweep(sweep, SEEDS, *limits, *slow(0.5))
    training(sweep / "1")
    slurm.slurm("scancel", "--signal=USR2", run.job_ids(2)[1])
    reason = assert_summary(*run.finish(), sweep, "timeout")
    assert "not requeued" in reason and "submitit requeues" not in reason
    assert_rerun_finishes(sweep, reference)


def test_time_limit_by_timeout_min(tmp_path: Path, reference) -> None:
    """``timeout_min=1``: SLURM's time-limit signal comes early or late (before or after the
    handlers are installed), once per attempt; with one requeue allowed the job ends
    ``timeout`` whichever way it went, and a re-run with the default limit finishes it."""
    sweep = tmp_path / "sweep"
    limits = ("hydra.launcher.timeout_min=1", "hydra.launcher.max_num_timeout=1")
    code, out = run_sweep(sweep, "seed=1", *limits, *slow(4))
    assert code == 1, out
    assert "Traceback" not in out, out
    lines = not_finished(out)
    assert len(lines) == 1 and ": timeout: " in lines[0], out
    # no run.json if every signal came before the run started; an attempt stopped before it
    # recorded its overrides leaves an empty folder, and the next one takes another
    assert set(statuses(sweep).values()) <= {"timeout"}
    code, out = run_sweep(sweep, "seed=1")
    assert code == 0, out
    assert_same_run(slurm.job_dir(sweep, [*TINY, "seed=1"]), reference("seed=1"))


def test_scontrol_requeue_is_waited_for_and_a_rerun_meanwhile_says_so(
    tmp_path: Path, reference
) -> None:
    """``scontrol requeue`` of job 1: SLURM stops it and queues it again. The sweep does not
    report the stopped attempt as the job's end: it waits for the requeued one, which
    resumes and completes (exit 0). A re-run of the command meanwhile says that SLURM still
    holds the job and exits 1, without a traceback and without touching the run."""
    sweep = tmp_path / "sweep"
    run = Sweep(sweep, SEEDS, *slow(0.5))
    training(sweep / "1")
    job = run.job_ids(2)[1]
    assert slurm.slurm("scontrol", "requeue", job)[0] == 0
    until(lambda: slurm.pending_reasons([job]).get(job) == "BeginTime", "the requeued job held")
    code, out = run_sweep(sweep, SEEDS)  # SLURM holds the requeued job for about 120 s
    assert code == 1, out
    # sacct may list a requeued array task under its array's id (``40 PENDING`` for 40_1)
    array = job.split("_")[0]
    assert "SLURM still holds job(s)" in out and "Traceback" not in out, out
    assert job in out or f"({array} " in out or f", {array} " in out, out
    code, out = run.finish()
    assert code == 0, out
    assert not_finished(out) == []
    for name in ("0", "1"):  # the sweep itself finished them: no re-run needed
        assert_same_run(sweep / name, reference(f"seed={name}"))


@pytest.mark.parametrize(
    ("override", "said"),
    [("hydra.launcher.cpus_per_task=64", "cpus_per_task"),
     ("hydra.launcher.gpus_per_node=1", "gpus_per_node"),
     ("hydra.launcher.mem_gb=100000", "mem")],
)  # fmt: skip
def test_a_request_the_cluster_cannot_satisfy_is_one_line(
    tmp_path: Path, override: str, said: str
) -> None:
    """More CPUs, GPUs or memory than the node has: one line naming the request, exit 1,
    before any job is submitted (``sbatch --test-only``), instead of a sweep pending forever."""
    sweep = tmp_path / "sweep"
    code, out = run_sweep(sweep, "seed=0", override)
    assert code == 1, out
    assert "error: SLURM cannot run a job of this sweep" in out and said in out, out
    assert "Traceback" not in out
    assert not (sweep / slurm.JOBS_FILE).exists()
