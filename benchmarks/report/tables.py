"""Summary tables (Markdown and LaTeX booktabs) built from ``records.final_values``.

A cell is ``mean ± std (n)`` over the completed seeds of one (family, model, dataset,
estimator_label), where ``estimator_label`` names one group of runs with the same resolved
config except seed and infrastructure keys (``records.assign_groups``; each seed counted once);
the best mean of each column within a (family, model, dataset) group is bold.
Per-quantity tables add each row's difference from the best row and a Welch t-test p-value.
Every table carries footnotes listing the runs that are not in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.records.files import write_text
from benchmarks.report.records import (
    FACET_COLUMNS,
    QUANTITIES,
    QUANTITY_BY_KEY,
    Quantity,
    final_values,
    main_series,
    with_reference,
)

GROUP = [*FACET_COLUMNS, "estimator_label"]
NA = "\N{EN DASH}"  # an undefined cell
TIMES = "\N{MULTIPLICATION SIGN}"
MAX_FOOTNOTE_RUNS = 25
_TEX_SPECIAL = dict(zip("\\&%$#_{}~^`", [
    r"\textbackslash{}", r"\&", r"\%", r"\$", r"\#", r"\_", r"\{", r"\}",
    r"\textasciitilde{}", r"\textasciicircum{}", "",
], strict=True))  # fmt: skip
# Characters that pdflatex does not take as UTF-8 text: Greek letters and a few symbols.
_TEX_SPECIAL |= dict(zip("τλαβγσμηεΔ±×−≤≥—–·†…", [  # noqa: RUF001
    r"$\tau$", r"$\lambda$", r"$\alpha$", r"$\beta$", r"$\gamma$", r"$\sigma$", r"$\mu$",
    r"$\eta$", r"$\epsilon$", r"$\Delta$", r"$\pm$", r"$\times$", "-", r"$\leq$", r"$\geq$",
    "---", "--", r"$\cdot$", r"\textsuperscript{\dag}", r"\ldots{}",
], strict=True))  # fmt: skip


@dataclass
class TableResult:
    """A written table: its Markdown text (for report.md) and its files."""

    name: str
    caption: str
    markdown: str
    files: list[Path] = field(default_factory=list)


def tex_escape(text: object) -> str:
    """Escape text for LaTeX (pdflatex-safe: common Greek letters and symbols become math)."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value for equal means without assuming equal variances: Welch's t-test
    (``scipy.stats.ttest_ind(equal_var=False)``). NaN when a sample has fewer than 2 values
    or both have zero variance."""
    from scipy.stats import ttest_ind  # here: importing scipy.stats takes a while

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0 and np.var(b) == 0):
        return math.nan
    return float(ttest_ind(a, b, equal_var=False).pvalue)


def summary_stats(fv: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1), n, best flag, difference from best and Welch p per group/quantity.

    ``fv`` is the output of ``records.final_values``. One row per (family, model, dataset,
    estimator_label, quantity). ``best`` is the highest mean (or lowest, for quantities where
    lower is better) within each (family, model, dataset, quantity); ties are all best.
    """
    cols = [*GROUP, "quantity", "mean", "std", "n", "best", "delta", "p"]
    if fv.empty:
        return pd.DataFrame(columns=cols)
    stats = (
        fv.groupby([*GROUP, "quantity"], sort=False)["value"]
        .agg(mean="mean", std="std", n="count", values=list)
        .reset_index()
    )
    out = []
    for _, block in stats.groupby([*FACET_COLUMNS, "quantity"], sort=False):
        q = QUANTITY_BY_KEY[block["quantity"].iloc[0]]
        best_mean = block["mean"].max() if q.higher_is_better else block["mean"].min()
        block = block.assign(best=np.isclose(block["mean"], best_mean, rtol=0, atol=1e-12))
        best_values = block.loc[block["best"], "values"].iloc[0]
        block["delta"] = block["mean"] - best_mean
        block["p"] = [
            math.nan if is_best else welch_p(v, best_values)
            for v, is_best in zip(block["values"], block["best"], strict=True)
        ]
        out.append(block)
    order = {q.key: i for i, q in enumerate(QUANTITIES)}
    stats = pd.concat(out, ignore_index=True).sort_values(
        [*GROUP, "quantity"], key=lambda s: s.map(order) if s.name == "quantity" else s
    )
    return stats[cols].reset_index(drop=True)


