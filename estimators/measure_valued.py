"""Measure-valued (weak) derivatives for Gaussian latents (Mohamed, Rosca, Figurnov & Mnih 2020).

The derivative of a density with respect to one parameter is written as a difference of two
densities, :math:`\\partial_\\theta q_\\theta = c_\\theta (q^+_\\theta - q^-_\\theta)`, so that
:math:`\\partial_\\theta E_q[f] = c_\\theta (E_{q^+}[f] - E_{q^-}[f])`: only values of ``f``
are needed, never its derivative. For :math:`N(\\mu, \\sigma^2)` (their Table 1):

- mean: :math:`c = 1/(\\sigma\\sqrt{2\\pi})`, :math:`q^\\pm = \\mu \\pm \\sigma R` with
  :math:`R` Rayleigh (a Weibull with shape 2 and scale :math:`\\sqrt 2`): the double-sided
  Weibull;
- scale: :math:`c = 1/\\sigma`, :math:`q^+ = \\mu + \\sigma M` with :math:`M` double-sided
  Maxwell (density :math:`m^2 \\varphi(m)`), :math:`q^- = N(\\mu, \\sigma^2)` itself.

For a factorized ``q`` each coordinate's derivative changes that coordinate only: ``f`` is
evaluated at the shared sample with one coordinate replaced, for every coordinate at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators._options import positive_int
from estimators.base import Estimate, EstimatorBase, Objective, base_of
from estimators.registry import register

#: The three evaluations per coordinate: mean +, mean -, scale + (scale - is the shared sample).
_SIDES = 3


def weak_samples(eps: Tensor) -> Tensor:
    """``[3, *eps.shape]`` standardized coordinates of the positive and negative parts:
    ``+R``, ``-R`` (double-sided Weibull, one Rayleigh ``R`` for both sides) and the
    double-sided Maxwell ``M = sign(eps) sqrt(eps^2 + a^2 + b^2)`` (``a, b ~ N(0, 1)``),
    coupled with the shared standard normal ``eps`` (``|M|`` is chi with 3 degrees of freedom,
    independent of the sign), which keeps ``f(mu + sigma M) - f(mu + sigma eps)`` small."""
    rayleigh = torch.sqrt(-2.0 * torch.log1p(-torch.rand_like(eps)))  # R: P(R > r) = e^{-r^2/2}
    extra = torch.randn((2, *eps.shape), dtype=eps.dtype, device=eps.device)
    maxwell = torch.sign(eps) * torch.sqrt(eps**2 + (extra**2).sum(0))
    return torch.stack([rayleigh, -rayleigh, maxwell])


@register("mvd")
class MeasureValued(EstimatorBase):
    r"""Measure-valued derivative of ``E_q[f]`` for a factorized Gaussian ``q``.

    .. math::
        \hat g_{\mu_d} = \frac{1}{\sigma_d\sqrt{2\pi}}\big(f(z^{(d)}_{\mu_d + \sigma_d R})
        - f(z^{(d)}_{\mu_d - \sigma_d R})\big),\qquad
        \hat g_{\sigma_d} = \frac{1}{\sigma_d}\big(f(z^{(d)}_{\mu_d + \sigma_d M})
        - f(z)\big),

    where :math:`z \sim q` is shared and :math:`z^{(d)}_v` is ``z`` with coordinate ``d`` set
    to ``v``; ``f``'s own parameters (and any direct dependence of ``f`` on ``q``'s, such as
    ``-log q(z)`` in the sampled-KL signal) get :math:`\nabla f(z)` at the shared sample.
    Averaged over ``S`` shared samples. All ``3 D S`` perturbed points are evaluated without
    a Python loop over samples or coordinates (in blocks of at most ``max_rows`` rows of
    ``f``'s batch, to bound memory).

    Cost: ``f_evals = S (3 D + 1)`` per example for ``D`` latent coordinates. The paper counts
    two evaluations per parameter (``4 D``); the negative part of the scale derivative is
    ``q`` itself, so the shared sample serves every coordinate's (``3 D + 1``).

    Requirements: gaussian family (``Normal``, optionally in ``Independent``); ``f`` need not
    be differentiable in ``z``. Unbiased for ``grad E_q[f]``.

    Args:
      num_samples: default ``S`` (>= 1).
      max_rows: at most this many rows (samples x batch elements) per call of ``f``.

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``objective`` is the mean of ``f`` at the
      shared samples; ``f_evals = S (3 D + 1)``.

    Example:
      >>> out = estimators.get("mvd")(Independent(Normal(mu, sigma), 1), f)

    References: Mohamed, Rosca, Figurnov & Mnih (2020), "Monte Carlo gradient estimation in
    machine learning", JMLR, sec. 6; Pflug (1989).
    """

    name = "mvd"
    families = frozenset({"gaussian"})

    def __init__(self, num_samples: int = 1, max_rows: int = 2**16) -> None:
        super().__init__(num_samples)
        self.max_rows = positive_int(self.name, "max_rows", max_rows)

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        base = base_of(dist)
        batch, event = tuple(dist.batch_shape), tuple(dist.event_shape)
        loc = base.loc.expand(batch + event).reshape(*batch, -1)  # [*B, D]
        scale = base.scale.expand(batch + event).reshape(*batch, -1)  # [*B, D]
        d = loc.shape[-1]
        eps = torch.randn((num_samples, *loc.shape), dtype=loc.dtype, device=loc.device)
        z = (loc.detach() + scale.detach() * eps).reshape(num_samples, *batch, *event)
        fz = f(z)  # [S, *B]: its gradient reaches f's parameters (and q's, directly)
        moved = loc.detach() + scale.detach() * weak_samples(eps)  # [3, S, *B, D]
        with torch.no_grad():
            f_side = self._perturbed_values(f, z.reshape(num_samples, *batch, d), moved, event)
        # f_side: [3, S, *B, D]; weak derivatives per coordinate, averaged over samples.
        s = scale.detach()
        g_loc = ((f_side[0] - f_side[1]) / (s * math.sqrt(2 * math.pi))).mean(0)  # [*B, D]
        g_scale = ((f_side[2] - fz.detach()[..., None]) / s).mean(0)  # [*B, D]
        weak = (g_loc * (loc - loc.detach()) + g_scale * (scale - scale.detach())).sum(-1)
        surrogate = fz.mean(0) + weak
        return Estimate(fz.detach().mean(0), surrogate, None, num_samples * (_SIDES * d + 1))

    def _perturbed_values(
        self, f: Objective, z: Tensor, moved: Tensor, event: tuple[int, ...]
    ) -> Tensor:
        """``f`` at ``z`` with coordinate ``d`` set to ``moved[k, ..., d]``, for every side
        ``k`` and coordinate ``d``: ``[3, S, *B, D]`` from ``z [S, *B, D]`` (``f`` sees the
        points in the ``event`` shape)."""
        s, d = z.shape[0], z.shape[-1]
        batch = z.shape[1:-1]
        eye = torch.eye(d, dtype=torch.bool, device=z.device)
        eye = eye.reshape(1, d, 1, *(1,) * len(batch), d)
        # points[k, j, s, b, :] = z[s, b, :] with coordinate j replaced by moved[k, s, b, j].
        diag = moved.movedim(-1, 1).unsqueeze(-1)  # [3, D, S, *B, 1]
        points = torch.where(eye, diag, z.unsqueeze(0).unsqueeze(0))  # [3, D, S, *B, D]
        flat = points.reshape(_SIDES * d * s, *batch, *event)
        per_call = max(1, self.max_rows // max(1, math.prod(batch)))
        values = torch.cat([f(flat[i : i + per_call]) for i in range(0, flat.shape[0], per_call)])
        return values.reshape(_SIDES, d, s, *batch).movedim(1, -1)
