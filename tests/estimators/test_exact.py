"""Exact enumeration: the multi-sample bound against a direct sum over joint draws."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, OneHotCategorical

import estimators


def _dist_and_f(family: str):
    g = torch.Generator().manual_seed(0)
    event = (3,) if family == "bernoulli" else (2, 3)
    logits = torch.randn(2, *event, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(math.prod(event), generator=g, dtype=torch.float64).requires_grad_()
    if family == "bernoulli":
        dist = Independent(Bernoulli(logits=logits), 1)
    else:
        dist = Independent(OneHotCategorical(logits=logits), 1)

    def f(z):  # [S, 2, *E] -> [S, 2], depends on q as well (-log q)
        return 3 * torch.tanh(z.flatten(2) @ w) - dist.log_prob(z)

    return dist, f, [logits, w]


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
@pytest.mark.parametrize("num_samples", [1, 2, 3])
def test_iwae_bound_and_gradient_equal_the_sum_over_joint_draws(family, num_samples) -> None:
    """iwae_bound equals sum over all S-tuples (c_1..c_S) of prod q(c_s) log mean exp f(c_s),
    computed here draw by draw, and iwae_gradient its gradient; S = 1 gives E_q[f]."""
    dist, f, params = _dist_and_f(family)
    configs = estimators.exact.configurations(dist)  # [C, 2, *E]
    total = torch.zeros(2, dtype=torch.float64)
    for tup in itertools.product(range(configs.shape[0]), repeat=num_samples):
        z = configs[list(tup)]  # [S, 2, *E]
        prob = dist.log_prob(z).sum(0).exp()
        total = total + prob * (torch.logsumexp(f(z), 0) - math.log(num_samples))
    bound = estimators.exact.iwae_bound(dist, f, num_samples)
    torch.testing.assert_close(bound, total)
    expected = torch.autograd.grad(total.sum(), params, retain_graph=True)
    value, grads = estimators.exact.iwae_gradient(dist, f, num_samples, params)
    torch.testing.assert_close(value, total.sum().detach())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    if num_samples == 1:
        torch.testing.assert_close(bound, estimators.exact.expectation(dist, f))


def test_iwae_bound_refuses_too_many_tuples_and_bad_num_samples() -> None:
    """C^S above max_configs and S < 1 raise ValueError naming the limit / the option."""
    dist, f, _ = _dist_and_f("categorical")  # 9 configurations
    with pytest.raises(ValueError, match=r"9\^3 .*max_configs=100"):
        estimators.exact.iwae_bound(dist, f, 3, max_configs=100)
    with pytest.raises(ValueError, match=r"num_samples=0 .*allowed: an integer >= 1"):
        estimators.exact.iwae_bound(dist, f, 0)
