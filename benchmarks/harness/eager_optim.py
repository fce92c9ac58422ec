"""Optimizers without ``torch._dynamo``'s import: torch's own classes, run eagerly.

``torch.optim.Optimizer`` decorates ``add_param_group``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` with ``torch._disable_dynamo`` and every ``step`` with
``_use_grad_for_differentiable``; both import ``torch._dynamo`` on their first call (about
two seconds of a job's start-up on a small CPU) only to mark the function as not traceable by
``torch.compile`` or to insert graph breaks. The harness never compiles an optimizer
(``compile=true`` compiles the loss only), so :func:`eager_optimizer` returns a subclass of the
configured class whose methods are those same functions with the two wrappers taken off: the
optimizer's arithmetic, state and ``state_dict`` are torch's own, bit for bit
(``tests/benchmarks/test_startup.py``). ``step`` keeps the one effect of its wrapper that
matters eagerly: gradient mode set to ``defaults["differentiable"]`` during the update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

#: The code objects of torch's wrappers (what a decorated method's ``__code__`` is).
_DISABLE_DYNAMO = torch._disable_dynamo(lambda: None).__code__
_USE_GRAD = _use_grad_for_differentiable(lambda self: None).__code__
_PROFILE_HOOK = Optimizer.profile_hook_step(lambda self: None).__code__


def _unwrap(method: Callable[..., Any]) -> tuple[Callable[..., Any], bool]:
    """The function under the wrappers, and whether a ``_use_grad`` wrapper was among them."""
    use_grad = False
    while getattr(method, "__code__", None) in (_DISABLE_DYNAMO, _USE_GRAD, _PROFILE_HOOK):
        use_grad = use_grad or method.__code__ is _USE_GRAD
        method = method.__wrapped__  # type: ignore[attr-defined]
    return method, use_grad


def _in_grad_mode(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def eager_step(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return step(self, *args, **kwargs)

    return eager_step


@functools.cache
def eager_optimizer(cls: type[Optimizer]) -> type[Optimizer]:
    """``cls`` with its methods' ``_disable_dynamo`` / ``_use_grad_for_differentiable``
    wrappers removed (``step`` still profiled and hooked as torch does); ``cls`` itself when
    none of its methods carries them."""
    overrides: dict[str, Callable[..., Any]] = {}
    for name in {n for klass in cls.__mro__ for n in vars(klass)}:
        method = getattr(cls, name, None)
        if not callable(method) or getattr(method, "__code__", None) is None:
            continue
        raw, use_grad = _unwrap(method)
        if raw is not method:
            overrides[name] = _in_grad_mode(raw) if use_grad else raw
    if not overrides:
        return cls
    overrides["__doc__"] = f"``{cls.__module__}.{cls.__qualname__}`` run eagerly (eager_optim)."
    overrides["__module__"] = __name__
    return type(cls.__name__, (cls,), overrides)
