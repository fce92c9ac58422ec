"""The estimator contract: `Estimate`, the `Estimator` protocol and a thin `nn.Module` base."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    Normal,
    OneHotCategorical,
)

#: Latent families an estimator can declare.
FAMILIES: tuple[str, ...] = ("gaussian", "bernoulli", "categorical")

#: ``f``: samples ``[S, *batch_shape, *event_shape]`` -> values ``[S, *batch_shape]``.
#: Optionally ``f.detached``: the same values and the same gradient in ``z``, but no gradient
#: to ``f``'s own parameters; estimators that evaluate ``f`` only for a control variate (REBAR,
#: RELAX) use it when present, so a backward pass skips ``f``'s parameter gradients there.
#: Optionally ``f.gradient_only``: unspecified (NaN) values and ``f``'s gradient, in ``z`` and
#: in ``f``'s parameters; an estimator whose surrogate is the mean of ``f``'s values calls it
#: when its caller reads no objective (:attr:`EstimatorBase.objective_wanted`).
Objective = Callable[[Tensor], Tensor]


def detached_objective(f: Objective) -> Objective:
    """``f.detached`` when ``f`` provides it (see :data:`Objective`), else ``f`` itself."""
    return getattr(f, "detached", f)


class Estimate(NamedTuple):
    """What one estimator call returns.

    Attributes:
      objective: ``[*batch_shape]``, detached. Monte Carlo estimate of ``E_q[f(z)]`` under the
        true (unrelaxed) distribution, averaged over the ``S`` samples.
      surrogate: ``[*batch_shape]``. ``surrogate.sum().backward()`` leaves in every parameter
        (of ``q`` and of ``f``) the estimator's estimate of ``grad sum_b E_q[f(z_b)]``.
      aux_loss: scalar or None. A loss to *minimize* for the estimator's own parameters
        (learned baselines, control variates); it never changes the model's gradient.
      f_evals: evaluations of ``f`` per example made by this call (for equal-budget comparisons).
    """

    objective: Tensor
    surrogate: Tensor
    aux_loss: Tensor | None
    f_evals: int


@runtime_checkable
class Estimator(Protocol):
    """A Monte Carlo gradient estimator of ``grad E_{z ~ q}[f(z)]``.

    Called as ``est(dist, f, num_samples=S)`` with ``dist`` a ``torch.distributions``
    distribution whose parameters carry gradients (see :func:`family_of` for the accepted
    types) and ``f`` mapping ``[S, *batch_shape, *event_shape]`` to ``[S, *batch_shape]``.
    Returns an :class:`Estimate`. ``context`` is optional side information (e.g. the encoder
    input, for input-dependent baselines); estimators that do not need it ignore it.
    """

    name: str
    families: frozenset[str]
    unbiased: bool  # the mean estimate is the objective's gradient
    unbiased_for: str  # "gradient", "direction" (a positive multiple of it) or "none"

    def __call__(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int | None = None,
        context: Tensor | None = None,
    ) -> Estimate: ...


def family_of(dist: Distribution) -> str:
    """Latent family of ``dist``: ``gaussian``, ``bernoulli`` or ``categorical``.

    Accepts ``Normal``, ``Bernoulli`` and ``OneHotCategorical``, each optionally wrapped in
    (possibly nested) ``Independent``. Raises ``ValueError`` for anything else.
    """
    base = base_of(dist)
    if isinstance(base, Normal):
        return "gaussian"
    if isinstance(base, Bernoulli):
        return "bernoulli"
    if isinstance(base, OneHotCategorical):
        return "categorical"
    raise ValueError(
        f"unsupported distribution {type(base).__name__}; expected Normal (gaussian), "
        "Bernoulli (bernoulli) or OneHotCategorical (categorical), optionally in Independent"
    )


def base_of(dist: Distribution) -> Distribution:
    """The innermost distribution of (possibly nested) ``Independent`` wrappers."""
    while isinstance(dist, Independent):
        dist = dist.base_dist
    return dist


def reinterpreted_ndims(dist: Distribution) -> int:
    """Total batch dims that (possibly nested) ``Independent`` wrappers turn into event dims."""
    n = 0
    while isinstance(dist, Independent):
        n += dist.reinterpreted_batch_ndims
        dist = dist.base_dist
    return n


def check_num_samples(estimator: str, num_samples: object, minimum: int = 1) -> int:
    """Validate ``num_samples`` (an int >= ``minimum``) and return it."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(
            f"{estimator}: option num_samples={num_samples!r} is invalid; "
            f"allowed: an integer >= {minimum}"
        )
    return num_samples


