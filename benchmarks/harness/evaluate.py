"""Held-out evaluation: ELBO and IWAE bound with exact samples of q, independent of the
estimator.

One pass per batch of examples draws ``max(eval.num_samples, k)`` exact samples of ``q(z|x)``,
``eval.chunk`` at a time, and decodes each once: the IWAE bound uses the first ``k`` of them,
the ELBO the first ``eval.num_samples`` (the same estimator as separate draws: each sample is
an exact draw of ``q``). Chunks of about a thousand decoder rows (``eval.batch_size`` x
``eval.chunk``) stay in the CPU's cache. A run evaluates with the same noise at every step
(the caller passes one seed), so the differences along a curve are the model's, not the
noise's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from benchmarks.harness.vae import VAE

# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: VAE, splits: dict[str, Tensor], cfg: DictConfig, iwae_k: int, seed: int,
    iwae: bool = True,
) -> dict[tuple[str, str], float]:  # fmt: skip
    """ELBO (and, with ``iwae``, the IWAE(``iwae_k``) bound) per split, averaged over
    examples: ``{(split, metric): value}`` (the deterministic autoencoder: ``recon_ll``,
    ``log p(x|enc(x))``, instead).

    Samples come from a fixed generator state (``seed``) inside ``fork_rng``, so evaluation
    never perturbs the training RNG stream, and two evaluations with one seed use the same
    noise.
    """
    device = next(model.parameters()).device
    k = iwae_k if iwae else 0
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for split, x in splits.items():
            if model.family == "deterministic":  # no ELBO: the reconstruction it optimizes
                recon = sum(
                    float(model.reconstruction(xb).sum()) for xb in x.split(cfg.batch_size)
                )
                out[(split, "recon_ll")] = recon / len(x)
                continue
            elbo = bound = 0.0
            for xb in x.split(cfg.batch_size):
                e, b = bounds(model, xb, cfg.num_samples, k, cfg.chunk)
                elbo += float(e.sum())
                bound += float(b.sum()) if b is not None else 0.0
            out[(split, "elbo")] = elbo / len(x)
            if iwae:
                out[(split, "iwae")] = bound / len(x)
    return out


def bounds(
    model: VAE, x: Tensor, num_samples: int, k: int, chunk: int
) -> tuple[Tensor, Tensor | None]:
    """Per example ``[B]``: the ELBO ``mean_{s<S} log p(x|z_s) - KL(q||p)`` over the first
    ``S = num_samples`` samples, and (``k >= 1``; else None) the IWAE bound
    ``log (1/k) sum_{i<k} p(x, z_i) / q(z_i|x)`` over the first ``k``, from one set of
    ``max(S, k)`` exact samples ``z ~ q(z|x)`` drawn ``chunk`` at a time (memory
    ``O(chunk * B * D)``; the IWAE sum is a running logsumexp)."""
    q = model.encode(x)
    n = max(num_samples, k)
    ll_sum = x.new_zeros(q.batch_shape)  # [B]
    total = x.new_full(q.batch_shape, -math.inf)  # [B]
    for start in range(0, n, chunk):
        z = q.sample((min(chunk, n - start),))  # [c, B, *event]
        ll = log_likelihood(model, x, z)  # [c, B]
        if start < num_samples:
            ll_sum += ll[: num_samples - start].sum(0)
        if start < k:
            log_w = (ll + model.log_prior(z) - q.log_prob(z))[: k - start]  # [c', B]
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
    elbo = ll_sum / num_samples - model.kl(q)
    return elbo, (total - math.log(k) if k else None)


def log_likelihood(model: VAE, x: Tensor, z: Tensor) -> Tensor:
    """``log p(x|z) = sum_d x_d l_d - softplus(l_d)`` with pixel logits ``l = W h + b`` of the
    decoder's last layer: ``[*S, B]``, the value of :meth:`VAE.log_likelihood` (up to float
    rounding) for less work.

    ``sum_d x_d l_d = h . (x W) + x . b`` takes a product with the ``[B, H]`` matrix ``x W``
    instead of a pass over the ``[*S, B, D]`` logits, and one fused ``softplus`` replaces
    ``binary_cross_entropy_with_logits``'s several passes.
    """
    if model.family == "categorical":
        z = z.flatten(-2)  # [*S, B, L * C]
    last = model.decoder[-1]
    h = model.decoder[:-1](z)  # [*S, B, H] (the linear decoder: z itself)
    logits = F.linear(h, last.weight, last.bias)  # [*S, B, D]
    data_term = (h * (x @ last.weight)).sum(-1) + x @ last.bias  # [*S, B]
    return data_term - F.softplus(logits).sum(-1)


def eval_seed(seed: int, step: int) -> int:
    """A seed derived from the run's ``seed`` and ``step`` (the evaluation uses step 0's at
    every step; the probe its own per step)."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])
