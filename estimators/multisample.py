"""Pathwise estimators of the multi-sample (IWAE) bound for Gaussian latents: IWAE, STL, DReG.

All three draw ``S`` reparameterized samples ``z_s = mu + sigma eps_s`` per example, evaluate
``f`` once on them (``f`` returns log importance weights ``w_s = log p(x, z_s) - log q(z_s|x)``,
the VAE's learning signal with ``model.kl=sampled``) and report the bound

.. math:: \\hat L_S = \\log \\frac1S \\sum_{s=1}^S e^{w_s}

as their objective (``objective_kind = "iwae"``). They differ in the gradient they return
for the parameters of ``q``; with normalized weights :math:`\\tilde w_s = e^{w_s}/\\sum_{s'}
e^{w_{s'}}` and :math:`\\partial_z w_s` the derivative through the sample,

- ``iwae``: :math:`\\sum_s \\tilde w_s \\nabla w_s` (the plain reparameterization gradient);
- ``stl``: :math:`\\sum_s \\tilde w_s (\\nabla w_s + \\nabla_\\phi \\log q_\\phi(z_s))`, the
  score of ``log q`` at the fixed sample added back, which cancels the direct dependence of
  ``w_s`` on ``q``'s parameters (the "path derivative");
- ``dreg``: as ``stl``, but the gradient through the samples weighted by
  :math:`\\tilde w_s^2` instead of :math:`\\tilde w_s`.

``f``'s own parameters (the decoder) get :math:`\\sum_s \\tilde w_s \\nabla_\\theta w_s` from
all three: the IWAE bound's exact gradient estimate.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, EstimatorBase, Objective
from estimators.registry import register


def _bound(w: Tensor) -> Tensor:
    """``log mean_s exp w_s``: ``[*B]`` from ``[S, *B]``; gradient ``sum_s w~_s grad w_s``."""
    return torch.logsumexp(w, 0) - math.log(w.shape[0])


def _path_weights(dist: Distribution, z: Tensor, w: Tensor) -> Tensor:
    """``w + log q(stop z) - stop(log q(stop z))``: the same values; the added gradient
    ``+grad_phi log q_phi(z)`` at the fixed sample cancels the score term that ``w = ... -
    log q_phi(z)`` carries, leaving the path derivative (Roeder et al. 2017)."""
    log_q = dist.log_prob(z.detach())  # [S, *B]; gradient only to q's parameters
    return w + (log_q - log_q.detach())


@register("iwae")
class IWAE(EstimatorBase):
    r"""The S-sample IWAE bound with the reparameterization gradient.

    .. math::
        \hat L_S = \log\frac1S\sum_s e^{w_s},\qquad
        \hat g = \nabla \hat L_S = \sum_s \tilde w_s \nabla w_s,\qquad
        w_s = f(\mu + \sigma\varepsilon_s)

    **Only meaningful when ``f`` returns log importance weights** (``model.kl=sampled``);
    ``objective_kind = "iwae"``. At ``S = 1`` this is ``reparam`` (the ELBO).

    Requirements: gaussian family; ``f`` differentiable in ``z``. Unbiased for the gradient of
    the S-sample bound ``E[L_hat_S]``.

    Args:
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``objective`` is ``L_hat_S`` (detached);
      ``f_evals = S``.

    Example:
      >>> out = estimators.get("iwae", num_samples=5)(q, vae.learning_signal(x, q, "sampled"))

    References: Burda, Grosse & Salakhutdinov (2016), "Importance weighted autoencoders".
    """

    name = "iwae"
    families = frozenset({"gaussian"})
    objective_kind: ClassVar[str] = "iwae"

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        z = dist.rsample((num_samples,))  # [S, *B, *E]
        bound = _bound(f(z))  # [*B]
        return Estimate(bound.detach(), bound, None, num_samples)


@register("stl")
class STL(EstimatorBase):
    r"""Sticking the landing: the path derivative of the (multi-sample) bound.

    .. math::
        \hat g = \sum_s \tilde w_s\big(\nabla w_s + \nabla_\phi \log q_\phi(z_s)\big|_{z_s}\big)

    For ``w = log p(x, z) - log q_phi(z)`` the added score cancels the direct dependence on
    ``phi``, so only the path through ``z_s`` remains; at the optimum ``q = p(z|x)`` every
    estimate is then zero. For any ``f`` at ``S = 1`` the added term is a score function with
    mean zero, so the estimate is **unbiased for the ELBO's gradient at S = 1**
    (``unbiased_for = "gradient"``). **For S > 1 it is biased** for the IWAE bound's gradient
    (the weights ``w~_s`` correlate with the score; Tucker et al. 2019, sec. 3), so
    ``unbiased_for = "none"`` for a default ``num_samples > 1``. The decoder's gradient is
    the IWAE one (unbiased). ``objective_kind = "iwae"``; needs ``model.kl=sampled``.

    Requirements: gaussian family; ``f`` differentiable in ``z``.

    Args:
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``objective`` is ``L_hat_S``;
      ``f_evals = S``.

    Example:
      >>> out = estimators.get("stl")(q, vae.learning_signal(x, q, "sampled"))

    References: Roeder, Wu & Duvenaud (2017), "Sticking the landing: simple, lower-variance
    gradient estimators for variational inference".
    """

    name = "stl"
    families = frozenset({"gaussian"})
    objective_kind: ClassVar[str] = "iwae"

    @property
    def unbiased_for(self) -> str:  # type: ignore[override]
        """``gradient`` at ``S = 1`` (the ELBO), ``none`` for ``S > 1`` (biased)."""
        return "gradient" if self.num_samples == 1 else "none"

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        z = dist.rsample((num_samples,))  # [S, *B, *E]
        w = f(z)  # [S, *B]
        surrogate = _bound(_path_weights(dist, z, w))
        return Estimate(_bound(w.detach()), surrogate, None, num_samples)


@register("dreg")
class DReG(EstimatorBase):
    r"""Doubly reparameterized gradient of the IWAE bound.

    .. math::
        \hat g_\phi = \sum_s \tilde w_s^2\,\frac{\partial w_s}{\partial z_s}
        \frac{\partial z_s}{\partial \phi},\qquad
        \hat g_\theta = \sum_s \tilde w_s \nabla_\theta w_s

    Tucker et al. reparameterize the score term of the IWAE gradient a second time:
    ``E[w~_s grad log q(z_s)] = E[(w~_s - w~_s^2) dw_s/dz_s dz_s/dphi]``. Here the surrogate
    is STL's, and a hook on the samples multiplies the gradient that reaches ``z_s`` by
    ``w~_s`` (so the path term carries ``w~_s^2``); for ``w = log p - log q_phi`` this is the
    formula above, and for any ``f`` its mean is the bound's gradient by the same identity.
    Unbiased for the S-sample IWAE bound; the encoder's SNR does not vanish as ``S`` grows
    (Rainforth et al. 2018). At ``S = 1`` it equals ``stl``. ``objective_kind = "iwae"``; needs
    ``model.kl=sampled``.

    Requirements: gaussian family; ``f`` differentiable in ``z``; ``z`` reaches the
    parameters of ``q`` only (the hook scales every gradient through the samples).

    Args:
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``objective`` is ``L_hat_S``;
      ``f_evals = S``.

    Example:
      >>> out = estimators.get("dreg", num_samples=64)(q, vae.learning_signal(x, q, "sampled"))

    References: Tucker, Lawson, Gu & Maddison (2019), "Doubly reparameterized gradient
    estimators for Monte Carlo objectives".
    """

    name = "dreg"
    families = frozenset({"gaussian"})
    objective_kind: ClassVar[str] = "iwae"

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        z = dist.rsample((num_samples,))  # [S, *B, *E]
        w = f(z)  # [S, *B]
        if z.requires_grad:
            weights = torch.softmax(w.detach(), 0)  # [S, *B]: w~_s
            scale = weights.reshape(*weights.shape, *(1,) * (z.dim() - w.dim()))
            # One more w~_s on the path through the samples: w~_s^2 in total.
            z.register_hook(lambda grad: grad * scale)
        surrogate = _bound(_path_weights(dist, z, w))
        return Estimate(_bound(w.detach()), surrogate, None, num_samples)
