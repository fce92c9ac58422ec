r"""Hand-written REBAR and RELAX steps: the yardstick of ``estimators/control_variate.py``.

The same VAE as :mod:`.handwritten` with the conditional-relaxation control variates
written inline from the papers (pytorch/examples style: ``F.linear``, ``torch.rand``, no
``torch.distributions``). With logits ``theta``, uniforms ``u, v`` and ``b = H(z)``:

.. math::
    z = \theta + \mathrm{noise}(u),\quad \tilde z = z \mid b\ \text{(from } v\text{)},\quad
    c(z) = \eta f(\sigma_\lambda(z)) + r_\rho(z)\ \text{(} r \equiv 0 \text{ for REBAR)},

    g = \tfrac1S \textstyle\sum_s \big(f(b_s) - c(\tilde z_s)\big)(b_s - p)
    + \tfrac1S \nabla_\theta \textstyle\sum_s \big(c(z_s) - c(\tilde z_s)\big),

    \mathrm{loss} = -\tfrac1B \textstyle\sum_b \big(\tfrac1S \sum_s f(b_s)
    + \mathrm{stop}(g_b) \cdot (\theta_b - \mathrm{stop}(\theta_b))\big) + \lVert g\rVert^2

(Tucker et al. 2017, "REBAR"; Grathwohl et al. 2018, "Backpropagation through the void").
``lambda = exp(log_lambda)``, ``eta`` and the network ``r`` (one tanh hidden layer on each
example's flattened ``z``) are the estimator's own parameters, trained only by
``||g||^2``; the model gets ``grad f(b)`` plus ``g`` at the logits.

Isolation, written by hand instead of the harness's linearization: the control variate is
evaluated on a detached copy of the logits (``theta``), with *detached* decoder weights and a
detached KL, so ``||g||^2`` has a graph to the estimator's parameters only (and the leaf
``theta``, left out of ``backward`` by ``inputs=``), and can be added to the loss as is. ``f``
at the hard samples is a separate decoder call with the live weights. The values (loss) and
gradients are the harness's: the same random draws (``torch.rand`` of ``[S, *logits.shape]``
for ``u``, then for ``v``) and the same formulas, only grouped differently.

Parameters: ``estimator_params = [log_temperature, eta]`` (REBAR) or
``[log_temperature, eta, w1, b1, w2, b2]`` (RELAX), in the harness estimator's
``parameters()`` order; without them they are made from the options (``temperature``,
``eta``, ``hidden``; ``nn.Linear``'s initialization for the network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.throughput import handwritten
from benchmarks.throughput.handwritten import HandwrittenStep, linear_init, mlp, unsupported

#: Estimator name -> latent families with a hand-written version.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "rebar": ("bernoulli", "categorical"),
    "relax": ("bernoulli", "categorical"),
}
#: The options each estimator takes (besides ``num_samples``), as in ``conf/estimator/``.
OPTIONS: dict[str, frozenset[str]] = {
    "rebar": frozenset({"temperature", "eta"}),
    "relax": frozenset({"temperature", "eta", "hidden", "input_dim"}),
}

handwritten.WRITTEN.update(SUPPORTED)
handwritten.OPTION_NOTES.append(f"rebar / relax options: {', '.join(sorted(OPTIONS['relax']))}")


def supports(name: str, family: str, options: dict | None = None) -> bool:
    """Whether a hand-written version of estimator ``name`` with ``options`` exists."""
    keys = set(options or {}) - {"num_samples"}
    return family in SUPPORTED.get(name, ()) and keys <= OPTIONS[name]


class HandwrittenControlVariateStep(HandwrittenStep):
    """One VAE training step with hand-written REBAR or RELAX: ``step(x) -> loss``.

    Same constructor as :class:`.handwritten.HandwrittenStep`; ``estimator`` is
    ``rebar`` or ``relax`` with options ``temperature``, ``eta`` (and ``hidden``,
    ``input_dim`` for RELAX), which only set the initial parameters when
    ``estimator_params`` is empty. :meth:`loss` is ``estimate_loss``'s loss
    ``-(1/B) sum_b surrogate_b + aux_loss`` (the value of ``aux_loss`` is ``||g||^2``).
    """

    supported = staticmethod(supports)

    def __init__(
        self,
        params: Sequence[Tensor],
        family: str,
        latent_dim: int,
        n_categories: int,
        estimator: str,
        options: dict | None = None,
        num_samples: int = 1,
        *,
        estimator_params: Sequence[Tensor] = (),
        **kwargs: Any,
    ) -> None:
        options = dict(options or {})
        if not supports(estimator, family, options):
            raise unsupported(estimator, family, options)
        est_params = list(estimator_params)
        if not est_params:
            n_latent = latent_dim * (n_categories if family == "categorical" else 1)
            like = params[0]
            temperature = float(options.get("temperature", 0.5))
            est_params = [
                torch.tensor(math.log(temperature), dtype=like.dtype, device=like.device),
                torch.tensor(float(options.get("eta", 1.0)), dtype=like.dtype, device=like.device),
            ]
            if estimator == "relax":
                hidden = int(options.get("hidden", 32))
                est_params += [
                    linear_init(n_latent, (hidden, n_latent), like),
                    linear_init(n_latent, (hidden,), like),
                    linear_init(hidden, (1, hidden), like),
                    linear_init(hidden, (1,), like),
                ]
        expected = 2 if estimator == "rebar" else 6
        if len(est_params) != expected:
            raise ValueError(
                f"{estimator} takes {expected} estimator parameters "
                f"([log_temperature, eta{', w1, b1, w2, b2' if expected == 6 else ''}]); "
                f"got {len(est_params)}"
            )
        super().__init__(
            params, family, latent_dim, n_categories, estimator, options, num_samples,
            estimator_params=est_params, **kwargs,
        )  # fmt: skip
        self.leaves = [*self.params, *self.est_params]

    def loss(self, x: Tensor) -> Tensor:
        """The training loss ``-(1/B) sum_b surrogate_b + ||g||^2`` on batch ``x`` ``[B, D]``."""
        h = mlp(x, self.enc)  # [B, L] logits
        categorical = self.family == "categorical"
        if categorical:  # normalized logits (log-probabilities), as the harness's q has
            h = h.unflatten(-1, (self.L, self.C))
            h = h - h.logsumexp(-1, keepdim=True)  # [B, L, C]
        kl = self.kl(h)  # [B]
        S, dtype, device = self.S, h.dtype, h.device
        eps = torch.finfo(dtype).eps
        theta = h.detach().requires_grad_()  # the control variate's copy of the logits
        ell = theta.log_softmax(-1) if categorical else theta

        # z = ell + noise, b = H(z): logistic noise and 1[z > 0], or Gumbel noise and argmax.
        u = torch.rand(S, *h.shape, dtype=dtype, device=device).clamp(eps, 1 - eps)
        if categorical:
            z = ell - (-u.log()).log()
            b = F.one_hot(z.detach().argmax(-1), self.C).to(dtype)
        else:
            z = ell + (u.log() - (-u).log1p())
            b = (z.detach() > 0).to(dtype)

        # z~ ~ z | b, reparameterized in theta at fixed v (Tucker et al. 2017, appendix).
        v = torch.rand(S, *h.shape, dtype=dtype, device=device).clamp(eps, 1 - eps)
        on = b > 0.5
        if categorical:  # normalized logits: max(ell + Gumbel) = -log E_b, E = -log v
            log_e = (-v.log()).log()
            log_e_b = (log_e * b).sum(-1, keepdim=True)
            z_cond = torch.where(on, -log_e_b, -torch.logaddexp(log_e - ell, log_e_b))
        else:  # the logistic inverse CDF truncated to z > 0 (b = 1) or z <= 0 (b = 0)
            log_p, log_1mp = F.logsigmoid(theta), F.logsigmoid(-theta)
            # log v' - log(1 - v') with v' = 1 - p (1 - v) (b = 1) or v (1 - p) (b = 0)
            z_cond = theta + torch.where(
                on,
                (-(1 - v) * log_p.exp()).log1p() - log_p - (-v).log1p(),
                v.log() + log_1mp - (-v * log_1mp.exp()).log1p(),
            )

        # c(z), c(z~) in one decoder call with detached weights: no gradient to the model.
        log_temperature, eta = self.est_params[0], self.est_params[1]
        zz = torch.cat([z, z_cond])  # [2S, B, L(, C)]
        y = zz / log_temperature.exp()
        y = y.softmax(-1) if categorical else torch.sigmoid(y)
        logits = mlp(y.flatten(2), [p.detach() for p in self.dec])  # [2S, B, D]
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        f_y = -bce.sum(-1) - kl.detach()  # [2S, B]
        c = eta * f_y
        if self.estimator == "relax":
            w1, b1, w2, b2 = self.est_params[2:]
            c = c + F.linear(torch.tanh(F.linear(zz.flatten(2), w1, b1)), w2, b2).squeeze(-1)
        c_z, c_cond = c[:S], c[S:]

        f_b = self.log_px(x, b) - kl  # [S, B]: grad f(b) to the decoder and (KL) encoder
        probs = theta.detach().softmax(-1) if categorical else torch.sigmoid(theta.detach())
        event = (-2, -1) if categorical else (-1,)
        signal = (f_b.detach() - c_cond).reshape(S, -1, *(1,) * len(event))
        g = (signal * (b - probs)).mean(0)  # [B, L(, C)], the score term
        (path,) = torch.autograd.grad((c_z - c_cond).sum(), theta, create_graph=True)
        g = g + path / S
        surrogate = f_b.mean(0) + (g.detach() * (h - h.detach())).sum(event)
        return -surrogate.sum() / x.shape[0] + g.pow(2).sum()

    def __call__(self, x: Tensor) -> Tensor:
        """One training step on ``x``: loss, backward (to the parameters only), Adam step."""
        loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=self.leaves)
        self.optimizer.step()
        return loss
