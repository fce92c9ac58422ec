"""Exact moments of gradient estimates, for the variance tests.

Each estimate is written here from the math (independently of the library) as a function of
the underlying randomness, and its moments are computed exactly:
- Gaussian noise: tensor-product Gauss-Hermite quadrature, exact for polynomials of degree
  < 2 * nodes (the estimates below are polynomials in eps);
- Bernoulli draws: enumeration of all joint outcomes;
- logistic (binary Gumbel) noise: fine trapezoidal quadrature of a smooth integrand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.polynomial.hermite_e import hermegauss


@dataclass(frozen=True)
class Moments:
    """Mean, variance and fourth central moment of a scalar random variable."""

    mean: float
    var: float
    central4: float


def _from_weighted(values: np.ndarray, weights: np.ndarray) -> Moments:
    weights = weights / weights.sum()
    mean = float(np.sum(weights * values))
    dev = values - mean
    return Moments(mean, float(np.sum(weights * dev**2)), float(np.sum(weights * dev**4)))


def gaussian_moments(g: Callable[..., np.ndarray], dims: int, nodes: int = 12) -> Moments:
    """Moments of g(eps_1, ..., eps_dims), eps iid N(0, 1); exact for polynomial g of degree
    < (2 * nodes - 1) / 4 (the fourth moment needs degree 4 deg g)."""
    x, w = hermegauss(nodes)
    grids = np.meshgrid(*([x] * dims), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * dims), indexing="ij"), axis=0)
    return _from_weighted(g(*grids).ravel(), weights.ravel())


def bernoulli_moments(g: Callable[[np.ndarray], float], n_draws: int, p: float) -> Moments:
    """Moments of g(b) for b a vector of ``n_draws`` iid Bernoulli(p) draws (2^n outcomes)."""
    values, weights = [], []
    for bits in itertools.product((0, 1), repeat=n_draws):
        b = np.array(bits, dtype=float)
        values.append(g(b))
        weights.append(np.prod(np.where(b == 1, p, 1 - p)))
    return _from_weighted(np.array(values), np.array(weights))


def logistic_moments(g: Callable[[np.ndarray], np.ndarray], points: int = 400_001) -> Moments:
    """Moments of g(L), L ~ Logistic(0, 1), by trapezoidal quadrature on [-60, 60]."""
    grid = np.linspace(-60.0, 60.0, points)
    sig = 0.5 * (1.0 + np.tanh(0.5 * grid))
    density = sig * (1.0 - sig)
    weights = density * (grid[1] - grid[0])
    weights[[0, -1]] *= 0.5
    return _from_weighted(g(grid), weights)


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Logistic sigmoid."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))
