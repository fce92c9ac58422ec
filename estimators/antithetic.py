"""Antithetic estimators for Bernoulli latents: ARM and DisARM (DisARM also for categorical
latents, by stick-breaking: :mod:`estimators.stick_breaking`).

Both draw ``u ~ U(0, 1)^D`` and evaluate ``f`` at the antithetic pair
``b = 1[u < sigma(theta)]`` and ``b~ = 1[u > sigma(-theta)]`` (``= 1[1 - u < sigma(theta)]``),
each marginally an exact sample of ``Bernoulli(sigma(theta))``; they differ in the weight given
to ``f(b) - f(b~)``. The gradient is with respect to the logits ``theta``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, EstimatorBase, Objective, base_of, reinterpreted_ndims
from estimators.registry import register
from estimators.stick_breaking import stick_breaking_disarm


class _AntitheticPair(EstimatorBase):
    """Shared sampling and surrogate; subclasses give the per-unit logit gradient."""

    families = frozenset({"bernoulli"})

    def logit_gradient(
        self, u: Tensor, b: Tensor, b_anti: Tensor, df: Tensor, logits: Tensor
    ) -> Tensor:
        """Per-pair gradient w.r.t. the logits, ``[S, *B, *E]``, from ``df = f(b) - f(b~)``."""
        raise NotImplementedError

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        logits = base_of(dist).logits  # [*B, *E]
        theta = logits.detach()
        u = torch.rand((num_samples, *theta.shape), dtype=theta.dtype, device=theta.device)
        b = (u < torch.sigmoid(theta)).to(theta.dtype)  # [S, *B, *E]
        b_anti = (u > torch.sigmoid(-theta)).to(theta.dtype)
        fz = f(torch.cat([b, b_anti]))  # [2S, *B]: one call for both halves
        f_b, f_anti = fz[:num_samples], fz[num_samples:]
        n = reinterpreted_ndims(dist)
        df = (f_b - f_anti).detach().reshape(*f_b.shape, *(1,) * n)  # broadcast over E
        g = self.logit_gradient(u, b, b_anti, df, theta)  # [S, *B, *E]
        # Linear in the logits: its gradient is g (chained into q's parameters), its value 0.
        linear = (g * (logits - theta)).sum(tuple(range(-n, 0))) if n else g * (logits - theta)
        # grad f at both halves, averaged: unbiased for f's own parameters.
        surrogate = (0.5 * (f_b + f_anti) + linear).mean(0)
        return Estimate(fz.detach().mean(0), surrogate, None, 2 * num_samples)


@register("arm")
class ARM(_AntitheticPair):
    r"""Augment-REINFORCE-merge: antithetic pair weighted by ``u - 1/2``.

    .. math::
        \hat g_\theta = \frac1S\sum_s \big(f(\tilde b_s) - f(b_s)\big)\,(u_s - \tfrac12),
        \qquad \tilde b = 1[u > \sigma(-\theta)],\; b = 1[u < \sigma(\theta)],\;
        u\sim U(0,1)^D

    plus :math:`\frac1{2S}\sum_s(\nabla f(b_s) + \nabla f(\tilde b_s))` for ``f``'s own
    parameters.

    Requirements: bernoulli family (logits ``theta``); ``f`` need not be differentiable in
    ``z``. Unbiased. At ``theta = 0`` and ``f(b) = (b - t)^2`` its variance is
    ``(1 - 2t)^2 / 48``.

    Args:
      num_samples: default number of antithetic pairs ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``f_evals = 2 S`` (``f`` at both halves of
      each pair); ``objective`` averages all ``2 S`` values.

    Example:
      >>> out = estimators.get("arm")(Independent(Bernoulli(logits=theta), 1), f)

    References: Yin & Zhou (2019), "ARM: Augment-REINFORCE-merge gradient for stochastic binary
    networks".
    """

    name = "arm"

    def logit_gradient(
        self, u: Tensor, b: Tensor, b_anti: Tensor, df: Tensor, logits: Tensor
    ) -> Tensor:
        return -df * (u - 0.5)


@register("disarm")
class DisARM(_AntitheticPair):
    r"""DisARM: ARM with the augmentation integrated out (ARM Rao-Blackwellized given the pair).

    .. math::
        \hat g_\theta = \frac1S\sum_s \tfrac12\big(f(b_s) - f(\tilde b_s)\big)\,
        (-1)^{\tilde b_s}\,1[b_s \ne \tilde b_s]\,\sigma(|\theta|)

    with the same antithetic pair as :class:`ARM`, plus
    :math:`\frac1{2S}\sum_s(\nabla f(b_s) + \nabla f(\tilde b_s))` for ``f``'s own parameters.

    Categorical latents (Dong, Mnih & Tucker 2021): each variable is a chain of ``C - 1``
    stick-breaking bits (logits ``alpha``), antithetic bits give two coupled samples, and the
    weight above applies to the bits both chains read (:mod:`estimators.stick_breaking`).

    Requirements: bernoulli family (logits ``theta``) or categorical; ``f`` need not be
    differentiable in ``z``. Unbiased, with variance never above ARM's (Bernoulli). At
    ``theta = 0`` and ``f(b) = (b - t)^2`` every estimate equals the true gradient
    ``(1 - 2t) / 4``.

    Args:
      num_samples: default number of antithetic pairs ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``f_evals = 2 S``.

    Example:
      >>> out = estimators.get("disarm", num_samples=2)(Bernoulli(logits=theta), f)

    References: Dong, Mnih & Tucker (2020), "DisARM: An antithetic gradient estimator for
    binary latent variables"; Dong, Mnih & Tucker (2021), "Coupled gradient estimators for
    discrete latent variables" (categorical, stick-breaking).
    """

    name = "disarm"
    families = frozenset({"bernoulli", "categorical"})

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        if family == "categorical":
            return stick_breaking_disarm(dist, f, num_samples)
        return super().estimate(dist, f, num_samples, family, context)

    def logit_gradient(
        self, u: Tensor, b: Tensor, b_anti: Tensor, df: Tensor, logits: Tensor
    ) -> Tensor:
        sign = 1.0 - 2.0 * b_anti  # (-1)^{b~}
        return 0.5 * df * sign * (b != b_anti).to(df.dtype) * torch.sigmoid(logits.abs())
