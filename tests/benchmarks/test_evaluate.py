"""Held-out evaluation (:mod:`benchmarks.harness.evaluate`): one pass of exact samples gives
the ELBO and the IWAE bound of separate draws, the cheaper log-likelihood equals the VAE's,
a run evaluates with the same noise at every step, and ``eval.iwae_every`` thins the IWAE
rows only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.harness.evaluate import bounds, log_likelihood
from benchmarks.harness.train import run
from benchmarks.harness.vae import VAE

CASES = [(f, a) for f in ("gaussian", "bernoulli", "categorical") for a in ("linear", "nonlinear")]


def _vae(family: str, arch: str) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE(64, family, arch, latent_dim=6, n_categories=3, hidden_dim=16)
    x = (torch.rand(12, 64) < 0.3).float()
    return vae, x


@pytest.mark.parametrize(("family", "arch"), CASES)
def test_log_likelihood_equals_the_vaes(family: str, arch: str) -> None:
    """``x . l - sum softplus(l)`` through ``x W`` equals ``VAE.log_likelihood`` (float
    rounding aside) on exact and relaxed samples."""
    vae, x = _vae(family, arch)
    with torch.no_grad():
        z = vae.encode(x).sample((5,))
        if family != "gaussian":
            z = z * 0.7 + 0.1  # relaxed values too: the identity holds for any z
        torch.testing.assert_close(log_likelihood(vae, x, z), vae.log_likelihood(x, z))


@pytest.mark.parametrize(("family", "arch"), CASES)
def test_one_pass_gives_the_elbo_and_iwae_of_separate_draws(family: str, arch: str) -> None:
    """With one seed, ``bounds`` (S = 4 ELBO samples, k = 10 IWAE samples, drawn 4 at a time)
    equals ``VAE.elbo(x, 4)`` and ``VAE.iwae(x, 10, chunk=4)``: the ELBO uses the first S of
    the IWAE's exact draws, which are the draws ``VAE.elbo`` makes."""
    vae, x = _vae(family, arch)
    torch.manual_seed(3)
    elbo, iwae = bounds(vae, x, 4, 10, 4)
    torch.manual_seed(3)
    want_elbo = vae.elbo(x, 4)
    torch.manual_seed(3)
    want_iwae = vae.iwae(x, 10, chunk=4)
    torch.testing.assert_close(elbo, want_elbo)
    torch.testing.assert_close(iwae, want_iwae)
    torch.manual_seed(3)
    only_elbo, none = bounds(vae, x, 4, 0, 4)
    assert none is None
    torch.testing.assert_close(only_elbo, want_elbo)


def _eval_rows(make_config, run_dir: Path, *overrides: str) -> pd.DataFrame:
    cfg = make_config("experiment=debug", "device=cpu", "eval.every=5", *overrides)
    assert run(cfg, run_dir) == "completed"
    df = pd.read_parquet(run_dir / "metrics.parquet")
    return df[df["split"].isin(["val", "test"])]


def test_a_run_evaluates_with_the_same_noise_at_every_step(make_config, tmp_path: Path) -> None:
    """With a learning rate so small that the model does not move (1e-12), every evaluation
    of the run gives the same values: the noise is fixed across steps, so a curve's changes
    are the model's. (With fresh noise per step they differ by the Monte Carlo error.)"""
    df = _eval_rows(make_config, tmp_path, "optim.lr=1e-12")
    for (split, metric), rows in df.groupby(["split", "metric"]):
        assert rows["step"].tolist() == [0, 5, 10, 15, 20]
        first = rows["value"].iloc[0]
        assert rows["value"].tolist() == pytest.approx([first] * 5, rel=1e-6), (split, metric)


def test_iwae_every_thins_the_iwae_rows_only(make_config, tmp_path: Path) -> None:
    """``eval.iwae_every=10`` with ``eval.every=5``: ELBO rows at 0, 5, ..., 20; IWAE rows at
    0, 10, 20; a value that is not a multiple of ``eval.every`` is refused."""
    df = _eval_rows(make_config, tmp_path, "eval.iwae_every=10")
    for split in ("val", "test"):
        steps = {m: df[(df.split == split) & (df.metric == m)]["step"].tolist() for m in
                 ("elbo", "iwae")}  # fmt: skip
        assert steps == {"elbo": [0, 5, 10, 15, 20], "iwae": [0, 10, 20]}
    from benchmarks.harness.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"eval\.iwae_every"):
        validate(make_config("experiment=debug", "eval.every=5", "eval.iwae_every=7"))
    validate(make_config("experiment=quick", "eval.every=0"))  # no evaluation: nothing to thin
