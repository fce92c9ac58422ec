"""The latent-space figures and the continuity table, drawn by the report from the records
alone (run.json, metrics.parquet, qualitative/*.npz and their index; no checkpoint, no torch).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats

from benchmarks.harness.train import run
from benchmarks.report.pictures import load_record
from tests.benchmarks.test_report import run_report_subprocess
from tests.conftest import CONF_DIR

COMMON = ("experiment=debug", "data=digits", "eval.qualitative=true", "device=cpu", "steps=10",
          "eval.every=5")  # fmt: skip
CASES = {
    "ae": ("model=deterministic", "estimator=reparam", "model.latent_dim=2"),
    "vae": ("pairing=gaussian_reparam_log_var", "model.latent_dim=2"),
    "cat": ("model=categorical", "estimator=gumbel_softmax", "model.latent_dim=2"),
}
LABELS = {"ae": "autoencoder", "vae": "reparam (log σ²)", "cat": "gumbel_softmax (τ=1)"}


@pytest.fixture(scope="module")
def latent_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two seeds of each case; everything but the records deleted; the report built in a
    fresh interpreter."""
    import benchmarks.harness.config  # noqa: F401  (registers the schemas)

    root = tmp_path_factory.mktemp("latent")
    for case, overrides in CASES.items():
        for seed in (0, 1):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*COMMON, *overrides, f"seed={seed}"])
            run_dir = root / "runs" / f"{case}{seed}"
            assert run(cfg, run_dir) == "completed"
            for leftover in ("checkpoint.pt", "checkpoint.prev.pt", "snapshots"):
                path = run_dir / leftover
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out = root / "out"
    result = run_report_subprocess([str(root / "runs"), "--out", str(out), "--n-boot", "20"])
    return {**result, "root": root, "out": out}


def test_latent_figures_are_drawn_from_records_without_torch(latent_report: dict) -> None:
    """latent_panels and latent_map exist as PNG and PDF, 7 in wide, in report.md, and the
    report process never imported torch; each label is drawn in its palette colour."""
    from PIL import Image

    assert latent_report["rc"] == 0 and latent_report["torch"] == []
    out = latent_report["out"]
    for name in ("latent_panels", "latent_map"):
        png, pdf = out / "figures" / f"{name}.png", out / "figures" / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-"
        with Image.open(png) as img:
            assert abs(img.size[0] / img.info["dpi"][0] - 7.0) < 0.05
        assert f"![{name}](figures/{name}.png)" in (out / "report.md").read_text()
    palette = json.loads((out / "figures" / "palette.json").read_text())
    assert set(palette["figures"]["latent_panels"]) == set(LABELS.values())
    assert set(palette["figures"]["latent_map"]) == {LABELS["ae"], LABELS["vae"]}  # 2-D only
    for label, color in palette["figures"]["latent_panels"].items():
        assert color == palette["palette"][label]["color"]


def test_continuity_table_gives_each_label_its_mean_and_interval_over_seeds(
    latent_report: dict,
) -> None:
    """Each row's cells equal the mean and 95% t-interval of the last qualitative rows of its
    two seeds, recomputed here from metrics.parquet."""
    md = (latent_report["out"] / "tables" / "latent_continuity.md").read_text()
    assert (latent_report["out"] / "tables" / "latent_continuity.tex").is_file()
    runs = latent_report["root"] / "runs"
    for case, label in LABELS.items():
        frames = [pd.read_parquet(runs / f"{case}{s}" / "metrics.parquet") for s in (0, 1)]
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} "))
        for metric in ("interp_jump", "interp_off_data"):
            v = np.array([f[(f.split == "qualitative") & (f.metric == metric) & (f.step == 10)]
                          ["value"].iloc[0] for f in frames])  # fmt: skip
            half = stats.t.ppf(0.975, 1) * v.std(ddof=1) / math.sqrt(2)
            cell = f"{v.mean():.3f} [{v.mean() - half:.3f}, {v.mean() + half:.3f}]"
            assert cell in row, (label, metric, cell, row)
    assert "interp_off_data of the autoencoder against reparam (log σ²): " in md


def test_a_record_that_fails_its_checksum_is_not_drawn(latent_report: dict, tmp_path) -> None:
    """A damaged last record is passed over for the last one whose SHA-256 matches."""
    run_dir = tmp_path / "ae0"
    shutil.copytree(latent_report["root"] / "runs" / "ae0", run_dir)
    assert load_record(run_dir)[0] == 10
    last = run_dir / "qualitative" / "step_00000010.npz"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    last.write_bytes(bytes(data))
    step, arrays = load_record(run_dir)
    assert step == 5 and arrays["grid"].shape == (15, 15, 64)
