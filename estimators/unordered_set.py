r"""The unordered set estimator (Kool, van Hoof & Welling 2020), by stochastic beam search.

Each example's *whole* latent configuration is one element of a product space (``2^D``
Bernoulli or ``C^K`` categorical configurations). Its ``k`` samples without replacement are
the top ``k`` of Gumbel-perturbed log-probabilities over that space (Gumbel-top-k), found
exactly by stochastic beam search over the variables in a fixed order (Kool, van Hoof &
Welling 2019): a partial configuration's perturbed log-probability is the maximum of its
completions', and its children's are Gumbels conditioned on that maximum.

For the unordered sample set ``S`` the estimator weighs each ``s`` by ``p(s) R(S, s)`` with
:math:`R(S, s) = p^{D\setminus s}(S\setminus s) / p(S)`; the probability of an unordered
set is :math:`p(S) = \int_0^1 \prod_{s\in S}\big(1 - u^{a_s}\big)\,du` with
:math:`a_s = p(s) / (1 - \sum_{s'\in S} p(s'))`, and the leave-one-out and leave-two-out
sets reuse the same ``a`` (their domains renormalize ``p`` and the rest alike), so one
integrand per set, evaluated in log space on a grid, gives every ratio.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, EstimatorBase, Objective, base_of
from estimators.registry import register
from estimators.relaxed import perturb

#: Points of the grid on which the set probabilities' integrals are evaluated (trapezoid in
#: ``v = log(-log u)``, where the integrand is smooth and decays double-exponentially).
GRID_POINTS = 256
#: Examples per chunk of :func:`set_log_ratios` are capped so that the leave-two-out
#: integrands (``[chunk, k, k, GRID_POINTS]`` at most) hold at most this many float64 numbers.
MAX_GRID_ELEMENTS = 2**22


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def variable_log_probs(dist: Distribution, family: str) -> Tensor:
    """Per-variable log-probabilities ``[B', V, C]`` (``B'`` examples, ``V`` variables;
    Bernoulli: ``C = 2``, class 1 is ``z = 1``), detached."""
    logits = base_of(dist).logits.detach()
    batch = math.prod(dist.batch_shape)
    if family == "bernoulli":
        table = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], -1)
        return table.reshape(batch, -1, 2)
    return logits.reshape(batch, -1, logits.shape[-1])  # normalized already


def conditioned_gumbels(parent: Tensor, children: Tensor) -> Tensor:
    r"""Gumbels ``children [..., C]`` conditioned on their maximum being ``parent [..., 1]``:
    :math:`-\log(e^{-T} - e^{-Z} + e^{-G_i})`, ``Z = max G``, in the stable form of Kool et
    al. (2019, appendix B)."""
    top = children.max(-1, keepdim=True).values
    v = parent - children + log1mexp((children - top).clamp(max=0))
    return parent - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))


def stochastic_beam_search(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` configurations per example without replacement (fewer if the space has fewer).

    Args:
      log_probs: ``[B', V, C]`` per-variable log-probabilities of a factorized distribution.
      k: beam size.

    Returns:
      ``codes [B', k', V]`` (class of each variable) and ``log_p [B', k']`` (their joint
      log-probabilities), ``k' = min(k, C^V)``, in decreasing order of perturbed log-prob.
    """
    b, n_vars, c = log_probs.shape
    codes = log_probs.new_zeros((b, 1, 0), dtype=torch.long)
    log_p = log_probs.new_zeros(b, 1)
    gumbel = log_probs.new_zeros(b, 1)  # the root's perturbed log-prob: any constant
    for v in range(n_vars):
        child_log_p = log_p[..., None] + log_probs[:, None, v]  # [B', w, C]
        child = conditioned_gumbels(gumbel[..., None], perturb(child_log_p, "categorical"))
        width = min(k, child.shape[1] * c)
        gumbel, index = child.reshape(b, -1).topk(width, -1)  # [B', w']
        parent, cls = torch.div(index, c, rounding_mode="floor"), index % c
        log_p = child_log_p.reshape(b, -1).gather(1, index)
        kept = codes.gather(1, parent[..., None].expand(-1, -1, v))  # the parents' classes
        codes = torch.cat([kept, cls[..., None]], -1)
    return codes, log_p