def format_cell(mean: float, std: float, n: int, decimals: int, latex: bool = False) -> str:
    """``mean ± std (n)`` (``mean (n)`` when std is undefined), in Markdown or LaTeX (in math
    mode, which :func:`booktabs_table` bolds with ``\boldmath``)."""
    body = f"{mean:.{decimals}f}"
    if not (isinstance(std, float) and math.isnan(std)):
        body += (r" \pm " if latex else " ± ") + f"{std:.{decimals}f}"
    return f"${body}$ ({n})" if latex else f"{body} ({n})"


def format_p(p: float, latex: bool = False) -> str:
    """p-value text: ``<0.001``, ``0.042``; ``–`` when undefined."""
    if math.isnan(p):
        return "--" if latex else NA
    if p < 0.001:
        return "$<$0.001" if latex else "<0.001"
    return f"{p:.3f}"


def _excluded_groups(runs: pd.DataFrame) -> set[tuple]:
    bad = runs[runs["status"] != "completed"]
    return {tuple(str(x) for x in r) for r in bad[GROUP].fillna("").to_numpy()}


def footnotes(runs: pd.DataFrame) -> list[str]:
    """One line per run that is not in the tables (any status other than completed)."""
    bad = runs[runs["status"] != "completed"].sort_values(["status", "run_id"])
    lines = []
    for _, r in bad.iterrows():
        who = r["estimator_label"] if isinstance(r["estimator_label"], str) else None
        who = who or (r["overrides"] or "")
        seed = "" if pd.isna(r["seed"]) else f", seed {r['seed']}"
        reason = f": {r['reason']}" if isinstance(r["reason"], str) and r["reason"] else ""
        lines.append(f"{r['run_id']} ({who}{seed}) — {r['status']}{reason}")
    if len(lines) > MAX_FOOTNOTE_RUNS:
        extra = len(lines) - MAX_FOOTNOTE_RUNS
        lines = [*lines[:MAX_FOOTNOTE_RUNS], f"… and {extra} more (see report.md)"]
    return lines


def md_cell(value: object) -> str:
    """``value`` as the text of one Markdown table cell: a ``|`` would end the cell and a line
    break the row, so pipes are escaped and line breaks become spaces."""
    text = str(value).replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return text.replace("|", "\\|")


def _bold_where(cells: pd.DataFrame, best: pd.DataFrame | None, bold) -> pd.DataFrame:
    """``cells`` with ``bold(cell)`` where the mask ``best`` (same shape) is true."""
    if best is None:
        return cells
    mask = np.asarray(best, dtype=bool)
    return pd.DataFrame(
        np.where(mask, cells.map(bold).to_numpy(), cells.to_numpy()), columns=cells.columns
    )


def markdown_table(
    frame: pd.DataFrame, best: pd.DataFrame | None = None, floatfmt: str | None = None
) -> str:
    """``frame`` as a GitHub Markdown table: every cell and header through :func:`md_cell`,
    floats formatted with ``floatfmt`` (else ``str``), the cells where the mask ``best`` is
    true in bold; ``(none)`` when it has no rows. Every Markdown table is written here (the
    report's, the throughput summaries', the probe ranking's)."""
    if frame.empty:
        return "(none)\n"
    cells = frame.astype(object)
    if floatfmt is not None:
        cells = cells.map(lambda v: format(v, floatfmt) if isinstance(v, float) else v)
    cells = _bold_where(cells.map(md_cell), best, lambda c: f"**{c}**")
    cells.columns = [md_cell(c) for c in frame.columns]
    return cells.to_markdown(index=False, disable_numparse=True) + "\n"


def booktabs_table(
    frame: pd.DataFrame, best: pd.DataFrame | None = None, n_text: int = 0
) -> list[str]:
    """``frame`` (cells already LaTeX) as the lines of a booktabs ``tabular``: the first
    ``n_text`` columns left-aligned, the others right-aligned, a rule between facets (the
    leading :data:`FACET_COLUMNS`), the cells where the mask ``best`` is true in bold."""
    cells = _bold_where(frame.astype(object), best, lambda c: rf"\textbf{{\boldmath{c}}}")
    align = "l" * n_text + "r" * (frame.shape[1] - n_text)
    lines = [
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(tex_escape(c) for c in frame.columns) + r" \\",
        "\\midrule",
    ]
    previous = None
    for row in cells.itertuples(index=False):
        group = tuple(row[: len(FACET_COLUMNS)])
        if previous is not None and group != previous:
            lines.append("\\midrule")
        previous = group
        lines.append(" & ".join(str(c) for c in row) + r" \\")
    return [*lines, "\\bottomrule", "\\end{tabular}"]


