"""One training step: the estimator's loss on a batch and the optimizer update (eager or
``torch.compile``-d), shared by training runs and the throughput suites.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

import estimators
from benchmarks.harness.vae import VAE

# ------------------------------------------------------------------------- one step


def estimate_loss(
    model: VAE,
    estimator: estimators.EstimatorBase,
    x: torch.Tensor,
    kl: str,
    num_samples: int | None,
) -> tuple[torch.Tensor, estimators.Estimate]:
    """The training loss on batch ``x`` and the estimator's output.

    ``loss = -(1/B) sum_b surrogate_b + aux_loss``: its gradient is minus the estimator's
    estimate of the gradient of the batch-mean objective, plus the estimator's own loss.
    """
    q = model.encode(x)
    out = estimator(q, model.learning_signal(x, q, kl), num_samples=num_samples, context=x)
    loss = -out.surrogate.sum() / x.shape[0]
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    return loss, out


def compiled_estimate_loss() -> Callable[..., tuple[torch.Tensor, estimators.Estimate]]:
    """:func:`estimate_loss` under ``torch.compile`` (the ``compile=true`` option).

    Inductor is told to draw random numbers with eager PyTorch's generators
    (``fallback_random``), so a seed gives the same samples with and without compiling and a
    resumed run continues the same random stream; losses then agree with eager mode up to
    float32 rounding of the fused kernels.
    """
    # Looked up by name: with ``python -m benchmarks.train`` this module is ``__main__``, which
    # submitit's requeue pickles by value (cloudpickle), and a ``torch._inductor.config``
    # attribute chain in this function would make it pickle that config module (it cannot).
    inductor_config = importlib.import_module("torch._inductor.config")
    inductor_config.fallback_random = True
    return torch.compile(estimate_loss)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    inputs: Sequence[torch.Tensor] | None = None,
) -> None:
    """Backpropagate ``loss`` (into ``inputs`` only, if given) and take one optimizer step.

    ``inputs`` (see :func:`backward_inputs`) restricts the backward pass to the optimized
    parameters, skipping graph branches that lead only to an estimator's private leaves.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=inputs)
    optimizer.step()


def backward_inputs(
    optimizer: torch.optim.Optimizer, estimator: estimators.EstimatorBase
) -> list[torch.Tensor] | None:
    """The optimizer's parameters when ``estimator`` has private leaves (REBAR, RELAX), else
    ``None`` (a plain ``backward``, which is faster for every other estimator)."""
    if not getattr(estimator, "private_leaves", False):
        return None
    return [p for group in optimizer.param_groups for p in group["params"]]
