"""Where a run's time goes (:mod:`benchmarks.harness.timing`): ``run.json``'s ``timing`` and
the ``time/*`` rows, consistent with each other and with the run's wall-clock time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.harness import timing
from benchmarks.harness.train import run

PHASES = ("startup", "train", "eval", "probe", "checkpoint")


def test_every_run_records_its_seconds_per_phase(make_config, tmp_path: Path) -> None:
    """A probed debug run: ``run.json`` holds ``<phase>_s`` for the five phases, each >= 0,
    eval and probe > 0, their sum within the run's wall-clock time from its job start; the
    ``time/<phase>`` rows are written at each checkpoint (steps 10, 20), cumulative
    (non-decreasing) and equal to ``run.json``'s except for the last checkpoint's write."""
    started = timing.job_started()
    cfg = make_config(
        "experiment=debug", "device=cpu", "probe.every=10", "probe.num_estimates=8",
        "probe.groups=4", "probe.reference=none",
    )  # fmt: skip
    assert run(cfg, tmp_path) == "completed"
    elapsed = time.time() - started
    timing.job_ended()
    record = json.loads((tmp_path / "run.json").read_text())["timing"]
    assert set(record) == {f"{p}_s" for p in PHASES}
    assert all(v >= 0 for v in record.values())
    assert record["eval_s"] > 0 and record["probe_s"] > 0 and record["train_s"] > 0
    assert sum(record.values()) <= elapsed
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    rows = df[df["split"] == "time"].pivot(index="step", columns="metric", values="value")
    assert list(rows.index) == [10, 20] and set(rows.columns) == set(PHASES)
    assert (rows.diff().dropna() >= 0).all().all()
    for phase in ("startup", "train", "eval", "probe"):
        assert rows.loc[20, phase] == pytest.approx(record[f"{phase}_s"], abs=2e-3)
    assert rows.loc[20, "checkpoint"] <= record["checkpoint_s"]


def test_a_resumed_run_adds_up_the_seconds_of_its_attempts(make_config, tmp_path: Path) -> None:
    """Extending a completed run (steps 10 -> 20) keeps the first attempt's seconds and adds
    the second's: start-up, training and evaluation totals grow (the write of the checkpoint
    resumed from happened after its state was taken, so it is not carried over)."""
    overrides = ("experiment=debug", "device=cpu")
    timing.job_started()
    assert run(make_config(*overrides, "steps=10"), tmp_path) == "completed"
    timing.job_ended()
    first = json.loads((tmp_path / "run.json").read_text())["timing"]
    timing.job_started()
    assert run(make_config(*overrides, "steps=20"), tmp_path) == "completed"
    timing.job_ended()
    second = json.loads((tmp_path / "run.json").read_text())["timing"]
    for name in ("startup_s", "train_s", "eval_s"):
        assert second[name] > first[name], name


def test_a_later_job_of_a_process_starts_when_the_previous_one_ended() -> None:
    """The first job of a process starts with the process; the next one where the previous
    job ended (a reused joblib worker), not at the process start."""
    timing.job_ended()
    ended = time.time()
    assert timing.job_started() == pytest.approx(ended, abs=0.05)
    assert timing.process_start_time() < ended
