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

Hand-written estimators (:data:`SUPPORTED`), each vectorized over the ``S`` samples:

- ``reinforce`` (baseline ``none``, ``moving_average`` or ``batch_mean``; Williams 1992) and
  ``rloo`` (Kool et al. 2019), any family;
- ``nvil`` (Mnih & Gregor 2014): REINFORCE with a one-tanh-layer baseline network of ``x``
  (its weights are ``estimator_params``, trained by the squared centered signal) and
  bias-corrected running mean and variance of ``f - b(x)`` kept here (``normalize``: the
  whole gradient divided by ``max(1, sqrt(v))``); any family;
- ``vimco`` (Mnih & Rezende 2016): the ``S``-sample bound ``log mean_s exp f_s`` with
  leave-one-out signals (``f_s`` replaced by the mean of the others), any family;
- ``gumbel_softmax`` (relaxed or straight-through; like the harness, the relaxed version also
  evaluates ``f`` at the hard samples for the objective), ``straight_through`` (Bengio et al.
  2013) and ``gumbel_rao`` (Paulus et al. 2021: ``K`` draws of the logistic / Gumbel noise
  conditioned on the hard sample), Bernoulli and categorical;
- ``arm`` (Yin & Zhou 2019) and ``disarm`` (Dong et al. 2020), Bernoulli;
- ``reparam``, Gaussian.
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
    "nvil": ("gaussian", "bernoulli", "categorical"),
    "vimco": ("gaussian", "bernoulli", "categorical"),
    "gumbel_softmax": ("bernoulli", "categorical"),
    "straight_through": ("bernoulli", "categorical"),
    "gumbel_rao": ("bernoulli", "categorical"),
    "reparam": ("gaussian",),
    "arm": ("bernoulli",),
    "disarm": ("bernoulli",),
}
#: REINFORCE baselines with a hand-written version.
BASELINES: tuple[str, ...] = ("none", "moving_average", "batch_mean")


#: Estimators with a hand-written ``kl="sampled"`` learning signal (VIMCO trains only with it).
SAMPLED_KL = ("reinforce", "rloo", "nvil", "vimco")


#: What is hand-written (estimator: families), here and in the modules that extend this one
#: (:mod:`.handwritten_control_variate` adds REBAR and RELAX when imported); for messages.
WRITTEN: dict[str, tuple[str, ...]] = dict(SUPPORTED)
#: Option notes of the extending modules, for messages.
OPTION_NOTES: list[str] = [f"reinforce baselines: {', '.join(BASELINES)}"]


def supports(name: str, family: str, options: dict | None = None) -> bool:
    """Whether this module writes estimator ``name`` with ``options`` by hand (REBAR and RELAX
    are in :mod:`.handwritten_control_variate`; :mod:`.handwritten_steps` asks both)."""
    baseline = (options or {}).get("baseline", "none")
    return family in SUPPORTED.get(name, ()) and baseline in BASELINES


def unsupported(estimator: str, family: str, options: dict) -> ValueError:
    """The error for a step that is not hand-written, naming what is."""
    listing = "; ".join(f"{name}: {', '.join(fams)}" for name, fams in sorted(WRITTEN.items()))
    return ValueError(
        f"no hand-written {estimator} with options {options} for family {family!r}; "
        f"hand-written (estimator: families): {listing}; {'; '.join(OPTION_NOTES)}"
    )


def mlp(h: Tensor, layers: Sequence[Tensor]) -> Tensor:
    """``layers = [w1, b1, w2, b2, ...]``: affine maps with leaky ReLU between them."""
    n = len(layers) // 2
    for i in range(n):
        h = F.linear(h, layers[2 * i], layers[2 * i + 1])
        if i < n - 1:
            h = F.leaky_relu(h)
    return h


