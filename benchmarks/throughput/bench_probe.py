"""Benchmark: M = 1000 gradient estimates of the encoder, batched probe vs the naive loop.

Linear Bernoulli VAE (784-200) at batch 100, REINFORCE with a moving-average baseline, on
the available devices. The speed-up is the ratio of the two medians of one run:
``pytest benchmarks/throughput/bench_probe.py --benchmark-enable --benchmark-json OUT.json``.
"""

from __future__ import annotations

import pytest
import torch

import estimators
from benchmarks.harness.vae import VAE
from benchmarks.probe.moments import gradient_moments, gradient_moments_loop

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["batched", "loop"])
def test_probe_speed(benchmark, method: str, device: str) -> None:
    """Time M = 1000 estimates (M = 20 when benchmarks are disabled, as a smoke test)."""
    torch.manual_seed(0)
    model = VAE(784, "bernoulli", "linear", 200).to(device)
    x = (torch.rand(100, 784, device=device) < 0.3).float()
    est = estimators.get("reinforce", baseline="moving_average").to(device)
    torch.set_num_threads(1)  # 2 threads on 2 shared cores stall (see FIELD-NOTES)
    m = 1000 if benchmark.enabled else 40
    benchmark.extra_info.update({"method": method, "device": device, "num_estimates": m,
                                 "threads": torch.get_num_threads()})  # fmt: skip

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
