"""Conformance: every registered estimator honours the contract for every family it supports.

Parametrized over ``estimators.available()`` x supported families x batch shapes x event
layouts x S in {1, 4}, so a new estimator is checked as soon as it is registered.
"""

from __future__ import annotations

import inspect
import io
import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, OneHotCategorical

import estimators

BATCH_SHAPES = [(), (3,), (2, 3)]


def make_dist(family: str, batch: tuple[int, ...], independent: bool):
    """A distribution of ``family`` with leaf parameters; event (4,) / (2, 3) if independent."""
    g = torch.Generator().manual_seed(0)
    if family == "gaussian":
        shape = (*batch, 4) if independent else batch
        mu = torch.randn(shape, generator=g).requires_grad_()
        log_sigma = (0.3 * torch.randn(shape, generator=g)).requires_grad_()
        base = Normal(mu, log_sigma.exp())
        params = [mu, log_sigma]
    elif family == "bernoulli":
        shape = (*batch, 4) if independent else batch
        logits = torch.randn(shape, generator=g).requires_grad_()
        base, params = Bernoulli(logits=logits), [logits]
    else:
        shape = (*batch, 2, 3) if independent else (*batch, 3)
        logits = torch.randn(shape, generator=g).requires_grad_()
        base, params = OneHotCategorical(logits=logits), [logits]
    dist = Independent(base, 1) if independent else base
    return dist, params


class CountingObjective:
    """f(z) = sum over event dims of tanh(z * w + 0.1) with its own parameter w; counts rows."""

    def __init__(self, event_ndims: int) -> None:
        self.w = torch.tensor(0.7, requires_grad=True)
        self.event_ndims = event_ndims
        self.rows = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.rows += z.shape[0]
        self.shapes.append(tuple(z.shape))
        out = torch.tanh(z * self.w + 0.1)
        return out.sum(tuple(range(-self.event_ndims, 0))) if self.event_ndims else out


def _cases():
    for name in estimators.available():
        for family in sorted(estimators.families(name)):
            yield name, family


CASES = list(_cases())


def _build(name: str, s: int):
    est = estimators.get(name)
    return est, max(s, est.min_samples)


@pytest.mark.parametrize(("name", "family"), CASES)
@pytest.mark.parametrize("batch", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("independent", [False, True], ids=["plain", "independent"])
@pytest.mark.parametrize("s", [1, 4])
def test_shapes_finiteness_gradients_and_f_evals(name, family, batch, independent, s) -> None:
    """objective/surrogate have shape batch_shape and are finite; f is called with
    [S', *batch, *event] inputs; f_evals equals the number of f rows per example; gradients
    reach q's and f's parameters and are finite."""
    est, s = _build(name, s)
    dist, params = make_dist(family, batch, independent)
    f = CountingObjective(len(dist.event_shape))
    out = est(dist, f, num_samples=s)
    assert isinstance(out, estimators.Estimate)
    assert out.objective.shape == dist.batch_shape
    assert out.surrogate.shape == dist.batch_shape
    assert torch.isfinite(out.objective).all() and torch.isfinite(out.surrogate).all()
    # Sampling without replacement (unordered_set) draws at most every configuration once.
    at_least = s if family == "gaussian" else min(s, estimators.exact.num_configurations(dist))
    assert isinstance(out.f_evals, int) and out.f_evals >= at_least
    assert out.f_evals == f.rows
    for shape in f.shapes:
        assert shape[1:] == (*dist.batch_shape, *dist.event_shape)
    assert out.aux_loss is None or (out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss))
    grads = torch.autograd.grad(out.surrogate.sum(), [*params, f.w], allow_unused=True)
    for p, g in zip([*params, f.w], grads, strict=True):
        assert g is not None and g.shape == p.shape and torch.isfinite(g).all()


class GradientOnlyObjective(CountingObjective):
    """:class:`CountingObjective` with ``gradient_only``: NaN values, the same gradient."""

    def gradient_only(self, z: torch.Tensor) -> torch.Tensor:
        out = self(z)
        return out + (math.nan - out.detach())


