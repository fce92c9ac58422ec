"""Score-function (REINFORCE) estimators: plain with baselines, and leave-one-out."""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution

from estimators.base import (
    FAMILIES,
    Estimate,
    EstimatorBase,
    Objective,
    sample_score_inputs,
    score_surrogate,
)
from estimators.baselines import leave_one_out_mean, make_baseline
from estimators.registry import register


@register("reinforce")
class Reinforce(EstimatorBase):
    r"""Score-function estimator with a baseline.

    .. math::
        \hat g = \frac{1}{S}\sum_{s=1}^S \Big[\nabla f(z_s) + \big(f(z_s) - b\big)
        \nabla_\theta \log q_\theta(z_s)\Big], \qquad z_s \sim q_\theta

    Requirements: any family; ``f`` need not be differentiable in ``z`` (its own parameters'
    gradients, ``grad f``, flow through as well). Unbiased for every baseline here, since
    ``b`` never depends on the sample it multiplies.

    Args:
      baseline: ``none``; ``moving_average`` (bias-corrected EMA of past mean signals,
        ``decay``; state in buffers, updated in training mode only); ``batch_mean`` (mean
        signal of the other examples along the first batch dimension).
      decay: EMA decay of ``moving_average``, in [0, 1).
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape`` and ``f_evals = S``.

    Example:
      >>> est = estimators.get("reinforce", baseline="moving_average", decay=0.99)
      >>> out = est(Bernoulli(logits=theta), f, num_samples=1)

    References: Williams (1992); Glynn (1990).
    """

    name = "reinforce"
    families = frozenset(FAMILIES)

    def __init__(self, baseline: str = "none", decay: float = 0.99, num_samples: int = 1):
        super().__init__(num_samples)
        self.baseline_name = baseline
        self.baseline = make_baseline(self.name, baseline, decay)

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        log_q, fz = sample_score_inputs(dist, f, num_samples)  # [S, *B] each
        signal = fz.detach() - self.baseline(fz)
        surrogate = score_surrogate(fz, log_q, signal).mean(0)
        return Estimate(fz.detach().mean(0), surrogate, None, num_samples)

    def extra_repr(self) -> str:
        return f"baseline={self.baseline_name!r}, num_samples={self.num_samples}"


@register("rloo")
class RLOO(EstimatorBase):
    r"""REINFORCE leave-one-out: each sample's baseline is the mean of the other samples.

    .. math::
        \hat g = \frac{1}{S}\sum_{s=1}^S \Big[\nabla f(z_s) + \Big(f(z_s) - \frac{1}{S-1}
        \sum_{s'\ne s} f(z_{s'})\Big)\nabla_\theta\log q_\theta(z_s)\Big]

    Requirements: any family; ``S >= 2``. Unbiased (the samples are independent).

    Args:
      num_samples: default ``S`` (>= 2).

    Returns:
      :class:`Estimate` with shapes ``batch_shape`` and ``f_evals = S``.

    Example:
      >>> out = estimators.get("rloo", num_samples=4)(dist, f)

    References: Kool, van Hoof & Welling (2019), "Buy 4 REINFORCE samples, get a baseline for
    free!"; Salimans & Knowles (2014).
    """

    name = "rloo"
    families = frozenset(FAMILIES)
    min_samples = 2

    def __init__(self, num_samples: int = 2) -> None:
        super().__init__(num_samples)

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        log_q, fz = sample_score_inputs(dist, f, num_samples)  # [S, *B] each
        fd = fz.detach()
        surrogate = score_surrogate(fz, log_q, fd - leave_one_out_mean(fd)).mean(0)
        return Estimate(fd.mean(0), surrogate, None, num_samples)
