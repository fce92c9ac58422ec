"""IWAE, STL, DReG (estimators.multisample), MVD (estimators.measure_valued) and the Gaussian
quadrature truths (estimators.quadrature): per-sample formulas replayed, unbiasedness in two
latent dimensions against quadrature, costs and declarations.

Unbiasedness: |mean - truth| <= z * SE per coordinate over R replicates, z a Bonferroni bound
over every coordinate of the cases of this module (family-wise false-failure rate 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

import estimators
from estimators import quadrature
from tests.estimators.problems import z_critical

ALPHA = 1e-3
REPLICATES = 20_000
UNBIASED = [("iwae", 2), ("dreg", 2), ("stl", 1), ("mvd", 2)]


def _log_weights(dist, a):
    """f(z) = log N(z; a, 1) summed - log q(z): log weights with a parameter ``a`` of f's."""

    def f(z):
        return Normal(a, 1.0).log_prob(z).sum(-1) - 0.3 * torch.tanh(z).sum(-1) - dist.log_prob(z)

    return f


def _problem(replicates: int):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, generator=g, dtype=torch.float64).expand(replicates, 2).clone()
    sigma = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).expand(replicates, 2).clone()
    a = torch.randn(2, generator=g, dtype=torch.float64).expand(replicates, 2).clone()
    leaves = [mu.requires_grad_(), sigma.requires_grad_(), a.requires_grad_()]
    dist = Independent(Normal(mu, sigma), 1)
    return dist, _log_weights(dist, a), leaves


@pytest.mark.parametrize(("name", "num_samples"), UNBIASED)
def test_mean_gradient_equals_quadrature_in_two_dimensions(name: str, num_samples: int) -> None:
    """In 2 latent dimensions, with f's own parameter, the mean of R estimates equals the
    quadrature gradient of E_q[f] (mvd) or of the S-sample bound (iwae, dreg, stl at S=1)."""
    est = estimators.get(name, num_samples=num_samples)
    dist1, f1, leaves1 = _problem(1)
    if est.objective_kind == "iwae":
        _, truth = quadrature.iwae_gradient(dist1, f1, num_samples, leaves1)
    else:
        _, truth = quadrature.gradient(dist1, f1, leaves1)
    torch.manual_seed(1)
    dist, f, leaves = _problem(REPLICATES)
    est(dist, f).surrogate.sum().backward()
    z = z_critical(ALPHA / len(UNBIASED), 6)
    for leaf, exact in zip(leaves, truth, strict=True):
        g = leaf.grad  # [R, 2]
        err = (g.mean(0) - exact[0]) / (g.std(0) / REPLICATES**0.5)
        assert float(err.abs().max()) <= z, (name, err)


def test_dreg_replays_its_formula_and_equals_stl_at_one_sample() -> None:
    """For one draw, DReG's encoder gradient is sum_s w~_s^2 dw_s/dz_s dz_s/dphi (the score
    term of log q removed) and its f-parameter gradient sum_s w~_s grad_a w_s; at S = 1 it
    equals STL, and IWAE at S = 1 equals reparam (same random stream)."""
    dist, f, (mu, sigma, a) = _problem(1)
    torch.manual_seed(3)
    estimators.get("dreg", num_samples=4)(dist, f).surrogate.sum().backward()
    got = [mu.grad.clone(), sigma.grad.clone(), a.grad.clone()]
    torch.manual_seed(3)
    eps = torch.randn(4, 1, 2, dtype=torch.float64)
    z = (mu + sigma * eps).detach().requires_grad_()
    fixed = Independent(Normal(mu.detach(), sigma.detach()), 1)
    w = _log_weights(fixed, a)(z)  # [4, 1]
    wt = torch.softmax(w.detach(), 0)
    dz, da = torch.autograd.grad(w.sum(), [z, a], retain_graph=True)
    (da,) = torch.autograd.grad((wt * w).sum(), [a])
    want = [(wt[..., None] ** 2 * dz).sum(0), (wt[..., None] ** 2 * dz * eps).sum(0), da]
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e)
    for one, other in (("dreg", "stl"), ("iwae", "reparam")):
        grads = []
        for name in (one, other):
            for leaf in (mu, sigma, a):
                leaf.grad = None
            torch.manual_seed(4)
            estimators.get(name)(dist, f).surrogate.sum().backward()
            grads.append([mu.grad.clone(), sigma.grad.clone(), a.grad.clone()])
        for g, e in zip(*grads, strict=True):
            torch.testing.assert_close(g, e)


def test_declarations_costs_and_blocks() -> None:
    """stl declares unbiased_for "gradient" at S = 1 and "none" above; the multi-sample ones
    report the bound (objective_kind "iwae"); mvd costs S (3 D + 1) evaluations per example
    and gives the same estimate whatever block size (max_rows) evaluates its points."""
    assert estimators.get("stl").unbiased_for == "gradient"
    assert estimators.get("stl", num_samples=2).unbiased_for == "none"
    for name in ("iwae", "stl", "dreg"):
        assert estimators.get(name).objective_kind == "iwae"
    assert estimators.get("mvd").objective_kind == "mean"
    dist, f, leaves = _problem(3)
    outs = []
    for max_rows in (1, 2**20):
        torch.manual_seed(5)
        out = estimators.get("mvd", num_samples=2, max_rows=max_rows)(dist, f)
        outs.append(torch.autograd.grad(out.surrogate.sum(), leaves))
        assert out.f_evals == 2 * (3 * 2 + 1)
    for g, e in zip(*outs, strict=True):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="max_rows"):
        estimators.get("mvd", max_rows=0)


def test_quadrature_rule_and_refusals() -> None:
    """The rule integrates N(0,1) moments exactly (1, 0, 1, 0, 3), the S = 1 bound is the
    expectation, and too many points or a discrete family are refused."""
    x, w = quadrature.hermite_rule(8)
    moments = [float((w * x**k).sum()) for k in range(5)]
    assert moments == pytest.approx([1, 0, 1, 0, 3], abs=1e-12)
    dist, f, _ = _problem(1)
    torch.testing.assert_close(
        quadrature.iwae_bound(dist, f, 1), quadrature.expectation(dist, f, 16)
    )
    with pytest.raises(ValueError, match="points per example"):
        quadrature.iwae_bound(dist, f, 4)
    with pytest.raises(ValueError, match="gaussian"):
        bern = torch.distributions.Bernoulli(logits=torch.zeros(2))
        quadrature.expectation(bern, lambda z: z)
