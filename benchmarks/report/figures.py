"""Seaborn figures (PNG + vector PDF) sized for a paper column, from run records only.

Every figure takes the metrics frame of ``records.load_records`` (completed runs), draws mean
curves over seeds with 95% bootstrap bands (seeded, so figures are reproducible) and colours each
``estimator_label`` with the one ``EstimatorStyle`` of the report. A figure whose metrics are
absent is skipped, and the skip is returned with its reason.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from benchmarks.records.files import atomic_write
from benchmarks.report.records import (
    FACET_COLUMNS,
    config_value,
    final_values,
    main_series,
    primary_rows,
    with_reference,
)
from benchmarks.report.style import (
    DOUBLE_COLUMN_IN,
    DPI,
    PAPER_RC,
    SINGLE_COLUMN_IN,
    EstimatorStyle,
)
from benchmarks.report.time_figure import CAPTION as TIME_CAPTION
from benchmarks.report.time_figure import NAME as TIME_NAME
from benchmarks.report.time_figure import time_breakdown_figure

PANEL_HEIGHT_IN = 1.7
MAX_POINTS = 200  # curves are thinned/interpolated to at most this many x values


@dataclass(frozen=True)
class Panel:
    """One metric drawn in one column of a curve figure."""

    split: str
    metric: str
    title: str
    ylabel: str
    log10: bool = False  # plot log10(value): mean and bands over seeds on the log scale
    ylog: bool = False  # plot value on a log axis


@dataclass(frozen=True)
class CurveFigure:
    """Metrics (columns) against one x quantity, one row per (family, model, dataset)."""

    name: str
    caption: str
    x: str
    xlabel: str
    panels: tuple[Panel, ...]


@dataclass
class FigureResult:
    """A written figure (``files``) or a skipped one (``skipped`` says why)."""

    name: str
    caption: str
    files: list[Path] = field(default_factory=list)
    skipped: str | None = None
    colors: dict[str, tuple] = field(default_factory=dict)  # legend label -> RGBA as drawn


_ELBO = (
    Panel("train", "elbo", "train ELBO", "ELBO (nats)"),
    Panel("test", "elbo", "test ELBO", "ELBO (nats)"),
    Panel("test", "iwae", "test IWAE", "IWAE bound (nats)"),
)
_BANDS = "Lines: mean over seeds; bands: 95% bootstrap confidence intervals."
CURVE_FIGURES: tuple[CurveFigure, ...] = (
    CurveFigure(
        "elbo_vs_steps", f"ELBO against training steps. {_BANDS}", "step", "training step", _ELBO
    ),
    CurveFigure(
        "elbo_vs_wall_time",
        f"ELBO against wall-clock time since the run started "
        f"(curves interpolated onto a common time grid). {_BANDS}",
        "wall_time",
        "wall-clock time (s)",
        _ELBO,
    ),
    CurveFigure(
        "elbo_vs_f_evals",
        f"ELBO against cumulative f-evaluations per example (equal-budget comparison). {_BANDS}",
        "f_evals",
        "f-evaluations per example",
        _ELBO,
    ),
    CurveFigure(
        "val_elbo_vs_steps",
        f"Validation bounds against training steps. {_BANDS}",
        "step",
        "training step",
        (
            Panel("val", "elbo", "val ELBO", "ELBO (nats)"),
            Panel("val", "iwae", "val IWAE", "IWAE bound (nats)"),
        ),
    ),
    CurveFigure(
        "grad_var_vs_steps",
        "Gradient variance (log10) against training steps: "
        "moving-average variance along each estimator's own trajectory and the probe's "
        f"estimate for the run's own estimator. {_BANDS}",
        "step",
        "training step",
        (
            Panel(
                "train",
                "grad_var_ema",
                "own trajectory (EMA)",
                "log10 gradient variance",
                log10=True,
            ),
            Panel("probe", "grad_var", "probe", "log10 gradient variance", log10=True),
            Panel(
                "probe",
                "grad_var_per_feval",
                "probe, per f-evaluation",
                "log10 variance per f-eval",
                log10=True,
            ),
            Panel("probe", "grad_var_total", "probe, total", "log10 total variance", log10=True),
        ),
    ),
    CurveFigure(
        "grad_snr_vs_steps",
        f"Gradient signal-to-noise ratio (probe). {_BANDS}",
        "step",
        "training step",
        (Panel("probe", "grad_snr", "gradient SNR", "SNR", ylog=True),),
    ),
    CurveFigure(
        "grad_bias_vs_steps",
        f"Gradient bias against an exact or high-sample reference gradient (probe). {_BANDS}",
        "step",
        "training step",
        (
            Panel("probe", "grad_bias2", "squared bias", "log10 squared bias", log10=True),
            Panel("probe", "grad_cos", "cosine to true gradient", "cosine similarity"),
            Panel("probe", "grad_mse", "mean squared error", "log10 MSE", log10=True),
        ),
    ),
    CurveFigure(
        "temperature_vs_steps",
        f"Relaxation temperature schedule. {_BANDS}",
        "step",
        "training step",
        (Panel("train", "temperature", "temperature", "temperature τ"),),
    ),
)


# --------------------------------------------------------------------------------- helpers


def _short(value: float, _pos: object = None) -> str:
    """Tick text: 12000 -> 12k, 1.5e6 -> 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _facet_text(key: tuple) -> str:
    return " · ".join(str(k) for k in key)


