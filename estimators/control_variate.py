r"""Control variates from the conditional relaxation: REBAR and RELAX.

Both draw perturbed logits ``z`` (``b = H(z)`` an exact sample of ``q``) and ``z~ ~ z | b``, and
correct REINFORCE with a control variate ``c`` evaluated at both:

.. math::
    \hat g_\theta = \big(f(b) - c(\tilde z)\big)\nabla_\theta\log q(b)
    + \nabla_\theta c(z) - \nabla_\theta c(\tilde z)

(``z`` and ``z~`` reparameterized in ``theta`` at fixed noise and ``b``). It is unbiased for any
``c``, because ``z~ | b`` has the law of ``z | b``. ``c``'s parameters (temperature, ``eta``, a
network) are the estimator's own and are tuned by ``aux_loss`` = the squared norm of
``g_theta`` (a single-estimate variance surrogate: its mean is the variance plus a constant).

Isolation: ``g_theta`` is computed on a detached copy of the logits and enters ``surrogate``
only as the constant in ``stop(g) . logits``, so the control variate never sends gradient to
the model; ``f``'s own parameters get ``grad f(b)``. The control variate evaluates
``f.detached`` where ``f`` provides it (:data:`estimators.base.Objective`), so ``aux_loss``
reaches only the estimator's own parameters (and its private copy of the logits); with a plain
``f`` it is linearized in the estimator's own parameters, so its gradient reaches nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from estimators._options import finite_float, positive_float, positive_int
from estimators.base import (
    Estimate,
    EstimatorBase,
    Objective,
    base_of,
    detached_objective,
    reinterpreted_ndims,
)
from estimators.learned_baselines import skip_uninitialized
from estimators.registry import register
from estimators.relaxed import conditional_perturb, hard_of, perturb, soften


def _linearized(loss: Tensor, params: list[Tensor]) -> Tensor:
    """``loss``'s value, with a gradient equal to ``loss``'s for ``params`` and 0 elsewhere."""
    params = [p for p in params if p.requires_grad]
    if not params or not loss.requires_grad:
        return loss.detach()
    # retain_graph: f's graph may share nodes with the surrogate's (e.g. a precomputed term).
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    out = loss.detach()
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            out = out + (g.detach() * (p - p.detach())).sum()
    return out


@register("rebar")
class REBAR(EstimatorBase):
    r"""REBAR: REINFORCE with the scaled concrete relaxation as control variate.

    .. math::
        \hat g_\theta = \big(f(b) - \eta f(\sigma_\lambda(\tilde z))\big)\nabla\log q(b)
        + \eta\nabla f(\sigma_\lambda(z)) - \eta\nabla f(\sigma_\lambda(\tilde z))

    with :math:`\sigma_\lambda(z) = \mathrm{sigmoid}(z/\lambda)` (Bernoulli, logistic noise) or
    :math:`\mathrm{softmax}(z/\lambda)` (categorical, Gumbel noise), averaged over ``S`` draws.
    ``log lambda`` and ``eta`` are parameters trained by ``aux_loss`` (``sum g_theta^2``).

    Requirements: bernoulli or categorical; ``f`` accepts relaxed inputs and is differentiable
    in ``z`` there. Unbiased for every ``lambda``, ``eta``; ``f``'s own parameters get
    ``grad f(b)``.

    Args:
      temperature: initial ``lambda > 0``.
      eta: initial control-variate scale (any finite number).
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``, ``f_evals = 3 S`` (``f`` on ``b``, then
      one call on ``sigma(z)`` and ``sigma(z~)``) and a scalar ``aux_loss`` (detached in eval
      mode).

    Example:
      >>> est = estimators.get("rebar", temperature=0.5)
      >>> out = est(dist, f); (-out.surrogate.sum() + out.aux_loss).backward()

    References: Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein (2017), "REBAR: Low-variance,
    unbiased gradient estimates for discrete latent variable models".
    """

    name = "rebar"
    families = frozenset({"bernoulli", "categorical"})
    private_leaves = True  # theta, the control variate's copy of the logits
    double_backward = True  # the variance objective differentiates d c / d theta

    def __init__(self, temperature: float = 0.5, eta: float = 1.0, num_samples: int = 1):
        super().__init__(num_samples)
        temperature = positive_float(self.name, "temperature", temperature)
        eta = finite_float(self.name, "eta", eta)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.eta = nn.Parameter(torch.tensor(eta))

    def control_variate(self, z: Tensor, f_relaxed: Tensor, batch_ndim: int) -> Tensor:
        """``c(z) = eta f(sigma_lambda(z))`` given ``f_relaxed``, ``[S, *batch_shape]``."""
        return self.eta.to(f_relaxed.dtype) * f_relaxed

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        logits = base_of(dist).logits  # [*B, *E], the model's graph
        n_event = reinterpreted_ndims(dist) + (family == "categorical")
        batch_ndim = len(dist.batch_shape)
        grad_enabled = torch.is_grad_enabled()
        train_cv = self.training and grad_enabled
        with torch.enable_grad():
            theta = logits.detach().requires_grad_()  # the control variate sees only this copy
            ell = torch.log_softmax(theta, -1) if family == "categorical" else theta
            z = perturb(ell, family, (num_samples,))  # [S, *B, *E]
            hard = hard_of(z.detach(), family)
            z_cond = conditional_perturb(ell, hard, family)  # [S, *B, *E]
            temperature = self.log_temperature.exp().to(z.dtype)
            both = torch.cat([z, z_cond])  # [2S, *B, *E]
            relaxed = soften(both, family, temperature)
            # Two calls of f, not one on cat([hard, relaxed]): the training loss's backward
            # then visits only f(b)'s rows, not the control variate's 2S relaxed ones.
            f_b = f(hard)  # [S, *B]; carries grad f(b) to f's own parameters
            if not grad_enabled:
                f_b = f_b.detach()
            # f(relaxed) feeds the control variate only.
            f_cv = detached_objective(f)  # no gradient to f's own parameters needed here
            c_z, c_cond = self.control_variate(both, f_cv(relaxed), batch_ndim).split(num_samples)
            probs = torch.softmax(theta, -1) if family == "categorical" else torch.sigmoid(theta)
            score = hard - probs.detach()  # d log q(b) / d logits, [S, *B, *E]
            signal = (f_b.detach() - c_cond).reshape(*f_b.shape, *(1,) * n_event)
            g = (signal * score).mean(0)  # [*B, *E], differentiable in the CV's parameters
            diff = (c_z - c_cond).sum()
            if diff.requires_grad:
                (path,) = torch.autograd.grad(
                    diff, theta, retain_graph=True, create_graph=train_cv, allow_unused=True
                )
                if path is not None:
                    g = g + path / num_samples
            variance = g.pow(2).sum()
            if not train_cv:
                aux_loss = None
            elif f_cv is not f:  # f.detached: the variance reaches only c's own parameters
                aux_loss = variance  # (and theta, a private leaf): no linearization needed
            else:
                aux_loss = _linearized(variance, list(self.parameters()))
        if aux_loss is None:
            aux_loss = variance.detach()
        linear = g.detach() * (logits - logits.detach())  # value 0, gradient g
        linear = linear.sum(tuple(range(-n_event, 0))) if n_event else linear
        surrogate = f_b.mean(0) + linear
        return Estimate(f_b.detach().mean(0), surrogate, aux_loss, 3 * num_samples)

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.log_temperature.exp()):.3g}, eta={float(self.eta):.3g},"
            f" num_samples={self.num_samples}"
        )


@register("relax")
class RELAX(REBAR):
    r"""RELAX: REBAR's control variate plus a learned network of the perturbed logits.

    .. math::
        c_\phi(z) = \eta f(\sigma_\lambda(z)) + r_\rho(z),\qquad
        \hat g_\theta = \big(f(b) - c_\phi(\tilde z)\big)\nabla\log q(b)
        + \nabla c_\phi(z) - \nabla c_\phi(\tilde z)

    ``r_rho`` is an MLP (one tanh hidden layer) of each example's flattened ``z``; ``lambda``,
    ``eta`` and ``rho`` are trained only by ``aux_loss`` (``sum g_theta^2``). Setting
    ``eta = 0`` starts from a pure network control variate.

    Requirements: bernoulli or categorical; ``f`` accepts relaxed inputs and is differentiable
    in ``z`` there. Unbiased for every ``phi``; ``f``'s own parameters get ``grad f(b)``.

    Args:
      temperature: initial ``lambda > 0``.
      eta: initial scale of the REBAR term (any finite number).
      hidden: width of the network's hidden layer (>= 1).
      input_dim: number of latent units per example (``prod(event_shape)``); ``None`` infers
        it on the first call (``nn.LazyLinear``: call once before building the optimizer).
      num_samples: default ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``, ``f_evals = 3 S`` and a scalar
      ``aux_loss`` (detached in eval mode).

    Example:
      >>> est = estimators.get("relax", hidden=32, input_dim=20)

    References: Grathwohl, Choi, Wu, Roeder & Duvenaud (2018), "Backpropagation through the
    void: Optimizing control variates for black-box gradient estimation".
    """

    name = "relax"

    def __init__(
        self,
        temperature: float = 0.5,
        eta: float = 1.0,
        hidden: int = 32,
        input_dim: int | None = None,
        num_samples: int = 1,
    ):
        super().__init__(temperature, eta, num_samples)
        hidden = positive_int(self.name, "hidden", hidden)
        input_dim = positive_int(self.name, "input_dim", input_dim, allow_none=True)
        first = nn.LazyLinear(hidden) if input_dim is None else nn.Linear(input_dim, hidden)
        self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(hidden, 1))
        skip_uninitialized(self)

    def control_variate(self, z: Tensor, f_relaxed: Tensor, batch_ndim: int) -> Tensor:
        """``c(z) = eta f(sigma_lambda(z)) + r(z)``, ``[S, *batch_shape]``."""
        flat = z.reshape(*z.shape[: 1 + batch_ndim], -1)  # [S, *B, prod(E)]
        r = self.net(flat.to(self.net[-1].weight.dtype)).squeeze(-1).to(f_relaxed.dtype)
        return super().control_variate(z, f_relaxed, batch_ndim) + r
