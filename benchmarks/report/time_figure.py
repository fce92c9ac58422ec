"""Where the runs' time went: seconds per phase (start-up, training, evaluation, probing,
checkpoints) per estimator, a stacked bar from the ``time/*`` rows of the records.

Each run's ``time/<phase>`` rows are cumulative seconds, written before each checkpoint (the
last checkpoint's own write is not in them; ``run.json``'s ``timing`` has it). A bar is the mean
over the seeds of a group of each phase's seconds at the run's last such step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from benchmarks.report.records import FACET_COLUMNS
from benchmarks.report.style import DOUBLE_COLUMN_IN, PAPER_RC, SINGLE_COLUMN_IN

#: The phases, in the order they are stacked (``benchmarks.harness.timing.PHASES``).
PHASES: tuple[str, ...] = ("startup", "train", "eval", "probe", "checkpoint")
NAME = "time_breakdown"
CAPTION = (
    "Where each run's time went: seconds spent starting (job start to the first training "
    "step), training, evaluating, probing and checkpointing, stacked; mean over seeds."
)


def time_breakdown(df: pd.DataFrame) -> pd.DataFrame:
    """Per group (facet and estimator label) and phase: the mean over completed runs of the
    phase's seconds at each run's last ``time`` step, and the number of runs ``n``."""
    rows = df[(df["status"] == "completed") & (df["split"] == "time")]
    rows = rows[rows["metric"].isin(PHASES)]
    if rows.empty:
        return pd.DataFrame(columns=[*FACET_COLUMNS, "estimator_label", "phase", "seconds", "n"])
    last = rows.groupby("run_id")["step"].transform("max")
    rows = rows[rows["step"] == last]
    keys = [*FACET_COLUMNS, "estimator_label", "metric"]
    out = rows.groupby(keys, as_index=False).agg(
        seconds=("value", "mean"), n=("run_id", "nunique")
    )
    return out.rename(columns={"metric": "phase"})


def time_breakdown_figure(df: pd.DataFrame, out_dir: Path, save) -> tuple[list[Path], str | None]:
    """Draw :func:`time_breakdown` as one stacked horizontal bar per estimator label, one panel
    per (family, model, dataset); ``save(fig, out_dir, name)`` writes the PNG and PDF.
    Returns the files, or ``[]`` and why the figure is skipped."""
    table = time_breakdown(df)
    if table.empty:
        return [], "no time/* records in completed runs"
    facets = sorted({tuple(r) for r in table[list(FACET_COLUMNS)].to_numpy()})
    colors = dict(zip(PHASES, sns.color_palette("colorblind", len(PHASES)), strict=True))
    n_labels = table.groupby(list(FACET_COLUMNS))["estimator_label"].nunique().max()
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        ncols = min(len(facets), 2)
        nrows = -(-len(facets) // ncols)
        width = SINGLE_COLUMN_IN if ncols == 1 else DOUBLE_COLUMN_IN
        height = nrows * (0.5 + 0.25 * n_labels) + 0.6
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
        for ax in axes[len(facets) :]:
            ax.set_visible(False)
        for ax, facet in zip(axes, facets, strict=False):
            part = table[(table[list(FACET_COLUMNS)] == list(facet)).all(axis=1)]
            wide = part.pivot_table(index="estimator_label", columns="phase", values="seconds")
            wide = wide.reindex(columns=list(PHASES)).fillna(0.0).sort_index(ascending=False)
            left = pd.Series(0.0, index=wide.index)
            for phase in PHASES:
                ax.barh(wide.index, wide[phase], left=left, color=colors[phase], label=phase)
                left += wide[phase]
            ax.set_title(" · ".join(str(k) for k in facet))
            ax.set_xlabel("seconds per run")
            ax.grid(True, axis="x", alpha=0.5)
            ax.grid(False, axis="y")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(PHASES), frameon=False)
        return save(fig, out_dir, NAME), None
