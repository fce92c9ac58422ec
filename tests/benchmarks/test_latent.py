"""The latent space: the plain autoencoder, the log-variance scale and the qualitative records.

Runs are the ``debug`` preset on ``digits`` (8x8, labelled), in-process, 20 steps, evaluated
(and so recorded) at steps 0, 10 and 20.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import qualitative
from benchmarks.harness.train import run
from benchmarks.harness.vae import VAE, PointMass
from benchmarks.harness.validate import ConfigError
from benchmarks.records.files import file_sha256
from benchmarks.records.runs import timing_rows

REPO = Path(__file__).resolve().parents[2]
COMMON = ("experiment=debug", "data=digits", "eval.qualitative=true", "device=cpu")
CASES = {
    "autoencoder": ("model=deterministic", "estimator=reparam", "model.latent_dim=2"),
    "log_var": (
        "model=gaussian",
        "estimator=reparam",
        "model.latent_dim=2",
        "model.scale=log_var",
    ),
    "categorical": ("model=categorical", "estimator=gumbel_softmax", "model.latent_dim=3"),
    "bernoulli": ("model=bernoulli", "estimator=reinforce"),
}
N, K, T, P, G = 10, len(qualitative.PAIRS), qualitative.POINTS, qualitative.PRIOR_SAMPLES, 15
D = 64  # digits are 8x8


def _comparable(run_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "metrics.parquet")
    df = df[~timing_rows(df)]
    return df[["step", "f_evals", "split", "metric", "value"]].reset_index(drop=True)


def _qualitative_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "qualitative").iterdir())}


# ------------------------------------------------------------------------------ records


@pytest.mark.parametrize("case", list(CASES))
def test_qualitative_records_have_the_documented_shapes_and_checksums(
    make_config, tmp_path: Path, case: str
) -> None:
    """Each evaluation step writes step_<step>.npz with the arrays and shapes of the
    qualitative module's table (the 2-D grid and codes only for two Gaussian / autoencoder
    latents, the sampled interpolation only for discrete codes), its SHA-256 in index.json,
    and the continuity rows in the metrics."""
    assert run(make_config(*COMMON, *CASES[case]), tmp_path) == "completed"
    folder = tmp_path / "qualitative"
    index = json.loads((folder / "index.json").read_text())["files"]
    assert sorted(index) == [qualitative.step_file(s) for s in (0, 10, 20)]
    for name, entry in index.items():
        assert file_sha256(folder / name) == entry["sha256"]
    with np.load(folder / qualitative.step_file(20)) as f:
        a = {k: f[k] for k in f.files}
    shapes = {
        "image_shape": (2,), "family": (), "digits": (N, D), "labels": (N,),
        "recon_sample": (N, D), "recon_mode": (N, D), "prior_samples": (P, D), "pairs": (K, 2),
        "t": (T,), "interp": (K, T, D), "jump": (K,), "off_data": (K,),
    }  # fmt: skip
    if case in ("categorical", "bernoulli"):
        shapes["interp_sample"] = (K, T, D)
    if case in ("autoencoder", "log_var"):
        shapes |= {"grid": (G, G, D), "grid_z1": (G,), "grid_z2": (G,), "codes": (250, 2),
                   "code_labels": (250,)}  # fmt: skip
    assert {k: v.shape for k, v in a.items()} == shapes
    assert a["digits"].dtype == a["interp"].dtype == np.uint8
    assert sorted(a["labels"]) == list(range(10))  # one test digit of each label
    assert tuple(a["image_shape"]) == (8, 8)
    assert np.all((a["jump"] >= 1 / (T - 1) - 1e-6) & (a["jump"] <= 1 + 1e-6))
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    rows = df[df["split"] == "qualitative"]
    assert sorted(set(rows["metric"])) == ["interp_jump", "interp_off_data"]
    assert sorted(set(rows["step"])) == [0, 10, 20]
    last = rows[(rows["step"] == 20) & (rows["metric"] == "interp_jump")]["value"]
    assert float(last.iloc[0]) == pytest.approx(float(a["jump"].mean()), rel=1e-6)


def test_runs_without_the_option_write_no_qualitative_records(make_config, tmp_path) -> None:
    """eval.qualitative is off by default: no folder, no rows (the golden records hold)."""
    assert run(make_config("experiment=debug", "device=cpu"), tmp_path) == "completed"
    assert not (tmp_path / "qualitative").exists()
    assert not (pd.read_parquet(tmp_path / "metrics.parquet")["split"] == "qualitative").any()


def test_a_kill_while_writing_a_record_leaves_no_torn_file_and_resumes_to_the_same_bytes(
    tmp_path: Path,
) -> None:
    """SIGKILL right before the step-10 record is moved into place: no step_00000010.npz (only
    a temporary file), the index lists steps 0 only; re-running resumes and ends with the
    bytes of an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADBENCH_FAULT": "step_00000010.npz:1"}
    args = [sys.executable, "-m", "benchmarks.train", *COMMON, *CASES["autoencoder"],
            "checkpoint_every=5"]  # fmt: skip
    killed = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'a'}"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "a" / "qualitative"
    assert not (folder / qualitative.step_file(10)).exists()
    assert list(json.loads((folder / "index.json").read_text())["files"]) == [
        qualitative.step_file(0)
    ]
    assert list(folder.glob(".step_00000010.npz.*.tmp"))  # the unfinished write, set aside
    env.pop("GRADBENCH_FAULT")
    for sub in ("a", "b"):
        run_dir = f"hydra.run.dir={tmp_path / sub}"
        done = subprocess.run([*args, run_dir], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    assert _qualitative_bytes(tmp_path / "a") == _qualitative_bytes(tmp_path / "b")
    pd.testing.assert_frame_equal(_comparable(tmp_path / "a"), _comparable(tmp_path / "b"))


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("case", ["autoencoder", "log_var"])
def test_two_runs_are_identical_and_a_resumed_run_equals_an_uninterrupted_one(
    make_config, tmp_path: Path, case: str
) -> None:
    """Two runs of the same config (the process RNG in different states) write identical
    metrics and qualitative bytes; a run failing at step 15 and re-run resumes from its step-10
    checkpoint to the same records."""
    overrides = (*COMMON, *CASES[case], "seed=3", "checkpoint_every=10")
    for prior, sub in ((1, "a"), (2, "b")):
        torch.manual_seed(prior)
        assert run(make_config(*overrides), tmp_path / sub) == "completed"
    with pytest.raises(RuntimeError, match="fail_at_step=15"):
        run(make_config(*overrides, "faults.fail_at_step=15"), tmp_path / "c")
    torch.manual_seed(12345)
    assert run(make_config(*overrides), tmp_path / "c") == "completed"
    assert json.loads((tmp_path / "c" / "run.json").read_text())["resumed_from"] == [10]
    for sub in ("b", "c"):
        pd.testing.assert_frame_equal(_comparable(tmp_path / "a"), _comparable(tmp_path / sub))
        assert _qualitative_bytes(tmp_path / "a") == _qualitative_bytes(tmp_path / sub)


# ------------------------------------------------------------------------------ autoencoder


def test_autoencoder_records_its_reconstruction_log_likelihood_and_no_elbo(
    make_config, tmp_path
) -> None:
    """The autoencoder's train metric is recon_ll (what it optimizes, = -loss) and its
    evaluation rows are val/test recon_ll: no elbo or iwae row anywhere."""
    cfg = make_config("experiment=debug", "model=deterministic", "estimator=reparam")
    assert run(cfg, tmp_path) == "completed"
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    assert not df["metric"].isin(["elbo", "iwae"]).any()
    keys = set(zip(df["split"], df["metric"], strict=True))
    assert {("train", "recon_ll"), ("val", "recon_ll"), ("test", "recon_ll")} <= keys
    train = df[df["split"] == "train"].pivot(index="step", columns="metric", values="value")
    np.testing.assert_allclose(train["recon_ll"], -train["loss"], rtol=1e-6)
    assert json.loads((tmp_path / "run.json").read_text())["family"] == "deterministic"


@pytest.mark.parametrize(
    ("override", "option"),
    [
        ("estimator=reinforce", "estimator"),
        ("model.kl=sampled", "model.kl"),
        ("probe.every=10", "probe.every"),
    ],
)
def test_autoencoder_refuses_what_needs_sampling_naming_the_option(
    make_config, tmp_path, override: str, option: str
) -> None:
    """One line naming the option and the allowed value, before any training."""
    base = ["experiment=debug", "model=deterministic", "estimator=reparam"]
    with pytest.raises(ConfigError, match=rf"^{option}=.*deterministic.*allowed: "):
        run(make_config(*base, override), tmp_path)
    assert not (tmp_path / "metrics.parquet").exists()


def test_point_mass_samples_are_the_code_and_its_gradient_is_exact() -> None:
    """PointMass.rsample returns loc (no noise), so reparam's gradient of f(z) is grad f(loc)."""
    loc = torch.randn(3, 2, requires_grad=True)
    z = PointMass(loc).rsample((4,))
    assert z.shape == (4, 3, 2) and torch.equal(z, loc.expand(4, 3, 2))
    (z**2).sum().backward()
    torch.testing.assert_close(loc.grad, 8 * loc.detach())


def test_log_var_scale_is_exp_of_half_the_output_and_softplus_stays_the_default() -> None:
    """model.scale=log_var: sigma = exp(h / 2); the default: sigma = softplus(h) + 1e-4."""
    torch.manual_seed(0)
    h = torch.randn(5, 4)
    default, log_var = VAE(6, "gaussian", latent_dim=2), VAE(6, "gaussian", latent_dim=2,
                                                             scale="log_var")  # fmt: skip
    torch.testing.assert_close(log_var.distribution(h).base_dist.scale, torch.exp(h[:, 2:] / 2))
    torch.testing.assert_close(
        default.distribution(h).base_dist.scale, F.softplus(h[:, 2:]) + 1e-4
    )
    with pytest.raises(
        ValueError, match=r"model\.scale='exp' is invalid; allowed: softplus, log_var"
    ):
        VAE(6, "gaussian", scale="exp")