def _legend(
    fig: Figure,
    style: EstimatorStyle,
    labels: Sequence[str],
    width: float,
) -> dict[str, tuple]:
    """One legend for the whole figure, below the panels, in as many columns as fit.

    Returns the colour of each legend entry as drawn (label -> RGBA).
    """
    handles = [
        Line2D([], [], color=style.color(lb), marker=style.marker(lb), lw=1.2, ms=4)
        for lb in labels
    ]
    longest = max((len(lb) for lb in labels), default=1)
    ncols = max(1, min(len(labels), int(width / (0.45 + 0.055 * longest))))
    legend = fig.legend(
        handles,
        list(labels),
        loc="outside lower center",
        ncols=ncols,
        frameon=False,
        handlelength=1.8,
        columnspacing=1.2,
    )
    return {
        text.get_text(): mpl.colors.to_rgba(handle.get_color())
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    """PNG then PDF, without timestamps, so identical records give identical files."""
    files = []
    for ext, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None})):
        path = out_dir / f"{name}.{ext}"
        atomic_write(
            path, lambda fh, e=ext, m=meta: fig.savefig(fh, format=e, dpi=DPI, metadata=m)
        )
        files.append(path)
        fig.set_layout_engine("none")  # keep the layout computed for the PNG; it is the same
    return files


def palette_json(style: EstimatorStyle, figures: Sequence[FigureResult]) -> str:
    """The report's label -> colour/marker mapping and the colours each figure drew, as JSON.

    Reuse it to colour other plots (slides, posters) the way the report does.
    """
    hexes = {lb: mpl.colors.to_hex(c) for lb, c in style.colors.items()}
    data = {
        "palette": {lb: {"color": hexes[lb], "marker": style.marker(lb)} for lb in hexes},
        "figures": {
            f.name: {lb: mpl.colors.to_hex(c) for lb, c in sorted(f.colors.items())}
            for f in figures
            if not f.skipped and f.colors  # figures coloured by estimator
        },
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


_NICE = [1, 2, 2.5, 5, 10]


def _format_axis(ax: Axes, x: str | None) -> None:
    """Few, round, plainly written ticks (no 6x10^2), so labels never collide."""
    for axis, n in ((ax.xaxis, 4), (ax.yaxis, 5)):
        if axis.get_scale() == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=n + 1))
            axis.set_minor_formatter(NullFormatter())
            axis.set_major_formatter(FuncFormatter(_short))
        else:
            axis.set_major_locator(MaxNLocator(n, steps=_NICE))
    if x in ("step", "f_evals"):
        ax.xaxis.set_major_formatter(FuncFormatter(_short))
    ax.grid(True, alpha=0.5)


