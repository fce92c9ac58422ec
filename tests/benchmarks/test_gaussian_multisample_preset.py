"""experiment=gaussian_multisample: the Rainforth et al. (2018) / Tucker et al. (2019) sweep,
and its full-scale variant."""

from __future__ import annotations

from omegaconf import OmegaConf


def test_preset_sweeps_iwae_stl_dreg_over_s_with_encoder_and_decoder_probes(make_config):
    """iwae, stl, dreg x S in {1, 5, 64} on a Gaussian VAE with f = log weights (kl sampled);
    the probe records the decoder too, and its basket is the three estimators at the run's
    own S (equal S, equal parameters); the full variant is MNIST, nonlinear, 50 latents,
    100k steps, 3 seeds."""
    cfg = make_config("experiment=gaussian_multisample", return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params["estimator"].replace(" ", "") == "iwae,stl,dreg"
    assert params["estimator.num_samples"].replace(" ", "") == "1,5,64"
    assert (cfg.model.family, cfg.model.kl, cfg.probe.decoder) == ("gaussian", "sampled", True)
    job = make_config(
        "experiment=gaussian_multisample", "estimator=stl", "estimator.num_samples=64"
    )
    basket = OmegaConf.to_container(job.probe.basket, resolve=True)
    assert basket == [{"name": n, "num_samples": 64} for n in ("iwae", "stl", "dreg")]
    full = make_config("experiment=gaussian_multisample_full", return_hydra_config=True)
    assert (full.data.name, full.model.arch, full.model.latent_dim, full.steps) == (
        "mnist", "nonlinear", 50, 100_000,
    )  # fmt: skip
    assert full.hydra.sweeper.params["seed"].replace(" ", "") == "0,1,2"
    assert full.hydra.sweeper.params["estimator"].replace(" ", "") == "iwae,stl,dreg"
