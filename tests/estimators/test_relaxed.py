"""Gumbel-softmax: its known bias, its limit, hard-sample objective and numerical guards."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, OneHotCategorical

import estimators
from tests.estimators.moments import logistic_moments, sigmoid
from tests.estimators.problems import z_critical

THETA, T = 0.4, 0.35
P = float(sigmoid(THETA))
EXACT = P * (1 - P) * (1 - 2 * T)  # d/dtheta E[(b - t)^2] = p (1 - p) ((1-t)^2 - t^2)
TAUS = (2.0, 1.0, 0.5, 0.25, 0.1)
R = 200_000


def _expected_relaxed_gradient(tau: float, straight_through: bool = False) -> float:
    """E[g] for g = 2 (y or hard(y) - t) y (1 - y) / tau, y = sigmoid((theta + L)/tau)."""

    def g(noise):
        y = sigmoid((THETA + noise) / tau)
        value = (y > 0.5).astype(float) if straight_through else y
        return 2 * (value - T) * y * (1 - y) / tau

    return logistic_moments(g).mean


def test_relaxed_bias_shrinks_as_temperature_falls() -> None:
    """The exact bias of the relaxed estimator vanishes at rate O(tau) as tau -> 0: each
    halving of tau below 0.1 at least roughly halves |bias| (ratio <= 0.6), and at tau = 0.01
    it is below 1% of the gradient. (Above tau ~ 0.7 the bias has the other sign, so it is not
    monotone over all tau; the MC test below pins its value at each tau.)"""
    taus = (0.1, 0.05, 0.025, 0.0125)
    biases = [abs(_expected_relaxed_gradient(tau) - EXACT) for tau in taus]
    assert all(b <= 0.6 * a for a, b in itertools.pairwise(biases)), biases
    assert abs(_expected_relaxed_gradient(0.01) - EXACT) < 0.01 * abs(EXACT)


@pytest.mark.parametrize("straight_through", [False, True])
def test_mean_gradient_equals_its_known_biased_expectation(straight_through: bool) -> None:
    """At each temperature the Monte Carlo mean equals the quadrature expectation of the
    relaxed (or straight-through) gradient within z*SE (family-wise rate 1e-3 over taus);
    a wrong temperature scaling or a wrong relaxation fails this."""
    z = z_critical(1e-3, 2 * len(TAUS))
    for tau in TAUS:
        torch.manual_seed(5)
        theta = torch.full((R,), THETA, dtype=torch.float64, requires_grad=True)
        est = estimators.get("gumbel_softmax", temperature=tau, straight_through=straight_through)
        est(Bernoulli(logits=theta), lambda b: (b - T) ** 2).surrogate.sum().backward()
        g = theta.grad
        se = float(g.std() / math.sqrt(R))
        expected = _expected_relaxed_gradient(tau, straight_through)
        assert abs(float(g.mean()) - expected) <= z * se, (tau, float(g.mean()), expected)


def test_objective_uses_hard_samples_and_counts_both_evaluations() -> None:
    """The objective is f at exact one-hot samples; f_evals counts the relaxed and hard calls."""
    logits = torch.randn(4, 2, 5, requires_grad=True)
    dist = Independent(OneHotCategorical(logits=logits), 1)
    seen = []

    def f(z):
        seen.append(z.detach())
        return z[..., 0].sum(-1)

    out = estimators.get("gumbel_softmax", temperature=0.7)(dist, f, num_samples=3)
    relaxed, hard = seen
    assert not torch.all((relaxed == 0) | (relaxed == 1))
    assert torch.all((hard == 0) | (hard == 1)) and torch.all(hard.sum(-1) == 1)
    assert hard.argmax(-1).equal(relaxed.argmax(-1))
    assert torch.allclose(out.objective, hard[..., 0].sum(-1).mean(0))
    assert out.f_evals == 6


def test_objective_not_wanted_skips_only_the_hard_evaluation() -> None:
    """With ``objective_wanted = False`` the relaxed estimator calls ``f`` once (relaxed
    samples), returns a NaN objective, and gives the same surrogate, gradient, f_evals and
    generator state as the full call from the same seed."""
    results = []
    for wanted in (True, False):
        logits = torch.linspace(-1.0, 1.0, 10).reshape(2, 5).requires_grad_()
        dist = Independent(OneHotCategorical(logits=logits), 1)
        calls = []

        def f(z, calls=calls):
            calls.append(z.detach())
            return (z[..., 0] * torch.arange(1.0, 3.0)).sum(-1)

        est = estimators.get("gumbel_softmax", temperature=0.7)
        est.objective_wanted = wanted
        torch.manual_seed(5)
        out = est(dist, f, num_samples=3)
        out.surrogate.sum().backward()
        results.append((out, logits.grad, torch.rand(1), len(calls)))
    (full, grad_full, next_full, n_full), (lean, grad_lean, next_lean, n_lean) = results
    assert (n_full, n_lean) == (2, 1)
    assert torch.isnan(lean.objective).all() and lean.objective.shape == full.objective.shape
    assert not torch.isnan(full.objective).any()
    assert torch.equal(lean.surrogate, full.surrogate) and torch.equal(grad_lean, grad_full)
    assert lean.f_evals == full.f_evals == 6 and torch.equal(next_lean, next_full)


def test_straight_through_forward_is_hard_and_backward_is_relaxed() -> None:
    """With straight_through, f sees exact one-hot values and gradients still reach logits."""
    logits = torch.randn(6, 4, requires_grad=True)
    seen = []

    def f(z):
        seen.append(z.detach())
        return (z * torch.arange(4.0)).sum(-1)

    est = estimators.get("gumbel_softmax", temperature=0.5, straight_through=True)
    out = est(OneHotCategorical(logits=logits), f, num_samples=2)
    (hard,) = seen
    assert torch.all((hard == 0) | (hard == 1)) and out.f_evals == 2
    out.surrogate.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
@pytest.mark.parametrize(
    ("scale", "tau", "dtype"),
    [(1e4, 1.0, torch.float32), (3.0, 1e-4, torch.float32), (30.0, 0.05, torch.float16)],
    ids=["huge-logits", "tiny-temperature", "float16"],
)
def test_no_nan_in_known_gumbel_failure_cases(family, scale, tau, dtype) -> None:
    """Huge logits, tiny temperatures and float16 logits give finite values and gradients."""
    torch.manual_seed(0)
    base = (torch.randn(64, 3, 4) * scale).to(dtype).requires_grad_()
    for st in (False, True):
        dist = (
            Independent(Bernoulli(logits=base, validate_args=False), 2)
            if family == "bernoulli"
            else Independent(OneHotCategorical(logits=base, validate_args=False), 1)
        )
        est = estimators.get("gumbel_softmax", temperature=tau, straight_through=st)
        out = est(dist, lambda z: (z.float() ** 2).flatten(2).sum(-1) * 0.5, num_samples=4)
        assert torch.isfinite(out.surrogate).all() and torch.isfinite(out.objective).all()
        (grad,) = torch.autograd.grad(out.surrogate.sum(), base)
        assert torch.isfinite(grad).all()


def test_uniform_draws_of_exactly_zero_or_one_stay_finite(monkeypatch) -> None:
    """log(0) guard: uniforms of exactly 0 or 1 (possible in float32 rand) give finite output."""
    real_rand = torch.rand
    for value in (0.0, 1.0):
        monkeypatch.setattr(
            torch, "rand", lambda *a, v=value, **k: torch.full_like(real_rand(*a, **k), v)
        )
        for dist in (
            Bernoulli(logits=torch.zeros(5, requires_grad=True)),
            OneHotCategorical(logits=torch.zeros(5, 3, requires_grad=True)),
        ):
            out = estimators.get("gumbel_softmax", temperature=0.5)(dist, lambda z: z.sum())
            assert torch.isfinite(out.surrogate).all()


def test_temperature_is_checkpointed_and_schedulable() -> None:
    """The temperature lives in a buffer: a schedule updates it in place; state_dict has it."""
    est = estimators.get("gumbel_softmax", temperature=1.0)
    est.temperature.fill_(0.3)
    other = estimators.get("gumbel_softmax", temperature=1.0)
    other.load_state_dict(est.state_dict())
    assert float(other.temperature) == pytest.approx(0.3)
