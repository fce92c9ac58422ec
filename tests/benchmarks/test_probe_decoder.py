"""Decoder probing (``probe.decoder=true``): per-estimate decoder gradients from one backward
pass (forward hooks on the decoder's linear layers), and the rows they give."""

from __future__ import annotations

import functools

import pytest
import torch

import estimators
from benchmarks.harness.vae import VAE
from benchmarks.probe.moments import _decoder_per_estimate
from benchmarks.probe.runner import probe_basket


def _vae(arch: str) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE(5, "gaussian", arch, latent_dim=2, hidden_dim=4).double()
    x = (torch.rand(3, 5) < 0.5).double()
    return vae, x


@pytest.mark.parametrize("arch", ["linear", "nonlinear"])
@pytest.mark.parametrize("name", ["dreg", "mvd"])
def test_per_estimate_decoder_gradients_equal_separate_backward_passes(arch, name) -> None:
    """Row j of the batched decoder gradients equals the gradient of estimate j's batch-mean
    surrogate alone (same random stream replayed), for every decoder parameter."""
    vae, x = _vae(arch)
    m = 4
    est = estimators.get(name, num_samples=3)
    params = list(vae.decoder.parameters())

    def call():
        q = vae.distribution(vae.encoder(x)[:, None].expand(3, m, -1))
        f = vae.learning_signal(x[:, None], q, "sampled")
        return functools.partial(est, q, f)

    torch.manual_seed(1)
    flat, out = _decoder_per_estimate(vae, call(), m)
    assert flat.shape == (m, sum(p.numel() for p in params))
    torch.manual_seed(1)
    out = call()()
    for j in range(m):
        grads = torch.autograd.grad(out.surrogate[:, j].sum() / 3, params, retain_graph=True)
        torch.testing.assert_close(flat[j], torch.cat([g.reshape(-1) for g in grads]))


def test_probe_basket_with_decoder_adds_decoder_rows_without_bias() -> None:
    """decoder=True adds rows for param 'decoder' and each decoder tensor (variance, SNR, ...)
    and none for bias or cosine, which need a reference; encoder rows are unchanged in kind."""
    vae, x = _vae("linear")
    rows = probe_basket(
        vae, x, [("iwae", estimators.get("iwae", num_samples=2))], num_estimates=8,
        kl="sampled", groups=4, chunk=4, decoder=True,
    )  # fmt: skip
    params = {r["param"] for r in rows}
    assert {"all", "decoder", "decoder.0.weight", "decoder.0.bias"} <= params
    dec = {r["metric"] for r in rows if r["param"] == "decoder"}
    assert "grad_snr" in dec and "grad_bias2" not in dec
