"""Sweep and run directories that already hold runs: a command never rewrites the records of a
run it does not resume, jobs added to a sweep get folders of their own, and every job that does
not finish (refused, failed) makes the command exit 1, whatever its folder is called."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from benchmarks.harness import supervise

from .conftest import cli, record

#: A 3-step debug run: one checkpoint, one evaluation.
SHORT = ("experiment=debug", "steps=3", "checkpoint_every=3", "eval.every=3", "device=cpu")


def _files(run_dir: Path, log: bool = True) -> dict[str, bytes]:
    """Every file of a run directory (Hydra's records, the run's and, with ``log``, its
    ``train.log``) but the lock."""
    skip = {".lock"} if log else {".lock", "train.log"}
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _seeds(sweep: Path) -> dict[str, int]:
    """Job folder name -> the seed its run.json records."""
    return {p.parent.name: record(p.parent)["seed"] for p in sweep.glob("*/run.json")}


def test_a_sweep_with_other_jobs_in_an_existing_sweep_dir_runs_them_in_new_folders(tmp_path):
    """Issue 13 item 5. ``seed=0,1`` then ``seed=1,2`` into the same ``hydra.sweep.dir``: the
    second sweep skips seed 1 where it is (folder 1), trains seed 2 in a new folder (2), exits
    0, and leaves the records of folders 0 and 1 byte for byte as they were; the sweep dir's
    ``multirun.yaml`` (the report's command) stays the first one, the second sweep's is kept
    beside it as ``multirun.1.yaml``."""
    sweep = tmp_path / "sweep"
    proc = cli(*SHORT, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _seeds(sweep) == {"0": 0, "1": 1}
    # the job re-run in folder 1 logs that it skipped its completed run: records only
    before = {d: _files(sweep / d, log=False) for d in ("0", "1")}
    first = (sweep / "multirun.yaml").read_bytes()
    proc = cli(*SHORT, "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _seeds(sweep) == {"0": 0, "1": 1, "2": 2}
    assert record(sweep / "2")["status"] == "completed"
    assert "seed=2" in (sweep / "2" / ".hydra" / "overrides.yaml").read_text()
    assert {d: _files(sweep / d, log=False) for d in ("0", "1")} == before
    assert (sweep / "multirun.yaml").read_bytes() == first
    second = yaml.safe_load((sweep / "multirun.1.yaml").read_text())
    assert "seed=1,2" in second["hydra"]["overrides"]["task"]
    assert not (sweep / supervise.OUTCOMES).exists()


def test_a_job_refused_by_the_run_in_its_folder_fails_the_sweep_and_touches_nothing(tmp_path):
    """Issue 13 items 5 and 13. A job whose folder (here a fixed ``hydra.sweep.subdir``) holds
    a run of another config is refused: the sweep exits 1 naming it, without a traceback, and
    that run's records (``.hydra/`` included) stay byte for byte as they were."""
    sweep = tmp_path / "sweep"
    args = (*SHORT, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=fixed")
    proc = cli(*args, "seed=0", cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _files(sweep / "fixed")
    proc = cli(*args, "seed=1", cwd=tmp_path, multirun=True)
    output = proc.stdout + proc.stderr  # Hydra logs to stdout
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert f"not finished: {(sweep / 'fixed').resolve()}: refused:" in output
    assert "differs in: seed" in output
    assert _files(sweep / "fixed") == before


def test_a_refused_single_run_leaves_the_run_it_found_untouched(tmp_path: Path) -> None:
    """Issue 13 item 5. A single run refused because its ``hydra.run.dir`` holds a run of
    another config, or because another process holds that directory (a run still training),
    exits 1 with one line and leaves every record there, Hydra's ``.hydra/`` included, as it
    was."""
    run_dir = tmp_path / "run"
    proc = cli(*SHORT, "seed=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    before = _files(run_dir)
    proc = cli(*SHORT, "seed=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "differs in: seed" in proc.stderr.strip().splitlines()[-1]
    assert _files(run_dir) == before
    with supervise.RunDirLock(run_dir):  # as a run still training holds it
        proc = cli(*SHORT, "seed=0", "steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "in use by another process" in proc.stderr.strip().splitlines()[-1]
    assert _files(run_dir) == before


def test_failed_jobs_are_listed_whatever_their_folders_are_called(tmp_path: Path) -> None:
    """Issue 13 item 6. With ``hydra.sweep.subdir=${hydra.job.override_dirname}`` (folders
    named after the overrides, not numbers) a failing job is listed and the sweep exits 1."""
    sweep = tmp_path / "sweep"
    proc = cli(
        *SHORT, "faults.fail_at_step=null,2", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.override_dirname}", cwd=tmp_path, multirun=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [p.parent for p in sweep.glob("*/run.json") if record(p.parent)["status"] == "failed"]
    assert len(failed) == 1 and not failed[0].name.isdigit()
    assert f"not finished: {failed[0].resolve()}: failed" in proc.stdout + proc.stderr


def test_without_job_reports_every_run_json_under_the_sweep_dir_counts(tmp_path: Path) -> None:
    """Issue 13 item 6. When no job reported its outcome (a launcher that does not pass the
    environment on), :class:`supervise.SweepOutcome` reads every ``run.json`` under the sweep
    dir, in folders of any name and depth, and lists the unfinished ones."""
    sweep = tmp_path / "sweep"
    for name, status in (("seed=0", "completed"), ("seed=1", "failed"), ("a/b=c", "timeout")):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "run.json").write_text(json.dumps({"status": status, "reason": "r"}))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    outcome = supervise.SweepOutcome()
    outcome.on_multirun_start(config)
    outcome.on_multirun_end(config)
    listed = sorted(line.split(": ")[0] for line in supervise.sweep_problems)
    assert listed == [str(sweep / "a" / "b=c"), str(sweep / "seed=1")]
    supervise.sweep_problems.clear()


def test_job_folders_are_reused_by_the_same_job_and_new_for_another(tmp_path: Path) -> None:
    """Property of ``${job_subdir:...}``: a job's folder is the numbered one whose recorded
    overrides are the same (in any order), else its own number if free, else a new number
    after every existing one (claimed exclusively)."""
    from benchmarks.harness.config import job_subdir

    sweep = tmp_path / "sweep"
    assert job_subdir(sweep, ["seed=0", "model=gaussian"], 0) == "0"
    (sweep / "0" / ".hydra").mkdir()
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n- model=gaussian\n")
    assert job_subdir(sweep, ["model=gaussian", "seed=0"], 1) == "0"
    assert job_subdir(sweep, ["model=gaussian", "seed=1"], 0) == "1"
    assert job_subdir(sweep, ["model=gaussian", "seed=2"], 0) == "2"
    (sweep / "7").write_text("a file")
    assert job_subdir(sweep, ["model=gaussian", "seed=3"], 5) == "5"
    assert job_subdir(sweep, ["model=gaussian", "seed=4"], 5) == "8"
