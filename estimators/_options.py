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


def finite_float(estimator: str, option: str, value: object) -> float:
    """``value`` as a finite float, else ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)):
        raise ValueError(
            f"{estimator}: option {option}={value!r} is invalid; allowed: a finite number"
        )
    return float(value)


def positive_int(estimator: str, option: str, value: object, allow_none: bool = False):
    """``value`` if it is an int >= 1 (or None when ``allow_none``), else ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "null or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"{estimator}: option {option}={value!r} is invalid; allowed: {allowed}")
    return value
