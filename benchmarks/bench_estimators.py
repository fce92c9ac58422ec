"""Micro-benchmark: one gradient estimate (estimate + backward) per estimator.

Problem: a batch of 100 binarized 784-pixel examples, a linear Bernoulli decoder as f
(f(z) = log p(x | z) = -BCE(z W + c, x) summed over pixels), and latents of 200 Bernoulli units
(categorical 20 x 10 for gumbel_softmax, Gaussian 200 for reparam), with S in {1, 8}
(rloo uses S = 2 in place of 1). The estimator's distribution parameters are leaves, so the
timing is the estimator's own cost plus f and its backward.

Run: ``pytest benchmarks/bench_estimators.py --benchmark-enable --benchmark-json OUT.json``
then ``python -m benchmarks.bench_summary OUT.json`` for the S=8 / S=1 cost ratios.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators

BATCH, PIXELS, UNITS = 100, 784, 200

CONFIGS = [
    ("reparam", {}, "gaussian"),
    ("reinforce", {"baseline": "none"}, "bernoulli"),
    ("reinforce", {"baseline": "moving_average"}, "bernoulli"),
    ("reinforce", {"baseline": "batch_mean"}, "bernoulli"),
    ("rloo", {}, "bernoulli"),
    ("gumbel_softmax", {"temperature": 0.5}, "categorical"),
    ("gumbel_softmax", {"temperature": 0.5, "straight_through": True}, "categorical"),
    ("gumbel_softmax", {"temperature": 0.5}, "bernoulli"),
]


def _config_id(config) -> str:
    name, opts, family = config
    extra = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"{name}[{extra}]-{family}" if extra else f"{name}-{family}"


class Problem:
    """Leaves of q, a linear decoder f and a fixed binary batch."""

    def __init__(self, family: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(BATCH, PIXELS, generator=g) < 0.3).float()
        self.w = (0.01 * torch.randn(UNITS, PIXELS, generator=g)).requires_grad_()
        self.c = torch.zeros(PIXELS).requires_grad_()
        self.family = family
        if family == "gaussian":
            self.params = [torch.zeros(BATCH, UNITS).requires_grad_() for _ in range(2)]
        elif family == "bernoulli":
            self.params = [torch.zeros(BATCH, UNITS).requires_grad_()]
        else:
            self.params = [torch.zeros(BATCH, 20, 10).requires_grad_()]

    def dist(self):
        if self.family == "gaussian":
            mu, log_sigma = self.params
            return Independent(Normal(mu, log_sigma.exp(), validate_args=False), 1)
        if self.family == "bernoulli":
            return Independent(Bernoulli(logits=self.params[0], validate_args=False), 1)
        return Independent(OneHotCategorical(logits=self.params[0], validate_args=False), 1)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(*z.shape[:2], UNITS)  # [S, B, 200]
        logits = z @ self.w + self.c  # [S, B, 784]
        x = self.x.expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    def step(self, est, s: int) -> None:
        for p in (*self.params, self.w, self.c):
            p.grad = None
        out = est(self.dist(), self.f, num_samples=s)
        loss = -out.surrogate.sum()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()


@pytest.mark.parametrize("s", [1, 8])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradient_estimate(benchmark, config, s) -> None:
    """Time one estimate + backward; extra_info records estimator, family, S and f_evals."""
    name, opts, family = config
    est = estimators.get(name, **opts)
    s = max(s, est.min_samples)
    problem = Problem(family)
    benchmark.extra_info.update(
        {
            "estimator": _config_id(config),
            "family": family,
            "num_samples": s,
            "threads": torch.get_num_threads(),
        }
    )
    benchmark.pedantic(problem.step, args=(est, s), rounds=30, iterations=3, warmup_rounds=3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in problem.params)
