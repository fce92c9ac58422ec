"""Baselines for score-function estimators: small modules giving ``b`` for ``f - b``.

A baseline maps per-sample values ``f`` of shape ``[S, *batch_shape]`` to a baseline of a
shape that broadcasts against it, computed without looking at the sample it is subtracted
from, so that ``E[(f - b) grad log q] = E[f grad log q]`` (the estimator stays unbiased).

The pieces every score-function estimator builds its baseline from live here, once: the
bias-corrected moving average (:func:`debiased`, :func:`update_average_`; REINFORCE's
``moving_average`` and NVIL's running statistics) and the leave-one-out mean
(:func:`leave_one_out_mean`; RLOO, VIMCO and ``batch_mean``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from estimators._options import choice, unit_interval

BASELINES = ("none", "moving_average", "batch_mean")


class NoBaseline(nn.Module):
    """``b = 0``."""

    def forward(self, f_values: Tensor) -> Tensor:
        return torch.zeros((), dtype=f_values.dtype, device=f_values.device)


def debiased(average: Tensor, count: Tensor, decay: float) -> Tensor:
    r"""The bias-corrected moving average :math:`m_t / (1 - \beta^t)` after ``count = t`` updates.

    Before the first update ``average`` is 0 and the clamped correction 1e-30, so the result is
    0 without a branch (and without a host sync).
    """
    return average / (1.0 - torch.pow(decay, count)).clamp_min(1e-30)


@torch.no_grad()
def update_average_(average: Tensor, value: Tensor, decay: float) -> None:
    r"""Fold ``value`` into the moving average in place: :math:`m \leftarrow \beta m + (1-\beta)x`.

    The caller counts the updates (one count may serve several averages updated together).
    """
    average.mul_(decay).add_(value, alpha=1 - decay)


class MovingAverageBaseline(nn.Module):
    r"""Exponential moving average of past mean learning signals (bias-corrected).

    .. math:: m_t = \beta m_{t-1} + (1-\beta)\,\bar f_t,\qquad b_t = m_{t-1} / (1-\beta^{t-1})

    with ``b_1 = 0``. ``b_t`` uses calls before ``t`` only, so it is independent of the current
    samples. The average is updated only in training mode and lives in buffers.
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, f_values: Tensor) -> Tensor:
        b = debiased(self.average, self.count, self.decay)
        if self.training:
            update_average_(self.average, f_values.detach().mean(), self.decay)
            self.count.add_(1)
        return b.to(f_values.dtype)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def leave_one_out_mean(values: Tensor, dim: int = 0, size: int = 1) -> Tensor:
    r"""For each entry along ``dim``, the mean of the *other* entries: ``(sum - x) / (n - 1)``.

    An entry may itself be a sum of ``size`` values; the result is then the mean of the other
    entries' values, ``(sum - x) / ((n - 1) size)``. Needs ``n >= 2`` entries along ``dim``.
    The baseline of RLOO and VIMCO (over samples) and of the batch-mean baseline (over
    examples): it never sees the entry it is subtracted from.
    """
    n = values.shape[dim]
    return (values.sum(dim, keepdim=True) - values) / ((n - 1) * size)


class BatchMeanBaseline(nn.Module):
    r"""Mean learning signal of the *other* examples of the batch (leave-one-out over examples).

    For example ``i`` (index along the first batch dimension) and every sample,
    :math:`b_i = \frac{1}{(N-1)S}\sum_{j\ne i}\sum_s f_{s,j}`. Examples are independent, so
    the estimator stays unbiased. Needs at least two examples.
    """

    def forward(self, f_values: Tensor) -> Tensor:
        if f_values.dim() < 2 or f_values.shape[1] < 2:
            raise ValueError(
                "reinforce: option baseline='batch_mean' needs a batch of at least 2 examples "
                f"along the first batch dimension; got values of shape {tuple(f_values.shape)}"
            )
        per_example = f_values.detach().sum(0, keepdim=True)  # [1, N, ...]
        return leave_one_out_mean(per_example, dim=1, size=f_values.shape[0])


def make_baseline(estimator: str, baseline: str, decay: float) -> nn.Module:
    """Build the baseline named ``baseline`` (one of :data:`BASELINES`)."""
    choice(estimator, "baseline", baseline, BASELINES)
    unit_interval(estimator, "decay", decay)
    if baseline == "moving_average":
        return MovingAverageBaseline(decay)
    if baseline == "batch_mean":
        return BatchMeanBaseline()
    return NoBaseline()
