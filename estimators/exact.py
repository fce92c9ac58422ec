"""Exact expectations and gradients by enumerating small discrete latent spaces.

For a factorized Bernoulli or one-hot categorical ``q`` (optionally in ``Independent``),

.. math:: \\mathbb E_q[f(z)] = \\sum_{c} q(c)\\, f(c),

summed over every latent configuration ``c`` of one example; differentiating this sum gives
the exact gradient with respect to the parameters of ``q`` and of ``f``. This is the ground
truth that tests and the variance probe compare estimators against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Objective, family_of

#: Default limit on configurations per example.
MAX_CONFIGS = 2**16


def num_configurations(dist: Distribution) -> int:
    """Number of latent configurations of one example of ``dist`` (bernoulli/categorical)."""
    family = family_of(dist)
    event = tuple(dist.event_shape)
    if family == "bernoulli":
        return 2 ** math.prod(event)
    if family == "categorical":
        return event[-1] ** math.prod(event[:-1])
    raise ValueError(
        f"exact enumeration supports families bernoulli and categorical; got {family!r}"
    )


def configurations(dist: Distribution, max_configs: int = MAX_CONFIGS) -> Tensor:
    """All latent configurations, ``[C, *batch_shape, *event_shape]`` (expanded, not copied).

    Raises ``ValueError`` when ``C`` exceeds ``max_configs``.
    """
    n = num_configurations(dist)
    if n > max_configs:
        raise ValueError(
            f"exact enumeration needs {n} configurations per example, above "
            f"max_configs={max_configs}; use a smaller latent space or raise max_configs"
        )
    family = family_of(dist)
    event = tuple(dist.event_shape)
    device = dist.mean.device
    dtype = dist.mean.dtype
    index = torch.arange(n, device=device)
    if family == "bernoulli":
        units = math.prod(event)
        bits = (index[:, None] >> torch.arange(units, device=device)) & 1  # [C, units]
        table = bits.to(dtype).reshape(n, *event)
    else:
        k, n_vars = event[-1], math.prod(event[:-1])
        digits = (index[:, None] // k ** torch.arange(n_vars, device=device)) % k  # [C, V]
        table = torch.nn.functional.one_hot(digits, k).to(dtype).reshape(n, *event)
    view = (n,) + (1,) * len(dist.batch_shape) + event
    return table.reshape(view).expand(n, *dist.batch_shape, *event)


def expectation(
    dist: Distribution,
    f: Objective,
    max_configs: int = MAX_CONFIGS,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact ``E_q[f(z)]``, shape ``batch_shape``, differentiable in ``q``'s and ``f``'s params.

    ``f`` is called on chunks of ``chunk_size`` configurations (all at once by default), with
    inputs ``[chunk, *batch_shape, *event_shape]`` as in the estimator contract.
    """
    z = configurations(dist, max_configs)
    chunk = z.shape[0] if chunk_size is None else chunk_size
    total = None
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk]
        term = (dist.log_prob(zc).exp() * f(zc)).sum(0)
        total = term if total is None else total + term
    assert total is not None
    return total


def gradient(
    dist: Distribution,
    f: Objective,
    params: list[Tensor],
    max_configs: int = MAX_CONFIGS,
) -> tuple[Tensor, list[Tensor]]:
    """Exact ``sum_b E_q[f(z_b)]`` (detached) and its gradients with respect to ``params``.

    Parameters that the expectation does not depend on get zero gradients.
    """
    value = expectation(dist, f, max_configs).sum()
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return value.detach(), grads
