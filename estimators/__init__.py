"""gradbench estimators: Monte Carlo gradient estimators behind one small contract.

>>> import estimators
>>> estimators.available()
['gumbel_softmax', 'reinforce', 'reparam', 'rloo']
>>> est = estimators.get("reinforce", baseline="moving_average")
>>> out = est(dist, f, num_samples=4)          # -> Estimate
>>> (-out.surrogate.sum()).backward()          # gradient estimate of -sum E_q[f]
"""

# Importing the estimator modules registers them.
from estimators import (
    antithetic,
    arsm,
    control_variate,
    exact,
    learned_baselines,
    measure_valued,
    multisample,
    quadrature,
    relaxed,
    reparam,
    score_function,
    stick_breaking,
    unordered_set,
)
from estimators.base import (
    FAMILIES,
    Estimate,
    Estimator,
    EstimatorBase,
    family_of,
)
from estimators.registry import available, families, get, options, register, supporting

__all__ = [
    "FAMILIES",
    "Estimate",
    "Estimator",
    "EstimatorBase",
    "antithetic",
    "arsm",
    "available",
    "control_variate",
    "exact",
    "families",
    "family_of",
    "get",
    "learned_baselines",
    "measure_valued",
    "multisample",
    "options",
    "quadrature",
    "register",
    "relaxed",
    "reparam",
    "score_function",
    "stick_breaking",
    "supporting",
    "unordered_set",
]
