"""The encoder and decoder SNR table of a gaussian_multisample sweep, from its records only.

    python results/reference/gaussian_multisample/snr_table.py SWEEP_DIR > snr.md

Rows: (part, the run's training estimator, the probed estimator); columns: S (the run's and
the probe's). Cells: probe/grad_snr at the last probed step +- 1.96 jackknife SE.
"""

import json
import pathlib
import sys

import pandas as pd

rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/run.json")):
    config = json.loads(path.read_text())["config"]
    m = pd.read_parquet(path.parent / "metrics.parquet")
    m = m[(m.split == "probe") & m.param.isin(["all", "decoder"])]
    m = m[m.metric.isin(["grad_snr", "grad_snr_se"]) & (m.step == m.step.max())]
    for (probed, param), g in m.groupby(["probe_estimator", "param"]):
        v = g.set_index("metric").value
        rows.append(
            {
                "part": "encoder" if param == "all" else "decoder",
                "run": config["estimator"]["name"],
                "probed": probed.split(" ")[0],
                "S": config["estimator"]["num_samples"],
                "snr": f"{v['grad_snr']:.3f} ± {1.96 * v['grad_snr_se']:.3f}",
            }
        )
table = pd.DataFrame(rows).pivot_table(
    index=["part", "run", "probed"], columns="S", values="snr", aggfunc="first"
)
print(table.to_markdown())
