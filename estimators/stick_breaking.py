r"""DisARM for categorical latents by stick-breaking (Dong, Mnih & Tucker 2021).

A categorical variable with probabilities ``pi_1..pi_C`` is a chain of ``C - 1`` binary
decisions: "stop at class ``c``" with probability :math:`\sigma(\alpha_c) = \pi_c /
\sum_{i \ge c}\pi_i`, i.e. stick-breaking logits
:math:`\alpha_c = \log\pi_c - \log\sum_{i>c}\pi_i`; ``z`` is the first class whose bit is 1
(the last class if none is). Uniforms ``u`` give the bits ``b = 1[u < sigma(alpha)]`` and
their antithetic twins ``b~ = 1[u > sigma(-alpha)]``, hence two coupled exact samples ``z``
and ``z~`` of ``q``; DisARM's weight is applied to each bit both chains read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, Objective, base_of, reinterpreted_ndims


def stick_breaking_logits(logits: Tensor) -> Tensor:
    r"""``alpha [..., C - 1]`` from logits ``[..., C]``:
    :math:`\alpha_c = \ell_c - \log\sum_{i > c} e^{\ell_i}`, differentiable."""
    tail = torch.logcumsumexp(logits.flip(-1), -1).flip(-1)  # log sum_{i >= c} e^{l_i}
    return logits[..., :-1] - tail[..., 1:]


def first_success(bits: Tensor) -> Tensor:
    """The class of a chain of bits ``[..., C - 1]``: the first 1, or ``C - 1`` if none."""
    ones = torch.ones_like(bits[..., :1])
    return torch.cat([bits, ones], -1).argmax(-1)  # argmax returns the first maximum


def stick_breaking_disarm(dist: Distribution, f: Objective, num_samples: int) -> Estimate:
    r"""The categorical DisARM estimate (see :class:`estimators.antithetic.DisARM`).

    .. math::
        \hat g_{\alpha_c} = \tfrac12\big(f(z) - f(\tilde z)\big)\Big(
        1[c \le z, c \le \tilde z]\,(-1)^{\tilde b_c}1[b_c \ne \tilde b_c]\,\sigma(|\alpha_c|)
        + 1[c \le z, c > \tilde z]\,(b_c - \sigma(\alpha_c))
        - 1[c > z, c \le \tilde z]\,(\tilde b_c - \sigma(\alpha_c))\Big)

    A bit that only one chain reads gets that chain's REINFORCE term with the other chain's
    value as baseline (it does not depend on the bit); bits neither chain reads get 0 (their
    DisARM term has conditional mean 0). Shapes as in :class:`Estimate`; ``f_evals = 2 S``.
    """
    logits = base_of(dist).logits  # [*B, *K, C]
    alpha = stick_breaking_logits(logits)  # [*B, *K, C - 1], the model's graph
    a = alpha.detach()
    c = logits.shape[-1]
    u = torch.rand((num_samples, *a.shape), dtype=a.dtype, device=a.device)
    b = (u < torch.sigmoid(a)).to(a.dtype)  # [S, *B, *K, C - 1]
    b_anti = (u > torch.sigmoid(-a)).to(a.dtype)
    z, z_anti = first_success(b), first_success(b_anti)  # [S, *B, *K]
    hard = F.one_hot(torch.cat([z, z_anti]), c).to(logits.dtype)  # [2S, *B, *K, C]
    fz = f(hard)  # [2S, *B]: one call for both chains
    f_b, f_anti = fz[:num_samples], fz[num_samples:]
    n_event = reinterpreted_ndims(dist) + 1
    df = (f_b - f_anti).detach().reshape(*f_b.shape, *(1,) * n_event)
    position = torch.arange(c - 1, device=a.device)
    reads, reads_anti = position <= z[..., None], position <= z_anti[..., None]
    sign = 1.0 - 2.0 * b_anti  # (-1)^{b~}
    both = sign * (b != b_anti).to(a.dtype) * torch.sigmoid(a.abs())
    g = (
        0.5
        * df
        * (
            (reads & reads_anti) * both
            + (reads & ~reads_anti) * (b - torch.sigmoid(a))
            - (~reads & reads_anti) * (b_anti - torch.sigmoid(a))
        )
    )  # [S, *B, *K, C - 1]
    linear = (g.mean(0) * (alpha - a)).sum(tuple(range(-n_event, 0)))  # value 0, gradient g
    surrogate = (0.5 * (f_b + f_anti)).mean(0) + linear
    return Estimate(fz.detach().mean(0), surrogate, None, 2 * num_samples)