def align_runs(frame: pd.DataFrame, keys: Sequence[str], max_points: int = MAX_POINTS,
               ) -> pd.DataFrame:  # fmt: skip
    """Put the runs of each ``keys`` group on common x values so seeds can be averaged.

    Runs logged at identical x values (e.g. eval steps) keep them (thinned evenly to
    ``max_points``); otherwise (wall time, uneven logging) each run is linearly interpolated
    onto ``max_points`` values spanning the x range that every run of the group covers.
    ``frame`` has columns ``keys``, ``run_id``, ``x`` and ``y``; the result has the same.
    """
    out = []
    for key, group in frame.groupby(list(keys), sort=True):
        curves = [
            c.groupby("x")["y"].mean().sort_index() for _, c in group.groupby("run_id", sort=True)
        ]
        run_ids = sorted(group["run_id"].unique())
        first = curves[0].index.to_numpy()
        same = all(np.array_equal(c.index.to_numpy(), first) for c in curves)
        if same:
            take = np.unique(np.linspace(0, len(first) - 1, min(len(first), max_points)).round())
            grid = first[take.astype(int)]
            ys = [c.to_numpy()[take.astype(int)] for c in curves]
        else:
            lo = max(c.index.min() for c in curves)
            hi = min(c.index.max() for c in curves)
            n = min(max_points, max(len(c) for c in curves))
            if not hi > lo or n < 2:
                continue  # the runs share no x range: nothing to average
            grid = np.linspace(lo, hi, n)
            ys = [np.interp(grid, c.index.to_numpy(float), c.to_numpy(float)) for c in curves]
        key = key if isinstance(key, tuple) else (key,)
        for rid, y in zip(run_ids, ys, strict=True):
            part = pd.DataFrame({"x": grid, "y": y, "run_id": rid})
            for k, v in zip(keys, key, strict=True):
                part[k] = v
            out.append(part)
    if not out:
        return pd.DataFrame(columns=[*keys, "run_id", "x", "y"])
    return pd.concat(out, ignore_index=True)


def _panel_data(
    df: pd.DataFrame,
    panel: Panel,
    x: str,
    hue: str = "estimator_label",
) -> pd.DataFrame:
    rows = df[(df["split"] == panel.split) & (df["metric"] == panel.metric)]
    rows = rows[np.isfinite(rows["value"]) & np.isfinite(rows[x].astype(float))]
    if panel.log10 or panel.ylog:
        rows = rows[rows["value"] > 0]
    if rows.empty:
        return rows
    y = np.log10(rows["value"]) if panel.log10 else rows["value"]
    frame = rows[[*FACET_COLUMNS, hue, "run_id"]].assign(x=rows[x].astype(float), y=y)
    return align_runs(frame, [*FACET_COLUMNS, hue])


def _lineplot(
    ax: Axes, data: pd.DataFrame, style: EstimatorStyle, hue: str, n_boot: int, seed: int
) -> list[str]:
    labels = sorted(data[hue].unique())
    sns.lineplot(
        data=data,
        x="x",
        y="y",
        hue=hue,
        style=hue,
        hue_order=labels,
        style_order=labels,
        palette={lb: style.color(lb) for lb in labels},
        markers={lb: style.marker(lb) for lb in labels},
        dashes=False,
        errorbar=("ci", 95),
        n_boot=n_boot,
        seed=seed,
        markevery=0.12,
        legend=False,
        ax=ax,
        err_kws={"alpha": 0.2, "linewidth": 0},
    )
    return labels


# --------------------------------------------------------------------------------- figures


