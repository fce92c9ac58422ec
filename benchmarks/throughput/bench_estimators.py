"""Micro-benchmark: one gradient estimate (estimate + backward) per estimator.

Problem: a batch of 100 binarized 784-pixel examples, a linear Bernoulli decoder as f
(f(z) = log p(x | z) = -BCE(z W + c, x) summed over pixels), and latents of 200 Bernoulli units
(categorical 20 x 10 for gumbel_softmax, arsm, disarm and unordered_set, Gaussian 200 for
reparam), with S in {1, 8}
(rloo uses S = 2 in place of 1). The estimator's distribution parameters are leaves, so the
timing is the estimator's own cost plus f and its backward.

Three tests per estimator make the S = 8 cost interpretable:

- ``test_gradient_estimate[config-S]``: one call with ``S`` samples, vectorized;
- ``test_gradient_estimate_looped[config]``: the same 8 samples drawn by a Python loop of calls
  with the smallest ``S`` (what a non-vectorized estimator would cost);
- ``test_f_alone[family-S]``: f and its backward alone at ``S`` samples (gradients for W, c
  and, for pathwise estimators, z), the part of a call no estimator can avoid: its cost is
  linear in ``S`` (``S x B`` rows through a 200 x 784 matmul and 784 log-sigmoids each).

Run: ``pytest benchmarks/throughput/bench_estimators.py --benchmark-enable
--benchmark-json OUT.json`` then ``python -m benchmarks.throughput.bench_summary OUT.json``
for the S=8 / S=1 cost ratios, the vectorized / looped ratio and the split into f and the
estimator's own work.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators

BATCH, PIXELS, UNITS = 100, 784, 200
#: The vectorized call's S; S = 1 (2 for rloo) is the smallest call, and the looped test
#: makes LARGE_S / smallest calls.
LARGE_S = 8

CONFIGS = [
    ("reparam", {}, "gaussian"),
    ("reinforce", {"baseline": "none"}, "bernoulli"),
    ("reinforce", {"baseline": "moving_average"}, "bernoulli"),
    ("reinforce", {"baseline": "batch_mean"}, "bernoulli"),
    ("rloo", {}, "bernoulli"),
    ("gumbel_softmax", {"temperature": 0.5}, "categorical"),
    ("gumbel_softmax", {"temperature": 0.5, "straight_through": True}, "categorical"),
    ("gumbel_softmax", {"temperature": 0.5}, "bernoulli"),
    ("arsm", {}, "categorical"),
    ("disarm", {}, "categorical"),
    ("unordered_set", {}, "categorical"),
    ("iwae", {}, "gaussian"),
    ("stl", {}, "gaussian"),
    ("dreg", {}, "gaussian"),
    # S (3 D + 1) f-evaluations per example at 200 latents: seconds per call, so slow-marked.
    pytest.param(("mvd", {}, "gaussian"), marks=pytest.mark.slow, id="mvd-gaussian"),
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
        shape = (LARGE_S, *self.params[0].shape)  # fixed samples for f_alone (values irrelevant)
        self.samples = (torch.rand(shape, generator=g) < 0.5).float()

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

    def f_alone(self, s: int, pathwise: bool, forward_only_evals: int = 0) -> None:
        """f and its backward at ``s`` fixed samples (gradients for W, c and, if
        ``pathwise``, the samples), plus ``forward_only_evals`` more forward passes of f at
        ``s`` samples without gradient (relaxed gumbel_softmax's objective at the hard
        samples), without any estimator."""
        for p in (self.w, self.c):
            p.grad = None
        z = self.samples[:s].detach().requires_grad_(pathwise)
        (-self.f(z).sum()).backward()
        with torch.no_grad():
            for _ in range(forward_only_evals):
                self.f(self.samples[:s])


def _info(benchmark, config, s: int, kind: str) -> None:
    benchmark.extra_info.update(
        {
            "estimator": _config_id(config),
            "family": config[2],
            "num_samples": s,
            "kind": kind,
            "threads": torch.get_num_threads(),
        }
    )


@pytest.mark.parametrize("s", [1, LARGE_S])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradient_estimate(benchmark, config, s) -> None:
    """Time one estimate + backward; extra_info records estimator, family, S and kind."""
    name, opts, family = config
    est = estimators.get(name, **opts)
    s = max(s, est.min_samples)
    problem = Problem(family)
    _info(benchmark, config, s, "vectorized")
    benchmark.pedantic(problem.step, args=(est, s), rounds=30, iterations=3, warmup_rounds=3)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in problem.params)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradient_estimate_looped(benchmark, config) -> None:
    """Time LARGE_S samples drawn by a Python loop of the smallest calls (each with its
    backward): the cost a vectorized S = LARGE_S call is compared against."""
    name, opts, family = config
    est = estimators.get(name, **opts)
    s = est.min_samples
    problem = Problem(family)

    def looped() -> None:
        for _ in range(LARGE_S // s):
            problem.step(est, s)

    _info(benchmark, config, LARGE_S, "looped")
    benchmark.pedantic(looped, rounds=10, iterations=1, warmup_rounds=2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in problem.params)


@pytest.mark.parametrize("s", [1, LARGE_S])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_f_alone(benchmark, config, s) -> None:
    """Time f and its backward alone at the S of each of the estimator's calls."""
    name, opts, family = config
    est = estimators.get(name, **opts)
    s = max(s, est.min_samples)
    problem = Problem(family)
    # The f-evaluations of one call: S with a backward, the rest (relaxed gumbel_softmax's
    # objective at the hard samples) forward only.
    extra = est(problem.dist(), problem.f, num_samples=s).f_evals // s - 1
    _info(benchmark, config, s, "f_alone")
    pathwise = name in ("reparam", "gumbel_softmax", "iwae", "stl", "dreg")
    benchmark.pedantic(
        problem.f_alone, args=(s, pathwise, extra), rounds=30, iterations=3, warmup_rounds=3
    )
    assert problem.w.grad is not None and torch.isfinite(problem.w.grad).all()
