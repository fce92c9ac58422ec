"""Check 2: a kill at any write site leaves every file absent or at its previous complete
version; everything loads; the next run resumes; leftover temporary files never block it."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.harness import checkpoint
from benchmarks.harness.train import run
from benchmarks.records.files import FAULT_ENV, write_text

from .conftest import RUN_FILES, assert_same_run, in_child


def _snapshotting_replace(snap_dir: Path):
    """An ``os.replace`` that also copies each file it puts in place to ``snap_dir``
    (``<name>.<k>``): the sequence of complete versions each destination went through."""
    real = os.replace
    counts: dict[str, int] = {}

    def replace(src: str | Path, dst: str | Path) -> None:
        real(src, dst)
        name = Path(dst).name
        counts[name] = counts.get(name, 0) + 1
        shutil.copyfile(dst, snap_dir / f"{name}.{counts[name]:03d}")

    return replace


def _run_with_snapshots(cfg, run_dir: Path, snap_dir: Path) -> None:
    os.replace = _snapshotting_replace(snap_dir)  # in the forked child only
    run(cfg, run_dir)


def _assert_absent_or_previous(run_dir: Path, snap_dir: Path) -> None:
    """Each run file is absent (never completed a write) or byte-identical to its last
    complete version, and loads cleanly."""
    for name in RUN_FILES:
        versions = sorted(snap_dir.glob(f"{name}.*"))
        path = run_dir / name
        if not versions:
            assert not path.exists(), f"{name} exists but no write of it completed"
            continue
        assert path.read_bytes() == versions[-1].read_bytes(), f"{name} is not its last version"
        if name == "run.json":
            json.loads(path.read_text())
        elif name == "metrics.parquet":
            pd.read_parquet(path)
        else:
            checkpoint.load(path)


#: A write in the middle of the run at each site (fast), the other phase of the same writes,
#: and the first and last write of each file (slow).
SITES = [("checkpoint.pt", 2, "before_replace"), ("metrics.parquet", 2, "before_fsync"),
         ("run.json", 3, "before_replace")]  # fmt: skip
FIRST_AND_LAST = (
    ("checkpoint.pt", 1), ("checkpoint.pt", 4), ("metrics.parquet", 1), ("metrics.parquet", 4),
    ("run.json", 1), ("run.json", 6),
)  # fmt: skip
MORE_SITES = [("checkpoint.pt", 2, "before_fsync"), ("metrics.parquet", 2, "before_replace"),
              ("run.json", 3, "before_fsync")] + [
    (site, n, phase) for site, n in FIRST_AND_LAST for phase in ("before_fsync", "before_replace")
]  # fmt: skip


def _check_site(tiny, reference_runs, tmp_path: Path, site: str, n: int, phase: str) -> None:
    run_dir, snaps = tmp_path / "run", tmp_path / "snapshots"
    snaps.mkdir()
    code = in_child(
        _run_with_snapshots, tiny(), run_dir, snaps, env={FAULT_ENV: f"{site}:{n}:{phase}"}
    )
    assert code == -signal.SIGKILL
    _assert_absent_or_previous(run_dir, snaps)
    assert list(run_dir.glob(f".{site}.*.tmp")), "the killed write left no temporary file"
    # More leftovers, even unreadable ones, must not block the next saves.
    for name in ("checkpoint.pt", "run.json", "metrics.parquet"):
        junk = run_dir / f".{name}.leftover.tmp"
        junk.write_bytes(b"\0garbage")
        junk.chmod(0)
    assert run(tiny(), run_dir) == "completed"
    assert_same_run(run_dir, reference_runs())


@pytest.mark.parametrize(("site", "n", "phase"), SITES, ids=[f"{s}:{n}:{p}" for s, n, p in SITES])
def test_kill_in_a_write_leaves_the_previous_version_and_the_next_run_resumes(
    tiny, reference_runs, tmp_path: Path, site: str, n: int, phase: str
) -> None:
    """Fault: SIGKILL at the n-th write of a run file, after its temporary file is written,
    before fsync or before the rename (``GRADBENCH_FAULT``). Property: every run file is
    absent or byte-identical to its previous complete version and loads; the temporary file
    is left over; with more (unreadable) leftovers planted, the next run resumes and ends
    identical to an uninterrupted run, with no temporary file left."""
    _check_site(tiny, reference_runs, tmp_path, site, n, phase)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("site", "n", "phase"), MORE_SITES, ids=[f"{s}:{n}:{p}" for s, n, p in MORE_SITES]
)
def test_kill_at_more_writes_of_each_file(
    tiny, reference_runs, tmp_path: Path, site: str, n: int, phase: str
) -> None:
    """Fault and property as above, in the other phase of the same writes, and at the first
    and the last write of each file (the last checkpoint, and the final run.json that marks
    the run completed)."""
    _check_site(tiny, reference_runs, tmp_path, site, n, phase)


def _write_reports(path: Path) -> None:
    for version in ("one", "two", "three"):
        write_text(path, f"# report {version}\n")


@pytest.mark.parametrize("phase", ["before_fsync", "before_replace"])
def test_kill_while_writing_a_report_file_keeps_the_previous_report(
    tmp_path: Path, phase: str
) -> None:
    """Fault: SIGKILL in the second write of ``report.md`` (the report's atomic writer).
    Property: ``report.md`` is its first complete version, and a later write succeeds."""
    path = tmp_path / "report" / "report.md"
    code = in_child(_write_reports, path, env={FAULT_ENV: f"report.md:2:{phase}"})
    assert code == -signal.SIGKILL
    assert path.read_text() == "# report one\n"
    write_text(path, "# report four\n")
    assert path.read_text() == "# report four\n"


@pytest.mark.slow
def test_kill_while_the_report_cli_writes_keeps_the_previous_report(
    tiny, reference_runs, tmp_path: Path
) -> None:
    """Fault: SIGKILL of ``gradbench-report`` while it writes ``report.md`` or ``runs.csv``.
    Property: each file is its previous complete version (or absent the first time) and the
    next report builds."""
    from benchmarks.report import main as report_main

    runs = tmp_path / "runs"
    shutil.copytree(reference_runs(), runs / "0")
    out = tmp_path / "out"
    assert report_main([str(runs), "--out", str(out), "--n-boot", "50"]) == 0
    before = {n: (out / n).read_bytes() for n in ("report.md", "runs.csv")}
    for name in before:
        code = in_child(
            report_main, [str(runs), "--out", str(out), "--n-boot", "50"],
            env={FAULT_ENV: f"{name}:1"},
        )  # fmt: skip
        assert code == -signal.SIGKILL
        assert (out / name).read_bytes() == before[name]
    assert report_main([str(runs), "--out", str(out), "--n-boot", "50"]) == 0
