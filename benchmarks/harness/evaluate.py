"""Held-out evaluation: ELBO and IWAE bound with exact samples of q, independent of the
estimator, with evaluation noise fixed per (seed, step).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from benchmarks.harness.vae import VAE

# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: VAE, splits: dict[str, torch.Tensor], cfg: DictConfig, iwae_k: int, seed: int
) -> dict[tuple[str, str], float]:
    """ELBO and IWAE(k) per split, averaged over examples: ``{(split, metric): value}``
    (the deterministic autoencoder: ``recon_ll``, ``log p(x|enc(x))``, instead).

    Samples come from a fixed generator state (``seed`` and the step, via ``seed``) inside
    ``fork_rng``, so evaluation never perturbs the training RNG stream, and two runs at the
    same step evaluate with the same noise.
    """
    device = next(model.parameters()).device
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
            elbo = iwae = 0.0
            for xb in x.split(cfg.batch_size):
                elbo += float(model.elbo(xb, cfg.num_samples).sum())
                iwae += float(model.iwae(xb, iwae_k, cfg.chunk).sum())
            out[(split, "elbo")] = elbo / len(x)
            out[(split, "iwae")] = iwae / len(x)
    return out


def eval_seed(seed: int, step: int) -> int:
    """Seed of the evaluation at ``step`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])
