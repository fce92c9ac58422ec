"""Reproducibility: the same command run twice gives the same records, for every estimator.

Each registered estimator trains a few steps of the ``debug`` preset (CPU, in-process) twice
with the same seed, with the process's RNG in a different state before each run (as two
invocations may leave it): everything recorded except timings must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import estimators
from benchmarks.harness.train import run
from benchmarks.records.runs import timing_rows

#: One supported family per estimator, categorical first (its networks are the largest).
FAMILY = {
    name: next(
        f for f in ("categorical", "bernoulli", "gaussian") if f in estimators.families(name)
    )
    for name in estimators.available()
}
#: Columns and rows that measure time, and the run's random id: the only allowed differences.
TIMING_COLUMNS = ["run_id", "wall_time"]


def _records(run_dir: Path) -> tuple[pd.DataFrame, dict]:
    df = pd.read_parquet(run_dir / "metrics.parquet")
    df = df[~timing_rows(df)].drop(columns=TIMING_COLUMNS).reset_index(drop=True)
    return df, json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("name", estimators.available())
def test_two_runs_of_the_same_config_give_identical_records(
    make_config, tmp_path: Path, name: str
) -> None:
    """Two CPU runs of `experiment=debug estimator=NAME seed=7` (10 steps, probed at step 10)
    write identical metrics.parquet rows (all but run_id, wall_time and the timing rows:
    throughput, time, probe/seconds) and run.json with equal config and seed, whatever the RNG
    state before."""
    kl = "sampled" if estimators.get(name).objective_kind == "iwae" else "analytic"
    overrides = (
        "experiment=debug", f"estimator={name}", f"model={FAMILY[name]}", f"model.kl={kl}",
        "seed=7", "steps=10", "device=cpu", "probe.every=10", "probe.num_estimates=4",
        "probe.groups=2", "probe.reference=none",
    )  # fmt: skip
    records = []
    for prior_seed, sub in ((1, "a"), (2, "b")):
        torch.manual_seed(prior_seed)  # whatever the process did before the run
        assert run(make_config(*overrides), tmp_path / sub) == "completed"
        records.append(_records(tmp_path / sub))
    (first, first_json), (second, second_json) = records
    assert (first["split"] == "probe").any(), "the probe did not run"
    pd.testing.assert_frame_equal(first, second)
    assert first_json["config"] == second_json["config"]
    assert first_json["seed"] == second_json["seed"] == 7
