"""The public namespace of estimators: registry name -> estimator class.

A class is registered with :func:`register` (``@register("rloo")`` above its definition), so
its ``__init__`` signature is the one home of its options and their defaults, and its
``families`` attribute the one home of the latent families it supports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # base imports this module for its error messages
    from estimators.base import EstimatorBase

E = TypeVar("E", bound="type[EstimatorBase]")

_REGISTRY: dict[str, type[EstimatorBase]] = {}


def register(name: str) -> Callable[[E], E]:
    """Register the estimator class under ``name`` (its ``name`` attribute and config file
    name); its families are its ``families`` attribute."""

    def wrap(cls: E) -> E:
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is registered twice")
        if cls.name != name:
            raise ValueError(f"{cls.__name__}.name is {cls.name!r}, registered as {name!r}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of all registered estimators, sorted."""
    return sorted(_REGISTRY)


def families(name: str) -> frozenset[str]:
    """Latent families the estimator ``name`` supports."""
    return frozenset(_lookup(name).families)


def supporting(family: str) -> list[str]:
    """Names of the estimators that support ``family``, sorted."""
    return sorted(n for n, cls in _REGISTRY.items() if family in cls.families)


def options(name: str) -> dict[str, object]:
    """The options of estimator ``name`` with their defaults (its class's signature)."""
    sig = inspect.signature(_lookup(name))
    return {p.name: p.default for p in sig.parameters.values()}


def get(name: str, **opts: object) -> EstimatorBase:
    """Build the estimator ``name`` with options ``opts``, validated.

    Raises ``ValueError`` naming the estimator and the allowed names or options when ``name``
    is unknown, an option does not exist, or an option's value is out of range.
    """
    cls = _lookup(name)
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return cls(**opts)


def _lookup(name: str) -> type[EstimatorBase]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(available())}")
    return _REGISTRY[name]
