"""The VAE of the harness, importable as ``benchmarks.vae.VAE`` (a public path); it lives in
:mod:`benchmarks.harness.vae`."""

from benchmarks.harness.vae import VAE, LatentPosterior

__all__ = ["VAE", "LatentPosterior"]
