"""Check 11: every outcome gets a truthful status; a killed run is never ``completed``; the
report lists each run that did not complete with its status."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from benchmarks.harness import checkpoint, supervise
from benchmarks.harness.train import run
from benchmarks.report.records import load_records
from benchmarks.report.tables import footnotes

from .conftest import in_child, record


def _outcomes(tiny, root: Path) -> dict[str, Path]:
    """One run per outcome under ``root``: success, exception, NaN, SIGTERM, SIGKILL
    (unsupervised and supervised) and timeout."""
    d = {k: root / k for k in ("success", "exception", "nan", "sigterm", "sigkill",
                                "sigkill_supervised", "timeout")}  # fmt: skip
    assert run(tiny(), d["success"]) == "completed"
    with pytest.raises(RuntimeError):
        run(tiny("faults.fail_at_step=8"), d["exception"])
    assert run(tiny("faults.nan_at_step=8"), d["nan"]) == "diverged"
    assert in_child(run, tiny("faults.term_at_step=8"), d["sigterm"]) == -signal.SIGTERM
    assert in_child(run, tiny("faults.kill_at_step=8"), d["sigkill"]) == -signal.SIGKILL
    cfg = tiny("faults.kill_at_step=8")
    assert supervise.launch(run, cfg, d["sigkill_supervised"], multirun=True) == "failed"
    previous = signal.signal(supervise.PREEMPT_SIGNAL, signal.SIG_IGN)  # a scheduler that waits
    try:
        assert run(tiny("faults.preempt_after=8"), d["timeout"]) == "timeout"
    finally:
        signal.signal(supervise.PREEMPT_SIGNAL, previous)
    return d


EXPECTED = {
    "success": ("completed", None),
    "exception": ("failed", "injected failure"),
    "nan": ("diverged", "non-finite loss"),
    "sigterm": ("failed", "terminated by SIGTERM at step 8; checkpoint saved"),
    "sigkill": ("running", None),
    "sigkill_supervised": ("failed", "killed by SIGKILL"),
    "timeout": ("timeout", "preempted or out of time (SIGUSR2) at step 8"),
}


def test_each_outcome_has_a_truthful_status_and_the_report_lists_the_unfinished(
    tiny, tmp_path: Path
) -> None:
    """Fault: runs that succeed, raise, go NaN, get SIGTERM, get SIGKILL (unsupervised: no
    one left to record it; supervised: the supervisor records it) or are preempted.
    Property: run.json says completed, failed (the message), diverged, failed ("terminated by
    SIGTERM", after a checkpoint at that step), running (never completed), failed ("killed
    by SIGKILL") and timeout; the report's runs table has the same statuses and its list of
    runs left out of the tables names every non-completed run with its status."""
    dirs = _outcomes(tiny, tmp_path)
    for name, (status, reason) in EXPECTED.items():
        rec = record(dirs[name])
        assert rec["status"] == status, (name, rec.get("reason"))
        assert reason is None or reason in rec["reason"], (name, rec["reason"])
    assert checkpoint.load(dirs["sigterm"] / "checkpoint.pt")["step"] == 8
    assert checkpoint.load(dirs["timeout"] / "checkpoint.pt")["step"] == 8

    _, runs = load_records([tmp_path])
    by_dir = {Path(r).name: s for r, s in zip(runs["run_dir"], runs["status"], strict=True)}
    assert by_dir == {name: status for name, (status, _) in EXPECTED.items()}
    listed = "\n".join(footnotes(runs))
    for name, (status, _) in EXPECTED.items():
        if status != "completed":
            run_id = runs.loc[runs["run_dir"].map(lambda r: Path(r).name) == name, "run_id"]
            assert f"{run_id.iloc[0]} (" in listed and f"— {status}" in listed, name


@pytest.mark.slow
def test_the_report_cli_lists_every_non_completed_run_with_its_status(tiny, tmp_path: Path):
    """Property: ``gradbench-report`` over the same outcomes builds, counts every status, and
    its report.md lists each non-completed run with its status and directory."""
    from benchmarks.report import main as report_main

    dirs = _outcomes(tiny, tmp_path / "runs")
    out = tmp_path / "report"
    assert report_main([str(tmp_path / "runs"), "--out", str(out), "--n-boot", "50"]) == 0
    text = (out / "report.md").read_text()
    for name, (status, _) in EXPECTED.items():
        if status != "completed":
            line = next(x for x in text.splitlines() if f"/{name}`" in x or f"/{name} " in x)
            assert re.search(rf"\|\s*{status}\s*\|", line), line
    assert dirs