def linear_init(fan_in: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``nn.Linear``'s default initialization: uniform in ``+-1/sqrt(fan_in)``."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


class HandwrittenStep:
    """One training step of the VAE with a hand-written estimator: ``step(x) -> loss``.

    ``loss = -(1/B) sum_b surrogate_b + aux_loss`` (as in :func:`.harness.step.estimate_loss`;
    ``aux_loss`` is NVIL's baseline loss, zero otherwise), then ``zero_grad``, ``backward`` and
    an Adam step. :meth:`loss` alone is the forward pass.

    Args:
      params: ``[*encoder, *decoder]`` weights and biases in ``VAE.parameters()`` order; used
        as the leaves (made to require grad), not copied.
      family, latent_dim, n_categories: the latent space (categorical: ``latent_dim``
        variables of ``n_categories`` classes).
      estimator, options, num_samples: the estimator (see :data:`SUPPORTED`) with its
        options (``baseline``, ``decay``, ``temperature``, ``straight_through``,
        ``num_rao_samples``, ``hidden``, ``normalize``) and ``S``.
      lr, betas, eps, fused: ``torch.optim.Adam``'s settings.
      estimator_params: the estimator's own parameters in ``estimator.parameters()`` order
        (copies of a harness estimator's), used as leaves and optimized with the model. NVIL:
        ``[scalar, w1, b1, w2, b2]`` (the harness's baseline without context, unused here, then
        the baseline network); without them they are made as the harness does (zero, and
        ``nn.Linear``'s initialization with ``hidden`` units).
    """

    #: Which estimators this class writes by hand (a subclass writes others).
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
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        estimator_params: Sequence[Tensor] = (),
        kl: str = "analytic",
    ) -> None:
        options = dict(options or {})
        if not self.supported(estimator, family, options):
            raise unsupported(estimator, family, options)
        if kl not in ("analytic", "sampled") or (kl == "sampled" and estimator not in SAMPLED_KL):
            raise ValueError(
                f"no hand-written {estimator} with kl={kl!r}; allowed: 'analytic', and "
                f"'sampled' for {', '.join(SAMPLED_KL)}"
            )
        self.kl_mode = kl
        self.params = [p.requires_grad_() for p in params]
        half = len(self.params) // 2
        self.enc, self.dec = self.params[:half], self.params[half:]
        self.family, self.L, self.C = family, latent_dim, n_categories
        self.estimator, self.S = estimator, num_samples
        self.baseline = options.get("baseline", "none")
        self.decay = float(options.get("decay", 0.99))
        self.tau = float(options.get("temperature", 1.0))
        self.st = bool(options.get("straight_through", False))
        self.K = int(options.get("num_rao_samples", 10))
        self.normalize = bool(options.get("normalize", False))
        # Running statistics: the moving-average baseline's mean, or NVIL's mean and variance
        # of the residual f - b(x); ``count`` updates so far (for the bias correction).
        like = self.params[0]  # the statistics have the parameters' dtype, as the harness's
        self.average, self.count = like.new_zeros(()), 0
        self.variance = like.new_zeros(())
        estimator_params = list(estimator_params)
        if estimator == "nvil" and not estimator_params:  # x -> tanh(W1 x + b1) -> W2 h + b2
            d, hidden, like = self.enc[0].shape[1], int(options.get("hidden", 100)), params[0]
            estimator_params = [
                torch.zeros((), dtype=like.dtype, device=like.device),
                linear_init(d, (hidden, d), like),
                linear_init(d, (hidden,), like),
                linear_init(hidden, (1, hidden), like),
                linear_init(hidden, (1,), like),
            ]
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

    def probs(self, h: Tensor) -> Tensor:
        """Bernoulli probabilities ``[B, L]`` or categorical probability vectors ``[B, L, C]``."""
        return torch.sigmoid(h) if self.family == "bernoulli" else torch.softmax(h, -1)

    def sample(self, h: Tensor, probs: Tensor | None = None) -> Tensor:
        """``S`` exact samples of ``q``, no gradient: ``[S, B, L]`` (``[S, B, L, C]`` one-hot);
        discrete families may pass their ``probs`` (computed from ``h`` if not)."""
        with torch.no_grad():
            if self.family == "gaussian":
                loc, scale = h
                return torch.normal(
                    loc.expand(self.S, *loc.shape), scale.expand(self.S, *loc.shape)
                )
            probs = self.probs(h) if probs is None else probs
            if self.family == "bernoulli" and probs.device.type != "cpu":
                return torch.bernoulli(probs.expand(self.S, *h.shape))
            if self.family == "bernoulli":  # torch.bernoulli's draws, the harness's way
                return (torch.rand(self.S, *h.shape, dtype=probs.dtype) < probs).to(probs.dtype)
            idx = torch.multinomial(probs.reshape(-1, self.C), self.S, True).T
            return F.one_hot(idx.reshape(self.S, *h.shape[:-1]), self.C).to(h.dtype)

    def log_prior(self, z: Tensor) -> Tensor:
        """``log p(z)``, ``[S, B]``: standard normal, or uniform over ``2`` / ``C`` values."""
        if self.family == "gaussian":
            return (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        k = 2 if self.family == "bernoulli" else self.C
        return z.new_full(z.shape[:2], -self.L * math.log(k))

    def signal(self, x: Tensor, z: Tensor, kl: Tensor | None, log_q: Tensor) -> Tensor:
        """``f(z)``, ``[S, B]``: ``log p(x|z) - KL`` (analytic KL) or
        ``log p(x|z) + log p(z) - log q(z|x)`` (sampled; ``log q`` keeps its gradient)."""
        if kl is not None:
            return self.log_px(x, z) - kl
        return self.log_px(x, z) + self.log_prior(z) - log_q

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

    def encode(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``q``'s parameters for batch ``x``: ``(loc, scale)`` ``[B, L]`` each, Bernoulli
        logits ``[B, L]`` or categorical logits ``[B, L, C]``."""
        h = mlp(x, self.enc)  # [B, H]
        if self.family == "gaussian":
            loc, raw = h.chunk(2, -1)
            return loc, F.softplus(raw) + 1e-4
        if self.family == "categorical":
            return h.unflatten(-1, (self.L, self.C))  # [B, L, C]
        return h

    def loss(self, x: Tensor) -> Tensor:
        """The training loss ``-(1/B) sum_b surrogate_b + aux_loss`` on batch ``x`` ``[B, D]``."""
        h = self.encode(x)
        kl = self.kl(h) if self.kl_mode == "analytic" else None  # [B]
        S, name = self.S, self.estimator
        aux_loss = None
        if name in ("reinforce", "rloo", "nvil"):
            surrogate, aux_loss = self.score_function(x, h, kl)
        elif name == "vimco":
            surrogate = self.vimco(x, h, kl)
        elif name == "reparam":
            loc, scale = h
            z = loc + torch.randn(S, *loc.shape, dtype=loc.dtype, device=loc.device) * scale
            surrogate = (self.log_px(x, z) - kl).mean(0)
        elif name == "straight_through":  # forward: hard b; backward: d b / d probs = 1
            probs = self.probs(h)
            b = self.sample(h, probs.detach())
            surrogate = (self.log_px(x, b + (probs - probs.detach())) - kl).mean(0)
        elif name == "gumbel_rao":
            surrogate = (self.log_px(x, self.gumbel_rao(h)) - kl).mean(0)
        elif name == "gumbel_softmax":
            surrogate = self.gumbel_softmax(x, h, kl)
        else:  # arm, disarm
            surrogate = self.antithetic(x, h, kl)
        loss = -surrogate.sum() / x.shape[0]
        return loss if aux_loss is None else loss + aux_loss

    def score_function(
        self, x: Tensor, h: Tensor, kl: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """REINFORCE (with its baseline), RLOO or NVIL: the surrogate ``[B]`` and NVIL's
        baseline loss (None for the others)."""
        S, B = self.S, x.shape[0]
        aux_loss = None
        z = self.sample(h)
        log_q = self.log_q(h, z)
        f = self.signal(x, z, kl, log_q)  # [S, B]
        fd = f.detach()
        if self.estimator == "rloo":
            signal = fd - (fd.sum(0) - fd) / (S - 1)
        elif self.estimator == "nvil":
            signal, aux_loss, scale = self.nvil_signal(x, fd)
            # normalize: the whole gradient (f's and the score term) divided by the scale.
            f = fd + (f - fd) / scale
            signal = signal / scale
        elif self.baseline == "moving_average":
            correction = 1 - self.decay**self.count
            baseline = self.average / correction if self.count else 0.0
            with torch.no_grad():
                self.average.mul_(self.decay).add_(fd.mean(), alpha=1 - self.decay)
            self.count += 1
            signal = fd - baseline
        elif self.baseline == "batch_mean":  # mean f of the other examples, all samples
            per_example = fd.sum(0)  # [B]
            signal = fd - (per_example.sum() - per_example) / ((B - 1) * S)
        else:
            signal = fd
        return (f + signal * (log_q - log_q.detach())).mean(0), aux_loss

    def vimco(self, x: Tensor, h: Tensor, kl: Tensor | None) -> Tensor:
        """VIMCO's surrogate ``[B]``: the IWAE bound plus leave-one-out score terms."""
        S = self.S
        z = self.sample(h)
        log_q = self.log_q(h, z)
        w = self.signal(x, z, kl, log_q)  # [S, B], the log weights
        bound = torch.logsumexp(w, 0) - math.log(S)  # [B]
        # L_{-s}: the bound with w_s replaced by the mean of the other log weights.
        wd = w.detach()
        rows = wd.repeat(S, 1, 1)  # [S (left out), S, B]
        s = torch.arange(S, device=w.device)
        rows[s, s] = (wd.sum(0) - wd) / (S - 1)
        loo = torch.logsumexp(rows, 1) - math.log(S)  # [S, B]
        return bound + ((bound.detach() - loo) * (log_q - log_q.detach())).sum(0)

    def gumbel_softmax(self, x: Tensor, h: Tensor, kl: Tensor | None) -> Tensor:
        """Gumbel-softmax's surrogate ``[B]`` (straight-through with ``st``)."""
        S = self.S
        eps = torch.finfo(h.dtype).eps
        u = torch.rand(S, *h.shape, dtype=h.dtype, device=h.device).clamp(eps, 1 - eps)
        if self.family == "bernoulli":  # binary Concrete: logistic noise, sigmoid
            y = torch.sigmoid((h + u.log() - (-u).log1p()) / self.tau)
            hard = (y.detach() > 0.5).to(h.dtype)
        else:  # Gumbel noise, softmax over the classes
            y = torch.softmax((h.log_softmax(-1) - (-u.log()).log()) / self.tau, -1)
            hard = F.one_hot(y.detach().argmax(-1), self.C).to(h.dtype)
        if self.st:
            return (self.log_px(x, hard - y.detach() + y) - kl).mean(0)
        surrogate = (self.log_px(x, y) - kl).mean(0)
        with torch.no_grad():  # the objective at exact samples, as the harness does
            self.log_px(x, hard)
        return surrogate

    def antithetic(self, x: Tensor, h: Tensor, kl: Tensor | None) -> Tensor:
        """ARM's or DisARM's surrogate ``[B]``: an antithetic pair ``b, b~`` from one uniform."""
        S = self.S
        theta = h.detach()
        u = torch.rand(S, *theta.shape, dtype=theta.dtype, device=theta.device)
        b = (u < torch.sigmoid(theta)).to(h.dtype)
        b_anti = (u > torch.sigmoid(-theta)).to(h.dtype)
        f = self.log_px(x, torch.cat([b, b_anti])) - kl  # [2S, B]
        f_b, f_anti = f[:S], f[S:]
        if self.estimator == "arm":  # (f(b~) - f(b)) (u - 1/2)
            g = (f_anti - f_b).detach()[..., None] * (u - 0.5)
        else:  # DisARM: ARM with u integrated out given the pair
            df = (f_b - f_anti).detach()[..., None]  # [S, B, 1]
            g = 0.5 * df * (1 - 2 * b_anti) * (b != b_anti).to(h.dtype) * theta.abs().sigmoid()
        return (0.5 * (f_b + f_anti) + (g * (h - theta)).sum(-1)).mean(0)

    def nvil_signal(self, x: Tensor, fd: Tensor) -> tuple[Tensor, Tensor, Tensor | float]:
        """NVIL's learning signal ``f - b(x) - c`` (``[S, B]``), the baseline's loss
        ``mean (f - c - b(x))^2`` and the scale ``max(1, sqrt(v))`` that divides the whole
        gradient with ``normalize`` (else 1); then updates the running ``c`` and ``v``.

        ``c`` and ``v`` are bias-corrected running averages of the mean and variance of
        ``f - b(x)`` over earlier steps (``0`` and ``1`` before the first step); ``v`` is kept
        only with ``normalize``."""
        w1, b1, w2, b2 = self.est_params[1:]
        b = F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2).squeeze(-1)  # [B]
        residual = fd - b.detach()  # [S, B]
        scale: Tensor | float = 1.0
        if self.count:
            correction = 1 - self.decay**self.count
            center, var = self.average / correction, self.variance / correction
            signal = residual - center
            if self.normalize:
                scale = var.sqrt().clamp_min(1.0)
        else:
            center, signal = 0.0, residual
        aux_loss = (fd - center - b).pow(2).mean()
        with torch.no_grad():  # the variance is needed (and kept) only with normalize
            if self.normalize:
                var, mean = torch.var_mean(residual, correction=0)
                self.variance.mul_(self.decay).add_(var, alpha=1 - self.decay)
            else:
                mean = residual.mean()
            self.average.mul_(self.decay).add_(mean, alpha=1 - self.decay)
        self.count += 1
        return signal, aux_loss, scale

    def gumbel_rao(self, h: Tensor) -> Tensor:
        """Gumbel-Rao's straight-through sample ``[S, B, L(, C)]``: the value is the hard
        sample ``b``, the gradient that of the relaxation averaged over ``K`` noise draws
        conditioned on ``b`` (held fixed)."""
        b = self.sample(h)  # [S, B, L(, C)]
        eps = torch.finfo(h.dtype).eps
        ell = h if self.family == "bernoulli" else h.log_softmax(-1)  # normalized logits
        with torch.no_grad():
            v = torch.rand(self.K, *b.shape, dtype=h.dtype, device=h.device).clamp(eps, 1 - eps)
            on = b > 0.5
            if self.family == "bernoulli":
                # Logistic noise n given sign(theta + n) = b, by the inverse CDF on the
                # matching interval: F = 1 - p (1 - v) if b else v (1 - p), n = logit(F).
                log_p, log_1mp = F.logsigmoid(h), F.logsigmoid(-h)
                noise = torch.where(
                    on,
                    (-log_p.exp() * (1 - v)).log1p() - log_p - (-v).log1p(),
                    v.log() + log_1mp - (-log_1mp.exp() * v).log1p(),
                )
            else:
                # Gumbel(ell) given its argmax b: the max is -log E_b and the others are
                # -log(E_i exp(-ell_i) + E_b), with E = -log v ~ Exp(1).
                log_e = (-v.log()).log()
                log_e_b = (log_e * b).sum(-1, keepdim=True)
                z = torch.where(on, -log_e_b, -torch.logaddexp(log_e - ell, log_e_b))
                noise = z - ell
        if self.family == "bernoulli":
            y = torch.sigmoid((ell + noise) / self.tau).mean(0)
        else:
            y = torch.softmax((ell + noise) / self.tau, -1).mean(0)
        return b + (y - y.detach())

    def __call__(self, x: Tensor) -> Tensor:
        """One training step on ``x``: loss, backward, Adam step. Returns the loss."""
        loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss
