"""The public namespace of estimators: registry name -> module-level factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # base imports this module for its error messages
    from estimators.base import EstimatorBase

Factory = Callable[..., "EstimatorBase"]

_REGISTRY: dict[str, tuple[Factory, frozenset[str]]] = {}


def register(name: str, families: frozenset[str]) -> Callable[[Factory], Factory]:
    """Register ``factory`` under ``name`` (also its config file name) with its families."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is registered twice")
        _REGISTRY[name] = (factory, frozenset(families))
        return factory

    return wrap


def available() -> list[str]:
    """Names of all registered estimators, sorted."""
    return sorted(_REGISTRY)


def families(name: str) -> frozenset[str]:
    """Latent families the estimator ``name`` supports."""
    return _lookup(name)[1]


def supporting(family: str) -> list[str]:
    """Names of the estimators that support ``family``, sorted."""
    return sorted(n for n, (_, fams) in _REGISTRY.items() if family in fams)


def options(name: str) -> dict[str, object]:
    """The options of estimator ``name`` with their defaults."""
    sig = inspect.signature(_lookup(name)[0])
    return {p.name: p.default for p in sig.parameters.values()}


def get(name: str, **opts: object) -> EstimatorBase:
    """Build the estimator ``name`` with options ``opts``, validated.

    Raises ``ValueError`` naming the estimator and the allowed names or options when ``name``
    is unknown, an option does not exist, or an option's value is out of range.
    """
    factory, _ = _lookup(name)
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    return factory(**opts)


def _lookup(name: str) -> tuple[Factory, frozenset[str]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(available())}")
    return _REGISTRY[name]
