"""The hand-written reference: one VAE training step in plain PyTorch, the harness's yardstick.

The same model as :class:`benchmarks.vae.VAE` (linear or two-hidden-layer leaky-ReLU MLPs, a
Bernoulli likelihood ``-BCE(decoder(z), x).sum(-1)``, the analytic KL) and the same estimator
math as ``estimators/``, written inline the way a pytorch/examples script would: parameters
are a flat list of tensors, layers are ``F.linear`` calls, samples come straight from
``torch.rand`` / ``torch.bernoulli`` / ``torch.multinomial`` / ``torch.randn`` with no
``torch.distributions`` objects, and the optimizer is ``torch.optim.Adam``. Every random draw
is made with the same call and shape as the harness, so from the same RNG state both give
the same loss and gradients (``tests/benchmarks/test_throughput.py``): a timing ratio
harness / hand-written measures overhead only, not a different model.

Parameters are in ``VAE.parameters()`` order (encoder then decoder, weight then bias per
layer), so ``HandwrittenStep([p.detach().clone() for p in vae.parameters()], ...)`` copies a
harness model. Nothing here imports gradbench.

Hand-written estimators (:data:`SUPPORTED`): ``reinforce`` (baseline ``none`` or
``moving_average``), ``rloo`` (vectorized over ``S``), ``gumbel_softmax`` (relaxed or
straight-through; like the harness, the relaxed version also evaluates ``f`` at the hard
samples for the objective), ``reparam`` and ``disarm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Estimator name -> latent families with a hand-written version.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "reinforce": ("gaussian", "bernoulli", "categorical"),
    "rloo": ("gaussian", "bernoulli", "categorical"),
    "gumbel_softmax": ("bernoulli", "categorical"),
    "reparam": ("gaussian",),
    "disarm": ("bernoulli",),
}


def supports(name: str, family: str, options: dict | None = None) -> bool:
    """Whether a hand-written version of estimator ``name`` with ``options`` exists."""
    baseline = (options or {}).get("baseline", "none")
    return family in SUPPORTED.get(name, ()) and baseline in ("none", "moving_average")


def mlp(h: Tensor, layers: Sequence[Tensor]) -> Tensor:
    """``layers = [w1, b1, w2, b2, ...]``: affine maps with leaky ReLU between them."""
    n = len(layers) // 2
    for i in range(n):
        h = F.linear(h, layers[2 * i], layers[2 * i + 1])
        if i < n - 1:
            h = F.leaky_relu(h)
    return h


class HandwrittenStep:
    """One training step of the VAE with a hand-written estimator: ``step(x) -> loss``.

    ``loss = -(1/B) sum_b surrogate_b`` (as in ``benchmarks.train.estimate_loss``), then
    ``zero_grad``, ``backward`` and an Adam step. :meth:`loss` alone is the forward pass.

    Args:
      params: ``[*encoder, *decoder]`` weights and biases in ``VAE.parameters()`` order; used
        as the leaves (made to require grad), not copied.
      family, latent_dim, n_categories: the latent space (categorical: ``latent_dim``
        variables of ``n_categories`` classes).
      estimator, options, num_samples: the estimator (see :data:`SUPPORTED`) with its
        options (``baseline``, ``decay``, ``temperature``, ``straight_through``) and ``S``.
      lr, betas, eps, fused: ``torch.optim.Adam``'s settings.
      estimator_params: the estimator's own parameters in ``estimator.parameters()`` order
        (copies of a harness estimator's), used as leaves and optimized with the model.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        family: str,
        latent_dim: int,
        n_categories: int,
        estimator: str,
        options: dict | None = None,
        num_samples: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        estimator_params: Sequence[Tensor] = (),
    ) -> None:
        options = dict(options or {})
        if not supports(estimator, family, options):
            raise ValueError(f"no hand-written {estimator} {options} for family {family!r}")
        self.params = [p.requires_grad_() for p in params]
        half = len(self.params) // 2
        self.enc, self.dec = self.params[:half], self.params[half:]
        self.family, self.L, self.C = family, latent_dim, n_categories
        self.estimator, self.S = estimator, num_samples
        self.baseline = options.get("baseline", "none")
        self.decay = float(options.get("decay", 0.99))
        self.tau = float(options.get("temperature", 1.0))
        self.st = bool(options.get("straight_through", False))
        self.average, self.count = torch.zeros((), device=self.params[0].device), 0
        # The estimator's own parameters (NVIL's baseline network, REBAR's eta, ...), in
        # ``estimator.parameters()`` order, optimized with the model as the harness does.
        self.est_params = [p.requires_grad_() for p in estimator_params]
        self.optimizer = torch.optim.Adam(
            [*self.params, *self.est_params], lr=lr, betas=betas, eps=eps, fused=fused
        )

    # ----------------------------------------------------------------------- the model

    def log_px(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z)``, ``[S, B]``: Bernoulli pixels, ``z`` flattened per example."""
        logits = mlp(z.flatten(2), self.dec)  # [S, B, D]
        return -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)

    def kl(self, h: Tensor) -> Tensor:
        """Analytic ``KL(q(z|x) || p(z))``, ``[B]``, from the encoder output ``h``."""
        if self.family == "gaussian":
            loc, scale = h
            return 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
        if self.family == "bernoulli":  # L log 2 - H(q)
            ent = F.binary_cross_entropy_with_logits(h, torch.sigmoid(h), reduction="none")
            return self.L * math.log(2) - ent.sum(-1)
        logp = h.log_softmax(-1)  # [B, L, C]
        return self.L * math.log(self.C) + (logp.exp() * logp).sum((-2, -1))

    def sample(self, h: Tensor) -> Tensor:
        """``S`` exact samples of ``q``, no gradient: ``[S, B, L]`` (``[S, B, L, C]`` one-hot)."""
        with torch.no_grad():
            if self.family == "gaussian":
                loc, scale = h
                return torch.normal(
                    loc.expand(self.S, *loc.shape), scale.expand(self.S, *loc.shape)
                )
            if self.family == "bernoulli":
                return torch.bernoulli(torch.sigmoid(h).expand(self.S, *h.shape))
            probs = torch.softmax(h, -1)
            idx = torch.multinomial(probs.reshape(-1, self.C), self.S, True).T
            return F.one_hot(idx.reshape(self.S, *h.shape[:-1]), self.C).to(h.dtype)

    def log_q(self, h: Tensor, z: Tensor) -> Tensor:
        """``log q(z|x)`` of samples ``z``, ``[S, B]``."""
        if self.family == "gaussian":
            loc, scale = h
            lp = -((z - loc) ** 2) / (2 * scale**2) - scale.log() - 0.5 * math.log(2 * math.pi)
            return lp.sum(-1)
        if self.family == "bernoulli":
            return -F.binary_cross_entropy_with_logits(h.expand_as(z), z, reduction="none").sum(-1)
        return (z * h.log_softmax(-1)).sum((-2, -1))

    # ------------------------------------------------------------------- the estimators

    def loss(self, x: Tensor) -> Tensor:
        """The training loss ``-(1/B) sum_b surrogate_b`` on batch ``x`` ``[B, D]``."""
        h = mlp(x, self.enc)  # [B, H]
        if self.family == "gaussian":
            loc, raw = h.chunk(2, -1)
            h = (loc, F.softplus(raw) + 1e-4)
        elif self.family == "categorical":
            h = h.unflatten(-1, (self.L, self.C))  # [B, L, C]
        kl = self.kl(h)  # [B]
        S, name = self.S, self.estimator
        if name in ("reinforce", "rloo"):
            z = self.sample(h)
            log_q = self.log_q(h, z)
            f = self.log_px(x, z) - kl  # [S, B]
            fd = f.detach()
            if name == "rloo":
                baseline = (fd.sum(0) - fd) / (S - 1)
            elif self.baseline == "moving_average":
                correction = 1 - self.decay**self.count
                baseline = self.average / correction if self.count else 0.0
                with torch.no_grad():
                    self.average.mul_(self.decay).add_(fd.mean(), alpha=1 - self.decay)
                self.count += 1
            else:
                baseline = 0.0
            surrogate = f + (fd - baseline) * (log_q - log_q.detach())
        elif name == "reparam":
            loc, scale = h
            z = loc + torch.randn(S, *loc.shape, dtype=loc.dtype, device=loc.device) * scale
            surrogate = self.log_px(x, z) - kl
        elif name == "gumbel_softmax":
            eps = torch.finfo(h.dtype).eps
            u = torch.rand(S, *h.shape, dtype=h.dtype, device=h.device).clamp(eps, 1 - eps)
            if self.family == "bernoulli":  # binary Concrete: logistic noise, sigmoid
                y = torch.sigmoid((h + u.log() - (-u).log1p()) / self.tau)
                hard = (y.detach() > 0.5).to(h.dtype)
            else:  # Gumbel noise, softmax over the classes
                y = torch.softmax((h.log_softmax(-1) - (-u.log()).log()) / self.tau, -1)
                hard = F.one_hot(y.detach().argmax(-1), self.C).to(h.dtype)
            if self.st:
                surrogate = self.log_px(x, hard - y.detach() + y) - kl
            else:
                surrogate = self.log_px(x, y) - kl
                with torch.no_grad():  # the objective at exact samples, as the harness does
                    self.log_px(x, hard)
        else:  # disarm: antithetic pair b, b~ from one uniform
            theta = h.detach()
            u = torch.rand(S, *theta.shape, dtype=theta.dtype, device=theta.device)
            b = (u < torch.sigmoid(theta)).to(h.dtype)
            b_anti = (u > torch.sigmoid(-theta)).to(h.dtype)
            f = self.log_px(x, torch.cat([b, b_anti])) - kl  # [2S, B]
            f_b, f_anti = f[:S], f[S:]
            df = (f_b - f_anti).detach()[..., None]  # [S, B, 1]
            g = 0.5 * df * (1 - 2 * b_anti) * (b != b_anti).to(h.dtype) * theta.abs().sigmoid()
            surrogate = 0.5 * (f_b + f_anti) + (g * (h - theta)).sum(-1)
        return -surrogate.mean(0).sum() / x.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        """One training step on ``x``: loss, backward, Adam step. Returns the loss."""
        loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss
