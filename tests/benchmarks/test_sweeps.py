"""Sweeps: ``--multirun`` through the basic, joblib and submitit_local launchers.

Each test starts ``python -m benchmarks.train --multirun`` in a subprocess with an explicit
``hydra.sweep.dir`` and checks every job directory's records. One small basic-launcher sweep is
fast; the launcher and fault sweeps are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
#: A tiny run: the debug preset, shortened further.
TINY = ("experiment=debug", "steps=10", "checkpoint_every=5", "eval.every=5")


def _sweep(sweep_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CI", None)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--multirun", *TINY, *overrides,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _jobs(sweep_dir: Path) -> dict[str, dict]:
    """run.json of each job directory, keyed by its sweep overrides (as Hydra wrote them)."""
    out = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
        swept = [o[2:] for o in overrides if o.startswith("- ") and o[2:] not in TINY]
        key = " ".join(o for o in swept if not o.startswith(("hydra", "steps=")))
        out[key] = {**json.loads((job / "run.json").read_text()), "dir": job}
    return out


def _assert_complete(rec: dict) -> None:
    assert rec["status"] == "completed", rec.get("reason")
    df = pd.read_parquet(rec["dir"] / "metrics.parquet")
    assert len(df) and not df.isna().any().any()
    assert (df["run_id"] == rec["run_id"]).all()


def test_basic_launcher_sweep_smoke(tmp_path: Path) -> None:
    """A 2-job sweep with the basic launcher exits 0; each job has its own directory with a
    completed run.json, metrics and Hydra's config, and the run ids differ."""
    sweep = tmp_path / "sweep"
    proc = _sweep(sweep, "estimator=reinforce,rloo", "steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 2 and (sweep / "multirun.yaml").is_file()
    for rec in jobs.values():
        _assert_complete(rec)
    assert len({rec["run_id"] for rec in jobs.values()}) == 2


@pytest.mark.slow
def test_joblib_sweep_2x2_completes_and_re_running_it_skips_finished_jobs(tmp_path) -> None:
    """hydra/launcher=joblib runs a 2 estimators x 2 seeds sweep in parallel processes, and
    with threads=null joblib gives each job one torch thread; all four records are complete.
    Re-running the same command skips every job (metrics untouched) and exits 0."""
    sweep = tmp_path / "joblib"
    args = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=null",
            "estimator=reinforce,rloo", "seed=0,1")  # fmt: skip
    proc = _sweep(sweep, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    for rec in jobs.values():
        _assert_complete(rec)
        assert rec["threads"] == 1
    mtimes = {k: (r["dir"] / "metrics.parquet").stat().st_mtime_ns for k, r in jobs.items()}
    assert _sweep(sweep, *args).returncode == 0
    again = {k: (r["dir"] / "metrics.parquet").stat().st_mtime_ns for k, r in jobs.items()}
    assert again == mtimes


@pytest.mark.slow
def test_submitit_local_sweep_2x2_completes(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local (at most 2 jobs at once, threads=1) runs a 2 x 2 sweep;
    all four records are complete and submitit keeps its logs under .submitit/."""
    sweep = tmp_path / "submitit"
    proc = _sweep(
        sweep, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        "hydra.sweeper.max_batch_size=2", "threads=1", "estimator=reinforce,rloo", "seed=0,1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    for rec in jobs.values():
        _assert_complete(rec)
    assert (sweep / ".submitit").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sweep_with_a_diverging_and_a_failing_job_records_every_outcome(
    tmp_path: Path, launcher: str
) -> None:
    """Sweep over faults.nan_at_step x faults.fail_at_step: the clean job completes, the NaN job
    is diverged (last finite step recorded), the raising jobs are failed with their message;
    every job directory has a run.json; the sweep exits 1 because a job raised."""
    sweep = tmp_path / launcher
    proc = _sweep(
        sweep, f"hydra/launcher={launcher}", "faults.nan_at_step=null,4",
        "faults.fail_at_step=null,7",
    )  # fmt: skip
    assert proc.returncode == 1
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    _assert_complete(jobs["faults.nan_at_step=null faults.fail_at_step=null"])
    diverged = jobs["faults.nan_at_step=4 faults.fail_at_step=null"]
    assert diverged["status"] == "diverged" and diverged["last_step"] == 3
    for key in ("faults.nan_at_step=null faults.fail_at_step=7",):
        assert jobs[key]["status"] == "failed"
        assert "injected failure" in jobs[key]["reason"]
    # NaN at step 4 is found at the step-5 sync point, before the failure at step 7.
    assert jobs["faults.nan_at_step=4 faults.fail_at_step=7"]["status"] == "diverged"
