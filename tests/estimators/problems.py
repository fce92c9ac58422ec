"""Toy problems with exact answers, shared by the estimator tests.

Every problem puts ``R`` independent replicates in a batch dimension with *leaf* parameters of
shape ``[N, R, ...]`` (``N`` examples along the first batch dimension, which is the one
``batch_mean`` baselines average over). One vectorized estimator call then yields ``R``
independent gradient estimates: the gradient of replicate ``r`` is read off row ``r`` of each
leaf, averaged over the ``N`` examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators


def z_critical(alpha: float, comparisons: int) -> float:
    """Two-sided Bonferroni critical value: P(any |Z_i| > z) <= alpha over ``comparisons``."""
    return NormalDist().inv_cdf(1.0 - alpha / (2 * comparisons))


def variance_se(variance: float, fourth_central: float, n: int) -> float:
    """Standard error of the unbiased sample variance of ``n`` iid draws.

    Var(s^2) = mu_4 / n - sigma^4 (n - 3) / (n (n - 1)), with mu_4 the fourth central moment.
    """
    return math.sqrt(fourth_central / n - variance**2 * (n - 3) / (n * (n - 1)))


@dataclass
class Problem:
    """A distribution over ``[N, R]`` replicated examples, an objective and the exact gradient.

    ``leaves`` are the parameters whose per-replicate gradients are compared with ``exact``
    (same names, each of the per-example shape).
    """

    family: str
    dist: torch.distributions.Distribution
    f: object
    leaves: dict[str, Tensor]
    exact: dict[str, Tensor]
    n_examples: int
    replicates: int

    def per_replicate(self, name: str) -> Tensor:
        """Per-replicate gradient estimates of ``name`` (per example), ``[R, ...]``."""
        grad = self.leaves[name].grad
        assert grad is not None, f"no gradient reached {name}"
        if name.startswith("f_"):  # f's parameters are shared by the N examples of a replicate
            return grad / self.n_examples
        return grad.mean(0)  # average the N examples' estimates


def _tanh_objective(w: Tensor, c: Tensor):
    """f(z) = sum_h tanh(flat(z) @ w[r] + c[r]) per example; own parameters w ``[R,E,H]``, c."""

    def f(z: Tensor) -> Tensor:
        lead = z.shape[:3]  # [S, N, R]
        flat = z.reshape(*lead, -1)
        return torch.tanh(torch.einsum("snre,reh->snrh", flat, w) + c).sum(-1)

    return f


def discrete_problem(
    family: str, replicates: int, n_examples: int = 2, seed: int = 0, dtype=torch.float64
) -> Problem:
    """Bernoulli (3 units) or categorical (2 variables x 3 categories) with a tanh-MLP f.

    The exact gradient comes from :func:`estimators.exact.gradient` by enumeration.
    """
    g = torch.Generator().manual_seed(seed)
    event = (3,) if family == "bernoulli" else (2, 3)
    hidden = 2
    logits0 = torch.randn(event, generator=g, dtype=dtype)
    w0 = torch.randn(math.prod(event), hidden, generator=g, dtype=dtype)
    c0 = torch.randn(hidden, generator=g, dtype=dtype) * 0.5

    def build(n: int, r: int):
        logits = logits0.expand(n, r, *event).clone().requires_grad_()
        w = w0.expand(r, *w0.shape).clone().requires_grad_()
        c = c0.expand(r, hidden).clone().requires_grad_()
        if family == "bernoulli":
            dist = Independent(Bernoulli(logits=logits, validate_args=False), 1)
        else:
            dist = Independent(OneHotCategorical(logits=logits, validate_args=False), 1)
        return dist, _tanh_objective(w, c), {"logits": logits, "f_w": w, "f_c": c}

    dist1, f1, leaves1 = build(1, 1)
    _, grads = estimators.exact.gradient(dist1, f1, list(leaves1.values()))
    exact = {
        k: gr.reshape(leaves1[k].shape[2:] if k == "logits" else leaves1[k].shape[1:])
        for k, gr in zip(leaves1, grads, strict=True)
    }
    dist, f, leaves = build(n_examples, replicates)
    return Problem(family, dist, f, leaves, exact, n_examples, replicates)


def gaussian_problem(
    replicates: int, n_examples: int = 2, seed: int = 0, dtype=torch.float64
) -> Problem:
    r"""z ~ N(mu, diag sigma^2) in 3 dimensions, f(z) = sum_e a_e z_e^2 + w . z.

    Closed form: E f = sum a (mu^2 + sigma^2) + w . mu, so
    d/dmu = 2 a mu + w, d/dsigma = 2 a sigma, d/dw = mu.
    """
    g = torch.Generator().manual_seed(seed)
    mu0 = torch.randn(3, generator=g, dtype=dtype)
    sigma0 = torch.rand(3, generator=g, dtype=dtype) + 0.5
    a = torch.tensor([1.0, -0.5, 0.25], dtype=dtype)
    w0 = torch.randn(3, generator=g, dtype=dtype)
    mu = mu0.expand(n_examples, replicates, 3).clone().requires_grad_()
    sigma = sigma0.expand(n_examples, replicates, 3).clone().requires_grad_()
    w = w0.expand(replicates, 3).clone().requires_grad_()

    def f(z: Tensor) -> Tensor:
        return (a * z**2).sum(-1) + (z * w).sum(-1)

    dist = Independent(Normal(mu, sigma, validate_args=False), 1)
    exact = {"mu": 2 * a * mu0 + w0, "sigma": 2 * a * sigma0, "f_w": mu0}
    return Problem(
        "gaussian", dist, f, {"mu": mu, "sigma": sigma, "f_w": w}, exact, n_examples, replicates
    )


def make_problem(family: str, replicates: int, seed: int = 0) -> Problem:
    """The toy problem of ``family`` with ``replicates`` independent replicates."""
    if family == "gaussian":
        return gaussian_problem(replicates, seed=seed)
    return discrete_problem(family, replicates, seed=seed)


def standardized_errors(problem: Problem) -> dict[str, Tensor]:
    """(mean estimate - exact) / SE per coordinate and leaf, after ``backward``."""
    out = {}
    for name, truth in problem.exact.items():
        g = problem.per_replicate(name)  # [R, ...]
        se = g.std(0) / math.sqrt(g.shape[0])
        out[name] = (g.mean(0) - truth) / se.clamp_min(1e-300)
    return out
