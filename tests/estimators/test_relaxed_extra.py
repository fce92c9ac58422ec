"""Straight-through and Gumbel-Rao (biased by design), and the conditional relaxation sampler.

Statistical checks state their false-failure rate; seeds are fixed and were not tuned.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy.stats import ks_2samp
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators
from estimators.base import base_of
from estimators.relaxed import conditional_perturb, hard_of, perturb
from tests.estimators.problems import discrete_problem, standardized_errors, z_critical

ALPHA = 1e-3
REPLICATES = 20_000
FAMILIES = ("bernoulli", "categorical")


def _straight_through_expectation(problem):
    """Exact mean of the straight-through estimate by enumeration: E_b[f'(b) . dp/dtheta] for
    the logits, E_b[grad f(b)] for f's own parameters; per-replicate shapes as ``exact``."""
    dist = problem.dist
    configs = estimators.exact.configurations(dist)  # [C, N, R, *E]
    weights = dist.log_prob(configs).exp().detach()  # [C, N, R]
    zc = configs.clone().requires_grad_()
    (fprime,) = torch.autograd.grad(problem.f(zc).sum(), zc)  # f'(b), [C, N, R, *E]
    probs = base_of(dist).probs  # [N, R, *E]
    path = (fprime * probs).flatten(3).sum(-1)  # [C, N, R]
    value = (weights * (path + problem.f(configs))).sum()
    leaves = list(problem.leaves.values())
    grads = torch.autograd.grad(value, leaves, retain_graph=True)  # dist caches probs
    return {
        k: g[0, 0] if k == "logits" else g[0] for k, g in zip(problem.leaves, grads, strict=True)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_straight_through_mean_is_its_enumerated_expectation(family: str) -> None:
    """Straight-through's mean over R = 20000 estimates is within z * SE of its exact
    expectation E_b[f'(b) dp/dtheta] (f's own parameters: E_b[grad f(b)]), and the same
    check against the true gradient fails for the logits (it is biased for a nonlinear f).
    Bonferroni over all coordinates of both families; false-failure rate 1e-3 (the bias is
    > 6 SE on this problem, so the second check fails spuriously with rate < 1e-6)."""
    torch.manual_seed(0)
    problem = discrete_problem(family, REPLICATES, n_examples=1, seed=11)
    expected = _straight_through_expectation(problem)
    estimators.get("straight_through")(problem.dist, problem.f).surrogate.sum().backward()
    errors = standardized_errors(dataclasses.replace(problem, exact=expected))
    coords = sum(e.numel() for e in errors.values())
    z = z_critical(ALPHA / len(FAMILIES), coords)
    assert max(float(e.abs().max()) for e in errors.values()) <= z
    biased = standardized_errors(problem)["logits"]
    assert float(biased.abs().max()) > z


def _logit_grads(name: str, opts: dict, family: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    problem = discrete_problem(family, REPLICATES, n_examples=1, seed=11)
    estimators.get(name, **opts)(problem.dist, problem.f).surrogate.sum().backward()
    return problem.per_replicate("logits").flatten(1)  # [R, coords]


GR_CASES = [(fam, tau) for fam in FAMILIES for tau in (0.5, 2.0)]


@pytest.mark.parametrize(("family", "temperature"), GR_CASES)
def test_gumbel_rao_mean_equals_st_gumbel_softmax_mean(family: str, temperature: float) -> None:
    """Rao-Blackwellization keeps the mean: Gumbel-Rao's and ST-Gumbel-softmax's mean logit
    gradients (independent runs, R = 20000 each) agree within z * SE of their difference;
    Bonferroni over all coordinates of the 4 cases, false-failure rate 1e-3."""
    rao = _logit_grads("gumbel_rao", {"temperature": temperature}, family, seed=101)
    st = {"temperature": temperature, "straight_through": True}
    gs = _logit_grads("gumbel_softmax", st, family, seed=202)
    se = ((rao.var(0) + gs.var(0)) / REPLICATES).sqrt()
    z = z_critical(ALPHA / len(GR_CASES), rao.shape[1])
    assert ((rao.mean(0) - gs.mean(0)).abs() <= z * se).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_gumbel_rao_variance_below_st_gumbel_softmax(family: str) -> None:
    """At temperature 0.5 with K = 10, every logit coordinate's variance is below 0.75 of
    ST-Gumbel-softmax's; the ratio's relative SE at R = 20000 is ~3%, so a false failure needs
    a > 6 SE error (rate < 1e-6)."""
    rao = _logit_grads("gumbel_rao", {"temperature": 0.5}, family, seed=303)
    st = {"temperature": 0.5, "straight_through": True}
    gs = _logit_grads("gumbel_softmax", st, family, seed=404)
    assert (rao.var(0) < 0.75 * gs.var(0)).all(), rao.var(0) / gs.var(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_perturb_is_the_conditional_law(family: str) -> None:
    """conditional_perturb(logits, b) always hardens to b, and with b = hard_of(z) for
    z = perturb(logits) it has z's law: two-sample KS tests per coordinate (and of the max,
    for categorical) against an independent draw of z, Bonferroni at rate 1e-3. Consistency
    plus equal marginals implies equal conditional laws (the regions H^-1(b) are disjoint)."""
    torch.manual_seed(4)
    logits = torch.tensor([1.5, -0.3, 0.2, -2.0], dtype=torch.float64)
    if family == "categorical":
        logits = torch.log_softmax(logits, -1)
    z = perturb(logits, family, (50_000,))
    cond = conditional_perturb(logits, hard_of(z, family), family)
    assert torch.equal(hard_of(cond, family), hard_of(z, family))
    other = perturb(logits, family, (50_000,))
    stats = [(cond[:, i], other[:, i]) for i in range(logits.shape[0])]
    if family == "categorical":
        stats.append((cond.max(-1).values, other.max(-1).values))
    for a, b in stats:
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > ALPHA / len(stats)


@pytest.mark.parametrize("name", ["straight_through", "gumbel_rao"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_hard_and_f_evals(name: str, family: str) -> None:
    """f sees exact discrete samples (one call, S rows), f_evals = S, shapes follow
    batch_shape, and gaussian latents are refused with a ValueError naming the family."""
    logits = torch.randn(2, 3, 4, requires_grad=True)
    base = Bernoulli(logits=logits) if family == "bernoulli" else OneHotCategorical(logits=logits)
    dist = Independent(base, 1)
    seen = []

    def f(z):
        seen.append(z.detach())
        return (z * torch.arange(4.0)).flatten(2).sum(-1) ** 2

    out = estimators.get(name)(dist, f, num_samples=3)
    assert out.f_evals == 3 and len(seen) == 1 and seen[0].shape == (3, 2, 3, 4)
    assert set(seen[0].unique().tolist()) <= {0.0, 1.0}
    assert out.objective.shape == out.surrogate.shape == (2,)
    out.surrogate.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gaussian"):
        estimators.get(name)(Normal(torch.zeros(2), 1.0), lambda z: z)


@pytest.mark.parametrize(
    ("option", "value"), [("temperature", 0.0), ("temperature", math.inf), ("num_rao_samples", 0)]
)
def test_gumbel_rao_invalid_options_are_named(option: str, value: object) -> None:
    """Bad option values raise a ValueError naming the estimator, the option and the value."""
    with pytest.raises(ValueError, match=f"gumbel_rao: option {option}=.*allowed"):
        estimators.get("gumbel_rao", **{option: value})
