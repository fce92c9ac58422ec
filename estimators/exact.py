"""Exact expectations and gradients by enumerating small discrete latent spaces.

For a factorized Bernoulli or one-hot categorical ``q`` (optionally in ``Independent``),

.. math:: \\mathbb E_q[f(z)] = \\sum_{c} q(c)\\, f(c),

summed over every latent configuration ``c`` of one example; differentiating this sum gives
the exact gradient with respect to the parameters of ``q`` and of ``f``. This is the ground
truth that tests and the variance probe compare estimators against. For the multi-sample
(IWAE) bound that VIMCO's estimates target, :func:`iwae_bound` sums over ``S``-tuples.
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


def iwae_bound(
    dist: Distribution, f: Objective, num_samples: int, max_configs: int = MAX_CONFIGS
) -> Tensor:
    r"""Exact ``S``-sample bound ``E[log (1/S) sum_s exp f(z_s)]``, ``z_1..z_S`` iid ``q``.

    .. math:: \mathcal L_S = \sum_{c_1,\dots,c_S} \prod_s q(c_s)\,
        \log\frac1S\sum_s e^{f(c_s)},

    summed over all ``C^S`` tuples of configurations (``f`` is evaluated once per
    configuration); shape ``batch_shape``, differentiable in ``q``'s and ``f``'s parameters.
    With ``f`` the log weights ``log p(x, z) - log q(z|x)`` this is the IWAE bound; for
    ``S = 1`` it is :func:`expectation`. Raises ``ValueError`` when ``C^S`` exceeds
    ``max_configs``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid; allowed: an integer >= 1")
    n = num_configurations(dist)
    if n**num_samples > max_configs:
        raise ValueError(
            f"the exact {num_samples}-sample bound needs {n}^{num_samples} tuples of "
            f"configurations per example, above max_configs={max_configs}; use a smaller "
            "latent space, fewer samples or raise max_configs"
        )
    z = configurations(dist, max_configs)  # [C, *B, *E]
    log_q, fz = dist.log_prob(z), f(z)  # [C, *B] each
    device = log_q.device
    index = torch.arange(n, device=device)
    tuples = torch.cartesian_prod(*[index] * num_samples).reshape(-1, num_samples)  # [C^S, S]
    log_weight = log_q[tuples].sum(1)  # [C^S, *B]: log prod_s q(c_s)
    bound = torch.logsumexp(fz[tuples], 1) - math.log(num_samples)  # [C^S, *B]
    return (log_weight.exp() * bound).sum(0)


def gradient(
    dist: Distribution,
    f: Objective,
    params: list[Tensor],
    max_configs: int = MAX_CONFIGS,
) -> tuple[Tensor, list[Tensor]]:
    """Exact ``sum_b E_q[f(z_b)]`` (detached) and its gradients with respect to ``params``.

    Parameters that the expectation does not depend on get zero gradients.
    """
    return _value_and_grads(expectation(dist, f, max_configs).sum(), params)


def iwae_gradient(
    dist: Distribution,
    f: Objective,
    num_samples: int,
    params: list[Tensor],
    max_configs: int = MAX_CONFIGS,
) -> tuple[Tensor, list[Tensor]]:
    """Exact ``sum_b`` of the ``S``-sample bound (:func:`iwae_bound`, detached) and its
    gradients with respect to ``params`` (zeros for parameters it does not depend on)."""
    return _value_and_grads(iwae_bound(dist, f, num_samples, max_configs).sum(), params)


def _value_and_grads(value: Tensor, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return value.detach(), grads
