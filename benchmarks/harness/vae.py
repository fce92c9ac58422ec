"""The VAE of the benchmark: one stochastic layer, Bernoulli pixels, standard priors.

``q(z|x)`` is ``Independent(Normal)`` (family ``gaussian``), ``Independent(Bernoulli)``
(``bernoulli``) or ``Independent(OneHotCategorical)`` over ``latent_dim`` variables of
``n_categories`` classes (``categorical``); the priors are ``N(0, I)``, ``Bernoulli(1/2)`` and
uniform categoricals; ``p(x|z)`` is a product of Bernoullis over pixels. Family
``deterministic`` is the plain autoencoder of the same networks: ``q(z|x)`` is a point mass at
the encoder's output (:class:`PointMass`), with no prior, no KL and no sampling, so the learning
signal is the reconstruction log-likelihood ``log p(x|enc(x))`` and only ``reparam`` (whose
pathwise gradient is then the exact gradient) trains it. Gaussian encoders give the scale by
``model.scale``: ``softplus`` (the default, ``sigma = softplus(h) + 1e-4``) or ``log_var``
(``h = log sigma^2``, ``sigma = exp(h / 2)``, Kingma & Welling 2014). Architectures:

- ``linear``: ``x -> logits`` and ``z -> pixel logits`` are single linear maps (the "linear"
  model of REBAR, RELAX, ARM and DisARM);
- ``nonlinear``: two deterministic hidden layers of ``hidden_dim`` units each way.

The VAE knows nothing of estimators: :meth:`VAE.learning_signal` returns the ``f`` that any
estimator maximizes in expectation under ``q``, and :meth:`VAE.elbo` / :meth:`VAE.iwae` evaluate
bounds with exact samples of ``q``, independently of how the model was trained.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

from estimators import FAMILIES  # the latent families: those the estimators know

ARCHS: tuple[str, ...] = ("linear", "nonlinear")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}
KL_MODES: tuple[str, ...] = ("analytic", "sampled")
#: The model families: the latent families the estimators know, and the plain autoencoder.
MODEL_FAMILIES: tuple[str, ...] = (*FAMILIES, "deterministic")
#: How a Gaussian encoder's second output gives the scale (``model.scale``).
SCALES: tuple[str, ...] = ("softplus", "log_var")


class PointMass(Normal):
    """The deterministic autoencoder's ``q(z|x)``: all mass at ``loc`` (a Normal of scale 0).

    ``rsample`` / ``sample`` return ``loc`` itself (no noise is drawn), so the pathwise
    gradient through a sample is the exact gradient of ``f(loc)``. A ``Normal`` so that the
    estimators' family check accepts it for ``reparam``; its density, entropy and KL are not
    defined, and the autoencoder never asks for them.
    """

    def __init__(self, loc: Tensor) -> None:
        super().__init__(loc, torch.zeros_like(loc), validate_args=False)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        return self.loc.expand(self._extended_shape(torch.Size(sample_shape)))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class ThresholdBernoulli(Bernoulli):
    """``Bernoulli`` whose CPU samples are ``(U < p)`` with ``U = torch.rand(shape)``.

    The same draws as ``torch.bernoulli(p)`` from the same generator state: on the CPU both
    compare one uniform ``float`` per element, in element order, with ``p``, and leave the
    generator in the same state (``tests/benchmarks/test_vae.py`` pins this), so every
    record is unchanged. ``torch.rand`` fills the uniforms with vectorized code where
    ``bernoulli`` draws them one call per element, so sampling costs a fraction. On other
    devices (whose generators differ) it is ``torch.bernoulli`` itself. A NaN probability
    samples 0 instead of raising; a run whose parameters turn non-finite is then found
    diverged at its next sync point.
    """

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        probs = self.probs
        if probs.device.type != "cpu":
            return super().sample(sample_shape)
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, dtype=probs.dtype, device=probs.device)
            return (u < probs).to(probs.dtype)


class _BernoulliLogLikelihoodGradient(torch.autograd.Function):
    """``log p(x|logits) = -sum_d BCE(logits_d, x_d)`` over the last dimension, for a caller
    that only backpropagates: NaN values, the exact gradient ``(x - sigmoid(logits)) g``.

    The backward is the arithmetic of torch's ``binary_cross_entropy_with_logits`` backward
    for ``-BCE(...).sum(-1)``, ``(sigmoid(logits) - x) (-g)``, so the gradient equals that
    expression's bit for bit (``tests/benchmarks/test_vae.py`` pins it); the forward's
    log-sigmoid pass over ``[*S, B, D]``, which the gradient does not use, is skipped.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, target)
        return logits.new_full(logits.shape[:-1], math.nan)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        logits, target = ctx.saved_tensors
        grad_elem = (-grad)[..., None]  # through the negation and the sum
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.sigmoid(logits).sub_(target).mul_(grad_elem)
        if ctx.needs_input_grad[1]:  # d(-BCE)/dx = logits
            grad_target = logits * grad[..., None]
        return grad_logits, grad_target


