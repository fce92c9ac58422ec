"""A harness setup paired with the hand-written step of the same case, and the checks the
equivalence tests share (``test_throughput``, ``test_handwritten_control_variate``)."""

from __future__ import annotations

import torch

from benchmarks.harness.step import estimate_loss, optimizer_step
from benchmarks.throughput import bench_throughput as bt
from benchmarks.throughput import handwritten, handwritten_steps


def pair(
    case: bt.Case, dtype: torch.dtype = torch.float32
) -> tuple[bt.Setup, handwritten.HandwrittenStep]:
    """The harness setup (converted to ``dtype``) and the hand-written step of the same case
    (:func:`benchmarks.throughput.handwritten_steps.make_step`) with copies of its model and
    estimator
    parameters (after ``build`` materialized NVIL's or RELAX's lazy layer)."""
    setup = bt.build(case)
    setup.model.to(dtype)
    setup.estimator.to(dtype)
    setup.x = setup.x.to(dtype)
    latent_dim, n_categories = bt.LATENTS[case.family]
    hand = handwritten_steps.make_step(
        [p.detach().clone() for p in setup.model.parameters()],
        case.family, latent_dim, n_categories, case.estimator, options=case.opts,
        num_samples=case.num_samples, fused=setup.fused, kl=setup.kl,
        estimator_params=[p.detach().clone() for p in setup.estimator.parameters()],
    )  # fmt: skip
    return setup, hand


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to rounding, relative to the tensor's scale."""
    return bool((a - b).abs().max() <= rtol * max(1.0, float(a.abs().max())))


def assert_two_steps_update_alike(setup: bt.Setup, hand: handwritten.HandwrittenStep) -> None:
    """Two full training steps, the harness's (``estimate_loss`` + ``optimizer_step``) and the
    hand-written ``hand(x)``, from the same RNG states: the losses agree at each step and
    every model and estimator parameter agrees after them, to rtol 1e-10 (run in float64)."""
    for step in range(2):
        torch.manual_seed(10 + step)
        loss, _ = estimate_loss(
            setup.model, setup.estimator, setup.x, setup.kl, setup.case.num_samples
        )
        optimizer_step(setup.optimizer, loss)
        torch.manual_seed(10 + step)
        hand_loss = hand(setup.x)
        assert close(loss.detach(), hand_loss.detach(), rtol=1e-10), f"step {step}: losses"
    harness = [*setup.model.parameters(), *setup.estimator.parameters()]
    for i, (p, h) in enumerate(zip(harness, [*hand.params, *hand.est_params], strict=True)):
        assert close(p.detach(), h.detach(), rtol=1e-10), f"parameter {i} differs"
