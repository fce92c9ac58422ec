"""The side-by-side timing of the quick sweep (:mod:`benchmarks.throughput.quick_timing`):
the run order, the tidy record, the summary's ratio, refusals, and one tiny real sweep pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.throughput import quick_timing as qt


def test_sweeps_alternate_abba_so_a_drift_in_load_weighs_on_both() -> None:
    """Repeat 0 runs baseline then current, repeat 1 current then baseline, and so on."""
    assert qt.plan(3) == [
        (0, "baseline"), (0, "current"), (1, "current"), (1, "baseline"),
        (2, "baseline"), (2, "current"),
    ]  # fmt: skip


def test_the_record_has_one_row_per_sweep_and_the_summary_the_ratio_of_medians(
    tmp_path: Path,
) -> None:
    """With a timer that takes 10 s for the baseline and 4 s (then 6 s) for the current tree,
    the record lists four sweeps in ABBA order with their commits, and the summary gives the
    medians 10 and 5, ratio 0.5, per-repeat ratios 0.4 and 0.6, and every sweep ok."""
    current = iter([4.0, 6.0])

    def timer(tree: Path, sweep_dir: Path, overrides: list[str]) -> dict:
        assert overrides == ["steps=20"] and sweep_dir.parent == tmp_path
        seconds = 10.0 if tree.name == "b" else next(current)
        return {"seconds": seconds, "cpu_user_s": 1.0, "cpu_sys_s": 0.1, "loadavg_before": 0.2,
                "returncode": 0, "completed_runs": 18}  # fmt: skip

    trees = {"baseline": Path("b"), "current": Path("c")}
    commits = {"baseline": "a" * 40, "current": "c" * 40}
    rows = qt.measure(trees, commits, 2, tmp_path, ["steps=20"], timer=timer)
    assert [(r["order"], r["side"], r["repeat"]) for r in rows] == [
        (0, "baseline", 0), (1, "current", 0), (2, "current", 1), (3, "baseline", 1),
    ]  # fmt: skip
    assert {r["commit"] for r in rows if r["side"] == "baseline"} == {"a" * 40}
    summary = qt.summarize(rows)
    assert summary["median_seconds"] == {"baseline": 10.0, "current": 5.0}
    assert summary["ratio"] == pytest.approx(0.5)
    assert summary["ratio_per_repeat"] == pytest.approx([0.4, 0.6])
    assert summary["all_ok"]
    rows[0]["completed_runs"] = 17  # a sweep that finished fewer runs is not ok
    assert not qt.summarize(rows)["all_ok"]
    assert "ratio current / baseline 0.500" in qt.markdown(rows, summary, "cmd")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--repeats", "0"], "--repeats=0"), (["--baseline", "no-such-rev"], "--baseline")],
)
def test_bad_options_are_one_line_and_exit_1(argv, needle, capsys) -> None:
    """A bad --repeats or an unknown --baseline: one line naming the option, exit 1."""
    assert qt.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


@pytest.mark.slow
def test_a_tiny_sweep_pair_against_head_writes_the_record(tmp_path: Path) -> None:
    """Baseline HEAD (its files from git archive) against the working tree, one repeat of a
    two-job 10-step sweep: two records, both exit 0 with 2 completed runs."""
    out = tmp_path / "qt"
    argv = ["--baseline", "HEAD", "--repeats", "1", "--out", str(out), "--work", str(tmp_path),
            "steps=10", "pairing=bernoulli_rloo", "seed=0,1", "probe.every=0"]  # fmt: skip
    assert qt.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["side"] for r in data["records"]] == ["baseline", "current"]
    assert all(r["completed_runs"] == 2 for r in data["records"])
    assert data["summary"]["ratio"] > 0 and out.with_suffix(".md").is_file()
    current = data["records"][1]  # the phases summed over the two runs' run.json timing
    assert set(current["phase_seconds"]) >= {"startup_s", "train_s", "eval_s", "probe_s"}
    assert 0 < current["startup_median_s"] <= current["startup_max_s"]
    assert 0 < data["summary"]["training_floor_s"] <= current["phase_seconds"]["train_s"]
    assert "Training alone spread over" in out.with_suffix(".md").read_text()


def test_phase_totals_sum_the_runs_timing_and_skip_runs_without_it(tmp_path: Path) -> None:
    """Each phase is summed over the runs that record a ``timing``; start-up max and median
    are per run; a sweep of runs without ``timing`` (an older commit) gives nothing."""
    for i, timing in enumerate(
        [{"startup_s": 1.0, "train_s": 10.0}, {"startup_s": 3.0, "train_s": 12.0},
         {"startup_s": 2.0, "train_s": 11.0}, None]
    ):  # fmt: skip
        run = tmp_path / str(i)
        run.mkdir()
        record = {"status": "completed"} | ({"timing": timing} if timing else {})
        (run / "run.json").write_text(json.dumps(record))
    got = qt.phase_totals(tmp_path)
    assert got["phase_seconds"] == {"startup_s": 6.0, "train_s": 33.0}
    assert (got["startup_max_s"], got["startup_median_s"]) == (3.0, 2.0)
    (tmp_path / "3" / "run.json").write_text("{}")
    for i in range(3):
        (tmp_path / str(i) / "run.json").write_text('{"status": "completed"}')
    assert qt.phase_totals(tmp_path) == {}
