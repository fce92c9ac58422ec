"""Validation of estimator options: errors name the estimator, option, bad value and allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable


def positive_float(estimator: str, option: str, value: object) -> float:
    """``value`` as a finite float > 0, else ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(
            f"{estimator}: option {option}={value!r} is invalid; allowed: a finite number > 0"
        )
    return float(value)


def unit_interval(estimator: str, option: str, value: object) -> float:
    """``value`` as a float in [0, 1), else ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{estimator}: option {option}={value!r} is invalid; allowed: a number in [0, 1)"
        )
    return float(value)


def choice(estimator: str, option: str, value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{estimator}: option {option}={value!r} is invalid; allowed: {', '.join(allowed)}"
        )
    return str(value)


def boolean(estimator: str, option: str, value: object) -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(
            f"{estimator}: option {option}={value!r} is invalid; allowed: true, false"
        )
    return value
