"""Variance: each estimator's sample variance equals its closed-form variance.

Problems (one parameter coordinate each, R independent replicates in one vectorized call):
- z ~ N(mu, sigma^2), f(z) = z^2. With z = mu + sigma eps:
  reparam        g_mu = 2 z,                 Var = 4 sigma^2
                 g_sigma = 2 z eps,           Var = 4 (mu^2 + 2 sigma^2)
  reinforce      g_mu = z^2 eps / sigma,      Var = mu^4/sigma^2 + 14 mu^2 + 15 sigma^2
                 g_sigma = z^2 (eps^2-1)/sigma, Var = 2 mu^4/sigma^2 + 60 mu^2 + 74 sigma^2
  reinforce with a fixed baseline beta: z^2 replaced by z^2 - beta; rloo with S samples:
  (1/S) sum_s (f_s - mean_{s' != s} f_s') score_s. Moments by exact Gauss-Hermite quadrature
  (the closed forms above are asserted against it too).
- b ~ Bernoulli(p = sigmoid(theta)), f(b) = (b - t)^2, score d/dtheta log q = b - p:
  reinforce g = (f(b) - beta)(b - p); rloo and batch_mean as above, moments by enumerating the
  2^n joint outcomes; Gumbel-softmax with y = sigmoid((theta + L)/tau), L ~ Logistic:
  relaxed g = 2 (y - t) y (1 - y)/tau, straight-through g = 2 (1[y > 1/2] - t) y (1 - y)/tau,
  moments by quadrature.
Tolerance: |s^2 - Var| <= z SE(s^2) with SE from the fourth central moment, and the mean is
checked too; z is Bonferroni over all comparisons of this module, family-wise rate 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

import estimators
from tests.estimators.moments import (
    Moments,
    bernoulli_moments,
    gaussian_moments,
    logistic_moments,
    sigmoid,
)
from tests.estimators.problems import variance_se, z_critical

R = 200_000
MU, SIGMA = 0.7, 1.3
THETA, T = 0.4, 0.35
BETA = 0.2  # a fixed (frozen) moving-average baseline value
TAU = 0.5


def _z_crit() -> float:
    """Bonferroni critical value: mean and variance compared for every case of this module."""
    return z_critical(1e-3, 2 * (len(GAUSS_CASES) + len(BERN_CASES)))


def _check(samples: torch.Tensor, exact: Moments) -> None:
    s = samples.double()
    n = s.numel()
    mean, var = float(s.mean()), float(s.var())
    se_mean = math.sqrt(exact.var / n)
    if exact.var < 1e-24:  # degenerate estimate: every draw must equal the mean
        assert abs(mean - exact.mean) < 1e-9 and var < 1e-18
        return
    assert abs(mean - exact.mean) <= _z_crit() * se_mean, (mean, exact.mean)
    se_var = variance_se(exact.var, exact.central4, n)
    assert abs(var - exact.var) <= _z_crit() * se_var, (var, exact.var, se_var)


def _frozen_baseline(est) -> None:
    """Freeze a moving-average baseline at BETA (decay 0, one past update, eval mode)."""
    est.baseline.average.fill_(BETA)
    est.baseline.count.fill_(1)
    est.eval()


# --- Gaussian, f(z) = z^2 ---------------------------------------------------------------


def _z(e):
    return MU + SIGMA * e


def _score(param: str, e):
    return e / SIGMA if param == "mu" else (e**2 - 1) / SIGMA


def _rloo_gauss(param: str, s: int):
    def g(*eps):
        f = [_z(e) ** 2 for e in eps]
        total = sum(f)
        return (
            sum(
                (fk - (total - fk) / (s - 1)) * _score(param, e)
                for fk, e in zip(f, eps, strict=False)
            )
            / s
        )

    return g


GAUSS_CASES = {
    ("reparam", "mu"): (dict(), lambda e: 2 * _z(e), 1),
    ("reparam", "sigma"): (dict(), lambda e: 2 * _z(e) * e, 1),
    ("reinforce", "mu"): (dict(baseline="none"), lambda e: _z(e) ** 2 * _score("mu", e), 1),
    ("reinforce", "sigma"): (
        dict(baseline="none"),
        lambda e: _z(e) ** 2 * _score("sigma", e),
        1,
    ),
    ("reinforce_ma", "mu"): (
        dict(baseline="moving_average", decay=0.0),
        lambda e: (_z(e) ** 2 - BETA) * _score("mu", e),
        1,
    ),
    ("reinforce_ma", "sigma"): (
        dict(baseline="moving_average", decay=0.0),
        lambda e: (_z(e) ** 2 - BETA) * _score("sigma", e),
        1,
    ),
    ("rloo", "mu"): (dict(num_samples=3), _rloo_gauss("mu", 3), 3),
    ("rloo", "sigma"): (dict(num_samples=3), _rloo_gauss("sigma", 3), 3),
}


def test_gaussian_closed_forms_match_quadrature() -> None:
    """The closed-form variances in the module docstring equal the quadrature moments."""
    m, s = MU, SIGMA
    closed = {
        ("reparam", "mu"): 4 * s**2,
        ("reparam", "sigma"): 4 * (m**2 + 2 * s**2),
        ("reinforce", "mu"): m**4 / s**2 + 14 * m**2 + 15 * s**2,
        ("reinforce", "sigma"): 2 * m**4 / s**2 + 60 * m**2 + 74 * s**2,
    }
    for key, value in closed.items():
        _, g, dims = GAUSS_CASES[key]
        assert gaussian_moments(g, dims).var == pytest.approx(value, rel=1e-10)


@pytest.mark.parametrize("case", list(GAUSS_CASES), ids=lambda c: f"{c[0]}-{c[1]}")
def test_gaussian_variance_matches_closed_form(case: tuple[str, str]) -> None:
    """Sample variance (and mean) of R estimates equal the exact moments, f(z) = z^2."""
    name, param = case
    opts, g, dims = GAUSS_CASES[case]
    torch.manual_seed(11)
    mu = torch.full((R,), MU, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((R,), SIGMA, dtype=torch.float64, requires_grad=True)
    est = estimators.get(name.removesuffix("_ma"), **opts)
    if name.endswith("_ma"):
        _frozen_baseline(est)
    out = est(Normal(mu, sigma), lambda z: z**2)
    out.surrogate.sum().backward()
    grad = mu.grad if param == "mu" else sigma.grad
    _check(grad, gaussian_moments(g, dims))


# --- Bernoulli, f(b) = (b - t)^2 ------------------------------------------------------------

P = float(sigmoid(THETA))


def _f(b):
    return (b - T) ** 2


def _rloo_bern(s: int):
    def g(b):
        f = _f(b)
        return float(np.mean((f - (f.sum() - f) / (s - 1)) * (b - P)))

    return g


def _relaxed(straight_through: bool):
    def g(noise):
        y = sigmoid((THETA + noise) / TAU)
        value = (y > 0.5).astype(float) if straight_through else y
        return 2 * (value - T) * y * (1 - y) / TAU

    return g


BERN_CASES = {
    "reinforce": (dict(baseline="none"), 1, lambda b: float(_f(b[0]) * (b[0] - P))),
    "reinforce_ma": (
        dict(baseline="moving_average", decay=0.0),
        1,
        lambda b: float((_f(b[0]) - BETA) * (b[0] - P)),
    ),
    "reinforce_batch_mean": (
        dict(baseline="batch_mean"),
        3,  # three examples; the estimate of example 0
        lambda b: float((_f(b[0]) - _f(b[1:]).mean()) * (b[0] - P)),
    ),
    "rloo_2": (dict(num_samples=2), 2, _rloo_bern(2)),
    "rloo_4": (dict(num_samples=4), 4, _rloo_bern(4)),
    "gumbel_softmax": (dict(temperature=TAU), None, _relaxed(False)),
    "gumbel_softmax_st": (dict(temperature=TAU, straight_through=True), None, _relaxed(True)),
}


@pytest.mark.parametrize("case", list(BERN_CASES))
def test_bernoulli_variance_matches_closed_form(case: str) -> None:
    """Sample variance (and mean) of R estimates equal the exact moments, f(b) = (b - t)^2."""
    opts, draws, g = BERN_CASES[case]
    name = case.split("_")[0] if not case.startswith("gumbel") else "gumbel_softmax"
    torch.manual_seed(12)
    examples = 3 if case == "reinforce_batch_mean" else 1
    theta = torch.full((examples, R), THETA, dtype=torch.float64, requires_grad=True)
    est = estimators.get(name, **opts)
    if case.endswith("_ma"):
        _frozen_baseline(est)
    out = est(Bernoulli(logits=theta), _f)
    out.surrogate.sum().backward()
    samples = theta.grad[0]
    exact = logistic_moments(g) if draws is None else bernoulli_moments(g, draws, P)
    _check(samples, exact)