def curve_figure(
    df: pd.DataFrame,
    spec: CurveFigure,
    style: EstimatorStyle,
    out_dir: Path,
    n_boot: int = 1000,
    seed: int = 0,
) -> FigureResult:
    """Draw ``spec``: one column per metric present, one row per (family, model, dataset)."""
    result = FigureResult(spec.name, spec.caption)
    panels = [(p, _panel_data(df, p, spec.x)) for p in spec.panels]
    panels = [(p, d) for p, d in panels if not d.empty]
    if not panels:
        wanted = ", ".join(f"{p.split}/{p.metric}" for p in spec.panels)
        result.skipped = f"no {wanted} records with `{spec.x}` in completed runs"
        return result
    facets = sorted({tuple(r) for _, d in panels for r in d[list(FACET_COLUMNS)].to_numpy()})
    ncols = len(panels)
    width = SINGLE_COLUMN_IN if ncols == 1 else DOUBLE_COLUMN_IN
    height = len(facets) * (PANEL_HEIGHT_IN + 0.2) + 0.45
    labels_used: set[str] = set()
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        subfigs = fig.subfigures(len(facets), 1, squeeze=False)[:, 0]
        for facet, sub in zip(facets, subfigs, strict=True):
            sub.suptitle(_facet_text(facet), fontsize=8, fontweight="bold")
            axes = sub.subplots(1, ncols, squeeze=False)[0]
            for ax, (panel, data) in zip(axes, panels, strict=True):
                here = data[(data[list(FACET_COLUMNS)] == list(facet)).all(axis=1)]
                if here.empty:
                    ax.text(
                        0.5,
                        0.5,
                        "no data",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="0.5",
                    )
                else:
                    labels_used.update(_lineplot(ax, here, style, "estimator_label", n_boot, seed))
                if panel.ylog:
                    ax.set_yscale("log")
                ax.set_title(panel.title)
                ax.set_xlabel(spec.xlabel)
                ax.set_ylabel(panel.ylabel)
                _format_axis(ax, spec.x)
        result.colors = _legend(fig, style, sorted(labels_used), width)
        result.files = _save(fig, out_dir, spec.name)
    return result