@pytest.mark.parametrize(("name", "family"), CASES)
def test_an_unread_objective_leaves_the_surrogates_gradient_and_f_evals_unchanged(
    name, family
) -> None:
    """With ``objective_wanted = False`` and an ``f`` offering ``f.gradient_only`` (NaN
    values), every estimator's surrogate has the same gradient, bit for bit, in q's and f's
    parameters, the same ``f_evals`` and the same next draw as the full call; its objective
    is the same or NaN. An estimator that read ``f.gradient_only``'s values would turn its
    gradient NaN."""
    results = []
    for wanted in (True, False):
        torch.manual_seed(3)
        est, s = _build(name, 4)
        est.objective_wanted = wanted
        dist, params = make_dist(family, (3,), True)
        f = GradientOnlyObjective(len(dist.event_shape))
        out = est(dist, f, num_samples=s)
        grads = torch.autograd.grad(out.surrogate.sum(), [*params, f.w], allow_unused=True)
        results.append((out, grads, torch.rand(1)))
    (full, grads_full, next_full), (lean, grads_lean, next_lean) = results
    for a, b in zip(grads_full, grads_lean, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert lean.f_evals == full.f_evals and torch.equal(next_lean, next_full)
    assert torch.equal(lean.objective, full.objective) or torch.isnan(lean.objective).all()


@pytest.mark.parametrize(("name", "family"), CASES)
def test_state_dict_round_trip_reproduces_the_estimate(name, family) -> None:
    """state_dict survives torch.save/torch.load(weights_only=True), and an estimator loaded
    from it gives bit-identical estimates to the original from the same RNG state."""
    est, s = _build(name, 2)
    est.train()
    for _ in range(3):  # let stateful estimators move away from their initial state
        dist, _ = make_dist(family, (5,), True)
        out = est(dist, CountingObjective(len(dist.event_shape)), num_samples=s)
        loss = -out.surrogate.sum() + (0 if out.aux_loss is None else out.aux_loss)
        loss.backward()
    buffer = io.BytesIO()
    torch.save(est.state_dict(), buffer)
    buffer.seek(0)
    clone, _ = _build(name, 2)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    for (k, a), (_, b) in zip(est.state_dict().items(), clone.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    results = []
    for model in (est, clone):
        model.eval()
        torch.manual_seed(123)
        dist, _ = make_dist(family, (5,), True)
        results.append(model(dist, CountingObjective(len(dist.event_shape)), num_samples=s))
    assert torch.equal(results[0].surrogate, results[1].surrogate)


@pytest.mark.parametrize("name", estimators.available())
def test_unsupported_family_raises_value_error_naming_alternatives(name) -> None:
    """Calling an estimator with a family it does not support raises ValueError naming the
    estimator, the family and the estimators that do support it."""
    for family in sorted(set(estimators.FAMILIES) - estimators.families(name)):
        est, s = _build(name, 1)
        dist, _ = make_dist(family, (3,), True)
        with pytest.raises(ValueError) as info:
            est(dist, CountingObjective(1), num_samples=s)
        message = str(info.value)
        assert name in message and family in message
        assert all(other in message for other in estimators.supporting(family))


@pytest.mark.parametrize("name", estimators.available())
def test_invalid_options_raise_value_error_naming_option_and_allowed(name) -> None:
    """Unknown options and out-of-range num_samples raise ValueError naming the option, the bad
    value and the allowed values; so does num_samples below the minimum at call time."""
    with pytest.raises(ValueError, match=r"bogus_option.*allowed"):
        estimators.get(name, bogus_option=1)
    with pytest.raises(ValueError, match=r"num_samples=0.*allowed"):
        estimators.get(name, num_samples=0)
    est = estimators.get(name)
    family = sorted(estimators.families(name))[0]
    dist, _ = make_dist(family, (3,), True)
    with pytest.raises(ValueError, match="num_samples"):
        est(dist, CountingObjective(1), num_samples=est.min_samples - 1)


BAD_OPTIONS = [
    ("reinforce", {"baseline": "median"}, r"baseline='median'.*none, moving_average, batch_mean"),
    ("reinforce", {"decay": 1.5}, r"decay=1.5.*\[0, 1\)"),
    ("rloo", {"num_samples": 1}, r"num_samples=1.*>= 2"),
    ("gumbel_softmax", {"temperature": 0.0}, r"temperature=0.0.*> 0"),
    ("gumbel_softmax", {"temperature": -1}, r"temperature=-1.*> 0"),
    ("gumbel_softmax", {"temperature": math.inf}, r"temperature=inf.*finite"),
    ("gumbel_softmax", {"straight_through": "yes"}, r"straight_through='yes'.*true, false"),
]


@pytest.mark.parametrize(("name", "opts", "pattern"), BAD_OPTIONS)
def test_bad_option_values_are_rejected_when_built(name, opts, pattern) -> None:
    """Out-of-range option values fail in estimators.get with the option and allowed values."""
    with pytest.raises(ValueError, match=pattern) as info:
        estimators.get(name, **opts)
    assert name in str(info.value)


def test_unknown_estimator_lists_available_names() -> None:
    """An unknown name raises ValueError listing every registered estimator."""
    with pytest.raises(ValueError) as info:
        estimators.get("reinfroce")
    assert all(n in str(info.value) for n in estimators.available())


@pytest.mark.parametrize("name", estimators.available())
def test_registered_class_builds_with_its_own_defaults_and_they_are_the_options(name) -> None:
    """The registry registers classes: ``cls()`` builds, and ``estimators.options(name)`` is
    the class's own signature, so a default lives in one place (e.g. ``RLOO()`` has S=2)."""
    est = estimators.get(name)
    cls = type(est)
    assert cls.name == name
    assert type(cls()) is cls
    assert estimators.options(name) == {
        p.name: p.default for p in inspect.signature(cls).parameters.values()
    }
    assert estimators.families(name) == cls.families
    assert cls().num_samples == estimators.options(name)["num_samples"] >= cls.min_samples


def test_registry_lists_the_core_estimators() -> None:
    """The four core estimators are registered with their families."""
    assert {"reparam", "reinforce", "rloo", "gumbel_softmax"} <= set(estimators.available())
    assert estimators.families("reparam") == {"gaussian"}
    assert estimators.families("gumbel_softmax") == {"bernoulli", "categorical"}
    assert estimators.families("rloo") == set(estimators.FAMILIES)


def test_batch_mean_baseline_needs_two_examples() -> None:
    """batch_mean with a single example is an error, not a silent zero baseline."""
    est = estimators.get("reinforce", baseline="batch_mean")
    with pytest.raises(ValueError, match="at least 2 examples"):
        est(Bernoulli(logits=torch.zeros(1, 3)), lambda z: z.sum(-1))
    with pytest.raises(ValueError, match="at least 2 examples"):
        est(Independent(Bernoulli(logits=torch.zeros(3)), 1), lambda z: z.sum(-1))


def test_moving_average_updates_only_in_training_mode() -> None:
    """The moving average changes in train mode and is frozen in eval mode."""
    est = estimators.get("reinforce", baseline="moving_average", decay=0.5)
    dist = Bernoulli(logits=torch.zeros(8))
    est.train()
    est(dist, lambda z: z + 3.0)
    assert float(est.baseline.count) == 1 and float(est.baseline.average) > 0
    before = est.state_dict()
    est.eval()
    est(dist, lambda z: z + 3.0)
    after = est.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distribution_types_outside_the_families_are_rejected() -> None:
    """family_of names the accepted distribution types for anything else."""
    with pytest.raises(ValueError, match=r"Normal.*Bernoulli.*OneHotCategorical"):
        estimators.family_of(torch.distributions.Exponential(torch.ones(2)))
    assert estimators.family_of(Independent(Independent(Normal(torch.zeros(2, 2), 1.0), 1), 1))