def set_log_ratios(log_p: Tensor, complete: bool) -> tuple[Tensor, Tensor]:
    r"""``log R(S, s)`` ``[B', k]`` and ``log R^{D\s}(S, s')`` ``[B', k, k]`` (0 on the
    diagonal) for sample sets with log-probabilities ``log_p [B', k]``.

    :math:`R(S,s) = I(S\setminus s)/I(S)`, :math:`R^{D\setminus s}(S,s') =
    I(S\setminus\{s,s'\})/I(S\setminus s)` with
    :math:`I(A) = \int_{-\infty}^{\infty}\exp\big(v - e^v + \sum_{i\in A}
    \log(1 - e^{-a_i e^v})\big)\,dv` (``u = exp(-e^v)``). ``complete``: ``S`` is the whole
    space (every ``R`` is 1). Computed in float64.
    """
    lp = log_p.double()
    k = lp.shape[-1]
    if complete:
        return lp.new_zeros(lp.shape), lp.new_zeros(*lp.shape, k)
    chunk = max(1, MAX_GRID_ELEMENTS // (k * k * GRID_POINTS))
    parts = [_log_ratios(part) for part in lp.split(chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _log_ratios(lp: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`set_log_ratios` of one chunk of examples (not complete)."""
    k = lp.shape[-1]
    rest = log1mexp(torch.logsumexp(lp, -1, keepdim=True).clamp(max=-1e-15))  # log(1 - P_S)
    log_a = lp - rest  # [B', k]
    # The integrand lives where v is near log(k + 1) (small a) down to -log(max a) (large a).
    low = -log_a.max(-1, keepdim=True).values.clamp(min=0) - 25.0  # [B', 1]
    high = math.log(k + 1) + 4.0
    t = torch.linspace(0, 1, GRID_POINTS, dtype=lp.dtype, device=lp.device)
    v = low + (high - low) * t  # [B', G]
    y = log_a[..., None] + v[:, None]  # [B', k, G]: log(a_i e^v)
    # log(1 - exp(-e^y)); below y = -30 it is y to double precision (and exp(y) may vanish).
    terms = torch.where(y < -30, y, torch.log(-torch.expm1(-torch.exp(y.clamp(max=700)))))
    total = v - torch.exp(v) + terms.sum(1)  # [B', G]
    log_h = torch.log((high - low) / (GRID_POINTS - 1))  # [B', 1]
    i_all = torch.logsumexp(total, -1, keepdim=True) + log_h  # [B', 1]
    i_one = torch.logsumexp(total[:, None] - terms, -1) + log_h  # [B', k]
    first, second = torch.triu_indices(k, k, 1, device=lp.device)  # the pairs s < s'
    two = total[:, None] - terms[:, first] - terms[:, second]  # [B', k (k - 1) / 2, G]
    i_pair = torch.logsumexp(two, -1) + log_h  # I(S \ {s, s'}), symmetric
    i_two = lp.new_zeros(lp.shape[0], k, k)
    i_two[:, first, second] = i_pair
    i_two[:, second, first] = i_pair
    off_diagonal = 1 - torch.eye(k, dtype=lp.dtype, device=lp.device)
    return i_one - i_all, (i_two - i_one[..., None]) * off_diagonal


@register("unordered_set")
class UnorderedSet(EstimatorBase):
    r"""The unordered set estimator with its built-in baseline.

    .. math::
        \hat g = \sum_{s\in S} p(s)R(S,s)\Big[\nabla f(s) + \nabla\log p(s)\Big(f(s)
        - \sum_{s'\in S} p(s')R^{D\setminus s}(S,s')f(s')\Big)\Big]

    over ``S``, ``k`` samples without replacement of an example's whole configuration
    (stochastic beam search), with :math:`R^{D\setminus s}(S,s) = 1`. The baseline is itself
    an unbiased estimate of ``E_q[f]`` given ``s``, hence unbiased; the objective
    :math:`\sum_s p(s)R(S,s)f(s)` is unbiased for ``E_q[f]``.

    Requirements: bernoulli or categorical family; ``f`` need not be differentiable in ``z``.
    Unbiased. When the space has at most ``k`` configurations it is enumerated (exact).

    Args:
      num_samples: default ``k`` (>= 1), the samples without replacement per example.

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``f_evals = min(k, |space|)``.

    Example:
      >>> out = estimators.get("unordered_set", num_samples=4)(dist, f)

    References: Kool, van Hoof & Welling (2020), "Estimating gradients for discrete random
    variables by sampling without replacement"; Kool, van Hoof & Welling (2019), "Stochastic
    beams and where to find them".
    """

    name = "unordered_set"
    families = frozenset({"bernoulli", "categorical"})

    def __init__(self, num_samples: int = 4) -> None:
        super().__init__(num_samples)

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        table = variable_log_probs(dist, family)  # [B', V, C]
        codes, _ = stochastic_beam_search(table, num_samples)  # [B', k', V]
        k = codes.shape[1]
        codes = codes.transpose(0, 1)  # [k', B', V]
        if family == "bernoulli":
            z = codes.to(table.dtype).reshape(k, *dist.batch_shape, *dist.event_shape)
        else:
            z = F.one_hot(codes, table.shape[-1]).to(table.dtype)
            z = z.reshape(k, *dist.batch_shape, *dist.event_shape)
        log_q = dist.log_prob(z)  # [k', *B], differentiable
        fz = f(z)  # [k', *B]
        lp = log_q.detach().reshape(k, -1).T  # [B', k']
        complete = k == table.shape[-1] ** table.shape[1]
        log_r1, log_r2 = set_log_ratios(lp, complete)
        lp, fv = lp.double(), fz.detach().reshape(k, -1).T.double()
        weight = torch.exp(lp + log_r1)  # p(s) R(S, s)
        baseline = (torch.exp(lp[:, None] + log_r2) * fv[:, None]).sum(-1)  # [B', k']
        signal = (weight * (fv - baseline)).T.reshape(fz.shape).to(fz.dtype)
        weight = weight.T.reshape(fz.shape).to(fz.dtype)
        surrogate = (weight * fz + signal * (log_q - log_q.detach())).sum(0)
        return Estimate((weight * fz.detach()).sum(0), surrogate, None, k)
