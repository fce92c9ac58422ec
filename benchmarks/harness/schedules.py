"""Temperature schedule of relaxed estimators (Jang, Gu & Poole 2017).

``tau(t) = max(tau_min, tau0 * exp(-r * t))``, recomputed every ``N`` steps and constant in
between, so ``tau`` at step ``t`` uses ``t' = N * floor(t / N)``. The schedule is a function of
the step alone, so a resumed run recomputes it instead of storing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class TemperatureSchedule:
    """``tau(t) = max(tau_min, tau0 exp(-rate * N floor(t / N)))``.

    Args:
      initial: ``tau0 > 0``.
      rate: ``r >= 0`` per step (0: constant ``tau0``); Jang et al. use 1e-5 or 3e-5.
      minimum: ``tau_min > 0``; Jang et al. use 0.5.
      every: ``N >= 1``; Jang et al. use 1000.

    Example:
      >>> sched = TemperatureSchedule(1.0, rate=3e-5, minimum=0.5, every=1000)
      >>> sched(20_500)  # exp(-0.6)
      0.548...
    """

    initial: float
    rate: float = 0.0
    minimum: float = 0.5
    every: int = 1000

    def __call__(self, step: int) -> float:
        """``tau`` in force for the update at ``step`` (0-based count of updates done)."""
        if self.rate == 0.0:
            return self.initial
        t = self.every * (step // self.every)
        return max(self.minimum, self.initial * math.exp(-self.rate * t))

    def apply(self, temperature: Tensor, step: int) -> float:
        """Write ``tau(step)`` into the estimator's ``temperature`` buffer in place; return it."""
        value = self(step)
        temperature.fill_(value)
        return value

    @property
    def active(self) -> bool:
        """Whether ``tau`` changes over time."""
        return self.rate > 0.0
