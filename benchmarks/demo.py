"""Demo: every estimator's gradient against the exact gradient on small problems.

For each registered estimator and each family it supports, draws M independent gradient
estimates (in one vectorized call, M replicates in a batch dimension) on a small problem whose
exact gradient is known (enumeration of 2^4 Bernoulli / 3^2 categorical configurations; closed
form for the Gaussian), and prints the bias (with its standard error) and the variance.

Run: ``python -m benchmarks.demo`` (``gradbench-demo``); ``--replicates M``, ``--seed``.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators

EVENT = {"bernoulli": (4,), "categorical": (2, 3), "gaussian": (4,)}


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


def compare(name: str, family: str, m: int, seed: int) -> dict[str, object]:
    """Bias and variance of ``name``'s default configuration on the ``family`` problem."""
    build, exact = _problem(family, m, seed)
    dist, f, leaves = build(m)
    est = estimators.get(name)
    torch.manual_seed(seed)
    for _ in range(3):  # warm stateful estimators up
        est(dist, f)
    out = est(dist, f, num_samples=est.min_samples)
    loss = out.surrogate.sum()
    loss.backward()
    estimates = torch.cat([leaf.grad.reshape(m, -1) for leaf in leaves], 1)  # [M, P]
    truth = torch.cat([t.reshape(-1) for t in exact])  # [P]
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(m)
    z = ((mean - truth) / se).abs().max()
    return {
        "estimator": name,
        "family": family,
        "S": est.min_samples,
        "f_evals": out.f_evals,
        "unbiased": est.unbiased,
        "|exact grad|": float(truth.norm()),
        "|mean - exact|": float((mean - truth).norm()),
        "max |z|": float(z),
        "variance (mean over coords)": float(estimates.var(0).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table for every estimator x supported family."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=20_000, help="estimates per estimator")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [
        compare(name, family, args.replicates, args.seed)
        for name in estimators.available()
        for family in sorted(estimators.families(name))
    ]
    table = pd.DataFrame(rows)
    print(f"Gradient estimates vs exact gradients ({args.replicates} replicates each).")
    print("max |z|: largest |mean - exact| / SE over coordinates; about 4.5 or less is")
    print("consistent with no bias (Bonferroni, 1e-3); larger means a detectable bias.\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