def _markdown(
    frame: pd.DataFrame, note: str, excluded: list[str], best: pd.DataFrame | None = None
) -> str:
    text = markdown_table(frame, best) + "\n" + note + "\n"
    if excluded:
        text += "\n† Not included (not completed):\n\n" + "".join(
            f"- {md_cell(x)}\n" for x in excluded
        )
    return text


def _booktabs(
    frame: pd.DataFrame,
    note: str,
    excluded: list[str],
    n_text: int,
    best: pd.DataFrame | None = None,
) -> str:
    """A booktabs ``tabular`` (:func:`booktabs_table`) followed by its footnotes."""
    lines = [
        "% Generated by gradbench-report; needs \\usepackage{booktabs}.",
        *booktabs_table(frame, best, n_text),
    ]
    lines += ["", "\\par\\smallskip", "{\\footnotesize"]
    lines.append(tex_escape(note).replace("**", "") + "\\par")
    if excluded:
        lines.append(r"\textsuperscript{\dag}Not included (not completed):")
        lines += [
            tex_escape(x) + ("\\par" if i == len(excluded) - 1 else ";")
            for i, x in enumerate(excluded)
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _identity_cells(key: tuple, excluded: set[tuple], latex: bool) -> list[str]:
    label = str(key[-1]) + (" †" if tuple(str(x) for x in key) in excluded else "")
    cells = [str(x) for x in key[:-1]] + [label]
    return [tex_escape(c) for c in cells] if latex else cells


def summary_table(stats: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> TableResult | None:
    """All quantities side by side (``summary.md``/``summary.tex``); None without data."""
    if stats.empty:
        return None
    quantities = [q for q in QUANTITIES if (stats["quantity"] == q.key).any()]
    excluded_groups = _excluded_groups(runs)
    md_rows, tex_rows, best_rows = [], [], []
    for key, block in stats.groupby(GROUP, sort=True):
        cells = {r.quantity: r for r in block.itertuples()}
        md, tex = (
            _identity_cells(key, excluded_groups, False),
            _identity_cells(key, excluded_groups, True),
        )
        best = [False] * len(md)
        for q in quantities:
            r = cells.get(q.key)
            md.append(NA if r is None else format_cell(r.mean, r.std, r.n, q.decimals))
            tex.append("--" if r is None else format_cell(r.mean, r.std, r.n, q.decimals, True))
            best.append(r is not None and bool(r.best))
        md_rows.append(md)
        tex_rows.append(tex)
        best_rows.append(best)
    header = [*FACET_COLUMNS, "estimator", *(q.title for q in quantities)]
    note = (
        "Mean ± sample std (number of completed seeds). **Bold**: best per column within each "
        "(family, model, dataset); higher is better for ELBO, IWAE and steps/s, lower for "
        "variance and f-evaluations. "
        + " ".join(f"{q.title}: {q.description}." for q in quantities)
    )
    excluded, best = footnotes(runs), pd.DataFrame(best_rows, columns=header)
    md = _markdown(pd.DataFrame(md_rows, columns=header), note, excluded, best)
    tex = _booktabs(pd.DataFrame(tex_rows, columns=header), note, excluded, len(GROUP), best)
    caption = "Final values over seeds (all quantities)."
    return TableResult("summary", caption, md, _write(out_dir, "summary", md, tex))


def quantity_table(
    stats: pd.DataFrame,
    runs: pd.DataFrame,
    q: Quantity,
    out_dir: Path,
) -> TableResult | None:
    """One quantity with each row's difference from the best and a Welch t-test p-value."""
    part = stats[stats["quantity"] == q.key]
    if part.empty:
        return None
    excluded_groups = _excluded_groups(runs)
    md_rows, tex_rows = [], []
    for r in part.itertuples():
        key = tuple(getattr(r, c) for c in GROUP)
        delta = "0" if r.best else f"{r.delta:+.{q.decimals}f}"
        md_rows.append(
            [
                *_identity_cells(key, excluded_groups, False),
                format_cell(r.mean, r.std, r.n, q.decimals),
                delta,
                "best" if r.best else format_p(r.p),
            ]
        )
        tex_rows.append(
            [
                *_identity_cells(key, excluded_groups, True),
                format_cell(r.mean, r.std, r.n, q.decimals, latex=True),
                f"${delta}$",
                "best" if r.best else format_p(r.p, latex=True),
            ]
        )
    header = [*FACET_COLUMNS, "estimator", q.title, "Δ vs best", "p (Welch)"]
    best = pd.DataFrame(False, index=range(len(md_rows)), columns=header)
    best[q.title] = part["best"].to_numpy(bool)
    direction = "higher" if q.higher_is_better else "lower"
    note = (
        f"{q.title}: {q.description}. Mean ± sample std (number of completed seeds); **bold**: "
        f"best ({direction} is better) within each (family, model, dataset). Δ: difference of "
        "the mean from the best row's; p: two-sided Welch t-test against the best row's seeds "
        f"({NA} when a row has fewer than two seeds)."
    )
    excluded = footnotes(runs)
    md = _markdown(pd.DataFrame(md_rows, columns=header), note, excluded, best)
    tex = _booktabs(pd.DataFrame(tex_rows, columns=header), note, excluded, len(GROUP), best)
    name = q.key.replace("log10 ", "log10_").replace("/", "_")
    return TableResult(
        name, f"{q.title} with differences from the best.", md, _write(out_dir, name, md, tex)
    )


def basket_table(df: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> TableResult | None:
    """log10 probe variance of every probed estimator at the last probe step, per trajectory."""
    done = df[(df["status"] == "completed") & (df["split"] == "probe")]
    rows = done[(done["metric"] == "grad_var") & (done["value"] > 0)]
    if rows.empty or (rows["probe_label"] == rows["estimator_label"]).all():
        return None
    rows = main_series(rows)
    last = rows[rows["step"] == rows.groupby("run_id")["step"].transform("max")]
    last = last.groupby([*GROUP, "probe_label", "run_id"], as_index=False)["value"].mean()
    last["value"] = np.log10(last["value"])
    stats = (
        last.groupby([*GROUP, "probe_label"])["value"]
        .agg(mean="mean", std="std", n="count")
        .reset_index()
    )
    best = stats.groupby(GROUP)["mean"].transform("min")
    stats["best"] = np.isclose(stats["mean"], best, rtol=0, atol=1e-12)
    md_rows, tex_rows = [], []
    for r in stats.itertuples():
        ident = [*(getattr(r, c) for c in FACET_COLUMNS), r.estimator_label, r.probe_label]
        md_rows.append([*map(str, ident), format_cell(r.mean, r.std, r.n, 2)])
        tex_rows.append([*map(tex_escape, ident), format_cell(r.mean, r.std, r.n, 2, latex=True)])
    header = [*FACET_COLUMNS, "trajectory", "probed estimator", "log10 grad. variance"]
    best = pd.DataFrame(False, index=range(len(md_rows)), columns=header)
    best[header[-1]] = stats["best"].to_numpy(bool)
    note = (
        "Gradient basket: log10 `probe/grad_var` of each probed estimator, measured at the same "
        "parameters along the trajectory of the run's own estimator, at each run's last probe "
        "step. Mean ± sample std (completed seeds); **bold**: lowest per trajectory."
    )
    excluded = footnotes(runs)
    md = _markdown(pd.DataFrame(md_rows, columns=header), note, excluded, best)
    tex = _booktabs(pd.DataFrame(tex_rows, columns=header), note, excluded, len(GROUP) + 1, best)
    return TableResult(
        "grad_var_basket",
        "Gradient basket at the last probe step.",
        md,
        _write(out_dir, "grad_var_basket", md, tex),
    )


def benchmark_table(tp: pd.DataFrame | None, out_dir: Path) -> TableResult | None:
    """pytest-benchmark timings with each row's time relative to the hand-written reference."""
    if tp is None or tp.empty:
        return None
    keys = [k for k in ("family", "arch", "batch_size", "num_samples", "threads", "device")
            if k in tp]  # fmt: skip
    tp = with_reference(tp).sort_values(["kind", *keys, "label"])
    cols = ["kind", "label", *keys]
    md_rows, tex_rows = [], []
    for r in tp.itertuples():
        ident = [str(getattr(r, c)) for c in cols]
        nums = [
            f"{1e3 * r.median_s:.3f}",
            f"{r.per_s:.1f}",
            NA if math.isnan(r.ratio) else f"{r.ratio:.2f}{TIMES}",
        ]
        md_rows.append(ident + nums)
        tex_rows.append([tex_escape(x) for x in ident + nums])
    header = ["benchmark", "estimator", *keys, "median (ms)", "calls/s", f"{TIMES} reference"]
    note = (
        f"pytest-benchmark medians; {TIMES} reference: median time relative to the hand-written "
        "reference training step of the same case (family, architecture, batch size, S, "
        "threads, device and, where the reference is written per estimator, estimator); for "
        "the harness's training step this is its overhead over a hand-written loop, timed in "
        "a separate test (it drifts with the machine's load; `python -m "
        "benchmarks.throughput.summary --measure` times the two interleaved)."
    )
    return _plain_table(
        "throughput_benchmark", "Throughput (pytest-benchmark).", header, md_rows, tex_rows,
        note, len(cols), out_dir,
    )  # fmt: skip


def overhead_frame(ov: pd.DataFrame) -> pd.DataFrame:
    """The cells (text) of the overhead table, one row per case of ``ov`` (the columns of
    :data:`records.OVERHEAD_COLUMNS` that a measurement's ``results`` hold)."""
    rows = []
    for r in ov.itertuples():
        has_target = r.target is not None and not pd.isna(r.target)
        ident = (r.label, r.family, r.batch_size, r.num_samples, r.device, r.threads)
        rows.append(
            [str(x) for x in ident]
            + [
                f"{r.harness_ms:.2f}",
                f"{r.handwritten_ms:.2f}",
                f"{r.ratio:.3f}",
                f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                f"≤ {r.target:.2f}" if has_target else NA,
                ("yes" if r.ratio <= r.target else "no") if has_target else NA,
            ]
        )
    header = ["estimator", "family", "B", "S", "device", "threads", "harness (ms)",
              "hand-written (ms)", "ratio", "95% CI", "target", "met"]  # fmt: skip
    return pd.DataFrame(rows, columns=header)


def overhead_table(ov: pd.DataFrame | None, out_dir: Path) -> TableResult | None:
    """The harness's overhead measured side by side (interleaved), with the targets."""
    if ov is None or ov.empty:
        return None
    ov = ov.sort_values(["device", "threads", "batch_size", "family", "label"])
    frame = overhead_frame(ov)
    sources = ", ".join(
        f"{src} ({date}, commit {str(commit)[:10]})"
        for src, date, commit in ov[["source", "date", "git_commit"]]
        .drop_duplicates()
        .itertuples(index=False)
    )
    note = (
        "Harness training step / hand-written training step of the same model and estimator, "
        "timed in interleaved blocks (`python -m benchmarks.throughput.summary --measure`): "
        "median ratio over blocks with a 95% percentile-bootstrap interval over blocks; times "
        f"are medians per step. From: {sources}."
    )
    return _plain_table(
        "harness_overhead", "Harness overhead against a hand-written step (interleaved).",
        list(frame.columns), frame.to_numpy().tolist(), frame.map(tex_escape).to_numpy().tolist(),
        note, 6, out_dir,
    )  # fmt: skip


def _plain_table(
    name: str,
    title: str,
    header: list[str],
    md_rows: list[list[str]],
    tex_rows: list[list[str]],
    note: str,
    n_text: int,
    out_dir: Path,
) -> TableResult:
    """A table without excluded runs, as Markdown and booktabs LaTeX under ``name``."""
    md = _markdown(pd.DataFrame(md_rows, columns=header), note, [])
    tex = _booktabs(pd.DataFrame(tex_rows, columns=header), note, [], n_text)
    return TableResult(name, title, md, _write(out_dir, name, md, tex))


def _write(out_dir: Path, name: str, md: str, tex: str) -> list[Path]:
    return [write_text(out_dir / f"{name}.md", md), write_text(out_dir / f"{name}.tex", tex)]


def all_tables(
    df: pd.DataFrame,
    runs: pd.DataFrame,
    throughput: pd.DataFrame | None,
    out_dir: Path,
    overhead: pd.DataFrame | None = None,
) -> tuple[list[TableResult], pd.DataFrame]:
    """Every table of a report, and the statistics behind them (also ``summary_stats.csv``)."""
    fv = final_values(df)
    stats = summary_stats(fv)
    write_text(out_dir / "final_values.csv", fv.to_csv(index=False))
    write_text(out_dir / "summary_stats.csv", stats.to_csv(index=False))
    results = [summary_table(stats, runs, out_dir)]
    results += [quantity_table(stats, runs, q, out_dir) for q in QUANTITIES]
    results += [basket_table(df, runs, out_dir), benchmark_table(throughput, out_dir)]
    results.append(overhead_table(overhead, out_dir))
    return [r for r in results if r is not None], stats
