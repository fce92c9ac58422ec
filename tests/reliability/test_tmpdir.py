"""Check 3: atomic writes stay on the destination's filesystem, whatever ``$TMPDIR`` says."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from benchmarks.harness import checkpoint
from benchmarks.harness.train import run
from benchmarks.records import files as records

from .conftest import record


def _elsewhere(tmp_path: Path) -> Path:
    """A directory for $TMPDIR, on another filesystem (/dev/shm) when there is one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        return Path(tempfile.mkdtemp(prefix="gradbench-tmpdir-", dir=shm))
    other = tmp_path / "elsewhere"
    other.mkdir()
    return other


def test_temporary_files_live_beside_their_destination_when_tmpdir_is_elsewhere(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: ``$TMPDIR`` points to another directory (another filesystem when /dev/shm
    exists, where a rename from it would fail with EXDEV). Property: a run (checkpoints,
    metrics, run.json) and the report's writes succeed; every ``os.replace`` moves a file
    within its destination's directory; no file is created in ``$TMPDIR``; no temporary
    file is left."""
    elsewhere = _elsewhere(tmp_path)
    try:
        monkeypatch.setenv("TMPDIR", str(elsewhere))
        monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
        assert Path(tempfile.gettempdir()) == elsewhere
        moves: list[tuple[Path, Path]] = []
        real_replace = os.replace

        def replace(src, dst):
            moves.append((Path(src), Path(dst)))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        run_dir = tmp_path / "run"
        assert run(tiny("steps=10"), run_dir) == "completed"
        assert run(tiny("steps=15"), run_dir) == "completed"  # resume, rotate checkpoints
        records.write_text(tmp_path / "report" / "report.md", "# report\n")
        records.write_json(tmp_path / "report" / "x.json", {"a": 1})

        assert moves and all(src.parent == dst.parent for src, dst in moves), moves
        assert {dst.name for _, dst in moves} >= {
            "run.json", "metrics.parquet", "checkpoint.pt", "checkpoint.prev.pt", "report.md"
        }  # fmt: skip
        # (torch may make an empty cache directory there; our writers create no file)
        assert [p for p in elsewhere.rglob("*") if not p.is_dir()] == []
        assert not list(run_dir.glob(".*.tmp")) and not list((tmp_path / "report").glob(".*"))
        assert record(run_dir)["status"] == "completed"
        assert checkpoint.load(run_dir / "checkpoint.pt")["step"] == 15
    finally:
        if elsewhere.is_relative_to("/dev/shm"):
            shutil.rmtree(elsewhere, ignore_errors=True)
