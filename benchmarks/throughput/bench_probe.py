"""Benchmark: M = 1000 gradient estimates of the encoder, batched probe vs the naive loop.

Linear VAE (784-200) at batch 100, 1 thread, for each estimator of :data:`ESTIMATORS`
(REINFORCE with a moving-average baseline, RLOO, DisARM and Gumbel-softmax on Bernoulli
latents; the reparameterization on Gaussian ones), on the available devices. The speed-up is
the ratio of the two medians of one run:
``pytest benchmarks/throughput/bench_probe.py --benchmark-enable --benchmark-json OUT.json``;
``python -m benchmarks.throughput.probe_speed`` times the two interleaved (steadier under load).
"""

from __future__ import annotations

import pytest
import torch

import estimators
from benchmarks.harness.vae import VAE
from benchmarks.probe.moments import gradient_moments, gradient_moments_loop

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

#: ``(estimator, options, family)`` of the probe benchmark.
ESTIMATORS: list[tuple[str, dict, str]] = [
    ("reinforce", {"baseline": "moving_average"}, "bernoulli"),
    ("rloo", {}, "bernoulli"),
    ("disarm", {}, "bernoulli"),
    ("gumbel_softmax", {}, "bernoulli"),
    ("reparam", {}, "gaussian"),
]


def probe_case(name: str, options: dict, family: str, device: str = "cpu"):
    """``(model, x, estimator)`` of one benchmark case (seeded)."""
    torch.manual_seed(0)
    model = VAE(784, family, "linear", 200).to(device)
    x = (torch.rand(100, 784, device=device) < 0.3).float()
    return model, x, estimators.get(name, **options).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["batched", "loop"])
@pytest.mark.parametrize(("name", "options", "family"), ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_probe_speed(benchmark, name, options, family, method: str, device: str) -> None:
    """Time M = 1000 estimates (M = 40 when benchmarks are disabled, as a smoke test)."""
    model, x, est = probe_case(name, options, family, device)
    torch.set_num_threads(1)  # 2 threads on 2 shared cores stall (see FIELD-NOTES)
    m = 1000 if benchmark.enabled else 40
    info = {"estimator": name, "method": method, "device": device, "num_estimates": m}
    benchmark.extra_info.update({**info, "threads": torch.get_num_threads()})

    def run():
        if method == "batched":
            moments = gradient_moments(model, x, est, m, chunk=50)
        else:
            moments = gradient_moments_loop(model, x, est, m)
        if device == "cuda":
            torch.cuda.synchronize()
        return moments

    moments = benchmark.pedantic(run, rounds=3 if benchmark.enabled else 1, iterations=1)
    assert int(moments.counts.sum()) == m
