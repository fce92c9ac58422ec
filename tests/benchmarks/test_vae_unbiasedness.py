"""Unbiasedness on the harness's own VAE: every unbiased estimator x discrete family x KL mode.

Gradient estimates go through :meth:`benchmarks.vae.VAE.learning_signal` as training computes
them, on a tiny linear VAE whose latent space is enumerable (3 Bernoulli bits: 8
configurations; 2 categorical variables of 3 classes: 9), and are compared with the exact
gradient by enumeration (:mod:`estimators.exact`) for the encoder's *and* the decoder's
parameters. What each estimator is held to is what it declares (``unbiased_for``):

- ``gradient``: the mean of R independent estimates equals the exact gradient of
  ``E_q[f]`` (of the S-sample bound ``E log mean_s exp f(z_s)`` for VIMCO) within z * SE per
  coordinate;
- ``direction`` (NVIL with ``normalize``): the mean, minus its projection on the exact
  gradient, is zero within z * SE per coordinate, and the projection is positive.

z is a Bonferroni bound over all coordinates of all cases of this module: family-wise
false-failure rate ALPHA = 1e-3. Seeds are fixed and were not chosen to make anything pass.
Negative controls (a piecewise-constant categorical log q, Gumbel-softmax at temperature 1)
must fail the same checks, which shows that they have power.

The R replicates run in one vectorized call: the encoder's output is repeated R times along
a second batch dimension (as the variance probe does), and per-replicate parameter gradients
are read off the gradients of the linear encoder's output and of each decoder output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor
from torch.distributions import Independent

import estimators
from benchmarks.harness.vae import VAE, LatentPosterior
from estimators.baselines import debiased
from tests.estimators.problems import z_critical

ALPHA = 1e-3
REPLICATES = 20_000
DATA_DIM = 6
EXAMPLES = 2
KL_MODES = ("analytic", "sampled")
#: Option variants per estimator (default options otherwise).
VARIANTS: dict[str, list[dict]] = {"nvil": [{}, {"normalize": True, "decay": 0.5}]}


def _cases() -> list[tuple[str, dict, str, str]]:
    cases = []
    for name in estimators.available():
        for opts in VARIANTS.get(name, [{}]):
            if estimators.get(name, **opts).unbiased_for == "none":
                continue
            for family in sorted(estimators.families(name) & {"bernoulli", "categorical"}):
                cases.extend((name, opts, family, kl) for kl in KL_MODES)
    return cases


CASES = _cases()
#: Estimators whose cases take several seconds each here (set integrals for 2 x 20000
#: examples): slow; tests/estimators/test_categorical_estimators.py checks them by default.
SLOW = {"unordered_set"}


def _id(case: tuple[str, dict, str, str]) -> str:
    name, opts, family, kl = case
    return "-".join([name, *(f"{k}={v}" for k, v in opts.items()), family, kl])


def _z(coords: int) -> float:
    return z_critical(ALPHA / len(CASES), coords)


def _vae(family: str) -> VAE:
    torch.manual_seed(0)
    latent = 3 if family == "bernoulli" else 2
    vae = VAE(DATA_DIM, family, "linear", latent_dim=latent, n_categories=3).double()
    with torch.no_grad():  # a sharper decoder: f varies more between configurations
        vae.decoder[0].weight.mul_(3.0)
    return vae


def _data() -> Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(EXAMPLES, DATA_DIM, generator=g) < 0.5).double()


def _params(vae: VAE) -> list[Tensor]:
    return [vae.encoder[0].weight, vae.encoder[0].bias, vae.decoder[0].weight, vae.decoder[0].bias]


def exact_gradient(vae: VAE, x: Tensor, kl: str, est: estimators.EstimatorBase) -> Tensor:
    """Exact gradient ``[P]`` of the summed objective the estimator targets."""
    q = vae.encode(x)
    f = vae.learning_signal(x, q, kl)
    if est.objective_kind == "iwae":
        _, grads = estimators.exact.iwae_gradient(q, f, est.num_samples, _params(vae))
    else:
        _, grads = estimators.exact.gradient(q, f, _params(vae))
    return torch.cat([g.reshape(-1) for g in grads])


def replicate_gradients(
    vae: VAE, x: Tensor, kl: str, est: estimators.EstimatorBase, replicates: int
) -> Tensor:
    """``[R, P]``: R independent estimates of the gradient of ``sum_n E_q[f_n]`` (one call)."""
    n, d = x.shape
    head = vae.encoder(x).detach()  # [N, H]
    head_rep = head[:, None].expand(n, replicates, head.shape[-1]).clone().requires_grad_()
    calls: list[tuple[Tensor, Tensor]] = []  # (input, output) of each decoder call

    def keep(module, inputs, output) -> None:
        if output.requires_grad:
            output.retain_grad()
            calls.append((inputs[0].detach(), output))

    handle = vae.decoder[0].register_forward_hook(keep)
    try:
        q = vae.distribution(head_rep)  # batch [N, R]
        f = vae.learning_signal(x[:, None], q, kl)
        context = x[:, None].expand(n, replicates, d)
        est(q, f, context=context).surrogate.sum().backward()
    finally:
        handle.remove()
    g = head_rep.grad  # [N, R, H]; the linear encoder's output is x W^T + b
    enc_w, enc_b = torch.einsum("nrh,nd->rhd", g, x), g.sum(0)
    dec_w = x.new_zeros(replicates, *vae.decoder[0].weight.shape)
    dec_b = x.new_zeros(replicates, d)
    for inp, out in calls:
        if out.grad is None:
            continue
        go = out.grad.reshape(-1, n, replicates, d)  # [K, N, R, D]
        gi = inp.reshape(-1, n, replicates, inp.shape[-1])  # [K, N, R, Z]
        dec_w += torch.einsum("knro,knri->roi", go, gi)
        dec_b += go.sum((0, 1))
    parts = (enc_w, enc_b, dec_w, dec_b)
    return torch.cat([p.reshape(replicates, -1) for p in parts], 1)


@dataclass
class Outcome:
    """One check: standardized errors ``z_scores`` over the noisy coordinates, against
    ``critical``, and what else failed (``problems``)."""

    z_scores: Tensor
    critical: float
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and float(self.z_scores.abs().max()) <= self.critical

    def describe(self) -> str:
        worst = float(self.z_scores.abs().max())
        return "; ".join(
            [f"max |z| = {worst:.2f} against z = {self.critical:.2f}", *self.problems]
        )


def _standardize(estimates: Tensor, truth: Tensor, coords: int) -> Outcome:
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    noisy = se > 0
    outcome = Outcome((mean - truth)[noisy] / se[noisy], _z(coords))
    # A coordinate without noise must be exact (e.g. a gradient the estimator never samples).
    if not torch.allclose(mean[~noisy], truth[~noisy], rtol=1e-9, atol=1e-9):
        outcome.problems.append("a noiseless coordinate differs from the truth")
    return outcome


def check(estimates: Tensor, truth: Tensor, unbiased_for: str) -> Outcome:
    """The check of what the estimator declares: equality, or parallel with a positive scale.

    ``direction``: each estimate is split into its coordinate along the exact gradient
    ``a_k = G_k . u`` (``u = g / |g|``) and the rest ``G_k - a_k u``; the rest's mean must be
    zero per coordinate (the Bonferroni count includes one more comparison), and the mean of
    ``a`` must exceed z standard errors: the scale is shown positive, not merely not negative
    (a failure there would mean a check without power, not a bias).
    """
    coords = truth.numel()
    if unbiased_for == "gradient":
        return _standardize(estimates, truth, coords)
    assert unbiased_for == "direction"
    u = truth / truth.norm()
    along = estimates @ u  # [R]
    rest = estimates - along[:, None] * u
    outcome = _standardize(rest, torch.zeros_like(truth), coords + 1)
    positive = float(along.mean() / (along.std() / math.sqrt(along.numel())))
    if positive <= outcome.critical:
        outcome.problems.append(
            f"scale along the exact gradient not positive (z = {positive:.2f})"
        )
    return outcome


def run_case(name: str, opts: dict, family: str, kl: str, seed: int = 2) -> Outcome:
    vae, x = _vae(family), _data()
    est = estimators.get(name, **opts)
    torch.manual_seed(seed)
    truth = exact_gradient(vae, x, kl, est)
    est.train()
    for _ in range(5):  # move running averages (baselines, NVIL's scale) off their start
        small = vae.distribution(vae.encoder(x)[:, None].expand(EXAMPLES, 64, -1))
        ctx = x[:, None].expand(EXAMPLES, 64, DATA_DIM)
        est(small, vae.learning_signal(x[:, None], small, kl), context=ctx)
    est.eval()  # state frozen: every replicate sees the same baseline and scale
    if getattr(est, "normalize", False):
        # Power against a partial rescaling (only the score term divided) needs s > 1.
        scale = float(debiased(est.var, est.count, est.decay).sqrt())
        assert scale > 1.5, f"NVIL's running scale {scale:.2f} is too close to 1"
    estimates = replicate_gradients(vae, x, kl, est, REPLICATES).detach()
    return check(estimates, truth, est.unbiased_for)


@pytest.mark.parametrize(
    ("name", "opts", "family", "kl"),
    [pytest.param(*c, marks=pytest.mark.slow) if c[0] in SLOW else c for c in CASES],
    ids=[_id(c) for c in CASES],
)
def test_mean_gradient_on_the_vae_is_what_the_estimator_declares(
    name: str, opts: dict, family: str, kl: str
) -> None:
    """Through VAE.learning_signal (kl analytic and sampled), the mean of R = 20000 estimates
    of the encoder's and decoder's gradients equals the exact gradient (of the IWAE bound for
    VIMCO), or is parallel to it with a positive scale for unbiased_for="direction"."""
    outcome = run_case(name, opts, family, kl)
    assert outcome.passed, outcome.describe()


@pytest.mark.parametrize("kl", KL_MODES)
def test_gumbel_softmax_fails_both_checks_on_the_vae(kl: str) -> None:
    """Negative control: Gumbel-softmax at temperature 1 on the categorical VAE fails the
    equality check and the direction check (same R, same z)."""
    for unbiased_for in ("gradient", "direction"):
        vae, x = _vae("categorical"), _data()
        est = estimators.get("gumbel_softmax", temperature=1.0)
        torch.manual_seed(2)
        truth = exact_gradient(vae, x, kl, est)
        estimates = replicate_gradients(vae, x, kl, est, REPLICATES).detach()
        assert not check(estimates, truth, unbiased_for).passed, unbiased_for


def test_piecewise_constant_categorical_log_q_makes_rebar_fail(monkeypatch) -> None:
    """Negative control: with torch's OneHotCategorical.log_prob for log q (log pi[argmax z]
    on relaxed samples, as before the continuous extension) REBAR's mean gradient on the
    categorical VAE with kl=sampled fails the equality check."""
    monkeypatch.setattr(LatentPosterior, "log_prob", Independent.log_prob)
    outcome = run_case("rebar", {}, "categorical", "sampled")
    assert not outcome.passed, outcome.describe()
