"""Continuous relaxations of discrete latents: Gumbel-softmax / Concrete."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
)

from estimators._options import boolean, positive_float
from estimators.base import Estimate, EstimatorBase, Objective, base_of, reinterpreted_ndims
from estimators.registry import register

# Low-precision logits are relaxed in float32: (logits + gumbel) / temperature overflows
# float16 for small temperatures, and the clamped uniforms are too coarse there.
_UPCAST = (torch.float16, torch.bfloat16)


def relax(dist: Distribution, family: str, temperature: Tensor) -> Distribution:
    """The Concrete relaxation of a (possibly ``Independent``) Bernoulli or one-hot categorical.

    Built from ``RelaxedBernoulli`` / ``RelaxedOneHotCategorical`` with the same logits (in
    float32 when they are float16/bfloat16) and the same ``Independent`` event dims.
    """
    logits = base_of(dist).logits
    if logits.dtype in _UPCAST:
        logits = logits.float()
    temperature = temperature.to(logits)
    if family == "bernoulli":
        relaxed: Distribution = RelaxedBernoulli(temperature, logits=logits, validate_args=False)
    else:
        relaxed = RelaxedOneHotCategorical(temperature, logits=logits, validate_args=False)
    n = reinterpreted_ndims(dist)
    return Independent(relaxed, n, validate_args=False) if n else relaxed


def harden(y: Tensor, family: str) -> Tensor:
    """The discrete sample whose relaxation is ``y``: ``y > 1/2`` or the one-hot argmax.

    With Gumbel noise this is an exact sample of the unrelaxed distribution (Gumbel-max).
    """
    if family == "bernoulli":
        return (y > 0.5).to(y.dtype)
    return F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)


class GumbelSoftmax(EstimatorBase):
    r"""Gumbel-softmax / Concrete relaxation, optionally straight-through.

    .. math::
        y_s = \operatorname{softmax}\big((\log\pi + g_s)/\tau\big),\; g_s\sim\mathrm{Gumbel}(0,1);
        \qquad \hat g = \frac1S\sum_s \nabla_\theta f(y_s)

    With ``straight_through`` the forward pass uses the hard sample
    :math:`h_s = \mathrm{onehot}(\arg\max y_s)` and the backward pass the relaxed one:
    :math:`\hat g = \frac1S\sum_s \nabla f(h_s)\,\partial y_s/\partial\theta`. For Bernoulli
    latents the binary Concrete (logistic noise, sigmoid) is used.

    Requirements: bernoulli or categorical family; ``f`` must accept relaxed values and be
    differentiable in ``z``. **Biased** for any ``tau > 0``; the relaxed estimator's bias
    vanishes as ``tau -> 0`` while its variance grows.

    Args:
      temperature: ``tau > 0``; kept in a buffer so a schedule can update it in place.
      straight_through: use the hard sample in the forward pass.
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate`; ``objective`` is ``f`` at the hard samples (the true objective),
      ``surrogate`` uses the relaxed samples. ``f_evals`` is ``S`` with
      ``straight_through`` and ``2 S`` without (``f`` at relaxed and at hard samples).

    Example:
      >>> est = estimators.get("gumbel_softmax", temperature=0.5, straight_through=True)

    References: Jang, Gu & Poole (2017); Maddison, Mnih & Teh (2017).
    """

    name = "gumbel_softmax"
    families = frozenset({"bernoulli", "categorical"})
    unbiased = False

    def __init__(
        self, temperature: float = 1.0, straight_through: bool = False, num_samples: int = 1
    ) -> None:
        super().__init__(num_samples)
        temperature = positive_float(self.name, "temperature", temperature)
        self.straight_through = boolean(self.name, "straight_through", straight_through)
        self.register_buffer("temperature", torch.tensor(temperature))

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        dtype = base_of(dist).logits.dtype
        y = relax(dist, family, self.temperature).rsample((num_samples,))  # [S, *B, *E]
        hard = harden(y.detach(), family)
        if self.straight_through:
            fz = f((hard - y.detach() + y).to(dtype))  # forward: hard; backward: relaxed
            return Estimate(fz.detach().mean(0), fz.mean(0), None, num_samples)
        fz = f(y.to(dtype))
        with torch.no_grad():
            objective = f(hard.to(dtype)).mean(0)
        return Estimate(objective, fz.mean(0), None, 2 * num_samples)

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):g}, straight_through={self.straight_through},"
            f" num_samples={self.num_samples}"
        )


@register("gumbel_softmax", GumbelSoftmax.families)
def gumbel_softmax(
    temperature: float = 1.0, straight_through: bool = False, num_samples: int = 1
) -> GumbelSoftmax:
    """Gumbel-softmax / Concrete (Jang et al. 2017; Maddison et al. 2017)."""
    return GumbelSoftmax(temperature, straight_through, num_samples)
