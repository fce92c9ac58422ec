"""Per-replicate gradients of the harness's VAE in one vectorized call, and the checks of what
an estimator declares (``unbiased_for``) against a truth: shared by the VAE unbiasedness tests
(discrete families by enumeration, Gaussian by quadrature).

The R replicates run in one call: the encoder's output is repeated R times along a second
batch dimension (as the variance probe does), and per-replicate parameter gradients are read
off the gradients of the linear encoder's output and of each decoder output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import estimators
from benchmarks.harness.vae import VAE

#: Pixels and examples of the tiny linear VAEs the unbiasedness tests enumerate or integrate.
DATA_DIM = 6
EXAMPLES = 2


def tiny_data() -> Tensor:
    """``[EXAMPLES, DATA_DIM]`` fixed binary data (float64)."""
    g = torch.Generator().manual_seed(1)
    return (torch.rand(EXAMPLES, DATA_DIM, generator=g) < 0.5).double()


def linear_params(vae: VAE) -> list[Tensor]:
    """The encoder's and decoder's weight and bias of a linear VAE, in a fixed order."""
    return [vae.encoder[0].weight, vae.encoder[0].bias, vae.decoder[0].weight, vae.decoder[0].bias]


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


def _standardize(estimates: Tensor, truth: Tensor, critical: float) -> Outcome:
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    noisy = se > 0
    outcome = Outcome((mean - truth)[noisy] / se[noisy], critical)
    # A coordinate without noise must be exact (e.g. a gradient the estimator never samples).
    if not torch.allclose(mean[~noisy], truth[~noisy], rtol=1e-9, atol=1e-9):
        outcome.problems.append("a noiseless coordinate differs from the truth")
    return outcome


def check(
    estimates: Tensor, truth: Tensor, unbiased_for: str, z_of: Callable[[int], float]
) -> Outcome:
    """The check of what the estimator declares: equality, or parallel with a positive scale.

    ``direction``: each estimate is split into its coordinate along the exact gradient
    ``a_k = G_k . u`` (``u = g / |g|``) and the rest ``G_k - a_k u``; the rest's mean must be
    zero per coordinate (the Bonferroni count includes one more comparison), and the mean of
    ``a`` must exceed z standard errors: the scale is shown positive, not merely not negative
    (a failure there would mean a check without power, not a bias). ``z_of(comparisons)``
    is the critical value for that many comparisons.
    """
    coords = truth.numel()
    if unbiased_for == "gradient":
        return _standardize(estimates, truth, z_of(coords))
    assert unbiased_for == "direction"
    u = truth / truth.norm()
    along = estimates @ u  # [R]
    rest = estimates - along[:, None] * u
    outcome = _standardize(rest, torch.zeros_like(truth), z_of(coords + 1))
    positive = float(along.mean() / (along.std() / math.sqrt(along.numel())))
    if positive <= outcome.critical:
        outcome.problems.append(
            f"scale along the exact gradient not positive (z = {positive:.2f})"
        )
    return outcome
