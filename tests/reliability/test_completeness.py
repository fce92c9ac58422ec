"""Check 4: a run counts as complete only through its commit marker (``run.json`` status
``completed``, written last) over intact files; re-running redoes exactly the others."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from benchmarks.harness.train import run
from benchmarks.records.files import FAULT_ENV

from .conftest import TINY, cli, comparable, in_child, jobs, metrics, record


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_running(path: Path) -> None:
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "status": "running"}))


#: How each damaged run is damaged (run 0 is left intact).
DAMAGE = {
    "metrics truncated": lambda d: _truncate(d / "metrics.parquet"),
    "metrics empty": lambda d: (d / "metrics.parquet").write_bytes(b""),
    "stale running record": lambda d: _set_running(d / "run.json"),
    "run.json truncated": lambda d: _truncate(d / "run.json"),
    "checkpoint truncated": lambda d: _truncate(d / "checkpoint.pt"),
    "metrics missing": lambda d: (d / "metrics.parquet").unlink(),
}


def test_the_completed_marker_is_written_last(tiny, tmp_path: Path) -> None:
    """Fault: SIGKILL during the final checkpoint's writes (the last metrics file, the last
    checkpoint). Property: run.json never says ``completed`` before the files it vouches
    for are in place; once it does, they are complete."""
    for site in ("metrics.parquet:4", "checkpoint.pt:4", "checkpoint.pt:4:before_fsync"):
        run_dir = tmp_path / site.replace(":", "_")
        assert in_child(run, tiny(), run_dir, env={FAULT_ENV: site}) == -signal.SIGKILL
        assert record(run_dir)["status"] == "running", site
    run_dir = tmp_path / "whole"
    assert run(tiny(), run_dir) == "completed"
    rec = record(run_dir)
    assert rec["last_step"] == metrics(run_dir)["step"].max() == 20 and rec["metrics_sha256"]


def test_rerun_redoes_exactly_the_runs_whose_records_are_incomplete(tiny, tmp_path: Path) -> None:
    """Fault: in a set of completed runs, one each gets a truncated, empty or missing metrics
    file, a stale ``running`` record, a truncated run.json, a truncated checkpoint.
    Property: re-running every run leaves the intact one untouched (skipped, run.json
    byte-identical) and redoes exactly the damaged ones, which end completed with the
    original metric values."""
    dirs = {name: tmp_path / str(i) for i, name in enumerate(["intact", *DAMAGE])}
    original = {}
    for name, run_dir in dirs.items():
        assert run(tiny(), run_dir) == "completed"
        original[name] = comparable(metrics(run_dir))
    for name, damage in DAMAGE.items():
        damage(dirs[name])
    intact_json = (dirs["intact"] / "run.json").read_bytes()

    for run_dir in dirs.values():
        assert run(tiny(), run_dir) == "completed"
    assert (dirs["intact"] / "run.json").read_bytes() == intact_json
    for name in DAMAGE:
        rec = record(dirs[name])
        assert rec["status"] == "completed" and rec["last_step"] == 20, name
        redone = rec["attempts"] == 2 or (name == "run.json truncated" and rec["attempts"] == 1)
        assert redone and rec["resumed_from"][-1] in (15, 20), (name, rec)
        assert comparable(metrics(dirs[name])).equals(original[name]), name
    assert (dirs["run.json truncated"] / "run.json.corrupt").exists()
    assert (dirs["checkpoint truncated"] / "checkpoint.pt.corrupt").exists()


@pytest.mark.slow
def test_rerunning_a_damaged_sweep_redoes_exactly_its_incomplete_jobs(tmp_path: Path) -> None:
    """Fault: after a 4-job sweep (basic launcher), one job's metrics file is truncated, one
    run.json is set back to ``running``, one checkpoint is truncated. Property: re-running
    the same sweep command redoes exactly those three jobs (their ``attempts`` grow) and
    leaves the intact job's records byte-identical; the sweep exits 0."""
    sweep = tmp_path / "sweep"
    args = (*TINY, "seed=0,1,2,3", f"hydra.sweep.dir={sweep}")
    proc = cli(*args, cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = jobs(sweep)
    _truncate(before["1"]["dir"] / "metrics.parquet")
    _set_running(before["2"]["dir"] / "run.json")
    _truncate(before["3"]["dir"] / "checkpoint.pt")
    intact = (before["0"]["dir"] / "run.json").read_bytes()
    proc = cli(*args, cwd=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = jobs(sweep)
    assert (after["0"]["dir"] / "run.json").read_bytes() == intact
    assert [k for k in after if after[k]["attempts"] == 2] == ["1", "2", "3"]
    assert all(rec["status"] == "completed" for rec in after.values())