class LatentPosterior(Independent):
    """``Independent`` whose ``log_prob`` remembers its last input and result (and which
    sums its one reinterpreted dimension directly).

    For one-hot categorical variables ``log_prob`` is the continuous extension
    ``log q(z) = sum_l sum_c z_lc log pi_lc``: on one-hot ``z`` it equals torch's
    ``OneHotCategorical.log_prob``, and on relaxed ``z`` (points of the simplex, as REBAR,
    RELAX and the Gumbel relaxations pass to ``f``) it is linear in ``z`` where torch's gives
    ``log pi[argmax z]``, piecewise constant, whose jumps bias REBAR / RELAX's control variate
    and leave the relaxed estimators without the entropy's gradient under ``model.kl=sampled``.
    Bernoulli needs nothing: torch's ``z log p + (1 - z) log(1 - p)`` is already continuous.

    With the sampled KL, the learning signal ``f(z) = log p(x|z) + log p(z) - log q(z|x)``
    and a score-function estimator both ask for ``log q(z|x)`` of the same samples ``z``;
    the second call returns the first's tensor (same autograd graph) instead of recomputing
    it. The cache is keyed by the sample tensor's identity and version and by whether
    gradients are enabled, so a new or modified sample is always recomputed.
    """

    _last: tuple[Tensor, int, bool, Tensor] | None = None

    def log_prob(self, value: Tensor) -> Tensor:
        last, grad = self._last, torch.is_grad_enabled()
        if last is not None and last[0] is value and last[1] == value._version and last[2] == grad:
            return last[3]
        base = self.base_dist
        if isinstance(base, OneHotCategorical):
            # The continuous extension; base.logits are normalized (log pi), finite for an
            # encoder's finite outputs. Summed over the category and reinterpreted dims.
            dims = tuple(range(-1 - self.reinterpreted_batch_ndims, 0))
            out = (value * base.logits).sum(dims)
        elif self.reinterpreted_batch_ndims == 1:
            # One reinterpreted dim (as built by VAE.distribution): a plain sum over it,
            # without Independent's reshape (one op and one autograd node less per call).
            out = base.log_prob(value).sum(-1)
        else:
            out = super().log_prob(value)
        self._last = (value, value._version, grad, out)
        return out

    def entropy(self) -> Tensor:
        """Entropy ``[*batch_shape]``: the base entropies summed over the reinterpreted dim."""
        if self.reinterpreted_batch_ndims == 1:
            return self.base_dist.entropy().sum(-1)
        return super().entropy()


def _mlp(d_in: int, d_out: int, arch: str, hidden: int, activation: str) -> nn.Sequential:
    if arch == "linear":
        return nn.Sequential(nn.Linear(d_in, d_out))
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, d_out)
    )


