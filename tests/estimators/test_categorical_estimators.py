"""ARSM, categorical DisARM (stick-breaking) and the unordered set estimator: their pieces
against brute force and exact laws, and (fast, in the default run) their unbiasedness.

Statistical checks state their false-failure rate; seeds are fixed and were not tuned.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent, OneHotCategorical

import estimators
from estimators.relaxed import perturb
from estimators.stick_breaking import first_success, stick_breaking_logits
from estimators.unordered_set import set_log_ratios, stochastic_beam_search
from tests.estimators.problems import discrete_problem, standardized_errors, z_critical

ALPHA = 1e-3


def _objective(w: torch.Tensor):
    """f(z) = tanh(sum z * w) per example, for one-hot z ``[N, B, K, C]``."""
    return lambda z: torch.tanh((z * w).sum((-1, -2)))


def _arsm_by_loops(phi: torch.Tensor, g: torch.Tensor, f) -> tuple[torch.Tensor, list]:
    """ARSM's logit gradient from Gumbel noise ``g [S, B, K, C]`` (log pi = -g + const),
    written from the paper's formula with loops over the swaps, and each example's set of
    distinct pseudo actions that are none of its S true samples."""
    s_count, b, _, c = g.shape
    grad = torch.zeros_like(phi)
    distinct: list[set] = [set() for _ in range(b)]
    true = (phi + g).argmax(-1)  # [S, B, K]
    samples = [{tuple(true[s, e].tolist()) for s in range(s_count)} for e in range(b)]
    for s in range(s_count):
        values = torch.zeros(b, c, c, dtype=phi.dtype)
        for m, j in itertools.product(range(c), repeat=2):
            swapped = g[s].clone()
            swapped[..., [m, j]] = swapped[..., [j, m]]
            z = (phi + swapped).argmax(-1)  # argmin(log pi^{m<>j} - phi)
            values[:, m, j] = f(F.one_hot(z, c).to(phi.dtype)[None])[0]
            for e in range(b):
                distinct[e].add(tuple(z[e].tolist()))
        pi = torch.softmax(-g[s], -1)
        for cls, j in itertools.product(range(c), repeat=2):
            centered = values[:, cls, j] - values[:, :, j].mean(1)  # [B]
            grad[:, :, cls] += centered[:, None] * (1.0 / c - pi[:, :, j])
    return grad / s_count, [d - t for d, t in zip(distinct, samples, strict=True)]


def test_arsm_replays_the_papers_formula_and_evaluates_distinct_pseudo_actions() -> None:
    """From the same Dirichlet (Gumbel) draws, ARSM's logit gradient equals the paper's
    formula written with loops, and f_evals = S + the largest number of distinct pseudo
    actions (other than the true samples) of an example in the batch: f sees each of them
    once per example (with at most padding rows repeating the first sample)."""
    torch.manual_seed(0)
    b, k, c, s = 6, 3, 4, 2
    phi = torch.log_softmax(torch.randn(b, k, c, dtype=torch.float64), -1)
    phi[0] = torch.log_softmax(torch.tensor([8.0, 0, 0, 0], dtype=torch.float64), -1)
    w = torch.randn(k, c, dtype=torch.float64)
    torch.manual_seed(1)
    g = perturb(torch.zeros_like(phi), "categorical", (s,))
    expected, distinct = _arsm_by_loops(phi, g, _objective(w))
    leaf = phi.clone().requires_grad_()
    seen = []

    def f(z):
        seen.append(z.detach())
        return _objective(w)(z)

    torch.manual_seed(1)
    out = estimators.get("arsm", num_samples=s)(Independent(OneHotCategorical(logits=leaf), 1), f)
    out.surrogate.sum().backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)
    width = max(len(d) for d in distinct)
    assert out.f_evals == s + width and [t.shape[0] for t in seen] == [s, width]
    assert width < s * c * (c - 1) // 2  # duplicates were skipped (the peaked example)
    for e in range(b):
        rows = {tuple(r.argmax(-1).tolist()) for r in seen[1][:, e]}
        assert distinct[e] <= rows and len(rows - distinct[e]) <= 1  # at most the padding


def test_stick_breaking_chains_give_the_categorical() -> None:
    """sigma(alpha_c) prod_{i<c} (1 - sigma(alpha_i)) = pi_c for every class (the last one:
    prod of all 1 - sigma), and first_success reads the first 1 (the last class if none)."""
    logits = torch.randn(5, 6, dtype=torch.float64)
    sig = torch.sigmoid(stick_breaking_logits(logits))  # [5, 5]
    keep = torch.cumprod(torch.cat([torch.ones(5, 1, dtype=sig.dtype), 1 - sig], -1), -1)
    probs = torch.cat([sig, torch.ones(5, 1, dtype=sig.dtype)], -1) * keep
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    bits = torch.tensor([[0.0, 1, 1], [0, 0, 0], [1, 0, 0]])
    assert first_success(bits).tolist() == [1, 3, 0]


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_disarm_and_unordered_set_unbiased_fast(family: str) -> None:
    """The default run's check of the new estimators (the 20000-replicate ones are slow): mean
    of R = 4000 estimates within z * SE of the exact gradient, every coordinate of q's and f's
    parameters; Bonferroni over all coordinates of the 4 cases, false-failure rate 1e-3."""
    cases = [("unordered_set", {"num_samples": 3})]
    if family == "categorical":
        cases += [("disarm", {}), ("arsm", {})]
    for name, opts in cases:
        torch.manual_seed(5)
        problem = discrete_problem(family, 4000, seed=7)
        estimators.get(name, **opts)(problem.dist, problem.f).surrogate.sum().backward()
        errors = standardized_errors(problem)
        z = z_critical(ALPHA / 4, sum(e.numel() for e in errors.values()))
        worst = max(float(e.abs().max()) for e in errors.values())
        assert worst <= z, (name, worst, z)


def _set_probability(p: list[float]) -> float:
    """p(S) of an unordered set drawn without replacement: the sum over its orderings."""
    total = 0.0
    for order in itertools.permutations(range(len(p))):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        total += prob
    return total


def test_stochastic_beam_search_draws_sets_with_their_exact_probability() -> None:
    """Over N = 20000 draws of k = 3 configurations of 2 categorical variables (9
    configurations), each unordered set's frequency is within z * SE of its exact probability
    (the sum over its orderings); Bonferroni over the 84 sets, false-failure rate 1e-3."""
    torch.manual_seed(3)
    logp = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    n = 20_000
    codes, log_p = stochastic_beam_search(logp.expand(n, 2, 3), 3)
    assert codes.shape == (n, 3, 2)
    index = codes[..., 0] * 3 + codes[..., 1]  # [N, 3]
    joint = (logp[0][:, None] + logp[1][None]).reshape(9)
    torch.testing.assert_close(log_p, joint[index])
    keys = index.sort(-1).values
    z = z_critical(ALPHA, 84)
    for subset in itertools.combinations(range(9), 3):
        truth = _set_probability(joint[list(subset)].exp().tolist())
        freq = float((keys == torch.tensor(subset)).all(-1).double().mean())
        assert abs(freq - truth) <= z * math.sqrt(truth * (1 - truth) / n), subset


def test_set_ratios_match_the_sums_over_orderings() -> None:
    """R(S, s) = p^{D\\s}(S\\s) / p(S) and R^{D\\s}(S, s') from the integrals equal the
    same ratios from sums over orderings (the leave-out domains renormalized)."""
    torch.manual_seed(4)
    for k in (2, 3, 4):
        p = torch.rand(k + 2, dtype=torch.float64)
        p = (p / p.sum())[:k].tolist()
        log_r1, log_r2 = set_log_ratios(torch.tensor([p], dtype=torch.float64).log(), False)
        for s in range(k):
            rest = [q / (1 - p[s]) for i, q in enumerate(p) if i != s]
            r1 = _set_probability(rest) / _set_probability(p)
            assert math.isclose(float(log_r1[0, s].exp()), r1, rel_tol=1e-9)
            for t in range(k):
                if t == s:
                    assert float(log_r2[0, s, t]) == 0.0
                    continue
                both = [q / (1 - p[s] - p[t]) for i, q in enumerate(p) if i not in (s, t)]
                r2 = _set_probability(both) / _set_probability(rest)
                assert math.isclose(float(log_r2[0, s, t].exp()), r2, rel_tol=1e-9)


def _covered_case(n: int) -> None:
    """One case of the test below: 3 classes (n = 3) or 2 configurations of one bit (n = 1)."""
    theta = torch.randn(n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64)

    def dist_of(t):
        return OneHotCategorical(logits=t) if n == 3 else Independent(Bernoulli(logits=t), 1)

    def f(z):
        return torch.tanh((z * w).sum(-1) + 0.3)

    out = estimators.get("unordered_set", num_samples=5)(dist_of(theta), f)
    assert out.f_evals == (3 if n == 3 else 2)
    (grad,) = torch.autograd.grad(out.surrogate.sum(), theta)
    _, (exact,) = estimators.exact.gradient(dist_of(theta), f, [theta])
    torch.testing.assert_close(grad, exact)
    truth = estimators.exact.expectation(dist_of(theta), f).detach()
    torch.testing.assert_close(out.objective, truth)


def test_unordered_set_is_exact_when_k_covers_the_space() -> None:
    """With k at least the number of configurations (3 classes, k = 5; 1 bit, k = 5) every
    configuration is drawn once and the estimate is the exact gradient (no noise)."""
    torch.manual_seed(6)
    _covered_case(3)
    _covered_case(1)
