"""Check 12: a full disk or a read-only output gives a clear error naming the path and never
corrupts earlier records.

The tests run as root, for whom ``chmod`` does not stop writes, so the fast tests simulate
the failing system calls in-process (ENOSPC from ``fsync``, EROFS from creating the temporary
file, EACCES from ``os.replace``). The slow test uses real filesystems where the machine
allows it: a tiny tmpfs and a read-only bind mount inside a private user and mount namespace
(``unshare -rm``); it is skipped where namespaces are not available.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.harness import checkpoint
from benchmarks.harness.train import run
from benchmarks.records.files import write_text

from .conftest import REPO, TINY, assert_same_run, env_for_cli, metrics, record


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_a_full_disk_mid_run_names_the_file_and_keeps_earlier_records(
    tiny, reference_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: the disk fills up at the step-10 checkpoint (``fsync`` of the new metrics file
    raises ENOSPC, and every later write too). Property: the run raises an OSError with
    errno ENOSPC whose message names ``metrics.parquet`` in the run directory; run.json,
    metrics.parquet and checkpoint.pt are their step-5 versions and load; no temporary file
    is left; once space is back, the same run resumes and ends identical to an
    uninterrupted run."""
    real_fsync, state = os.fsync, {"metrics": 0, "full": False}

    def fsync(fd: int) -> None:
        if ".metrics.parquet." in _fd_path(fd):
            state["metrics"] += 1
            state["full"] = state["full"] or state["metrics"] == 2
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device") as info:
        run(tiny(), tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "metrics.parquet") in str(info.value)
    rec = record(tmp_path)
    assert rec["status"] == "running" and rec["last_step"] == 5
    assert metrics(tmp_path)["step"].max() == 5
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert run(tiny(), tmp_path) == "completed"
    assert_same_run(tmp_path, reference_runs())


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("where", "err"), [("mkstemp", errno.EROFS), ("replace", errno.EACCES)],
    ids=["read-only (EROFS)", "unwritable (EACCES)"],
)  # fmt: skip
def test_a_read_only_or_unwritable_run_dir_names_the_path_and_changes_nothing(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, err: int
) -> None:
    """Fault: extending a completed run whose directory became read-only (creating the
    temporary file fails with EROFS) or unwritable (the rename fails with EACCES).
    Property: an OSError with that errno whose message names the file of the run directory
    it could not write (the first write of the resume); every file is byte-identical to
    before; no temporary file is left."""
    assert run(tiny("steps=10"), tmp_path) == "completed"
    before = _snapshot(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(tempfile if where == "mkstemp" else os, where, fail)
    with pytest.raises(OSError) as info:
        run(tiny("steps=20"), tmp_path)
    monkeypatch.undo()
    assert info.value.errno == err
    assert re.search(
        rf"cannot write {re.escape(str(tmp_path))}/(run\.json|metrics\.parquet)", str(info.value)
    )
    assert _snapshot(tmp_path) == before


def test_a_full_disk_while_writing_a_report_keeps_the_previous_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: ENOSPC while the report writes ``report.md`` again. Property: an OSError naming
    the file; the previous report.md is intact; no temporary file is left."""
    path = tmp_path / "report.md"
    write_text(path, "# first\n")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left") as info:
        write_text(path, "# second\n")
    assert str(path) in str(info.value)
    assert path.read_text() == "# first\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


NAMESPACE_SCRIPT = r"""
set -u
mount -t tmpfs -o size="$SIZE"k tmpfs "$FULL"
cp -a "$SRC/." "$FULL/"
"$PY" -m benchmarks.train $ARGS steps=40 hydra.run.dir="$FULL" > "$OUT/full.log" 2>&1
echo $? > "$OUT/full.rc"
cp -a "$FULL/." "$OUT/full_after/"
mount --bind "$RO" "$RO" && mount -o remount,bind,ro "$RO"
"$PY" -m benchmarks.train $ARGS steps=40 hydra.run.dir="$RO" > "$OUT/ro.log" 2>&1
echo $? > "$OUT/ro.rc"
"""


@pytest.mark.slow
def test_a_real_full_tmpfs_and_a_real_read_only_mount(reference_runs, tmp_path: Path):
    """Fault: extending a completed 20-step run to 40 steps (a) on a tmpfs with a few pages
    to spare, which fills up (real ENOSPC), (b) in a read-only bind mount (real EROFS).
    Property: both commands exit non-zero with an error naming a path in the run directory;
    every run file still loads (run.json, metrics, checkpoints); the read-only run is
    byte-identical; copied to a normal disk, the full-disk run resumes to the result of an
    uninterrupted 40-step run."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode
    ):
        pytest.skip("no user and mount namespaces here (unshare -rm)")
    src = reference_runs()
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    full, ro, out = tmp_path / "full", tmp_path / "ro", tmp_path / "out"
    for d in (full, out, out / "full_after"):
        d.mkdir()
    shutil.copytree(src, ro)
    before = _snapshot(ro)
    env = {
        **env_for_cli(), "SIZE": str(used // 1024 + 24), "FULL": str(full), "RO": str(ro),
        "SRC": str(src), "OUT": str(out), "PY": sys.executable, "ARGS": " ".join(TINY),
    }  # fmt: skip
    subprocess.run(["unshare", "-rm", "bash", "-c", NAMESPACE_SCRIPT], cwd=REPO, env=env,
                   check=True, timeout=600)  # fmt: skip

    full_log, ro_log = (out / "full.log").read_text(), (out / "ro.log").read_text()
    assert (out / "full.rc").read_text().strip() != "0", full_log[-2000:]
    assert "No space left on device" in full_log and str(full) in full_log, full_log[-2000:]
    assert (out / "ro.rc").read_text().strip() != "0"
    assert "Read-only file system" in ro_log and str(ro) in ro_log, ro_log[-2000:]
    assert _snapshot(ro) == before

    after = out / "full_after"
    json.loads((after / "run.json").read_text())
    pd.read_parquet(after / "metrics.parquet")
    checkpoint.load(after / "checkpoint.pt")
    resumed = tmp_path / "resumed"
    shutil.copytree(after, resumed)
    env = env_for_cli()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", *TINY, "steps=40", f"hydra.run.dir={resumed}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(resumed, reference_runs("steps=40"))