class EstimatorBase(nn.Module):
    """Shared validation for estimators: family support and ``num_samples``.

    Subclasses set ``name``, ``families`` and ``min_samples`` and implement
    :meth:`estimate`. State (moving averages, learned baselines) lives in buffers and
    parameters so that ``state_dict()`` checkpoints it. Stateful estimators update their state
    only in training mode (``est.train()``); ``est.eval()`` freezes it (e.g. for probing).
    """

    name: ClassVar[str] = ""
    families: ClassVar[frozenset[str]] = frozenset()
    min_samples: ClassVar[int] = 1
    #: What the mean of the gradient estimate equals (tests hold it to that): ``"gradient"``,
    #: the gradient of the objective (``grad E_q[f]``, or of the multi-sample bound when
    #: ``objective_kind`` is ``"iwae"``); ``"direction"``, that gradient times a positive
    #: scalar (NVIL's variance normalization divides the whole estimate by a running scale);
    #: ``"none"``, neither (biased, e.g. the continuous relaxations).
    unbiased_for: str = "gradient"
    #: What ``Estimate.objective`` estimates: ``mean`` (``E_q[f]``) or ``iwae`` (the
    #: multi-sample bound ``E log mean_s exp f(z_s)``, for ``f`` returning log weights).
    objective_kind: ClassVar[str] = "mean"
    #: Whether the estimate's graph holds leaves of the estimator's own that nothing trains
    #: (REBAR / RELAX differentiate a detached copy of the logits inside ``estimate``): a
    #: training loop then backpropagates into its parameters only (``backward(inputs=...)``),
    #: which skips the branches leading to those leaves; elsewhere ``inputs=`` only costs time.
    private_leaves: ClassVar[bool] = False
    #: Whether the estimate differentiates through a gradient (``torch.autograd.grad`` with
    #: ``create_graph=True``: REBAR / RELAX train their control variate on the estimator's
    #: variance); ``torch.compile`` cannot trace that, so the harness refuses ``compile=true``.
    double_backward: ClassVar[bool] = False
    #: Whether the caller reads ``Estimate.objective``. A caller that needs only the
    #: surrogate's gradient (the gradient probe) sets it to ``False`` on its own copy; an
    #: estimator may then skip work done for the objective alone and return a NaN objective:
    #: the relaxed Gumbel-softmax skips ``f`` at the hard samples, and the pathwise estimators
    #: (surrogate ``mean_s f(z_s)``) evaluate ``f.gradient_only`` (:meth:`pathwise_objective`).
    #: The surrogate's gradient, the random draws and ``f_evals`` (the cost of the estimator
    #: as trained) are unchanged.
    objective_wanted: bool = True

    def __init__(self, num_samples: int = 1) -> None:
        super().__init__()
        self.num_samples = check_num_samples(self.name, num_samples, self.min_samples)

    def pathwise_objective(self, f: Objective) -> Objective:
        """The ``f`` to evaluate for a surrogate ``mean_s f(z_s)``: ``f.gradient_only`` (see
        :data:`Objective`) when the caller reads no objective and ``f`` provides it, else
        ``f``. The surrogate's gradient is the same either way."""
        return f if self.objective_wanted else getattr(f, "gradient_only", f)

    @property
    def unbiased(self) -> bool:
        """Whether the mean estimate is the objective's gradient (``unbiased_for`` is
        ``"gradient"``)."""
        return self.unbiased_for == "gradient"

    def forward(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int | None = None,
        context: Tensor | None = None,
    ) -> Estimate:
        family = family_of(dist)
        if family not in self.families:
            from estimators.registry import supporting  # local: registry imports estimators

            raise ValueError(
                f"estimator {self.name!r} does not support family {family!r} "
                f"(it supports: {', '.join(sorted(self.families))}); estimators supporting "
                f"{family!r}: {', '.join(supporting(family))}"
            )
        s = self.num_samples if num_samples is None else num_samples
        s = check_num_samples(self.name, s, self.min_samples)
        return self.estimate(dist, f, s, family, context)

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        """Compute the estimate; ``family`` and ``num_samples`` are already validated."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}"


def sample_score_inputs(
    dist: Distribution, f: Objective, num_samples: int
) -> tuple[Tensor, Tensor]:
    """What every score-function estimator starts from: ``log q(z)`` and ``f(z)`` (both
    ``[S, *B]``) at ``S`` exact samples ``z ~ q`` (drawn with ``sample``: no gradient path)."""
    z = dist.sample((num_samples,))  # [S, *B, *E]
    return dist.log_prob(z), f(z)


def score_surrogate(f_values: Tensor, log_q: Tensor, signal: Tensor) -> Tensor:
    """Per-sample surrogate ``f + stop(signal) * (log q - stop(log q))``.

    Its value equals ``f`` and its gradient is ``grad f + signal * grad log q`` (the score
    function term with learning signal ``signal``, e.g. ``f - baseline``). Shapes ``[S, *B]``.
    """
    return f_values + signal.detach() * (log_q - log_q.detach())


def as_tensor_option(value: float, like: Tensor | None = None) -> Tensor:
    """A float option as a 0-d tensor (for buffers that schedules update in place)."""
    t = torch.tensor(float(value))
    return t if like is None else t.to(like)
