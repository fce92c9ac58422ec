"""The hand-written REBAR and RELAX steps compute what the harness computes: from the same
parameters and RNG state the same loss and the same gradients for every model and estimator
parameter (float32 up to rounding, float64 to ~1e-10), and the same Adam updates."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.harness.step import estimate_loss
from benchmarks.throughput import bench_throughput as bt
from benchmarks.throughput import handwritten_control_variate as hcv
from tests.benchmarks.handwritten_pairs import assert_two_steps_update_alike, close, pair

#: (estimator, options); each runs on all its hand-written families.
CONFIGS = [
    ("rebar", {}),
    ("relax", {}),
    ("rebar", {"temperature": 0.3, "eta": 0.7}),
    ("relax", {"temperature": 2.0, "eta": 0.0, "hidden": 8}),
]


def _id(name: str, options: dict, family: str, s: int, arch: str) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{name}[{opts}]-{family}-S{s}-{arch}" if opts else f"{name}-{family}-S{s}-{arch}"


CASES = [
    pytest.param(
        bt.make_case(name, options, family, 16, s, arch), id=_id(name, options, family, s, arch)
    )
    for name, options in CONFIGS
    for family in hcv.SUPPORTED[name]
    for arch in ("linear", "nonlinear")
    for s in (1, 2)
    if not options or (arch, s) == ("linear", 2)  # non-default options: one shape is enough
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_harness(case: bt.Case, dtype: torch.dtype) -> None:
    """From the same parameters and RNG state, the hand-written loss and the gradients of every
    model parameter and every estimator parameter (temperature, eta, RELAX's network) equal
    the harness's ``estimate_loss`` up to rounding.

    The two group the same sums differently (f at the hard and at the relaxed samples in two
    decoder calls instead of one, the network on z and z~ in one call instead of two, the
    estimator's gradient in the training backward instead of a separate one): float32 agrees
    to ~1e-6 relative (exactly, for most Bernoulli cases), float64 to ~1e-14, which rules out
    a real difference hiding under the float32 tolerance."""
    setup, hand = pair(case, dtype)
    rtol_loss, rtol_grad = (1e-5, 1e-4) if dtype == torch.float32 else (1e-10, 1e-10)
    params = [*setup.model.parameters(), *setup.estimator.parameters()]
    assert len(hand.leaves) == len(params)
    torch.manual_seed(1)
    loss, _ = estimate_loss(setup.model, setup.estimator, setup.x, setup.kl, case.num_samples)
    grads = torch.autograd.grad(loss, params)
    torch.manual_seed(1)
    hand_loss = hand.loss(setup.x)
    hand_grads = torch.autograd.grad(hand_loss, hand.leaves)
    assert hand_loss.dtype == dtype
    assert close(loss.detach(), hand_loss.detach(), rtol_loss)
    for p, g, h in zip(params, grads, hand_grads, strict=True):
        assert g.shape == h.shape == p.shape
        assert close(g, h, rtol_grad)
    # The estimator's parameters are trained: their gradient is not zero (the temperature's
    # is, exactly, when eta = 0: then it enters no term).
    assert all(g.abs().max() > 0 for g in grads[len(hand.params) + 1 :])


@pytest.mark.parametrize("case", CASES)
def test_two_training_steps_update_like_harness(case: bt.Case) -> None:
    """Two full training steps (harness ``optimizer_step`` with its Adam vs the hand-written
    ``step(x)``) give the same losses and leave every model and estimator parameter equal.

    In float64: Adam moves each entry by about ``lr * g / (|g| + eps)``, so in float32 a
    gradient entry at rounding level would turn rounding differences into ~``lr``."""
    setup, hand = pair(case, torch.float64)
    start = [p.detach().clone() for p in hand.est_params]
    assert_two_steps_update_alike(setup, hand)
    # The estimator's parameters were trained (so the comparison above covers their updates).
    assert not torch.equal(hand.est_params[1].detach(), start[1])  # eta


def test_default_parameters_match_the_harness_estimator() -> None:
    """Without ``estimator_params`` the step makes them from the options: ``log
    temperature`` and ``eta`` as the harness, RELAX's network with its shapes."""
    for name, options in CONFIGS:
        case = bt.make_case(name, options, "bernoulli", 4, 1)
        setup = bt.build(case)
        latent_dim, n_categories = bt.LATENTS["bernoulli"]
        hand = hcv.HandwrittenControlVariateStep(
            [p.detach().clone() for p in setup.model.parameters()],
            "bernoulli", latent_dim, n_categories, name, options,
        )  # fmt: skip
        harness = list(setup.estimator.parameters())
        assert [p.shape for p in hand.est_params] == [p.shape for p in harness]
        for p, h in zip(harness[:2], hand.est_params[:2], strict=True):
            assert math.isclose(p.item(), h.item(), rel_tol=1e-6, abs_tol=1e-7)
        assert len(hand.optimizer.param_groups[0]["params"]) == len(hand.leaves)


def test_supports_only_rebar_and_relax_on_discrete_latents() -> None:
    """``supports`` refuses other estimators, the Gaussian family and unknown options; the
    constructor raises ValueError for them and for a wrong number of estimator parameters."""
    assert hcv.supports("rebar", "bernoulli") and hcv.supports("relax", "bernoulli", {"hidden": 8})
    assert hcv.supports("rebar", "categorical", {"temperature": 0.3, "eta": 0.7})
    for name in ("reinforce", "rloo", "gumbel_softmax", "disarm", "nvil", "vimco", "arm"):
        assert not hcv.supports(name, "bernoulli")
    assert not hcv.supports("rebar", "gaussian") and not hcv.supports("relax", "gaussian")
    assert not hcv.supports("rebar", "bernoulli", {"hidden": 8})  # a RELAX option
    assert not hcv.supports("relax", "bernoulli", {"baseline": "moving_average"})
    params = [torch.zeros(4, 8), torch.zeros(4), torch.zeros(8, 4), torch.zeros(8)]
    with pytest.raises(ValueError, match="no hand-written"):
        hcv.HandwrittenControlVariateStep(params, "bernoulli", 4, 1, "reinforce")
    with pytest.raises(ValueError, match="no hand-written"):
        hcv.HandwrittenControlVariateStep(params, "gaussian", 4, 1, "rebar")
    with pytest.raises(ValueError, match="estimator parameters"):
        hcv.HandwrittenControlVariateStep(
            params, "bernoulli", 4, 1, "relax", estimator_params=[torch.zeros(()), torch.ones(())]
        )
