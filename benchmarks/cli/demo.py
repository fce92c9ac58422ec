"""Demo: every estimator's gradient against the gradient it should average to, on small problems.

For each registered estimator and each family it supports (and NVIL with ``normalize``), draws
M independent gradient estimates (in one vectorized call, M replicates in a batch dimension) on
a small problem and compares their mean with the *truth* the estimator declares
(``unbiased_for``), named in each row:

- ``grad E_q[f]``: the gradient of the expectation, exact by enumeration (2^4 Bernoulli / 3^2
  categorical configurations) or in closed form (Gaussian); biased estimators are shown against
  it too, so their bias is visible;
- ``grad IWAE_S``: for VIMCO, the gradient of the S-sample bound ``E log mean_s exp f(z_s)``,
  exact by enumerating S-tuples of configurations (Gaussian: a Monte Carlo reference of
  reparameterized gradients of the bound, whose standard error enters the z-score);
- ``direction of grad E_q[f]``: for NVIL with ``normalize``, whose mean is the gradient times
  a positive scale; the row tests the mean's component orthogonal to the gradient.

Prints the bias (as a z-score) and the variance. Run: ``python -m benchmarks.cli.demo``
(``gradbench-demo``); ``--replicates M`` (>= 2), ``--seed`` (>= 0).
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators
from benchmarks.report.tables import markdown_table

EVENT = {"bernoulli": (4,), "categorical": (2, 3), "gaussian": (4,)}
#: Option variants shown besides each estimator's defaults.
VARIANTS: list[tuple[str, dict[str, object]]] = [("nvil", {"normalize": True})]
#: Monte Carlo references (Gaussian VIMCO) average this many times M estimates.
REFERENCE_FACTOR = 4
DECLARED = {"gradient": "unbiased", "direction": "unbiased up to scale", "none": "biased"}


def _problem(family: str, m: int, seed: int):
    """Leaves with M replicates, an objective with its own parameters, and exact gradients."""
    g = torch.Generator().manual_seed(seed)
    event = EVENT[family]
    units = math.prod(event)
    theta0 = torch.randn(event, generator=g, dtype=torch.float64)
    w0 = torch.randn(units, generator=g, dtype=torch.float64)
    target = torch.rand(units, generator=g, dtype=torch.float64)

    def build(r: int):
        theta = theta0.expand(r, *event).clone().requires_grad_()
        w = w0.expand(r, units).clone().requires_grad_()
        if family == "bernoulli":
            dist = Independent(Bernoulli(logits=theta), 1)
        elif family == "categorical":
            dist = Independent(OneHotCategorical(logits=theta), 1)
        else:
            dist = Independent(Normal(theta, 1.0), 1)

        def f(z):  # [S, R, *event] -> [S, R]; quadratic (Gaussian) or nonlinear (discrete)
            flat = z.reshape(*z.shape[:2], units)
            if family == "gaussian":
                return -(((flat - target) ** 2) * w.exp()).sum(-1)
            return torch.tanh((flat * w).sum(-1) - 1.0) + ((flat - target) ** 2).sum(-1)

        return dist, f, [theta, w]

    if family == "gaussian":  # E f = -sum e^w ((theta - target)^2 + 1)
        exact = [-2 * w0.exp() * (theta0 - target), -w0.exp() * ((theta0 - target) ** 2 + 1)]
    else:
        dist1, f1, leaves1 = build(1)
        _, grads = estimators.exact.gradient(dist1, f1, leaves1)
        exact = [gr[0] for gr in grads]
    return build, exact


def _truth(family: str, est: estimators.EstimatorBase, build, exact, m: int):
    """What the estimator's mean is compared with: ``(label, truth [P], standard error [P])``."""
    s = est.min_samples
    if est.objective_kind != "iwae":
        truth = torch.cat([t.reshape(-1) for t in exact])
        label = "grad E_q[f]" if est.unbiased_for != "direction" else "direction of grad E_q[f]"
        return label, truth, torch.zeros_like(truth)
    if family != "gaussian":
        dist1, f1, leaves1 = build(1)
        _, grads = estimators.exact.iwae_gradient(dist1, f1, s, leaves1)
        truth = torch.cat([g[0].reshape(-1) for g in grads])
        return f"grad IWAE_{s}", truth, torch.zeros_like(truth)
    # No enumeration for Gaussians: reparameterized gradients of the bound, averaged.
    r = REFERENCE_FACTOR * m
    dist, f, leaves = build(r)
    bound = torch.logsumexp(f(dist.rsample((s,))), 0) - math.log(s)  # [r]
    bound.sum().backward()
    estimates = torch.cat([leaf.grad.reshape(r, -1) for leaf in leaves], 1)  # [r, P]
    return f"grad IWAE_{s} (MC ref.)", estimates.mean(0), estimates.std(0) / math.sqrt(r)


