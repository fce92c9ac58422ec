"""ARM and DisARM: unbiased against exact enumeration, closed-form variances at theta = 0.

Statistical checks state their false-failure rate; seeds are fixed and were not tuned.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, OneHotCategorical

import estimators
from tests.estimators.problems import (
    discrete_problem,
    standardized_errors,
    variance_se,
    z_critical,
)

ALPHA = 1e-3
REPLICATES = 20_000
CASES = [(name, s) for name in ("arm", "disarm") for s in (1, 3)]
#: Targets t of f(b) = (b - t)^2; t = 1/2 is left out (zero variance for both).
TARGETS = torch.tensor([0.0, 0.2, 0.9, 1.5], dtype=torch.float64)


@pytest.mark.parametrize(("name", "num_samples"), CASES)
def test_mean_gradient_equals_exact_gradient(name: str, num_samples: int) -> None:
    """The mean of R = 20000 estimates of the logits' and of f's own parameters' gradients is
    within z * SE of the exact (enumerated) gradient, coordinate-wise; Bonferroni over all
    coordinates of the 4 cases, family-wise false-failure rate 1e-3."""
    torch.manual_seed(0)
    problem = discrete_problem("bernoulli", REPLICATES, seed=11)
    out = estimators.get(name, num_samples=num_samples)(problem.dist, problem.f)
    out.surrogate.sum().backward()
    errors = standardized_errors(problem)
    coords = sum(e.numel() for e in errors.values())
    z = z_critical(ALPHA / len(CASES), coords)
    worst = {k: float(e.abs().max()) for k, e in errors.items()}
    assert max(worst.values()) <= z, f"standardized errors {worst} exceed z={z:.2f}"


def _theta_zero(replicates: int):
    """Bernoulli(1/2) in a [R, len(TARGETS)] batch, f(b) = (b - t)^2 with t a leaf of f."""
    logits = torch.zeros(replicates, len(TARGETS), dtype=torch.float64, requires_grad=True)
    t = TARGETS.expand(replicates, -1).clone().requires_grad_()
    return Bernoulli(logits=logits), (lambda z: (z - t) ** 2), logits, t


def test_disarm_is_exact_at_theta_zero() -> None:
    """Acceptance: at theta = 0 and f(b) = (b - t)^2, every DisARM estimate equals the true
    gradient, (1 - 2t)/4 for the logit and -(1 - 2t) for t (zero variance; deterministic)."""
    torch.manual_seed(1)
    dist, f, logits, t = _theta_zero(REPLICATES)
    estimators.get("disarm")(dist, f).surrogate.sum().backward()
    truth = (1 - 2 * TARGETS).expand(REPLICATES, -1)
    torch.testing.assert_close(logits.grad, truth / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(t.grad, -truth, rtol=0, atol=1e-12)


def test_arm_variance_at_theta_zero() -> None:
    """Acceptance: at theta = 0 and f(b) = (b - t)^2, ARM's logit estimate is
    (1 - 2t)|u - 1/2|: mean (1 - 2t)/4, variance (1 - 2t)^2/48, fourth central moment
    (1 - 2t)^4/1280. The sample mean and variance of R = 20000 estimates are within z * SE
    (SE of the sample variance from the fourth moment); Bonferroni over 2 x 4 comparisons,
    false-failure rate 1e-3. Its t-gradient is -(1 - 2t) exactly (b + b~ = 1)."""
    torch.manual_seed(2)
    dist, f, logits, t = _theta_zero(REPLICATES)
    estimators.get("arm")(dist, f).surrogate.sum().backward()
    g = logits.grad  # [R, 4]
    a = 1 - 2 * TARGETS
    mean, var, mu4 = a / 4, a**2 / 48, a**4 / 1280
    z = z_critical(ALPHA, 2 * len(TARGETS))
    for j in range(len(TARGETS)):
        se_mean = math.sqrt(float(var[j]) / REPLICATES)
        assert abs(float(g[:, j].mean() - mean[j])) <= z * se_mean
        se_var = variance_se(float(var[j]), float(mu4[j]), REPLICATES)
        assert abs(float(g[:, j].var() - var[j])) <= z * se_var, (j, float(g[:, j].var()))
    torch.testing.assert_close(t.grad, -a.expand(REPLICATES, -1), rtol=0, atol=1e-12)


def test_disarm_is_arm_rao_blackwellized() -> None:
    """With common uniforms, DisARM = E[ARM | b, b~] per logit, so the residual ARM - DisARM has
    mean 0 and is uncorrelated with DisARM; hence Var(ARM) = Var(DisARM) + E[residual^2].
    Both moments are checked within z * SE over R = 20000 pairs; Bonferroni over 2 x 3
    comparisons, false-failure rate 1e-3."""
    grads = {}
    for name in ("arm", "disarm"):
        torch.manual_seed(3)  # same uniforms for both (the problem has its own generator)
        problem = discrete_problem("bernoulli", REPLICATES, n_examples=1, seed=11)
        estimators.get(name)(problem.dist, problem.f).surrogate.sum().backward()
        grads[name] = problem.per_replicate("logits")  # [R, 3]
    residual = grads["arm"] - grads["disarm"]
    assert float(residual.abs().max()) > 0.01  # ARM really is noisier
    cross = residual * (grads["disarm"] - grads["disarm"].mean(0))
    z = z_critical(ALPHA, 2 * residual.shape[1])
    for x in (residual, cross):
        se = x.std(0) / math.sqrt(REPLICATES)
        assert (x.mean(0).abs() <= z * se).all(), (x.mean(0), se)


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_shapes_f_evals_and_family(name: str) -> None:
    """Shapes follow batch_shape, f is called once on both halves (2S rows, exact 0/1 values),
    f_evals = 2S, and ARM refuses categorical latents with a ValueError naming the family
    (DisARM takes them by stick-breaking: tests/estimators/test_categorical_estimators.py)."""
    logits = torch.randn(4, 5, requires_grad=True)
    seen = []

    def f(z):
        seen.append(z)
        return z.sum(-1)

    out = estimators.get(name, num_samples=3)(Independent(Bernoulli(logits=logits), 1), f)
    assert out.objective.shape == out.surrogate.shape == (4,)
    assert out.f_evals == 6 and len(seen) == 1 and seen[0].shape == (6, 4, 5)
    assert set(seen[0].unique().tolist()) <= {0.0, 1.0}
    if name == "arm":
        with pytest.raises(ValueError, match="categorical"):
            estimators.get(name)(OneHotCategorical(logits=torch.zeros(3)), lambda z: z.sum(-1))
