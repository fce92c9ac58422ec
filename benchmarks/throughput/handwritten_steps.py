"""The hand-written reference step of any estimator that has one: :mod:`.handwritten` (the
score-function, relaxed and antithetic estimators), :mod:`.handwritten_control_variate`
(REBAR and RELAX) or :mod:`.handwritten_multisample` (IWAE, STL, DReG, MVD)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from benchmarks.throughput import handwritten
from benchmarks.throughput import handwritten_control_variate as cv
from benchmarks.throughput import handwritten_multisample as ms
from benchmarks.throughput.handwritten import HandwrittenStep, unsupported

__all__ = ["make_step", "supports", "unsupported"]


def supports(name: str, family: str, options: dict | None = None) -> bool:
    """Whether a hand-written version of estimator ``name`` with ``options`` exists."""
    module = cv if name in cv.SUPPORTED else handwritten
    module = ms if name in ms.SUPPORTED else module
    return module.supports(name, family, options)


def make_step(
    params: Sequence[Tensor],
    family: str,
    latent_dim: int,
    n_categories: int,
    estimator: str,
    **kwargs: Any,
) -> HandwrittenStep:
    """The hand-written step of ``estimator``: :class:`.handwritten.HandwrittenStep`, or for
    REBAR and RELAX its subclass
    :class:`.handwritten_control_variate.HandwrittenControlVariateStep`;
    keyword arguments as for :class:`.handwritten.HandwrittenStep`."""
    step = cv.HandwrittenControlVariateStep if estimator in cv.SUPPORTED else HandwrittenStep
    step = ms.HandwrittenMultisampleStep if estimator in ms.SUPPORTED else step
    return step(params, family, latent_dim, n_categories, estimator, **kwargs)
