"""The reference gradient the probe compares with: exact by enumeration when the latent space
is small enough, else the mean of many estimates of a high-sample unbiased estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import estimators
from benchmarks.probe.moments import GroupedMoments, _encoder_params, gradient_moments
from estimators.exact import MAX_CONFIGS, num_configurations

#: ``auto`` references enumerate at most this many configurations per example (cost ~ C x B).
AUTO_EXACT_CONFIGS = 2**12
#: Decoder rows (configurations x examples) evaluated at once by the exact reference.
EXACT_ROWS = 2**16


@dataclass
class Reference:
    """Reference gradient ``[P]`` with per-coordinate standard errors (0 when exact) and, for a
    Monte Carlo reference, its grouped moments (for the paired jackknife)."""

    mean: Tensor
    se: Tensor
    kind: str
    moments: GroupedMoments | None = None

    def __post_init__(self) -> None:
        # Leave-one-group-out means and variances of the mean, [K+1, P] (MC references only).
        if self.moments is not None:
            mean, var, n = self.moments.leave_one_out()
            self.loo_mean, self.loo_var_of_mean = mean, var / n


def exact_reference(
    model: nn.Module, x: Tensor, kl: str = "analytic", max_configs: int = MAX_CONFIGS
) -> Reference:
    """The exact gradient of the batch-mean objective by enumerating the latent space."""
    params = [p for _, p in _encoder_params(model)]
    q = model.distribution(model.encoder(x))
    f = model.learning_signal(x, q, kl)
    chunk = max(1, EXACT_ROWS // x.shape[0])  # bounds memory: chunk x B decoder rows at once
    value = estimators.exact.expectation(q, f, max_configs, chunk_size=chunk).sum() / x.shape[0]
    grads = torch.autograd.grad(value, params)
    flat = torch.cat([g.reshape(-1) for g in grads]).double().cpu()
    return Reference(flat, torch.zeros_like(flat), "exact")


def reference_method(
    model: nn.Module, x: Tensor, method: str = "auto", max_configs: int = AUTO_EXACT_CONFIGS
) -> str:
    """What ``method`` means for ``model``: ``auto`` becomes ``exact`` when the latent space has
    at most ``max_configs`` configurations per example, else ``rloo`` for discrete and
    ``reparam`` for Gaussian latents; any other method is returned as it is."""
    if method != "auto":
        return method
    family = getattr(model, "family", None)
    enumerable = (
        family in ("bernoulli", "categorical")
        and num_configurations(model.distribution(model.encoder(x[:1]))) <= max_configs
    )
    return "exact" if enumerable else ("reparam" if family == "gaussian" else "rloo")


def reference_gradient(
    model: nn.Module,
    x: Tensor,
    *,
    kl: str = "analytic",
    method: str = "auto",
    num_samples: int = 100,
    num_estimates: int = 200,
    groups: int = 20,
    chunk: int = 50,
    max_configs: int = AUTO_EXACT_CONFIGS,
) -> Reference:
    """Reference gradient: ``exact`` (enumeration), a registry name (the mean of
    ``num_estimates`` estimates with ``num_samples`` samples each), or ``auto`` (exact when
    the latent space has at most ``max_configs`` configurations per example, else ``rloo``
    for discrete and ``reparam`` for Gaussian latents)."""
    method = reference_method(model, x, method, max_configs)
    if method == "exact":
        return exact_reference(model, x, kl, max(max_configs, MAX_CONFIGS))
    est = estimators.get(method, num_samples=num_samples)
    moments = gradient_moments(model, x, est, num_estimates, kl=kl, groups=groups, chunk=chunk)
    ref = Reference(torch.empty(0), torch.empty(0), f"{method}(S={num_samples})", moments)
    ref.mean, ref.se = ref.loo_mean[0], ref.loo_var_of_mean[0].sqrt()
    return ref
