"""Unbiasedness on the harness's own VAE: every unbiased estimator x discrete family x KL mode.

Gradient estimates go through :meth:`benchmarks.vae.VAE.learning_signal` as training computes
them, on a tiny linear VAE whose latent space is enumerable (3 Bernoulli bits: 8
configurations; 2 categorical variables of 3 classes: 9), and are compared with the exact
gradient by enumeration (:mod:`estimators.exact`) for the encoder's *and* the decoder's
parameters. What each estimator is held to is what it declares (``unbiased_for``):

- ``gradient``: the mean of R independent estimates equals the exact gradient of
  ``E_q[f]`` (of the S-sample bound ``E log mean_s exp f(z_s)`` for VIMCO) within z * SE per
  coordinate;
- ``direction`` (NVIL with ``normalize``): the mean, minus its projection on the exact
  gradient, is zero within z * SE per coordinate, and the projection is positive.

z is a Bonferroni bound over all coordinates of all cases of this module: family-wise
false-failure rate ALPHA = 1e-3. Seeds are fixed and were not chosen to make anything pass.
Negative controls (a piecewise-constant categorical log q, Gumbel-softmax at temperature 1)
must fail the same checks, which shows that they have power.

The R replicates run in one vectorized call (:mod:`tests.benchmarks.vae_replicates`).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.distributions import Independent

import estimators
from benchmarks.harness.vae import VAE, LatentPosterior
from estimators.baselines import debiased
from tests.benchmarks.vae_replicates import (
    DATA_DIM,
    EXAMPLES,
    Outcome,
    check,
    linear_params,
    replicate_gradients,
    tiny_data,
)
from tests.estimators.problems import z_critical

ALPHA = 1e-3
REPLICATES = 20_000
KL_MODES = ("analytic", "sampled")
#: Option variants per estimator (default options otherwise).
VARIANTS: dict[str, list[dict]] = {"nvil": [{}, {"normalize": True, "decay": 0.5}]}


def _cases() -> list[tuple[str, dict, str, str]]:
    cases = []
    for name in estimators.available():
        for opts in VARIANTS.get(name, [{}]):
            if estimators.get(name, **opts).unbiased_for == "none":
                continue
            for family in sorted(estimators.families(name) & {"bernoulli", "categorical"}):
                cases.extend((name, opts, family, kl) for kl in KL_MODES)
    return cases


CASES = _cases()
#: Estimators whose cases take several seconds each here (set integrals for 2 x 20000
#: examples): slow; tests/estimators/test_categorical_estimators.py checks them by default.
SLOW = {"unordered_set"}


def _id(case: tuple[str, dict, str, str]) -> str:
    name, opts, family, kl = case
    return "-".join([name, *(f"{k}={v}" for k, v in opts.items()), family, kl])


def _z(coords: int) -> float:
    return z_critical(ALPHA / len(CASES), coords)


def _vae(family: str) -> VAE:
    torch.manual_seed(0)
    latent = 3 if family == "bernoulli" else 2
    vae = VAE(DATA_DIM, family, "linear", latent_dim=latent, n_categories=3).double()
    with torch.no_grad():  # a sharper decoder: f varies more between configurations
        vae.decoder[0].weight.mul_(3.0)
    return vae


def exact_gradient(vae: VAE, x: Tensor, kl: str, est: estimators.EstimatorBase) -> Tensor:
    """Exact gradient ``[P]`` of the summed objective the estimator targets."""
    q = vae.encode(x)
    f = vae.learning_signal(x, q, kl)
    if est.objective_kind == "iwae":
        _, grads = estimators.exact.iwae_gradient(q, f, est.num_samples, linear_params(vae))
    else:
        _, grads = estimators.exact.gradient(q, f, linear_params(vae))
    return torch.cat([g.reshape(-1) for g in grads])


def run_case(name: str, opts: dict, family: str, kl: str, seed: int = 2) -> Outcome:
    vae, x = _vae(family), tiny_data()
    est = estimators.get(name, **opts)
    torch.manual_seed(seed)
    truth = exact_gradient(vae, x, kl, est)
    est.train()
    for _ in range(5):  # move running averages (baselines, NVIL's scale) off their start
        small = vae.distribution(vae.encoder(x)[:, None].expand(EXAMPLES, 64, -1))
        ctx = x[:, None].expand(EXAMPLES, 64, DATA_DIM)
        est(small, vae.learning_signal(x[:, None], small, kl), context=ctx)
    est.eval()  # state frozen: every replicate sees the same baseline and scale
    if getattr(est, "normalize", False):
        # Power against a partial rescaling (only the score term divided) needs s > 1.
        scale = float(debiased(est.var, est.count, est.decay).sqrt())
        assert scale > 1.5, f"NVIL's running scale {scale:.2f} is too close to 1"
    estimates = replicate_gradients(vae, x, kl, est, REPLICATES).detach()
    return check(estimates, truth, est.unbiased_for, _z)


@pytest.mark.parametrize(
    ("name", "opts", "family", "kl"),
    [pytest.param(*c, marks=pytest.mark.slow) if c[0] in SLOW else c for c in CASES],
    ids=[_id(c) for c in CASES],
)
def test_mean_gradient_on_the_vae_is_what_the_estimator_declares(
    name: str, opts: dict, family: str, kl: str
) -> None:
    """Through VAE.learning_signal (kl analytic and sampled), the mean of R = 20000 estimates
    of the encoder's and decoder's gradients equals the exact gradient (of the IWAE bound for
    VIMCO), or is parallel to it with a positive scale for unbiased_for="direction"."""
    outcome = run_case(name, opts, family, kl)
    assert outcome.passed, outcome.describe()


@pytest.mark.parametrize("kl", KL_MODES)
def test_gumbel_softmax_fails_both_checks_on_the_vae(kl: str) -> None:
    """Negative control: Gumbel-softmax at temperature 1 on the categorical VAE fails the
    equality check and the direction check (same R, same z)."""
    for unbiased_for in ("gradient", "direction"):
        vae, x = _vae("categorical"), tiny_data()
        est = estimators.get("gumbel_softmax", temperature=1.0)
        torch.manual_seed(2)
        truth = exact_gradient(vae, x, kl, est)
        estimates = replicate_gradients(vae, x, kl, est, REPLICATES).detach()
        assert not check(estimates, truth, unbiased_for, _z).passed, unbiased_for


def test_piecewise_constant_categorical_log_q_makes_rebar_fail(monkeypatch) -> None:
    """Negative control: with torch's OneHotCategorical.log_prob for log q (log pi[argmax z]
    on relaxed samples, as before the continuous extension) REBAR's mean gradient on the
    categorical VAE with kl=sampled fails the equality check."""
    monkeypatch.setattr(LatentPosterior, "log_prob", Independent.log_prob)
    outcome = run_case("rebar", {}, "categorical", "sampled")
    assert not outcome.passed, outcome.describe()
