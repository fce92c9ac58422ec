"""Helpers of the tests marked ``slurm``: sweeps through ``hydra/launcher=slurm`` on a real
SLURM cluster (``sudo .ci/slurm-cluster.sh start``; ``.ci/run`` starts one, runs these tests
and stops it). Without a cluster that answers ``sinfo`` and ``sacct`` they are skipped.

The sweeps are tiny (20-step debug runs); a test slows the steps of its jobs
(:class:`tests.slurm.slow.SlowSteps`) when it must act while a run trains, and waits by
polling files and ``sacct`` with generous deadlines (the machine may be loaded): no timing is
asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import slurm
from tests.reliability.conftest import REPO, TINY, record

#: How to get a cluster, in every skip message.
HOW = (
    "no SLURM cluster answers (sinfo, sacct): start the local one with "
    "`sudo .ci/slurm-cluster.sh start`, run `python -m pytest -m slurm`, then "
    "`sudo .ci/slurm-cluster.sh stop`"
)
#: Generous deadlines (seconds): a loaded machine, SLURM's scheduling and ~10 s of start-up
#: per job.
SWEEP_TIMEOUT, WAIT_TIMEOUT = 900, 300
#: The swept parameter of the fault tests: two jobs, the fault hits job 1.
SEEDS = "seed=0,1"


def cluster_problem() -> str | None:
    """Why the tests cannot use a cluster here (None: they can)."""
    code, out = slurm.slurm("sinfo", "-h", "-o", "%T", timeout=20)
    if code != 0 or not out.strip():
        return HOW
    return HOW if slurm.accounting_problem() else None


@pytest.fixture(scope="session")
def cluster() -> None:
    """Skip (saying how to start one) unless a SLURM cluster with accounting answers."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


def command(sweep_dir: Path, *args: str) -> list[str]:
    """The sweep command of the tests: tiny runs, ``hydra/launcher=slurm``, ``args``."""
    return [
        sys.executable, "-m", "benchmarks.train", "--multirun", *TINY, "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep_dir}", *args,
    ]  # fmt: skip


def slow(seconds: float) -> tuple[str, str]:
    """The overrides that sleep ``seconds`` before every step of the sweep's jobs."""
    return (
        "+hydra.callbacks.slow._target_=tests.slurm.slow.SlowSteps",
        f"+hydra.callbacks.slow.seconds={seconds}",
    )


def env() -> dict[str, str]:
    """The sweep's environment (passed on to its SLURM jobs): this checkout first."""
    out = {**os.environ, "PYTHONPATH": str(REPO), "GRADBENCH_SLURM_POLL_S": "2"}
    out.pop("CI", None)
    return out


class Sweep:
    """One ``gradbench-train --multirun`` command running in the background."""

    def __init__(self, sweep_dir: Path, *args: str) -> None:
        self.dir = Path(sweep_dir)
        self.log = self.dir.parent / f"{self.dir.name}.{time.monotonic_ns()}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "w")  # noqa: SIM115 (closed by finish)
        self.proc = subprocess.Popen(
            command(self.dir, *args), cwd=self.dir.parent, env=env(), text=True,
            stdout=self._fh, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def job_ids(self, n: int) -> list[str]:
        """The SLURM ids of the sweep's ``n`` jobs (job ``i`` is array task ``i``), waiting
        until they are submitted."""
        path = self.dir / slurm.JOBS_FILE
        until(lambda: path.is_file() and len(path.read_text().split()) >= n, "submission")
        return path.read_text().split()[-n:]

    def finish(self, release: bool = True) -> tuple[int, str]:
        """Wait for the command; ``(exit code, output)``. With ``release``, requeued jobs are
        let go at once instead of after SLURM's hold of about 120 s."""
        stop = threading.Event()
        if release:
            threading.Thread(target=self._release, args=(stop,), daemon=True).start()
        try:
            code = self.proc.wait(timeout=SWEEP_TIMEOUT)
        finally:
            stop.set()
            self._fh.close()
        return code, self.log.read_text()

    def _release(self, stop: threading.Event) -> None:
        path = self.dir / slurm.JOBS_FILE
        while not stop.wait(2):
            if path.is_file():
                slurm.release_requeued(path.read_text().split())


def run_sweep(sweep_dir: Path, *args: str) -> tuple[int, str]:
    """Run a sweep command to its end: ``(exit code, output)``."""
    return Sweep(sweep_dir, *args).finish()


def until(check: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT) -> Any:
    """Poll ``check`` every half second until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def training(job_dir: Path) -> int:
    """Wait until the run in ``job_dir`` trains past its first checkpoint; its supervisor's
    pid (the holder of the run directory's lock)."""
    until(lambda: (job_dir / "checkpoint.pt").is_file(), f"a checkpoint in {job_dir}")
    return int(until(lambda: _read(job_dir / ".lock"), f"the lock of {job_dir}"))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def child_of(pid: int) -> int:
    """The supervised training process of the supervisor ``pid``."""
    children = until(lambda: _read(Path(f"/proc/{pid}/task/{pid}/children")), f"{pid}'s child")
    return int(children.split()[0])


def statuses(sweep_dir: Path) -> dict[str, str]:
    """``run.json`` status of each job folder of a sweep."""
    return {
        p.name: record(p)["status"]
        for p in sorted(Path(sweep_dir).iterdir())
        if p.name.isdigit() and (p / "run.json").is_file()
    }


def not_finished(output: str) -> list[str]:
    """The sweep summary's "not finished" lines."""
    return [
        line.split("not finished: ", 1)[1]
        for line in output.splitlines()
        if "not finished: " in line
    ]


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``reference("seed=1")``: an uninterrupted in-process run of ``TINY`` plus that override,
    computed once per session."""
    from hydra import compose, initialize_config_dir

    import benchmarks.harness.config  # noqa: F401  (registers the schemas)
    from benchmarks.cli.train import CONF_DIR
    from benchmarks.harness.train import run

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("slurm-reference")

    def get(override: str) -> Path:
        if override not in cache:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[*TINY, override])
            cache[override] = root / str(len(cache))
            assert run(cfg, cache[override]) == "completed"
        return cache[override]

    yield get
