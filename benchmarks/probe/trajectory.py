"""Probing a trajectory after training: estimators warmed up at each snapshot's parameters, and
the ranking of their variances at one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pandas is imported where a table is built, not on a training job's start
    import pandas as pd

# ------------------------------------------------------------ the trajectory probe (CLI)

#: File of a run directory holding the rows of ``gradbench-probe`` (same columns as metrics).
TRAJECTORY_FILE = "probe_trajectory.parquet"


def warm_up(est: nn.Module, model: nn.Module, x: Tensor, kl: str, calls: int = 200) -> None:
    """Bring an estimator's running state (e.g. a moving-average baseline) to its value at
    these parameters, by ``calls`` estimates on ``x`` in training mode. Only estimators with
    buffers and no trainable parameters are warmed up (learned baselines would need their own
    optimization); their state is otherwise that of a fresh estimator."""
    if not list(est.buffers()) or list(est.parameters()):
        return
    est.train()
    with torch.no_grad():
        for _ in range(calls):
            q = model.encode(x)
            est(q, model.learning_signal(x, q, kl), context=x)


def ranking_table(df: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """Per probed estimator at ``step`` (default: the last): grad_var and grad_var_per_feval
    with 95% intervals (value +- 1.96 SE), and each one's ratio to the smallest, with a
    delta-method 95% interval. Sorted by variance per f-evaluation."""
    import pandas as pd

    rows = df[(df["split"] == "probe") & (df["param"] == "all")]
    rows = rows[~rows["probe_estimator"].str.startswith("reference:")]
    step = int(rows["step"].max()) if step is None else step
    wide = rows[rows["step"] == step].pivot_table(
        index="probe_estimator", columns="metric", values="value"
    )
    out = pd.DataFrame(index=wide.index)
    for metric in ("grad_var", "grad_var_per_feval"):
        v, se = wide[metric], wide[f"{metric}_se"]
        out[metric] = v
        out[f"{metric} 95% CI"] = [f"[{a:.4g}, {b:.4g}]" for a, b in
                                   zip(v - 1.96 * se, v + 1.96 * se, strict=True)]  # fmt: skip
        best = v.idxmin()
        ratio = v / v[best]
        rel = ((se / v) ** 2 + (se[best] / v[best]) ** 2) ** 0.5
        out[f"{metric} / best"] = [
            f"{r:.3g} [{r * (1 - 1.96 * e):.3g}, {r * (1 + 1.96 * e):.3g}]" if k != best else "1"
            for k, r, e in zip(v.index, ratio, rel, strict=True)
        ]
    out.insert(0, "step", step)
    return out.sort_values("grad_var_per_feval").reset_index()
