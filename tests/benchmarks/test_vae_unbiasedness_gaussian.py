"""Unbiasedness on the harness's own Gaussian VAE: the pathwise, multi-sample and
measure-valued estimators, through :meth:`benchmarks.vae.VAE.learning_signal`.

A tiny linear VAE with ``LATENT`` Gaussian latents; the truth is the exact gradient of
``E_q[f]`` (``objective_kind == "mean"``) or of the S-sample bound ``E log mean_s exp f(z_s)``
(``"iwae"``), for the encoder's *and* the decoder's parameters, by Gauss-Hermite quadrature
(:mod:`estimators.quadrature`; 4 more nodes move it by less than 1e-4, a hundredth of
the standard errors: ``test_quadrature_truth_has_converged``). Each case is held to
what its estimator declares (``unbiased_for``): the mean of R independent estimates equals the
truth within z * SE per coordinate, z a Bonferroni bound over every coordinate of every case
here and the negative control: family-wise false-failure rate ALPHA = 1e-3. Seeds are fixed
and were not chosen to make anything pass.

Negative control: ``stl`` at S = 4 (the path derivative of the IWAE bound, biased for S > 1,
Tucker et al. 2019) fails the same check against the IWAE bound's gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import estimators
from benchmarks.harness.vae import VAE
from tests.benchmarks.vae_replicates import (
    DATA_DIM,
    Outcome,
    check,
    linear_params,
    replicate_gradients,
    tiny_data,
)
from tests.estimators.problems import z_critical

ALPHA = 1e-3
REPLICATES = 20_000
LATENT = 1
NODES = 16  # Gauss-Hermite nodes per coordinate and sample (NODES^(LATENT * S) points)

#: (estimator, options, kl); each estimator of the Gaussian family that declares a truth.
CASES: list[tuple[str, dict, str]] = [
    ("reparam", {}, "analytic"),
    ("reparam", {}, "sampled"),
    ("mvd", {}, "analytic"),
    ("mvd", {"num_samples": 2}, "sampled"),
    ("iwae", {}, "sampled"),
    ("iwae", {"num_samples": 4}, "sampled"),
    ("dreg", {"num_samples": 4}, "sampled"),
    ("dreg", {"num_samples": 2}, "sampled"),
    ("stl", {}, "sampled"),
]
NEGATIVE = ("stl", {"num_samples": 4}, "sampled")


def _id(case: tuple[str, dict, str]) -> str:
    name, opts, kl = case
    return "-".join([name, *(f"{k}={v}" for k, v in opts.items()), kl])


def _z(coords: int) -> float:
    return z_critical(ALPHA / (len(CASES) + 1), coords)


def _vae() -> VAE:
    torch.manual_seed(0)
    vae = VAE(DATA_DIM, "gaussian", "linear", latent_dim=LATENT).double()
    with torch.no_grad():  # a sharper decoder: a posterior far from q, so the cases differ
        vae.decoder[0].weight.mul_(3.0)
    return vae


def quadrature_gradient(
    vae: VAE, x: Tensor, kl: str, est: estimators.EstimatorBase, nodes: int = NODES
) -> Tensor:
    """Exact gradient ``[P]`` of the summed objective the estimator targets (quadrature)."""
    q = vae.encode(x)
    f = vae.learning_signal(x, q, kl)
    quad = estimators.quadrature
    if est.objective_kind == "iwae":
        _, grads = quad.iwae_gradient(q, f, est.num_samples, linear_params(vae), nodes)
    else:
        _, grads = quad.gradient(q, f, linear_params(vae), nodes)
    return torch.cat([g.reshape(-1) for g in grads])


def run_case(name: str, opts: dict, kl: str, seed: int = 2) -> Outcome:
    vae, x = _vae(), tiny_data()
    est = estimators.get(name, **opts)
    truth = quadrature_gradient(vae, x, kl, est)
    torch.manual_seed(seed)
    estimates = replicate_gradients(vae, x, kl, est.eval(), REPLICATES).detach()
    # A biased estimator (unbiased_for "none") is held to equality: the negative control.
    declared = "gradient" if est.unbiased_for == "none" else est.unbiased_for
    return check(estimates, truth, declared, _z)


@pytest.mark.parametrize(("name", "opts", "kl"), CASES, ids=[_id(c) for c in CASES])
def test_mean_gradient_on_the_gaussian_vae_is_what_the_estimator_declares(
    name: str, opts: dict, kl: str
) -> None:
    """Through VAE.learning_signal, the mean of R = 20000 estimates of the encoder's and
    decoder's gradients equals the quadrature gradient of E_q[f] (of the S-sample IWAE bound
    for iwae, dreg and stl)."""
    assert estimators.get(name, **opts).unbiased_for == "gradient"
    outcome = run_case(name, opts, kl)
    assert outcome.passed, outcome.describe()


def test_stl_with_several_samples_is_biased_and_declares_it() -> None:
    """Negative control: STL at S = 4 declares unbiased_for="none" and fails the equality
    check against the IWAE bound's gradient (same R, same z): the check has power, and
    STL's path derivative is biased for S > 1."""
    name, opts, kl = NEGATIVE
    assert estimators.get(name, **opts).unbiased_for == "none"
    outcome = run_case(name, opts, kl)
    assert not outcome.passed, outcome.describe()


def test_quadrature_truth_has_converged() -> None:
    """The truths above move by less than 1e-4 (absolute; the standard errors of the means
    are about 1e-2) when the rule has 4 more nodes, and for S = 1 the bound's gradient equals
    the ELBO's."""
    vae, x = _vae(), tiny_data()
    for name, opts in (("reparam", {}), ("mvd", {}), ("dreg", {"num_samples": 4})):
        est = estimators.get(name, **opts)
        for kl in ("sampled", "analytic") if est.objective_kind == "mean" else ("sampled",):
            a = quadrature_gradient(vae, x, kl, est)
            b = quadrature_gradient(vae, x, kl, est, nodes=NODES + 4)
            assert float((a - b).abs().max()) < 1e-4, (name, kl)
    one = quadrature_gradient(vae, x, "sampled", estimators.get("iwae"))
    assert torch.allclose(one, quadrature_gradient(vae, x, "sampled", estimators.get("reparam")))