class VAE(nn.Module):
    """Encoder ``q(z|x)``, prior ``p(z)`` and Bernoulli decoder ``p(x|z)``.

    Args:
      data_dim: pixels ``D``.
      family: ``gaussian`` | ``bernoulli`` | ``categorical`` | ``deterministic``.
      arch: ``linear`` | ``nonlinear``.
      latent_dim: latent variables ``L`` (categorical: number of variables).
      n_categories: classes ``C`` per categorical variable.
      hidden_dim: width of the hidden layers (``nonlinear``).
      activation: ``leaky_relu`` | ``tanh`` (``nonlinear``).
      scale: ``softplus`` | ``log_var``: the Gaussian encoder's scale (see the module).
      data_mean: ``[D]`` mean training image; if given, the decoder's output bias starts at
        ``logit(clip(mean, 1e-3, 1 - 1e-3))`` (as in DisARM), so the untrained decoder already
        predicts the average image.

    Shapes: ``x`` is ``[B, D]``; samples ``z`` are ``[S, B, L]`` (``[S, B, L, C]`` one-hot for
    categorical); per-example values are ``[S, B]``.
    """

    def __init__(
        self,
        data_dim: int,
        family: str = "bernoulli",
        arch: str = "linear",
        latent_dim: int = 200,
        n_categories: int = 10,
        hidden_dim: int = 200,
        activation: str = "leaky_relu",
        data_mean: Tensor | None = None,
        scale: str = "softplus",
    ) -> None:
        super().__init__()
        for option, value, allowed in (
            ("model.family", family, MODEL_FAMILIES),
            ("model.scale", scale, SCALES),
            ("model.arch", arch, ARCHS),
            ("model.activation", activation, tuple(ACTIVATIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"{option}={value!r} is invalid; allowed: {', '.join(allowed)}")
        self.family = family
        self.scale = scale
        self.latent_dim = latent_dim
        self.n_categories = n_categories if family == "categorical" else 1
        z_dim = latent_dim * self.n_categories  # flattened size of one latent sample
        q_dim = 2 * latent_dim if family == "gaussian" else z_dim  # (loc, scale) or logits
        self.encoder = _mlp(data_dim, q_dim, arch, hidden_dim, activation)
        self.decoder = _mlp(z_dim, data_dim, arch, hidden_dim, activation)
        if data_mean is not None:
            with torch.no_grad():
                self.decoder[-1].bias.copy_(torch.logit(data_mean.clamp(1e-3, 1 - 1e-3)))

    def encode(self, x: Tensor) -> Distribution:
        """``q(z|x)``: batch shape ``[B]``, event shape ``[L]`` (``[L, C]`` categorical)."""
        return self.distribution(self.encoder(x))

    def distribution(self, out: Tensor) -> Distribution:
        """``q`` from the encoder's output ``[*B, H]``: batch ``[*B]``, event as in encode."""
        if self.family == "gaussian":
            loc, raw_scale = out.chunk(2, dim=-1)
            if self.scale == "log_var":  # raw_scale = log sigma^2
                sigma = torch.exp(0.5 * raw_scale)
            else:
                sigma = F.softplus(raw_scale) + 1e-4
            base: Distribution = Normal(loc, sigma, validate_args=False)
        elif self.family == "deterministic":
            base = PointMass(out)
        elif self.family == "bernoulli":
            base = ThresholdBernoulli(logits=out, validate_args=False)
        else:
            logits = out.unflatten(-1, (self.latent_dim, self.n_categories))  # [B, L, C]
            base = OneHotCategorical(logits=logits, validate_args=False)
        return LatentPosterior(base, 1, validate_args=False)

    def prior(self) -> Distribution:
        """``p(z)``: the standard prior, batch shape ``[]``, on the model's device and dtype
        (the autoencoder has none: ``N(0, I)`` is returned for it, used by nothing)."""
        like = self.decoder[-1].weight
        zeros = like.new_zeros(self.latent_dim)
        if self.family in ("gaussian", "deterministic"):
            base: Distribution = Normal(zeros, torch.ones_like(zeros), validate_args=False)
        elif self.family == "bernoulli":
            base = Bernoulli(logits=zeros, validate_args=False)
        else:
            zeros = like.new_zeros(self.latent_dim, self.n_categories)
            base = OneHotCategorical(logits=zeros, validate_args=False)
        return Independent(base, 1, validate_args=False)

    def log_prior(self, z: Tensor) -> Tensor:
        """``log p(z)``: ``[*S, B]`` for samples ``z`` of shape ``[*S, B, *event]``.

        The discrete priors are uniform, so ``log p(z) = -L log K`` for every ``z`` (also what
        torch's ``log_prob`` gives for relaxed samples); it is filled in rather than computed.
        On relaxed samples this is also the continuous extension used for ``log q``
        (``sum z log(1/K)`` over each variable's simplex, ``z log 1/2 + (1 - z) log 1/2``).
        """
        if self.family == "gaussian":
            return self.prior().log_prob(z)
        k = 2 if self.family == "bernoulli" else self.n_categories
        batch = z.shape[:-1] if self.family == "bernoulli" else z.shape[:-2]
        return z.new_full(batch, -self.latent_dim * math.log(k))

    def decode(self, z: Tensor, detached: bool = False) -> Tensor:
        """Pixel logits ``[*S, B, D]`` of ``p(x|z)``; ``detached``: with the decoder's
        parameters detached (gradient in ``z`` only)."""
        if self.family == "categorical":
            z = z.flatten(-2)  # [*S, B, L * C]
        if not detached:
            return self.decoder(z)
        for layer in self.decoder:
            if isinstance(layer, nn.Linear):
                z = F.linear(z, layer.weight.detach(), layer.bias.detach())
            else:
                z = layer(z)
        return z

    def log_likelihood(
        self, x: Tensor, z: Tensor, detached: bool = False, values: bool = True
    ) -> Tensor:
        """``log p(x|z) = sum_d log Bernoulli(x_d; sigmoid(logit_d(z)))``: ``[*S, B]``.

        One fused ``binary_cross_entropy_with_logits`` over all samples; ``z`` may be relaxed.
        ``detached``: the decoder's parameters get no gradient. ``values=False``: NaN values
        with the same gradient, bit for bit (:class:`_BernoulliLogLikelihoodGradient`), for a
        caller that only backpropagates.
        """
        logits = self.decode(z, detached)  # [*S, B, D]
        target = x.expand_as(logits)
        if not values:
            return _BernoulliLogLikelihoodGradient.apply(logits, target)
        return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def kl(self, q: Distribution) -> Tensor:
        """Analytic ``KL(q(z|x) || p(z))``: ``[B]``.

        Gaussian: ``kl_divergence`` against ``N(0, I)``. Discrete: the prior is uniform over
        ``K`` values per variable (``K = 2`` for Bernoulli), so ``KL = L log K - H(q)`` with
        torch's entropy; equal to ``kl_divergence`` but without its masked index writes, which
        cost about a tenth of a training step of the linear model. The autoencoder: zero (it
        has no KL term).
        """
        if self.family == "deterministic":
            return q.mean.new_zeros(q.batch_shape)
        if self.family == "gaussian":
            return kl_divergence(q, self.prior().expand(q.batch_shape))
        k = 2 if self.family == "bernoulli" else self.n_categories
        return self.latent_dim * math.log(k) - q.entropy()

    def learning_signal(
        self, x: Tensor, q: Distribution, kl: str = "analytic"
    ) -> Callable[[Tensor], Tensor]:
        """The ``f`` whose expectation under ``q`` is the ELBO, for an estimator to maximize.

        - ``analytic``: ``f(z) = log p(x|z) - KL(q||p)``, the KL computed once (``[B]``) and
          broadcast to ``[S, B]``; its gradient reaches the encoder as part of ``grad f``.
        - ``sampled``: ``f(z) = log p(x|z) + log p(z) - log q(z|x)``; ``log q`` carries the
          encoder's gradient, which score-function estimators include as ``grad f``.

        ``f`` maps ``[S, B, *event]`` to ``[S, B]`` and accepts relaxed samples. With the
        analytic KL it carries ``f.detached`` (:data:`estimators.base.Objective`): the same
        values and gradient in ``z``, none to the model's parameters. Both modes carry
        ``f.gradient_only``: NaN values and ``f``'s gradient bit for bit, in ``z`` and in the
        model's parameters (the likelihood's values are not computed).
        """
        if kl not in KL_MODES:
            raise ValueError(f"model.kl={kl!r} is invalid; allowed: {', '.join(KL_MODES)}")
        if self.family == "deterministic" and kl != "analytic":
            raise ValueError(
                f"model.kl={kl!r} is invalid for model.family=deterministic (a point mass has "
                "no density); allowed: analytic"
            )
        if kl == "analytic":
            kl_value = self.kl(q)  # [B]

            def f(z: Tensor, values: bool = True) -> Tensor:
                return self.log_likelihood(x, z, values=values) - kl_value

            def f_detached(z: Tensor) -> Tensor:
                return self.log_likelihood(x, z, detached=True) - kl_value.detach()

            f.detached = f_detached  # type: ignore[attr-defined]  # estimators.base.Objective
            f.gradient_only = functools.partial(f, values=False)  # type: ignore[attr-defined]
            return f

        def f_sampled(z: Tensor, values: bool = True) -> Tensor:
            likelihood = self.log_likelihood(x, z, values=values)
            return likelihood + self.log_prior(z) - q.log_prob(z)

        gradient_only = functools.partial(f_sampled, values=False)
        f_sampled.gradient_only = gradient_only  # type: ignore[attr-defined]
        return f_sampled

    @torch.no_grad()
    def reconstruction(self, x: Tensor) -> Tensor:
        """``log p(x|z)`` at the posterior mean ``z = E_q[z]`` (the autoencoder's code) ``[B]``."""
        return self.log_likelihood(x, self.encode(x).mean)

    @torch.no_grad()
    def elbo(self, x: Tensor, num_samples: int = 1) -> Tensor:
        """ELBO per example ``[B]``: ``mean_s log p(x|z_s) - KL(q||p)``, ``z_s ~ q`` exactly."""
        q = self.encode(x)
        z = q.sample((num_samples,))  # [S, B, *event]
        return self.log_likelihood(x, z).mean(0) - self.kl(q)

    @torch.no_grad()
    def iwae(self, x: Tensor, k: int, chunk: int = 100) -> Tensor:
        """IWAE bound per example ``[B]``: ``log (1/k) sum_i p(x, z_i) / q(z_i|x)``, ``z_i ~ q``.

        The ``k`` samples are drawn ``chunk`` at a time and combined with a running logsumexp,
        so memory is ``O(chunk * B * D)`` whatever ``k``.
        """
        q = self.encode(x)
        total = torch.full(q.batch_shape, -math.inf, device=x.device, dtype=x.dtype)  # [B]
        for start in range(0, k, chunk):
            z = q.sample((min(chunk, k - start),))  # [c, B, *event]
            log_w = self.log_likelihood(x, z) + self.log_prior(z) - q.log_prob(z)  # [c, B]
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return total - math.log(k)
