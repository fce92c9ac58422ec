"""The VAE: shapes, architectures, the analytic KL, and the ordering of the bounds.

Statistical checks compare a Monte Carlo mean with a closed form or an exact enumeration and
allow z = 4.5 standard errors, a false-failure rate below 1e-5 per check (Gaussian tails;
about 10 such checks here). Seeds are fixed and were not chosen to make anything pass.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Independent, kl_divergence

from benchmarks.harness.vae import FAMILIES, VAE

Z = 4.5


def _tiny(family: str, arch: str = "linear", data_dim: int = 12, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(data_dim, family, arch, latent_dim=4, n_categories=3, hidden_dim=8)


def _binary(n: int, d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.4).float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["linear", "nonlinear"])
def test_shapes_of_q_samples_and_per_example_values(family: str, arch: str) -> None:
    """encode gives batch [B]; log p(x|z), log p(z), f and the bounds are [S, B] / [B]."""
    vae = _tiny(family, arch)
    x = _binary(5, 12)
    q = vae.encode(x)
    event = (4, 3) if family == "categorical" else (4,)
    assert q.batch_shape == (5,) and q.event_shape == event
    z = q.sample((3,))
    assert vae.log_likelihood(x, z).shape == (3, 5)
    assert vae.log_prior(z).shape == (3, 5)
    for kl in ("analytic", "sampled"):
        assert vae.learning_signal(x, q, kl)(z).shape == (3, 5)
    assert vae.elbo(x, 2).shape == (5,)
    assert vae.iwae(x, 7, chunk=3).shape == (5,)


def test_linear_arch_is_one_linear_map_each_way_and_nonlinear_has_two_hidden_layers() -> None:
    """linear: x -> logits and z -> pixel logits are single nn.Linear maps; nonlinear: 3 each."""
    lin = VAE(784, "bernoulli", "linear", latent_dim=200)
    assert [type(m) for m in lin.encoder] == [nn.Linear]
    assert [type(m) for m in lin.decoder] == [nn.Linear]
    assert lin.encoder[0].weight.shape == (200, 784) and lin.decoder[0].weight.shape == (784, 200)
    deep = VAE(784, "bernoulli", "nonlinear", latent_dim=200, activation="tanh")
    assert sum(isinstance(m, nn.Linear) for m in deep.encoder) == 3
    assert sum(isinstance(m, nn.Tanh) for m in deep.decoder) == 2


def test_decoder_output_bias_starts_at_the_logit_of_the_data_mean() -> None:
    """With data_mean, the decoder's output bias is logit(clip(mean, 1e-3, 1 - 1e-3))."""
    mean = torch.tensor([0.0, 0.25, 0.5, 1.0])
    vae = VAE(4, "bernoulli", "linear", latent_dim=2, data_mean=mean)
    expected = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
    torch.testing.assert_close(vae.decoder[-1].bias.detach(), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_likelihood_equals_torch_bernoulli_log_prob(family: str) -> None:
    """log_likelihood (fused BCE) equals Independent(Bernoulli(logits)).log_prob(x)."""
    vae = _tiny(family)
    x = _binary(5, 12)
    z = vae.encode(x).sample((3,))
    expected = Independent(Bernoulli(logits=vae.decode(z)), 1).log_prob(x)
    torch.testing.assert_close(vae.log_likelihood(x, z), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_prior_equals_torch_log_prob_for_hard_and_relaxed_samples(family: str) -> None:
    """log_prior equals the prior's torch log_prob (the uniform priors' constant -L log K)."""
    vae = _tiny(family)
    z = vae.encode(_binary(5, 12)).sample((3,))
    torch.testing.assert_close(vae.log_prior(z), vae.prior().log_prob(z))
    if family != "gaussian":
        relaxed = torch.rand_like(z)
        torch.testing.assert_close(vae.log_prior(relaxed), vae.prior().log_prob(relaxed))


def test_categorical_log_q_is_torchs_on_one_hot_and_linear_in_relaxed_samples() -> None:
    """q.log_prob equals torch's OneHotCategorical log_prob on one-hot samples and is the
    continuous extension sum z log pi on relaxed ones (so its gradient in z is log pi, where
    torch's log pi[argmax z] has none)."""
    vae = _tiny("categorical")
    q = vae.encode(_binary(5, 12))
    hard = q.sample((3,))
    torch.testing.assert_close(q.log_prob(hard), Independent(q.base_dist, 1).log_prob(hard))
    relaxed = F.softmax(torch.randn(3, 5, 4, 3), dim=-1).requires_grad_()
    log_pi = torch.log_softmax(q.base_dist.logits, -1)  # [5, 4, 3]
    value = q.log_prob(relaxed)
    torch.testing.assert_close(value, (relaxed * log_pi).sum((-2, -1)))
    (grad,) = torch.autograd.grad(value.sum(), relaxed)
    torch.testing.assert_close(grad, log_pi.detach().expand_as(grad))


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_kl_equals_torch_kl_divergence(family: str) -> None:
    """VAE.kl equals kl_divergence(q, p) (the discrete families use L log K - H(q))."""
    vae = _tiny(family)
    q = vae.encode(_binary(6, 12))
    expected = kl_divergence(q, vae.prior().expand(q.batch_shape))
    torch.testing.assert_close(vae.kl(q), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_kl_equals_monte_carlo_kl_within_z_se(family: str) -> None:
    """KL(q||p) is within Z standard errors of the mean of log q(z) - log p(z), z ~ q."""
    torch.manual_seed(2)
    vae = _tiny(family)
    q = vae.encode(_binary(4, 12))
    with torch.no_grad():
        z = q.sample((20_000,))
        log_ratio = q.log_prob(z) - vae.log_prior(z)  # [S, B]
        mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(z.shape[0])
        err = (mc - vae.kl(q)).abs() / se
    assert float(err.max()) <= Z, f"standardized errors {err.tolist()}"


def _exact(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(x) and ELBO of a Bernoulli VAE by enumerating all 2^L latent vectors."""
    L = vae.latent_dim
    z = torch.tensor(list(itertools.product((0.0, 1.0), repeat=L)))[:, None, :]  # [2^L, 1, L]
    z = z.expand(-1, x.shape[0], -1)  # [2^L, B, L]
    with torch.no_grad():
        q = vae.encode(x)
        log_joint = vae.log_likelihood(x, z) + vae.log_prior(z)  # [2^L, B]
        log_q = q.log_prob(z)
        log_px = torch.logsumexp(log_joint, 0)
        elbo = (log_q.exp() * (log_joint - log_q)).sum(0)
    return log_px, elbo


def test_bounds_are_ordered_elbo_le_iwae_le_log_px_and_iwae_grows_with_k() -> None:
    """Tiny Bernoulli VAE (L = 4, 16 configurations), against exact log p(x):
    E[ELBO estimate] = exact ELBO; exact ELBO <= E[IWAE_k] <= log p(x) for k = 1, 10, 100;
    E[IWAE_1] < E[IWAE_10] < E[IWAE_100]. Means over R replicates, within Z standard errors."""
    torch.manual_seed(3)
    vae = _tiny("bernoulli", "linear")
    with torch.no_grad():  # q = the prior and a sharp decoder: the bounds are far apart
        vae.decoder[-1].weight.mul_(3.0)
        vae.encoder[-1].weight.zero_()
        vae.encoder[-1].bias.zero_()
    x = _binary(1, 12)
    log_px, exact_elbo = _exact(vae, x)
    assert float(exact_elbo) < float(log_px)
    reps = x.expand(4000, -1)  # R replicates of the same example

    def mean_se(v: torch.Tensor) -> tuple[float, float]:
        return float(v.mean()), float(v.std() / math.sqrt(v.numel()))

    elbo_mean, elbo_se = mean_se(vae.elbo(reps, num_samples=1))
    assert abs(elbo_mean - float(exact_elbo)) <= Z * elbo_se
    iwae = {k: mean_se(vae.iwae(reps, k, chunk=7)) for k in (1, 10, 100)}
    for mean, se in iwae.values():
        assert float(exact_elbo) - Z * se <= mean <= float(log_px) + Z * se
    for k_lo, k_hi in ((1, 10), (10, 100)):
        (lo, se_lo), (hi, se_hi) = iwae[k_lo], iwae[k_hi]
        assert hi - lo > Z * math.hypot(se_lo, se_hi), f"IWAE_{k_hi} not above IWAE_{k_lo}"


@pytest.mark.parametrize("kl", ["analytic", "sampled"])
def test_learning_signal_expectation_is_the_exact_elbo(kl: str) -> None:
    """E_q[f(z)] equals the exact ELBO for both kl modes (tiny Bernoulli VAE, enumeration)."""
    torch.manual_seed(4)
    vae = _tiny("bernoulli")
    x = _binary(3, 12)
    _, exact_elbo = _exact(vae, x)
    with torch.no_grad():
        q = vae.encode(x)
        values = vae.learning_signal(x, q, kl)(q.sample((20_000,)))  # [S, B]
    se = values.std(0) / math.sqrt(values.shape[0])
    err = (values.mean(0) - exact_elbo).abs() / se
    assert float(err.max()) <= Z


def test_gradient_of_analytic_signal_reaches_the_encoder_through_the_kl() -> None:
    """With kl=analytic, f(z) for a fixed z still has a gradient in the encoder (via KL)."""
    vae = _tiny("bernoulli")
    x = _binary(3, 12)
    q = vae.encode(x)
    z = q.sample((2,))
    vae.learning_signal(x, q, "analytic")(z).sum().backward()
    assert vae.encoder[0].weight.grad is not None
    assert float(vae.encoder[0].weight.grad.abs().sum()) > 0


def test_invalid_family_arch_activation_and_kl_name_the_option() -> None:
    """Bad constructor arguments raise ValueError naming the option and allowed values."""
    with pytest.raises(ValueError, match=r"model\.family='poisson'.*gaussian, bernoulli"):
        VAE(4, "poisson")
    with pytest.raises(ValueError, match=r"model\.arch='deep'.*linear, nonlinear"):
        VAE(4, "bernoulli", "deep")
    with pytest.raises(ValueError, match=r"model\.activation='relu'.*leaky_relu, tanh"):
        VAE(4, "bernoulli", "nonlinear", activation="relu")
    vae = _tiny("bernoulli")
    x = _binary(2, 12)
    with pytest.raises(ValueError, match=r"model\.kl='exact'.*analytic, sampled"):
        vae.learning_signal(x, vae.encode(x), "exact")


def test_relaxed_samples_are_accepted_by_the_learning_signal() -> None:
    """f accepts relaxed (continuous) samples, as Gumbel-softmax passes them."""
    vae = _tiny("categorical")
    x = _binary(2, 12)
    q = vae.encode(x)
    relaxed = F.softmax(torch.randn(3, 2, 4, 3), dim=-1)
    for kl in ("analytic", "sampled"):
        assert torch.isfinite(vae.learning_signal(x, q, kl)(relaxed)).all()


def test_posterior_log_prob_is_reused_only_for_the_same_unchanged_sample() -> None:
    """q.log_prob returns its previous result for the same sample tensor (the sampled-KL
    signal and a score-function estimator share it), and recomputes for a new sample, an
    in-place-modified one, or a change of grad mode."""
    torch.manual_seed(0)
    vae = VAE(12, "bernoulli", latent_dim=5)
    q = vae.encode(torch.rand(3, 12))
    z = q.sample((2,))
    first = q.log_prob(z)
    assert q.log_prob(z) is first and first.requires_grad
    other = z.clone()
    assert q.log_prob(other) is not first
    torch.testing.assert_close(q.log_prob(other), first)
    z[0, 0, 0] = 1 - z[0, 0, 0]  # in place: a new version
    changed = q.log_prob(z)
    assert changed is not first and not torch.equal(changed, first)
    with torch.no_grad():
        assert not q.log_prob(z).requires_grad
    assert q.log_prob(z).requires_grad


@pytest.mark.parametrize("arch", ["linear", "nonlinear"])
def test_detached_signal_has_fs_values_and_z_gradient_but_no_parameter_gradient(arch) -> None:
    """f.detached (used by REBAR / RELAX for their control variate) equals f at relaxed
    samples, with the same gradient in z, and sends no gradient to the model."""
    torch.manual_seed(0)
    vae = VAE(12, "bernoulli", arch, latent_dim=5, hidden_dim=7)
    x = (torch.rand(3, 12) < 0.5).float()
    q = vae.encode(x)
    f = vae.learning_signal(x, q)
    z = torch.rand(2, 3, 5, requires_grad=True)
    (gz,) = torch.autograd.grad(f(z).sum(), z)
    value = f.detached(z)
    torch.testing.assert_close(value, f(z))
    (gz_detached,) = torch.autograd.grad(value.sum(), z, retain_graph=True)
    torch.testing.assert_close(gz_detached, gz)
    grads = torch.autograd.grad(value.sum(), list(vae.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert not hasattr(vae.learning_signal(x, q, "sampled"), "detached")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 33), (4, 100, 200)])
def test_bernoulli_posterior_draws_what_torch_bernoulli_draws(dtype, shape) -> None:
    """The Bernoulli posterior's fast sampler (``U < p``) gives torch.bernoulli's samples
    from the same generator state and leaves the generator where torch.bernoulli does, so
    switching samplers changes no record."""
    from benchmarks.harness.vae import ThresholdBernoulli

    g = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(shape[-2:] if len(shape) > 1 else shape, generator=g, dtype=dtype)
    logits[..., 0] = math.inf  # p = 1 exactly
    if logits.shape[-1] > 1:
        logits[..., 1] = -math.inf  # p = 0 exactly
    q = ThresholdBernoulli(logits=logits, validate_args=False)
    sample_shape = shape[: len(shape) - logits.dim()]
    for seed in range(3):
        torch.manual_seed(seed)
        expected = torch.bernoulli(q.probs.expand(*sample_shape, *logits.shape))
        after_expected = torch.rand(5, dtype=dtype)
        torch.manual_seed(seed)
        got = q.sample(sample_shape)
        after = torch.rand(5, dtype=dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
        assert torch.equal(after, after_expected)


def test_vae_samples_bernoulli_latents_with_the_fast_sampler() -> None:
    vae = _tiny("bernoulli")
    from benchmarks.harness.vae import ThresholdBernoulli

    assert isinstance(vae.encode(_binary(3, 12)).base_dist, ThresholdBernoulli)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kl", ["analytic", "sampled"])
@pytest.mark.parametrize("arch", ["linear", "nonlinear"])
def test_gradient_only_signal_has_nan_values_and_fs_gradient_bit_for_bit(family, kl, arch) -> None:
    """f.gradient_only returns NaN values and f's gradient, bit for bit, in z (relaxed or
    hard samples) and in every parameter of the model (decoder, and encoder through q), for
    an upstream gradient that differs per sample and example."""
    torch.manual_seed(0)
    vae = VAE(12, family, arch, latent_dim=4, n_categories=3, hidden_dim=7)
    x = _binary(3, 12)
    with torch.no_grad():
        z = vae.encode(x).sample((2,))
    if family != "gaussian":  # a relaxed point of the cube / simplex, as the relaxations pass
        z = 0.8 * z + 0.2 * torch.rand_like(z)
    z.requires_grad_()
    upstream = torch.randn(2, 3)
    inputs = [z, *vae.parameters()]
    f = vae.learning_signal(x, vae.encode(x), kl)
    full = torch.autograd.grad(f(z), inputs, upstream, allow_unused=True)
    values = vae.learning_signal(x, vae.encode(x), kl).gradient_only(z)  # a fresh q (no cache)
    lean = torch.autograd.grad(values, inputs, upstream, allow_unused=True)
    assert values.shape == (2, 3) and torch.isnan(values).all()
    assert [g is None for g in lean] == [g is None for g in full]
    assert sum(g is not None for g in full) > 2  # z, the decoder and the encoder
    for a, b in zip(full, lean, strict=True):
        assert a is None or torch.equal(a, b)


def test_gradient_only_likelihood_differentiates_the_target_too() -> None:
    """log_likelihood(values=False) gives the data's gradient ``logits`` as the full
    expression does (``x`` requiring a gradient is not dropped)."""
    vae = _tiny("gaussian")
    z = torch.randn(2, 3, 4)
    x = torch.rand(3, 12, requires_grad=True)
    upstream = torch.randn(2, 3)
    (full,) = torch.autograd.grad(vae.log_likelihood(x, z), x, upstream)
    (lean,) = torch.autograd.grad(vae.log_likelihood(x, z, values=False), x, upstream)
    torch.testing.assert_close(lean, full)
