"""Score-function estimators with learned or multi-sample baselines: NVIL and VIMCO."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.nn.parameter import UninitializedParameter

from estimators._options import boolean, positive_int, unit_interval
from estimators.base import (
    FAMILIES,
    Estimate,
    EstimatorBase,
    Objective,
    sample_score_inputs,
    score_surrogate,
)
from estimators.baselines import debiased, leave_one_out_mean, update_average_
from estimators.registry import register


def skip_uninitialized(module: nn.Module) -> None:
    """Keep ``module``'s not yet materialized lazy parameters out of its ``state_dict``.

    They have no value yet and would not load with ``torch.load(..., weights_only=True)``.
    Loading a state_dict without them into a module whose same parameters are also still
    uninitialized is then not an error (they stay lazy); anything else is checked as usual.
    """

    def uninitialized() -> list[str]:
        return [n for n, p in module.named_parameters() if isinstance(p, UninitializedParameter)]

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in uninitialized():
            state_dict.pop(prefix + name, None)

    def allow_missing(mod: nn.Module, incompatible) -> None:
        lazy = uninitialized()
        missing = incompatible.missing_keys
        # Missing keys carry the prefix of the module being loaded; match on the suffix.
        missing[:] = [k for k in missing if not any(k == n or k.endswith("." + n) for n in lazy)]

    register = getattr(module, "register_state_dict_post_hook", None)
    (register or module._register_state_dict_hook)(drop)
    module.register_load_state_dict_post_hook(allow_missing)


@register("nvil")
class NVIL(EstimatorBase):
    r"""Neural variational inference and learning: REINFORCE with a learned input baseline.

    .. math::
        \hat g = \frac1{S\,s}\sum_s\Big[\nabla f(z_s) + \big(f(z_s) - b_\psi(x) - c\big)
        \nabla_\theta\log q_\theta(z_s)\Big]

    with ``b_psi`` an MLP (one tanh hidden layer) of the ``context`` ``x`` (the encoder input;
    a learned scalar when ``context`` is None), ``c`` a moving average of ``f - b_psi(x)`` and,
    with ``normalize``, ``s = max(1, sqrt(v))`` for ``v`` a moving average of its variance
    (else ``s = 1``). ``c`` and ``v`` come from *earlier* calls (buffers, updated after use in
    training mode only) and ``b_psi`` never sees ``z``, so nothing depends on the current
    samples. ``psi`` is trained by ``aux_loss = mean (f - c - b_psi(x))^2`` only.

    Requirements: any family; ``f`` need not be differentiable in ``z``. Without
    ``normalize``, unbiased for ``grad E_q[f]``. With it, the whole estimate is divided by
    ``s``: its mean is ``grad E_q[f] / s`` for every parameter, ``q``'s and ``f``'s, including
    any dependence of ``f`` on ``q``'s parameters (an analytic KL term), so it is unbiased for
    the gradient's *direction* only (``unbiased_for = "direction"``), a per-call learning-rate
    change. (The paper divides only the learning signal of the inference network; when ``f``
    itself depends on ``q``'s parameters that would change the mean gradient's direction.)

    Args:
      hidden: width of the baseline network's hidden layer (>= 1).
      context_dim: features per example of ``context``; ``None`` infers it on the first call
        with a context (``nn.LazyLinear``).
      decay: decay of the moving averages ``c`` and ``v``, in [0, 1).
      normalize: divide the whole estimate by ``s = max(1, sqrt(v))``.
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``, ``f_evals = S`` and a scalar ``aux_loss``.
      ``context`` must have shape ``[*batch_shape, *features]``.

    Example:
      >>> out = estimators.get("nvil")(dist, f, context=x)
      >>> (-out.surrogate.sum() + out.aux_loss).backward()

    References: Mnih & Gregor (2014), "Neural variational inference and learning in belief
    networks".
    """

    name = "nvil"
    families = frozenset(FAMILIES)

    def __init__(
        self,
        hidden: int = 100,
        context_dim: int | None = None,
        decay: float = 0.99,
        normalize: bool = False,
        num_samples: int = 1,
    ) -> None:
        super().__init__(num_samples)
        hidden = positive_int(self.name, "hidden", hidden)
        context_dim = positive_int(self.name, "context_dim", context_dim, allow_none=True)
        self.decay = unit_interval(self.name, "decay", decay)
        self.normalize = boolean(self.name, "normalize", normalize)
        self.unbiased_for = "direction" if self.normalize else "gradient"
        first = nn.LazyLinear(hidden) if context_dim is None else nn.Linear(context_dim, hidden)
        self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(hidden, 1))
        skip_uninitialized(self)
        self.scalar = nn.Parameter(torch.zeros(()))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.zeros(()))
        self.register_buffer("count", torch.zeros(()))

    def baseline(self, context: Tensor | None, batch_shape: torch.Size) -> Tensor:
        """``b_psi(context)``, shape ``batch_shape`` (or a scalar without context)."""
        if context is None:
            return self.scalar
        nb = len(batch_shape)
        if context.shape[:nb] != batch_shape:
            raise ValueError(
                f"{self.name}: context of shape {tuple(context.shape)} must start with the "
                f"batch shape {tuple(batch_shape)}"
            )
        x = context.detach().reshape(*batch_shape, -1)  # [*B, features]
        return self.net(x.to(self.net[-1].weight.dtype)).squeeze(-1)

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
        b = self.baseline(context, dist.batch_shape).to(fd.dtype)  # [*B] or []
        # Bias-corrected running statistics; before the first update c = 0 (and v = 1).
        center = debiased(self.mean, self.count, self.decay).to(fd.dtype)
        residual = fd - b.detach()  # [S, *B]
        signal = residual - center
        if self.normalize:  # the variance is kept (and used) only when normalizing
            var = debiased(self.var, self.count, self.decay)
            var = torch.where(self.count > 0, var, 1.0).to(fd.dtype)
            # Divide the whole gradient (value unchanged), not only the score term: f's own
            # gradient may reach q's parameters too (an analytic KL), and scaling only part of
            # the gradient would change its direction.
            scaled = score_surrogate(fz - fd, log_q, signal) / var.sqrt().clamp_min(1.0)
            surrogate = (fd + scaled).mean(0)
        else:
            surrogate = score_surrogate(fz, log_q, signal).mean(0)
        aux_loss = (fd - center - b).pow(2).mean()  # reaches psi only
        if self.training:
            if self.normalize:
                var_r, mean_r = torch.var_mean(residual, unbiased=False)
                update_average_(self.var, var_r, self.decay)
            else:
                mean_r = residual.mean()
            update_average_(self.mean, mean_r, self.decay)
            self.count.add_(1)
        return Estimate(fd.mean(0), surrogate, aux_loss, num_samples)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, normalize={self.normalize}, num_samples={self.num_samples}"


@register("vimco")
class VIMCO(EstimatorBase):
    r"""VIMCO: the multi-sample (IWAE) bound with leave-one-out learning signals.

    **Only meaningful when ``f`` returns log importance weights**
    ``w_s = log p(x, z_s) - log q(z_s | x)``: the objective is the IWAE bound, *not* the mean
    of ``f``,

    .. math::
        \hat L = \log\frac1S\sum_s e^{w_s},\qquad
        \hat g = \sum_s \big(\hat L - \hat L_{-s}\big)\nabla_\theta\log q_\theta(z_s)
        + \sum_s \tilde w_s \nabla w_s

    with :math:`\tilde w_s = e^{w_s}/\sum_{s'} e^{w_{s'}}` and :math:`\hat L_{-s}` the bound
    with :math:`w_s` replaced by the mean of the other log weights (their geometric mean in
    weight space). ``objective_kind = "iwae"`` tells the harness.

    Requirements: any family; ``S >= 2``; ``f`` need not be differentiable in ``z``. Unbiased
    for ``grad E[L_hat]`` (the IWAE bound's gradient), since ``L_hat_{-s}`` does not depend
    on ``z_s``.

    Args:
      num_samples: default ``S`` (>= 2).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``objective`` is ``L_hat`` (detached),
      ``f_evals = S``.

    Example:
      >>> out = estimators.get("vimco", num_samples=5)(q, lambda z: log_p(x, z) - q.log_prob(z))

    References: Mnih & Rezende (2016), "Variational inference for Monte Carlo objectives".
    """

    name = "vimco"
    families = frozenset(FAMILIES)
    min_samples = 2
    objective_kind: ClassVar[str] = "iwae"

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
        log_q, w = sample_score_inputs(dist, f, num_samples)  # [S, *B] each
        log_s = math.log(num_samples)
        bound = torch.logsumexp(w, 0) - log_s  # [*B]; its gradient is sum_s w~_s grad w_s
        wd = w.detach()
        loo_mean = leave_one_out_mean(wd)  # [S, *B]
        # Row s: the log weights with w_s replaced by loo_mean_s, [S, S, *B].
        eye = torch.eye(num_samples, dtype=torch.bool, device=wd.device)
        eye = eye.reshape(num_samples, num_samples, *(1,) * (wd.dim() - 1))
        rows = torch.where(eye, loo_mean.unsqueeze(1), wd.unsqueeze(0))
        loo_bound = torch.logsumexp(rows, 1) - log_s  # [S, *B]
        signal = bound.detach() - loo_bound  # [S, *B]
        surrogate = bound + (signal * (log_q - log_q.detach())).sum(0)
        return Estimate(bound.detach(), surrogate, None, num_samples)
