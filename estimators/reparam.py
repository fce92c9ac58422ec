"""Pathwise (reparameterization) gradient estimator."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, EstimatorBase, Objective
from estimators.registry import register


@register("reparam")
class Reparam(EstimatorBase):
    r"""Pathwise gradient through ``rsample``.

    .. math::
        \hat g = \frac{1}{S}\sum_{s=1}^S \nabla_\theta f(\mu_\theta + \sigma_\theta\,
        \varepsilon_s), \qquad \varepsilon_s \sim \mathcal N(0, I)

    Requirements: gaussian family; ``f`` differentiable in ``z``. Unbiased.

    Args:
      num_samples: default number of samples ``S`` per example (>= 1).

    Returns:
      :class:`Estimate` with ``objective`` and ``surrogate`` of shape ``batch_shape`` and
      ``f_evals = S``.

    Example:
      >>> est = estimators.get("reparam")
      >>> out = est(Normal(mu, sigma), lambda z: -(z**2), num_samples=4)

    References: Kingma & Welling (2014); Rezende, Mohamed & Wierstra (2014).
    """

    name = "reparam"
    families = frozenset({"gaussian"})

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        z = dist.rsample((num_samples,))  # [S, *B, *E]
        fz = self.pathwise_objective(f)(z)  # [S, *B]
        mean = fz.mean(0)
        return Estimate(mean.detach(), mean, None, num_samples)