def compare(name: str, options: dict, family: str, m: int, seed: int) -> dict[str, object]:
    """Bias and variance of ``name`` with ``options`` on the ``family`` problem, against the
    gradient it declares to be unbiased for."""
    build, exact = _problem(family, m, seed)
    est = estimators.get(name, **options)
    torch.manual_seed(seed)
    label, truth, truth_se = _truth(family, est, build, exact, m)
    dist, f, leaves = build(m)
    for _ in range(3):  # warm stateful estimators up
        est(dist, f)
    out = est(dist, f, num_samples=est.min_samples)
    loss = out.surrogate.sum()
    loss.backward()
    estimates = torch.cat([leaf.grad.reshape(m, -1) for leaf in leaves], 1)  # [M, P]
    norm = float(truth.norm())
    if est.unbiased_for == "direction":
        # Only the component orthogonal to the truth must vanish (the scale is free).
        u = truth / truth.norm()
        estimates = estimates - (estimates @ u)[:, None] * u
        truth = torch.zeros_like(truth)
    mean = estimates.mean(0)
    se = (estimates.var(0) / m + truth_se**2).sqrt()
    z = ((mean - truth) / se).abs().max()
    options_text = ", ".join(f"{k}={v}" for k, v in options.items())
    return {
        "estimator": f"{name} ({options_text})" if options else name,
        "family": family,
        "S": est.min_samples,
        "f_evals": out.f_evals,
        "declared": DECLARED[est.unbiased_for],
        "truth": label,
        "|truth|": norm,
        "|mean - truth|": float((mean - truth).norm()),
        "max |z|": float(z),
        "variance (mean over coords)": float(estimates.var(0).mean()),
    }


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``; else argparse's one-line error, which names
    the option, with the allowed values (exit status 2, no traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}; allowed: an integer >= {minimum}"
            )
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table for every estimator x supported family."""
    parser = argparse.ArgumentParser(prog="gradbench-demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--replicates", type=_at_least(2), default=20_000, help="estimates per estimator (>= 2)"
    )
    parser.add_argument("--seed", type=_at_least(0), default=0, help="(>= 0)")
    args = parser.parse_args(argv)
    cases = [(name, {}) for name in estimators.available()] + VARIANTS
    rows = [
        compare(name, options, family, args.replicates, args.seed)
        for name, options in sorted(cases, key=lambda c: (c[0], sorted(c[1].items())))
        for family in sorted(estimators.families(name))
    ]
    table = pd.DataFrame(rows)
    print(f"Gradient estimates vs the truth of each row ({args.replicates} replicates each).")
    print("truth: what the mean estimate should equal if the declared property holds (exact")
    print("unless marked MC ref.); for 'unbiased up to scale', the mean's part orthogonal to it.")
    print("max |z|: largest |mean - truth| / SE over coordinates; about 4.5 or less is")
    print("consistent with the declared property (Bonferroni, 1e-3); larger means a detectable")
    print("bias, as expected for the rows declared biased.\n")
    print(markdown_table(table, floatfmt=".4g"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
