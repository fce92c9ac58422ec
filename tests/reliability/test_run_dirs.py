"""Check 9: runs started at the same instant get distinct run directories and never share a
writer (Hydra's default ``${now:%H-%M-%S}`` alone collides within a second)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import benchmarks.harness.config
from benchmarks.harness import supervise
from benchmarks.harness.config import unique_dir
from benchmarks.harness.train import run

from .conftest import REPO, env_for_cli, in_child, record


def test_the_default_run_and_sweep_dirs_are_claimed_uniquely(make_config) -> None:
    """Property: the default ``hydra.run.dir`` and ``hydra.sweep.dir`` go through the
    ``unique_dir`` resolver (presets' fixed sweep dirs and explicit dirs do not)."""
    hc = make_config(return_hydra_config=True).hydra
    for node in (hc.run, hc.sweep):
        assert node._get_node("dir")._value().startswith("${unique_dir:")
    quick = make_config("experiment=quick", return_hydra_config=True).hydra.sweep
    assert "${" not in quick._get_node("dir")._value()  # fixed: re-running resumes it


def test_a_claim_nobody_wrote_into_is_released_at_exit(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Property: resolving the default run dir (e.g. composing or printing the config)
    claims a directory, which is removed at exit while still empty, with the parents the
    claim created; a directory a run wrote into stays."""
    monkeypatch.chdir(tmp_path)
    unused = Path(make_config(return_hydra_config=True).hydra.run.dir)
    used = Path(make_config(return_hydra_config=True).hydra.run.dir)
    assert unused.is_dir() and used.is_dir() and unused != used
    (used / "run.json").write_text("{}")
    benchmarks.harness.config._release_unused_claims()
    assert not unused.exists() and (used / "run.json").exists()
    assert sorted(p.name for p in (tmp_path / "results" / "runs").iterdir()) == [used.parent.name]


def test_sixteen_claims_at_the_same_instant_get_sixteen_directories(tmp_path: Path) -> None:
    """Fault: 16 processes claim the same timestamped directory at the same instant.
    Property: 16 distinct directories (``base``, ``base_1``, ... ``base_15``), each claimed
    by exactly one process."""
    base, out = tmp_path / "runs" / "12-00-00", tmp_path / "claims"
    out.mkdir()
    start = time.time() + 1.0
    pids = []
    for i in range(16):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                while time.time() < start:
                    pass
                (out / str(i)).write_text(unique_dir(str(base)))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in pids)
    claimed = [(out / str(i)).read_text() for i in range(16)]
    assert len(set(claimed)) == 16
    names = {"12-00-00"} | {f"12-00-00_{i}" for i in range(1, 16)}
    assert {Path(c).name for c in claimed} == names


def test_an_unusable_output_dir_is_an_error_naming_it_not_an_endless_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 8. A dangling ``results`` symbolic link or a file where a folder must be
    makes ``unique_dir`` raise OutputDirError naming the culprit at once (instead of retrying
    forever); after ``MAX_CLAIMS`` taken names it gives up too."""
    (tmp_path / "results").symlink_to(tmp_path / "nowhere")
    base = str(tmp_path / "results" / "runs" / "12-00-00")
    assert in_child(unique_dir, base, timeout=60) == 1  # raised, did not loop
    with pytest.raises(
        benchmarks.harness.config.OutputDirError, match=r"symbolic link to .*nowhere"
    ):
        unique_dir(base)
    (tmp_path / "results").unlink()
    (tmp_path / "results").write_text("a file")
    with pytest.raises(benchmarks.harness.config.OutputDirError, match="results is a file"):
        unique_dir(base)
    monkeypatch.setattr(benchmarks.harness.config, "MAX_CLAIMS", 3)
    for name in ("x", "x_1", "x_2"):
        (tmp_path / name).mkdir()
    with pytest.raises(benchmarks.harness.config.OutputDirError, match="every name is taken"):
        unique_dir(str(tmp_path / "x"))


def test_cli_with_a_dangling_results_link_exits_1_with_one_line(tmp_path: Path) -> None:
    """Issue 13 item 8. ``gradbench-train`` in a folder whose ``results`` is a dangling
    symbolic link (default run dir; a sweep; an explicit run dir under it) exits 1 at once
    with one line naming ``results``; with an explicit directory elsewhere it runs."""
    (tmp_path / "results").symlink_to(tmp_path / "nowhere")
    for args in ((), ("--multirun",), ("hydra.run.dir=results/x",)):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.train", *args, "experiment=debug", "steps=2"],
            cwd=tmp_path, env=env_for_cli(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "results is a symbolic link to" in lines[0], proc.stderr


def _hold(run_dir: Path) -> None:
    with supervise.RunDirLock(run_dir):
        pass


def _hold_and_die(run_dir: Path) -> None:
    supervise.RunDirLock(run_dir).__enter__()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_run_dir_never_has_two_writers(tiny, tmp_path: Path) -> None:
    """Fault: a second process starts a run (the same command, explicit dir) while the first
    holds the run directory; then the holder is SIGKILLed. Property: the second fails at once
    with RunDirBusyError naming the holder's pid and writes nothing; a lock never outlives
    its holder (after a SIGKILL the directory is free)."""
    run_dir = tmp_path / "run"
    with supervise.RunDirLock(run_dir):
        assert in_child(_hold, run_dir) == 1  # RunDirBusyError in the child
        with pytest.raises(supervise.RunDirBusyError, match=f"pid {os.getpid()}"):
            supervise.launch(run, tiny(), run_dir)
    assert not (run_dir / "run.json").exists()
    assert in_child(_hold_and_die, run_dir) == -signal.SIGKILL
    assert supervise.launch(run, tiny(), run_dir) == "completed"


STARTER = """
import sys, time
start = float(sys.argv[1])
sys.argv = ["gradbench-train", *sys.argv[2:]]
import benchmarks.train  # the slow imports happen before the common start
while time.time() < start:
    time.sleep(0.001)
benchmarks.train.main()
"""


@pytest.mark.slow
def test_sixteen_identical_commands_started_together_get_sixteen_run_dirs(tmp_path: Path):
    """Fault: 16 identical ``python -m benchmarks.train experiment=debug`` commands with the
    default (timestamped) ``hydra.run.dir`` start at the same instant (imports done first,
    then a common start time). Property: 16 distinct run directories, each with one
    completed run (its own run id in run.json and in every metric row, its own Hydra
    config); at least two commands did start within the same second (the collision the
    default dir must survive)."""
    start = time.time() + 60
    command = [sys.executable, "-c", STARTER, str(start), "experiment=debug", "steps=5"]
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env_for_cli(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(16)
    ]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, errors
    dirs = sorted(p.parent for p in (tmp_path / "results" / "runs").rglob("run.json"))
    assert len(dirs) == 16
    run_ids = set()
    for d in dirs:
        rec = record(d)
        assert rec["status"] == "completed" and Path(rec["run_dir"]) == d.resolve()
        assert set(pd.read_parquet(d / "metrics.parquet")["run_id"]) == {rec["run_id"]}
        assert (d / ".hydra" / "config.yaml").is_file()
        run_ids.add(rec["run_id"])
    assert len(run_ids) == 16
    assert len({d.name.split("_")[0] for d in dirs}) < 16, "no two commands shared a second"
    assert REPO.is_dir()
