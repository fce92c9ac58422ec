"""Probe variance per call and at an equal budget of f-evaluations (grad_var x f_evals) of every
basket estimator, on each run's own parameters at its last probe, with 95% intervals
(jackknife SE), and each estimator's ratio to reinforce and to rloo (delta-method interval,
the two estimates treated as independent). Reads run records only.

    cd results/reference/categorical_compare && python equal_cost.py sweep
"""

import json
import pathlib
import sys

import numpy as np
import pandas as pd

rows = []
for run in sorted(pathlib.Path(sys.argv[1]).glob("*/run.json")):
    info = json.loads(run.read_text())
    m = pd.read_parquet(run.parent / "metrics.parquet")
    m = m[(m.split == "probe") & (m.param == "all")]
    m = m[~m.probe_estimator.str.startswith("reference")]
    m = m[m.step == m.step.max()]
    wide = m.pivot_table(index="probe_estimator", columns="metric", values="value")
    wide["trajectory"] = info["config"]["estimator"]["name"]
    wide["step"] = int(m.step.max())
    rows.append(wide.reset_index())
df = pd.concat(rows)
df["f_evals"] = df["grad_var_per_feval"] / df["grad_var"]
out = []
for traj, g in df.groupby("trajectory", sort=False):
    g = g.set_index("probe_estimator")
    for ref in ("reinforce", "rloo (S=2)"):
        ref_row = g[g.index.str.startswith(ref)].iloc[0]
        r = g["grad_var_per_feval"] / ref_row["grad_var_per_feval"]
        rel = np.sqrt(
            (g["grad_var_per_feval_se"] / g["grad_var_per_feval"]) ** 2
            + (ref_row["grad_var_per_feval_se"] / ref_row["grad_var_per_feval"]) ** 2
        )
        g[f"ratio_to_{ref.split()[0]}"] = (
            r.map("{:.3g}".format)
            + " ["
            + (r * np.exp(-1.96 * rel)).map("{:.3g}".format)
            + ", "
            + (r * np.exp(1.96 * rel)).map("{:.3g}".format)
            + "]"
        )
    g["var_per_feval_95"] = (
        g["grad_var_per_feval"].map("{:.3g}".format)
        + " +- "
        + (1.96 * g["grad_var_per_feval_se"]).map("{:.2g}".format)
    )
    g["var_per_call"] = g["grad_var"].map("{:.3g}".format)
    g["f_evals"] = g["f_evals"].round(1)
    cols = ["step", "f_evals", "var_per_call", "var_per_feval_95", "ratio_to_reinforce",
            "ratio_to_rloo"]  # fmt: skip
    print(f"\n### trajectory of `{traj}`\n")
    print(g[cols].sort_values("f_evals").to_markdown())