def _flat_grid(
    n: int,
    max_cols: int,
    row_height: float = PANEL_HEIGHT_IN + 0.25,
) -> tuple[Figure, list[Axes], float]:
    ncols = min(n, max_cols)
    nrows = -(-n // ncols)
    width = SINGLE_COLUMN_IN if ncols == 1 else DOUBLE_COLUMN_IN
    fig = Figure(figsize=(width, nrows * row_height + 0.45), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n], width


#: Characters per line of a panel title (a third of a paper's text width at PAPER_RC).
TITLE_CHARS = 30


def basket_figure(
    df: pd.DataFrame, style: EstimatorStyle, out_dir: Path, n_boot: int = 1000, seed: int = 0
) -> FigureResult:
    """The gradient basket: every probed estimator's variance along each run's trajectory."""
    name = "grad_var_basket"
    caption = (
        "Gradient basket: log10 variance of every probed estimator (colours) measured at "
        "the same parameters along each estimator's training trajectory (panels). " + _BANDS
    )
    result = FigureResult(name, caption)
    rows = df[(df["split"] == "probe") & (df["metric"] == "grad_var") & (df["value"] > 0)]
    if "probe_label" not in rows or rows.empty:
        result.skipped = "no probe/grad_var records"
        return result
    if (rows["probe_label"] == rows["estimator_label"]).all():
        result.skipped = "probe/grad_var only measures each run's own estimator (no basket)"
        return result
    rows = main_series(rows)
    frame = rows[[*FACET_COLUMNS, "estimator_label", "probe_label", "run_id"]].assign(
        x=rows["step"].astype(float), y=np.log10(rows["value"])
    )
    data = align_runs(
        frame.rename(columns={"estimator_label": "trajectory"}),
        [*FACET_COLUMNS, "trajectory", "probe_label"],
    )
    keys = [*FACET_COLUMNS, "trajectory"]
    groups = list(data.groupby(keys, sort=True))
    multi_facet = data[list(FACET_COLUMNS)].drop_duplicates().shape[0] > 1
    used: set[str] = set()
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        fig, axes, width = _flat_grid(len(groups), 3)
        for ax, (key, part) in zip(axes, groups, strict=True):
            used.update(_lineplot(ax, part, style, "probe_label", n_boot, seed))
            # Wrapped so that long labels (``reinforce (moving_average)``) stay in the panel.
            title = textwrap.fill(f"trajectory: {key[-1]}", width=TITLE_CHARS)
            ax.set_title(f"{title}\n{_facet_text(key[:-1])}" if multi_facet else title)
            ax.set_xlabel("training step")
            ax.set_ylabel("log10 gradient variance")
            _format_axis(ax, "step")
        if not multi_facet:
            fig.suptitle(_facet_text(tuple(data[list(FACET_COLUMNS)].iloc[0])), fontweight="bold")
        result.colors = _legend(fig, style, sorted(used), width)
        result.files = _save(fig, out_dir, name)
    return result


#: Quantities of the temperature ablation: (title, y label).
_TEMPERATURE_TITLES = {
    "test/elbo": ("final test ELBO", "ELBO (nats)"),
    "test/iwae": ("final test IWAE", "IWAE bound (nats)"),
    "log10 probe/grad_var": ("final probe variance", "log10 gradient variance"),
}


def _gumbel_softmax_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The completed gumbel_softmax runs with their ``temperature`` and ``variant`` (the
    other estimator options, which a grey line joins across temperatures)."""

    def variant(config: object) -> str:
        est = config_value(config, "estimator") or {}
        opts = [
            f"{k}={v}"
            for k, v in sorted(est.items())
            if k not in ("temperature", "_target_", "name")
        ]
        return ", ".join(opts) or "gumbel_softmax"

    gs = runs[(runs["estimator"] == "gumbel_softmax") & (runs["status"] == "completed")].copy()
    gs["temperature"] = [config_value(c, "estimator.temperature") for c in gs["config"]]
    gs = gs[gs["temperature"].notna()]
    gs["variant"] = [variant(c) for c in gs["config"]]
    return gs


def _temperature_panel(
    ax: Axes, part: pd.DataFrame, style: EstimatorStyle, n_boot: int, seed: int
) -> list[str]:
    """One panel: grey lines joining each variant's means, then the estimators' points with
    bootstrap bars; returns the estimator labels drawn."""
    means = part.groupby(["variant", "temperature"])["value"].mean().reset_index()
    for i, (_, line) in enumerate(means.groupby("variant", sort=True)):
        ax.plot(
            line["temperature"],
            line["value"],
            color="0.6",
            lw=0.8,
            zorder=0,
            ls=("-", "--", ":", "-.")[i % 4],
        )
    labels = sorted(part["estimator_label"].unique())
    sns.lineplot(
        data=part,
        x="temperature",
        y="value",
        hue="estimator_label",
        style="estimator_label",
        hue_order=labels,
        style_order=labels,
        palette={lb: style.color(lb) for lb in labels},
        markers={lb: style.marker(lb) for lb in labels},
        dashes=False,
        err_style="bars",
        errorbar=("ci", 95),
        n_boot=n_boot,
        seed=seed,
        legend=False,
        ax=ax,
        err_kws={"capsize": 2, "elinewidth": 0.8},
    )
    return labels


def temperature_ablation(
    df: pd.DataFrame,
    runs: pd.DataFrame,
    style: EstimatorStyle,
    out_dir: Path,
    n_boot: int = 1000,
    seed: int = 0,
) -> FigureResult:
    """Final values against gumbel_softmax's ``estimator.temperature`` when it varies."""
    name = "temperature_ablation"
    caption = (
        "Temperature ablation for gumbel_softmax: final values against the relaxation "
        "temperature τ (points: mean over seeds, bars: 95% bootstrap confidence "
        "intervals; grey lines join the same variant)."
    )
    result = FigureResult(name, caption)
    gs = _gumbel_softmax_runs(runs)
    if gs["temperature"].nunique() < 2:
        result.skipped = "gumbel_softmax's estimator.temperature does not vary in these runs"
        return result
    gs["temperature"] = gs["temperature"].astype(float)
    fv = final_values(df[df["run_id"].isin(gs["run_id"])])
    fv = fv.merge(gs[["run_id", "temperature", "variant"]], on="run_id")
    quantities = [q for q in _TEMPERATURE_TITLES if (fv["quantity"] == q).any()]
    if not quantities:
        result.skipped = "no final test/elbo, test/iwae or probe/grad_var for gumbel_softmax"
        return result
    facets = sorted({tuple(r) for r in fv[list(FACET_COLUMNS)].to_numpy()})
    panels = [(f, q) for f in facets for q in quantities]
    used: set[str] = set()
    logx = fv["temperature"].max() / max(fv["temperature"].min(), 1e-12) >= 10
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        fig, axes, width = _flat_grid(len(panels), len(quantities))
        for ax, (facet, q) in zip(axes, panels, strict=True):
            part = fv[(fv["quantity"] == q) & (fv[list(FACET_COLUMNS)] == list(facet)).all(axis=1)]
            used.update(_temperature_panel(ax, part, style, n_boot, seed))
            if logx:
                ax.set_xscale("log")
            title, ylabel = _TEMPERATURE_TITLES[q]
            ax.set_title(f"{title}\n{_facet_text(facet)}" if len(facets) > 1 else title)
            ax.set_xlabel("temperature τ")
            ax.set_ylabel(ylabel)
            _format_axis(ax, None)
        if len(facets) == 1:
            fig.suptitle(_facet_text(facets[0]), fontweight="bold")
        result.colors = _legend(fig, style, sorted(used), width)
        result.files = _save(fig, out_dir, name)
    return result


def steps_per_s_figure(
    df: pd.DataFrame, style: EstimatorStyle, out_dir: Path, n_boot: int = 1000, seed: int = 0
) -> FigureResult:
    """Training throughput of the runs themselves (median steps/s per run)."""
    name = "throughput_runs"
    caption = (
        "Training throughput measured during the runs: median steps per second of each "
        "run (bars: mean over seeds, whiskers: 95% bootstrap confidence intervals)."
    )
    result = FigureResult(name, caption)
    fv = final_values(df)
    fv = fv[fv["quantity"] == "throughput/steps_per_s"]
    if fv.empty:
        result.skipped = "no throughput/steps_per_s records in completed runs"
        return result
    facets = sorted({tuple(r) for r in fv[list(FACET_COLUMNS)].to_numpy()})
    longest = max(len(x) for x in fv["estimator_label"])
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        n_labels = fv["estimator_label"].nunique()
        fig, axes, _ = _flat_grid(
            len(facets), 2 if longest > 18 else 3, row_height=0.3 + 0.22 * n_labels + 0.6
        )
        for ax, facet in zip(axes, facets, strict=True):
            part = fv[(fv[list(FACET_COLUMNS)] == list(facet)).all(axis=1)]
            labels = sorted(part["estimator_label"].unique())
            sns.barplot(
                data=part,
                y="estimator_label",
                x="value",
                hue="estimator_label",
                order=labels,
                hue_order=labels,
                palette={lb: style.color(lb) for lb in labels},
                errorbar=("ci", 95),
                n_boot=n_boot,
                seed=seed,
                legend=False,
                ax=ax,
                err_kws={"linewidth": 0.8},
                capsize=0.2,
                saturation=1.0,
            )
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            result.colors |= {
                lb: c.patches[0].get_facecolor() for lb, c in zip(labels, bars, strict=True)
            }
            ax.set_title(_facet_text(facet))
            ax.set_xlabel("training steps / s")
            ax.set_ylabel("")
            ax.xaxis.set_major_locator(MaxNLocator(4, steps=_NICE))
            ax.grid(True, axis="x", alpha=0.5)
        result.files = _save(fig, out_dir, name)
    return result


def benchmark_figure(tp: pd.DataFrame, style: EstimatorStyle, out_dir: Path) -> FigureResult:
    """Throughput from pytest-benchmark: calls per second (median, IQR bars) per estimator,
    and the harness's overhead (training step / hand-written step) where a reference exists."""
    name = "throughput_benchmark"
    caption = (
        "Throughput from pytest-benchmark: calls per second (1 / median time; bars: "
        "interquartile range over rounds), per benchmark and latent family; panels "
        "'harness / hand-written': median time of the harness's training step over that of "
        "the hand-written reference step of the same case (1 = no overhead). The two are "
        "timed in separate tests, so these ratios drift with the machine's load; "
        "`python -m benchmarks.throughput.summary --measure` times them interleaved "
        "(results/throughput/overhead_<device>.md)."
    )
    result = FigureResult(name, caption)
    if tp is None or tp.empty or tp["per_s"].isna().all():
        result.skipped = "no pytest-benchmark JSON given (--throughput)"
        return result
    tp = with_reference(tp[tp["per_s"].notna()])
    overhead = tp[(tp["kind"] == "harness_step") & tp["ratio"].notna()]
    tp = pd.concat([tp, overhead.assign(kind="harness / hand-written")], ignore_index=True)
    row_keys = [
        k for k in ("kind", "device", "arch", "threads") if k in tp and tp[k].nunique() > 1
    ]
    row_keys = row_keys or ["kind"]
    col_keys = [k for k in ("family",) if k in tp]
    keys = row_keys + col_keys
    tp[keys] = tp[keys].fillna("—").astype(str)
    groups = list(tp.groupby(keys, sort=True))
    by_batch = "batch_size" in tp and tp["batch_size"].notna().all()
    used: set[str] = set()
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        fig, axes, width = _flat_grid(len(groups), 3)
        for ax, (key, part) in zip(axes, groups, strict=True):
            key = key if isinstance(key, tuple) else (key,)
            is_ratio = part["kind"].iloc[0] == "harness / hand-written"
            for label, line in part.groupby("label", sort=True):
                used.add(label)
                line = line.sort_values("batch_size" if by_batch else "label")
                x = line["batch_size"].astype(float) if by_batch else np.arange(len(line))
                if is_ratio:
                    y, err = line["ratio"], None
                else:
                    y = line["per_s"]
                    lo = y - 1.0 / line["q3_s"].astype(float)
                    hi = 1.0 / line["q1_s"].astype(float) - y
                    err = np.vstack([lo.fillna(0).clip(lower=0), hi.fillna(0).clip(lower=0)])
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    color=style.color(label),
                    marker=style.marker(label),
                    lw=1.2,
                    ms=3.5,
                    capsize=1.5,
                    elinewidth=0.7,
                )
            if is_ratio:
                ax.axhline(1.0, color="0.3", lw=0.7, ls="--")
                ax.set_ylabel("harness / hand-written")
            else:
                ax.set_yscale("log")
                _format_axis(ax, None)
                ax.set_ylabel("calls / s")
            if by_batch:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.set_xlabel("batch size")
            else:
                ax.set_xticks([])
                ax.set_xlabel("estimator")
            words = [str(k).replace("_", " ") for k in key]  # (kind, *facet): two lines
            ax.set_title(f"{words[0]}\n{' · '.join(words[1:])}" if len(words) > 1 else words[0])
            ax.grid(True, alpha=0.5)
        result.colors = _legend(fig, style, sorted(used), width)
        result.files = _save(fig, out_dir, name)
    return result


