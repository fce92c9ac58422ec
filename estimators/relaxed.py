"""Continuous relaxations of discrete latents: Gumbel-softmax / Concrete, straight-through,
Gumbel-Rao, and the perturbation helpers REBAR and RELAX share.

Relaxed samples follow the law of ``torch.distributions.RelaxedBernoulli`` /
``RelaxedOneHotCategorical`` (``soften(perturb(logits))``: the same uniforms and formula),
computed directly from the logits to skip those classes' probs -> logits round trip and
argument checks, a noticeable share of a small training step (the throughput suite measures
it); the tests pin the law by quadrature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Distribution,
)

from estimators._options import boolean, positive_float, positive_int
from estimators.base import Estimate, EstimatorBase, Objective, base_of
from estimators.registry import register

# Low-precision logits are relaxed in float32: (logits + gumbel) / temperature overflows
# float16 for small temperatures, and the clamped uniforms are too coarse there.
_UPCAST = (torch.float16, torch.bfloat16)


def float_logits(dist: Distribution) -> tuple[Tensor, torch.dtype]:
    """``q``'s logits ``[*B, *E]`` (normalized for categorical) in at least float32, where
    Gumbel noise and low temperatures stay finite, and the dtype to cast samples back to."""
    logits = base_of(dist).logits
    dtype = logits.dtype
    return (logits.float() if dtype in _UPCAST else logits), dtype


@register("gumbel_softmax")
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
    unbiased_for = "none"

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
        logits, dtype = float_logits(dist)
        # The reparameterized sample of RelaxedBernoulli / RelaxedOneHotCategorical, computed
        # directly (see the module docstring).
        y = soften(perturb(logits, family, (num_samples,)), family, self.temperature.to(logits))
        hard = hard_of(y.detach(), family, threshold=0.5)
        if self.straight_through:
            st = (hard - y.detach() + y).to(dtype)  # forward: hard; backward: relaxed
            fz = self.pathwise_objective(f)(st)
            return Estimate(fz.detach().mean(0), fz.mean(0), None, num_samples)
        fz = self.pathwise_objective(f)(y.to(dtype))
        if not self.objective_wanted:  # f at the hard samples serves the objective only
            objective = fz.detach().new_full(fz.shape[1:], math.nan)
        else:
            with torch.no_grad():
                objective = f(hard.to(dtype)).mean(0)
        return Estimate(objective, fz.mean(0), None, 2 * num_samples)

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):g}, straight_through={self.straight_through},"
            f" num_samples={self.num_samples}"
        )


# Straight-through estimators and the exact conditional noise that REBAR, RELAX and Gumbel-Rao
# share. Categorical logits passed to these helpers must be normalized (log-probabilities):
# the conditional formula uses that the max of ``logits + Gumbel`` is then ``Gumbel(0)``.


def _uniform(shape: torch.Size, like: Tensor) -> Tensor:
    """Uniforms in ``[eps, 1 - eps]`` (finite logs and logits), dtype and device of ``like``."""
    eps = torch.finfo(like.dtype).eps
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp(eps, 1 - eps)


def perturb(logits: Tensor, family: str, sample_shape: tuple[int, ...] = ()) -> Tensor:
    r"""Perturbed logits ``z = logits + noise``, ``[*sample_shape, *logits.shape]``.

    Logistic noise :math:`\log u - \log(1-u)` (Bernoulli, ``b = 1[z > 0]``) or Gumbel noise
    :math:`-\log(-\log u)` (categorical, ``b = onehot(argmax z)``), so that :func:`hard_of`
    ``(z)`` is an exact sample of ``q``. Differentiable in ``logits`` at fixed noise.
    """
    u = _uniform(torch.Size(sample_shape) + logits.shape, logits)
    noise = u.log() - (-u).log1p() if family == "bernoulli" else -(-u.log()).log()
    return logits + noise


def hard_of(z: Tensor, family: str, threshold: float = 0.0) -> Tensor:
    """The discrete sample of perturbed logits: ``1[z > 0]`` or the one-hot argmax.

    With Gumbel (logistic) noise this is an exact sample of the unrelaxed distribution
    (Gumbel-max). ``threshold=0.5`` takes the relaxed sample ``soften(z)`` instead of ``z``
    (its Bernoulli threshold is 1/2; the argmax is the same).
    """
    if family == "bernoulli":
        return (z > threshold).to(z.dtype)
    return F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)


def conditional_perturb(
    logits: Tensor, hard: Tensor, family: str, sample_shape: tuple[int, ...] = ()
) -> Tensor:
    r"""Perturbed logits :math:`\tilde z \sim z \mid \mathrm{hard\_of}(z) = b`, reparameterized.

    Bernoulli: the logistic(logits) inverse CDF truncated to ``z > 0`` (``b = 1``) or
    ``z <= 0``: :math:`\tilde z = \theta + \log v' - \log(1-v')` with :math:`v' = 1-p(1-v)` or
    :math:`v' = v(1-p)`, :math:`p = \sigma(\theta)`. Categorical (normalized logits
    :math:`\ell`, :math:`E = -\log v \sim \mathrm{Exp}(1)`): :math:`\tilde z_b = -\log E_b` and
    :math:`\tilde z_i = -\log(E_i e^{-\ell_i} + E_b)` for :math:`i \ne b` (Tucker et al. 2017,
    appendix). Differentiable in ``logits`` at fixed ``v`` and ``b``;
    ``[*sample_shape, *hard.shape]``.
    """
    if family == "bernoulli":
        return logits + conditional_noise(logits, hard, family, sample_shape)
    v = _uniform(torch.Size(sample_shape) + hard.shape, logits)
    log_e = (-v.log()).log()  # log E, E ~ Exp(1)
    log_e_hard = (log_e * hard).sum(-1, keepdim=True)
    others = -torch.logaddexp(log_e - logits, log_e_hard)
    return torch.where(hard > 0.5, -log_e_hard, others)


def conditional_noise(
    logits: Tensor, hard: Tensor, family: str, sample_shape: tuple[int, ...] = ()
) -> Tensor:
    r"""The noise of :func:`conditional_perturb`: ``conditional_perturb(...) - logits`` from
    the same uniforms. Bernoulli, directly:
    :math:`\log(1 - p(1-v)) - \log p - \log(1-v)` for ``b = 1`` and
    :math:`\log v + \log(1-p) - \log(1 - v(1-p))` for ``b = 0``."""
    if family != "bernoulli":
        return conditional_perturb(logits, hard, family, sample_shape) - logits
    v = _uniform(torch.Size(sample_shape) + hard.shape, logits)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    return torch.where(
        hard > 0.5,
        (-(1 - v) * log_p.exp()).log1p() - log_p - (-v).log1p(),
        v.log() + log_1mp - (-v * log_1mp.exp()).log1p(),
    )


def soften(z: Tensor, family: str, temperature: Tensor | float) -> Tensor:
    """The relaxation of perturbed logits: ``sigmoid(z / tau)`` or ``softmax(z / tau)``."""
    if family == "bernoulli":
        return torch.sigmoid(z / temperature)
    return torch.softmax(z / temperature, -1)


@register("straight_through")
class StraightThrough(EstimatorBase):
    r"""Straight-through: the hard sample forward, the identity to the probabilities backward.

    .. math::
        \hat g = \frac1S\sum_s \nabla_z f(b_s)\,\frac{\partial p}{\partial\theta},\qquad
        b_s\sim q_\theta,\quad z = b_s + p - \mathrm{stop}(p)

    with ``p`` the Bernoulli probabilities or the categorical probability vector.

    Requirements: bernoulli or categorical; ``f`` differentiable in ``z`` at the discrete
    points. **Biased** for ``q``'s parameters whenever ``f`` is nonlinear; unbiased for ``f``'s
    own parameters (``grad f(b_s)``).

    Args:
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape`` and ``f_evals = S``.

    Example:
      >>> out = estimators.get("straight_through")(Bernoulli(logits=theta), f, num_samples=1)

    References: Bengio, Léonard & Courville (2013), "Estimating or propagating gradients
    through stochastic neurons for conditional computation".
    """

    name = "straight_through"
    families = frozenset({"bernoulli", "categorical"})
    unbiased_for = "none"

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        probs = base_of(dist).probs  # [*B, *E]
        hard = dist.sample((num_samples,))  # [S, *B, *E]
        st = hard + (probs - probs.detach())  # value exactly hard; gradient to probs
        fz = self.pathwise_objective(f)(st)
        return Estimate(fz.detach().mean(0), fz.mean(0), None, num_samples)


@register("gumbel_rao")
class GumbelRao(EstimatorBase):
    r"""Gumbel-Rao: straight-through Gumbel-softmax, Rao-Blackwellized over the noise.

    .. math::
        \hat g = \frac1S\sum_s \nabla_z f(D_s)\,\frac1K\sum_{k=1}^K
        \frac{\partial}{\partial\theta}\operatorname{softmax}\big((\theta+G_{sk})/\tau\big),
        \qquad G_{sk}\sim \mathrm{Gumbel} \mid \arg\max(\theta + G) = D_s

    The Jacobian is taken at fixed ``G`` (as in ST-Gumbel-softmax), so the mean equals
    ST-Gumbel-softmax's and the variance is lower; ``K = 1`` has ST-Gumbel-softmax's law.
    Bernoulli latents use the binary Concrete (logistic noise, sigmoid).

    Requirements: bernoulli or categorical; ``f`` differentiable in ``z``. **Biased** (like
    ST-Gumbel-softmax) for ``q``'s parameters; unbiased for ``f``'s own parameters.

    Args:
      temperature: ``tau > 0`` (buffer, so a schedule can update it in place).
      num_rao_samples: conditional noise draws ``K`` per hard sample (>= 1).
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``f`` is evaluated only at the hard samples,
      ``f_evals = S``.

    Example:
      >>> est = estimators.get("gumbel_rao", temperature=0.5, num_rao_samples=10)

    References: Paulus, Maddison & Krause (2021), "Rao-Blackwellizing the straight-through
    Gumbel-softmax gradient estimator".
    """

    name = "gumbel_rao"
    families = frozenset({"bernoulli", "categorical"})
    unbiased_for = "none"

    def __init__(
        self, temperature: float = 1.0, num_rao_samples: int = 10, num_samples: int = 1
    ) -> None:
        super().__init__(num_samples)
        temperature = positive_float(self.name, "temperature", temperature)
        self.num_rao_samples = positive_int(self.name, "num_rao_samples", num_rao_samples)
        self.register_buffer("temperature", torch.tensor(temperature))

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        logits, dtype = float_logits(dist)
        hard = dist.sample((num_samples,)).to(logits.dtype)  # [S, *B, *E]
        with torch.no_grad():  # the noise is held fixed: no derivative through G
            noise = conditional_noise(logits, hard, family, (self.num_rao_samples,))
        y = soften(logits + noise, family, self.temperature.to(logits)).mean(0)  # [S, *B, *E]
        st = (hard + (y - y.detach())).to(dtype)  # value exactly hard
        fz = self.pathwise_objective(f)(st)
        return Estimate(fz.detach().mean(0), fz.mean(0), None, num_samples)

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):g}, num_rao_samples={self.num_rao_samples},"
            f" num_samples={self.num_samples}"
        )
