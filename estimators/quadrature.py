"""Exact (to quadrature accuracy) expectations and gradients for low-dimensional Gaussians.

The Gaussian counterpart of :mod:`estimators.exact`: for a factorized ``q = N(mu, diag
sigma^2)`` with ``D`` coordinates per example (optionally in ``Independent``),

.. math:: \\mathbb E_q[f(z)] = \\int \\varphi(\\varepsilon) f(\\mu + \\sigma\\varepsilon)\\,
    d\\varepsilon \\approx \\sum_k w_k\\, f(\\mu + \\sigma x_k)

with the ``n``-point Gauss-Hermite rule of the standard normal (``x_k``, ``w_k``) in every
coordinate (``n^D`` points). The rule is exact for polynomials of degree ``2n - 1`` and
converges exponentially for smooth ``f``; the points move with ``mu`` and ``sigma``, so
autograd through the sum gives the gradient with respect to ``q``'s and ``f``'s parameters.
:func:`iwae_bound` applies the rule to the ``S`` samples of the multi-sample bound
(``n^{D S}`` tuples; ``f`` is evaluated once per point).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Objective, base_of, family_of

#: Default limit on quadrature points (or tuples of points) per example.
MAX_POINTS = 2**18


def hermite_rule(n: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes ``[n]`` and weights ``[n]`` (summing to 1) of the ``n``-point Gauss-Hermite rule
    for ``E[g(e)]``, ``e ~ N(0, 1)`` (Golub-Welsch: the eigenvalues of the Jacobi matrix of
    the probabilists' Hermite polynomials, off-diagonal ``sqrt(k)``; weights are the squared
    first components of its eigenvectors)."""
    off = torch.arange(1, n, dtype=torch.float64).sqrt()
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    return nodes.to(dtype), (vectors[0] ** 2).to(dtype)


def points(dist: Distribution, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Quadrature points ``[K, *batch_shape, *event_shape]`` (differentiable in ``mu`` and
    ``sigma``) and their weights ``[K]`` for ``K = num_nodes^D``."""
    if family_of(dist) != "gaussian":
        raise ValueError(f"quadrature supports the gaussian family; got {family_of(dist)!r}")
    base = base_of(dist)
    batch, event = tuple(dist.batch_shape), tuple(dist.event_shape)
    dims = math.prod(event)
    nodes, weights = hermite_rule(num_nodes, base.loc.dtype)
    grid = torch.cartesian_prod(*[nodes] * dims).reshape(-1, dims)  # [K, D]
    weight = torch.cartesian_prod(*[weights] * dims).reshape(-1, dims).prod(1)  # [K]
    eps = grid.reshape(-1, *(1,) * len(batch), *event).to(base.loc.device)
    return base.loc + base.scale * eps, weight.to(base.loc.device)  # [K, *B, *E], [K]


def expectation(dist: Distribution, f: Objective, num_nodes: int = 32) -> Tensor:
    """``E_q[f(z)]``, shape ``batch_shape``, differentiable in ``q``'s and ``f``'s params."""
    _check(dist, num_nodes, 1)
    z, weight = points(dist, num_nodes)
    fz = f(z)  # [K, *B]
    return (weight.reshape(-1, *(1,) * (fz.dim() - 1)) * fz).sum(0)


def iwae_bound(dist: Distribution, f: Objective, num_samples: int, num_nodes: int = 16) -> Tensor:
    r"""The ``S``-sample bound ``E[log (1/S) sum_s exp f(z_s)]``, ``z_s`` iid ``q``:

    .. math:: \sum_{k_1..k_S} \prod_s w_{k_s} \log\frac1S\sum_s e^{f(\mu+\sigma x_{k_s})},

    shape ``batch_shape``; for ``S = 1`` it is :func:`expectation`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; allowed: an integer >= 1")
    _check(dist, num_nodes, num_samples)
    z, weight = points(dist, num_nodes)
    fz = f(z)  # [K, *B]
    index = torch.arange(fz.shape[0], device=fz.device)
    tuples = torch.cartesian_prod(*[index] * num_samples).reshape(-1, num_samples)  # [K^S, S]
    tuple_weight = weight[tuples].prod(1)  # [K^S]
    bound = torch.logsumexp(fz[tuples], 1) - math.log(num_samples)  # [K^S, *B]
    return (tuple_weight.reshape(-1, *(1,) * (bound.dim() - 1)) * bound).sum(0)


def gradient(
    dist: Distribution, f: Objective, params: list[Tensor], num_nodes: int = 32
) -> tuple[Tensor, list[Tensor]]:
    """``sum_b E_q[f(z_b)]`` (detached) and its gradients with respect to ``params``."""
    return _value_and_grads(expectation(dist, f, num_nodes).sum(), params)


def iwae_gradient(
    dist: Distribution, f: Objective, num_samples: int, params: list[Tensor], num_nodes: int = 16
) -> tuple[Tensor, list[Tensor]]:
    """``sum_b`` of the ``S``-sample bound (detached) and its gradients w.r.t. ``params``."""
    return _value_and_grads(iwae_bound(dist, f, num_samples, num_nodes).sum(), params)


def _check(dist: Distribution, num_nodes: int, num_samples: int) -> None:
    total = num_nodes ** (math.prod(dist.event_shape) * num_samples)
    if total > MAX_POINTS:
        raise ValueError(
            f"quadrature needs {num_nodes}^({math.prod(dist.event_shape)} x {num_samples}) "
            f"points per example, above {MAX_POINTS}; use fewer latent dimensions, samples or "
            "nodes"
        )


def _value_and_grads(value: Tensor, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return value.detach(), grads
