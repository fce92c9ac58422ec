"""Check 6: preemption round trip (checkpoint, requeue, resume) and running out of retries.

submitit sends SIGUSR2 to a job shortly before its time limit (``signal_delay_s``), calls the
task's ``checkpoint`` (Hydra's launcher resubmits the same job) and exits with code 173 so its
controller starts the job again, up to ``max_num_timeout`` times; then it gives up with
``UncompletedJobError``. The hook ``faults.preempt_after=N`` sends that SIGUSR2 to the job
process after N steps of every attempt, since ``hydra.launcher.timeout_min`` has a resolution
of minutes: the real submitit handler then does the rest (slow test), or a stand-in for it
(fast tests).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from benchmarks.harness import checkpoint, supervise
from benchmarks.harness.train import run

from .conftest import TINY, assert_same_run, cli, comparable, jobs, metrics, record


class FakeSubmitit:
    """Stands in for submitit's SIGUSR2 handler: requeues (``SystemExit(173)``) ``retries``
    times, then gives up like submitit (an exception)."""

    def __init__(self, retries: int) -> None:
        self.retries, self.calls = retries, 0

    def __call__(self, signum: int, frame: object) -> None:
        assert signum == supervise.PREEMPT_SIGNAL
        self.calls += 1
        if self.calls > self.retries:
            raise RuntimeError("Job not requeued because: timed-out too many times.")
        raise SystemExit(173)


@pytest.fixture
def fake_submitit():
    """``fake_submitit(retries)`` installs a :class:`FakeSubmitit` for SIGUSR2."""
    previous = signal.getsignal(supervise.PREEMPT_SIGNAL)

    def install(retries: int) -> FakeSubmitit:
        handler = FakeSubmitit(retries)
        signal.signal(supervise.PREEMPT_SIGNAL, handler)
        return handler

    yield install
    signal.signal(supervise.PREEMPT_SIGNAL, previous)


def test_a_preempted_run_checkpoints_is_requeued_and_resumes_to_the_reference(
    tiny, reference_runs, fake_submitit, tmp_path: Path
) -> None:
    """Fault: the preemption signal after 8 steps of every attempt (the job's previous
    SIGUSR2 handler, like submitit's, requeues). Property: each attempt checkpoints at the
    step it stops, records ``timeout`` with that step, hands the signal to the previous
    handler (requeue: exit 173); the requeued attempts resume (8, then 16) and the run ends
    identical to an uninterrupted one."""
    handler = fake_submitit(retries=3)
    cfg = tiny("faults.preempt_after=8")
    for stop in (8, 16):
        with pytest.raises(SystemExit) as exit_info:
            run(cfg, tmp_path)
        assert exit_info.value.code == 173
        rec = record(tmp_path)
        assert rec["status"] == "timeout" and rec["last_step"] == stop
        assert "SIGUSR2" in rec["reason"]
        assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == stop
        assert metrics(tmp_path)["step"].max() <= stop
    assert run(cfg, tmp_path) == "completed"
    assert handler.calls == 2 and record(tmp_path)["resumed_from"] == [8, 16]
    assert_same_run(tmp_path, reference_runs())


def test_running_out_of_retries_records_timeout(tiny, fake_submitit, tmp_path: Path) -> None:
    """Fault: preempted in every attempt; the scheduler requeues once, then gives up.
    Property: the run's final status is ``timeout`` at the last checkpointed step."""
    fake_submitit(retries=1)
    cfg = tiny("steps=100", "faults.preempt_after=8")
    with pytest.raises(SystemExit):
        run(cfg, tmp_path)
    with pytest.raises(RuntimeError, match="too many times"):
        run(cfg, tmp_path)
    rec = record(tmp_path)
    assert rec["status"] == "timeout" and rec["last_step"] == 16


def test_a_supervised_job_forwards_preemption_and_lets_the_scheduler_requeue(
    tiny, reference_runs, fake_submitit, tmp_path: Path
) -> None:
    """Fault: as above, in supervised sweep jobs: the signal reaches the supervisor (as
    submitit's controller sends it), which forwards it to its training child. Property: the
    child checkpoints and records ``timeout``; the supervisor then calls the scheduler's
    handler (requeue); the requeued job resumes; out of retries, the job returns normally
    with ``timeout`` (the sweep goes on)."""
    handler = fake_submitit(retries=1)
    cfg = tiny("faults.preempt_after=8")
    with pytest.raises(SystemExit):
        supervise.launch(run, cfg, tmp_path / "a", multirun=True)
    first = record(tmp_path / "a")
    assert first["status"] == "timeout" and first["last_step"] == 8
    assert supervise.launch(run, cfg, tmp_path / "a", multirun=True) == "timeout"
    assert handler.calls == 2
    second = record(tmp_path / "a")
    assert second["resumed_from"] == [first["last_step"]] and second["status"] == "timeout"
    assert run(tiny(), tmp_path / "a") == "completed"
    assert_same_run(tmp_path / "a", reference_runs())


@pytest.mark.slow
def test_submitit_local_preemption_round_trip_and_retries_exhausted(
    reference_runs, tmp_path: Path
) -> None:
    """Fault: under the submitit_local launcher, each attempt of two jobs gets SIGUSR2 after
    8 steps (``timeout_min=1``: submitit counts every signal as a time-out, and the local
    executor allows 3 requeues). Property: the 20-step job is requeued twice, resumes from
    its checkpoints and ends with the metrics of an uninterrupted run; the 200-step job runs
    out of retries after 4 attempts and is recorded ``timeout`` at step 32; the sweep exits
    1 naming it; its records build a report listing the timeout."""
    from benchmarks.report.records import load_records

    sweep = tmp_path / "sweep"
    proc = cli(
        *TINY, "threads=1", "faults.preempt_after=8", "steps=20,200",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, multirun=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    short, long = jobs(sweep)["0"], jobs(sweep)["1"]
    assert short["status"] == "completed" and short["resumed_from"] == [8, 16]
    pd_a, pd_b = comparable(metrics(short["dir"])), comparable(metrics(reference_runs()))
    assert pd_a.equals(pd_b)
    assert long["status"] == "timeout" and long["last_step"] == 32
    assert long["resumed_from"] == [8, 16, 24]
    _, runs = load_records([sweep])
    assert sorted(runs["status"]) == ["completed", "timeout"]