def overhead_figure(ov: pd.DataFrame | None, style: EstimatorStyle, out_dir: Path) -> FigureResult:
    """The harness's overhead measured side by side: harness / hand-written training step
    time per estimator (interleaved blocks; median, 95% bootstrap interval), one panel per
    device, threads and batch size, with the acceptance target."""
    name = "harness_overhead"
    caption = (
        "Harness overhead: time of a training step through the harness over that of a "
        "hand-written PyTorch step of the same model and estimator (1 = no overhead), timed "
        "in interleaved blocks (`python -m benchmarks.throughput.summary --measure`); dots: "
        "median ratio over blocks, whiskers: 95% bootstrap intervals; dashed line: 1; dotted "
        "marks: each case's target (none for cases measured for information)."
    )
    result = FigureResult(name, caption)
    if ov is None or ov.empty:
        result.skipped = "no overhead measurement given (--overhead)"
        return result
    keys = ["device", "threads", "batch_size"]
    ov = ov.assign(**{k: ov[k].fillna("—") for k in keys})
    groups = list(ov.groupby(keys, sort=True))
    n_labels = ov["label"].nunique()
    with mpl.rc_context(PAPER_RC), sns.axes_style("whitegrid", PAPER_RC):
        fig, axes, _ = _flat_grid(len(groups), 2, row_height=0.5 + 0.2 * n_labels)
        for ax, ((device, threads, batch), part) in zip(axes, groups, strict=True):
            part = part.sort_values("label", ascending=False).reset_index(drop=True)
            for y, r in part.iterrows():
                drawn = ax.errorbar(
                    r["ratio"],
                    y,
                    xerr=[[max(r["ratio"] - r["ci_low"], 0)], [max(r["ci_high"] - r["ratio"], 0)]],
                    color=style.color(r["label"]),
                    marker=style.marker(r["label"]),
                    ms=4,
                    capsize=1.5,
                    elinewidth=0.8,
                )
                result.colors[r["label"]] = mpl.colors.to_rgba(drawn.lines[0].get_color())
            ax.set_yticks(range(len(part)), part["label"])
            ax.set_ylim(-0.6, len(part) - 0.4)
            ax.axvline(1.0, color="0.3", lw=0.7, ls="--")
            lo = min(1.0, part["ci_low"].min(), part["ratio"].min())
            targets = pd.to_numeric(part["target"], errors="coerce")
            hi = max(part["ci_high"].max(), part["ratio"].max(), targets.max(skipna=True))
            pad = 0.06 * max(hi - lo, 0.02)
            ax.set_xlim(lo - pad, hi + pad)
            for y, target in targets.items():  # each case's own target
                if pd.notna(target):
                    ax.vlines(target, y - 0.42, y + 0.42, color="0.15", lw=1.1, ls=":")
            ax.xaxis.set_major_locator(MaxNLocator(4, steps=_NICE))
            ax.set_xlabel("harness / hand-written")
            threads_text = "" if threads == "—" else f" · {threads} thread(s)"
            ax.set_title(f"{device}{threads_text} · batch {batch}")
            ax.grid(True, axis="x", alpha=0.5)
        result.files = _save(fig, out_dir, name)
    return result


def all_figures(
    df: pd.DataFrame,
    runs: pd.DataFrame,
    throughput: pd.DataFrame | None,
    style: EstimatorStyle,
    out_dir: Path,
    n_boot: int = 1000,
    seed: int = 0,
    overhead: pd.DataFrame | None = None,
) -> list[FigureResult]:
    """Every figure of a report, written under ``out_dir`` (skipped ones included)."""
    completed = primary_rows(df[df["status"] == "completed"])
    results = [
        curve_figure(completed, spec, style, out_dir, n_boot, seed) for spec in CURVE_FIGURES
    ]
    done = df[df["status"] == "completed"]
    results.append(basket_figure(done, style, out_dir, n_boot, seed))
    results.append(temperature_ablation(df, runs, style, out_dir, n_boot, seed))
    results.append(steps_per_s_figure(df, style, out_dir, n_boot, seed))
    time_result = FigureResult(TIME_NAME, TIME_CAPTION)
    time_result.files, time_result.skipped = time_breakdown_figure(df, out_dir, _save)
    results.append(time_result)
    results.append(benchmark_figure(throughput, style, out_dir))
    results.append(overhead_figure(overhead, style, out_dir))
    return results
