"""``gradbench-report``: records -> figures, tables and ``report.md``.

Usage::

    python -m benchmarks.report SWEEP_DIR... [--out DIR] [--throughput JSON...] \
        [--overhead JSON...]

Reads run records only (``run.json`` + metrics, Hydra's ``multirun.yaml``), never torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from benchmarks.records.files import write_text
from benchmarks.report.records import (
    FACET_COLUMNS,
    INFRASTRUCTURE_KEYS,
    STATUS_ORDER,
    discover,
    flatten_config,
    load_overhead,
    load_records,
    load_throughput,
)
from benchmarks.report.tables import NA, markdown_table


def _code(text: object) -> str:
    text = str(text)
    return f"`{text}`" if text and text != "nan" else NA


def _provenance(runs: pd.DataFrame) -> list[str]:
    out: list[str] = []
    present = runs[runs["status"] != "missing"]

    def counts(cols: list[str], title: str) -> None:
        cols = [c for c in cols if c in present]
        out.append(f"### {title}\n")
        if not cols or present.empty:
            out.append("(not recorded)\n")
            return
        text = present[cols].map(lambda v: NA if v is None or pd.isna(v) else str(v))
        table = text.value_counts(dropna=False).rename("runs").reset_index()
        out.append(markdown_table(table))

    counts(["git_commit", "git_dirty"], "Code (git commit; dirty = uncommitted changes)")
    counts(sorted(c for c in runs if c.startswith("version_")), "Package versions")
    counts(["device"], "Devices")

    out.append("### Configurations\n")
    out.append("Distinct configurations (each job's Hydra overrides without `seed`):\n")
    rows = []
    for _, r in runs.iterrows():
        config = " ".join(
            o for o in str(r["overrides"] or "").split() if not o.startswith("seed=")
        )
        rows.append(
            {"overrides": config or "(defaults)", "seed": r["seed"], "status": r["status"]}
        )
    cfg = pd.DataFrame(rows)
    if not cfg.empty:
        cfg = (
            cfg.groupby("overrides", sort=True)
            .agg(
                runs=("status", "size"),
                seeds=("seed", lambda s: ", ".join(str(x) for x in sorted(s.dropna()))),
                statuses=(
                    "status",
                    lambda s: ", ".join(
                        f"{k} {v}" for k, v in s.value_counts().sort_index().items()
                    ),
                ),
            )
            .reset_index()
        )
        cfg["overrides"] = cfg["overrides"].map(_code)
    out.append(markdown_table(cfg))
    flat = [flatten_config(c) for c in runs["config"] if isinstance(c, dict)]
    if flat:
        keys = sorted(set().union(*flat))
        varying = {k: sorted({repr(f.get(k)) for f in flat}) for k in keys}
        varying = {k: v for k, v in varying.items() if len(v) > 1}
        common = {k: flat[0].get(k) for k in keys if k not in varying}
        out.append("\nResolved config keys that differ between runs:\n")
        out.append(
            markdown_table(
                pd.DataFrame(
                    [{"key": _code(k), "values": ", ".join(v)} for k, v in varying.items()]
                )
            )
        )
        shared = "\n".join(f"{k}: {v!r}" for k, v in common.items())
        out.append(
            "\n<details><summary>Config keys shared by all runs</summary>\n\n"
            f"```\n{shared}\n```\n\n</details>\n"
        )
    return out


def _runs_section(runs: pd.DataFrame, argv: Sequence[str], paths: Sequence[str]) -> list[str]:
    """The header, the command that rebuilds the report and the runs by status."""
    status_counts = runs["status"].value_counts()
    statuses = [*STATUS_ORDER, *sorted(set(status_counts.index) - set(STATUS_ORDER))]
    status_table = pd.DataFrame(
        [{"status": s, "runs": int(status_counts[s])} for s in statuses if s in status_counts]
    )
    return [
        "# gradbench report\n",
        f"Built by `gradbench-report` from the records of {len(runs)} runs in "
        + ", ".join(_code(p) for p in paths)
        + ". It reads `run.json`, metrics files and qualitative records only.\n",
        "Regenerate with:\n",
        "```bash\n" + shlex.join(["python", "-m", "benchmarks.report", *argv]) + "\n```\n",
        "## Runs\n",
        markdown_table(status_table),
    ]


def _left_out_section(runs: pd.DataFrame) -> list[str]:
    """The runs that did not complete, which figures and tables leave out."""
    bad = runs[runs["status"] != "completed"].sort_values(["status", "run_id"])
    lines = ["\n### Runs not in the figures and tables\n"]
    if bad.empty:
        return [*lines, "All runs completed.\n"]
    lines.append("Figures and tables aggregate completed runs only; these are left out:\n")
    table = bad[["run_id", "estimator_label", "seed", "status", "reason", "run_dir"]]
    table = table.astype(object)  # a run without a seed holds a dash, not a number
    table["estimator_label"] = table["estimator_label"].fillna(bad["overrides"])
    table["run_dir"] = table["run_dir"].map(_code)
    return [*lines, markdown_table(table.fillna(NA).astype(str))]


def _duplicates_section(runs: pd.DataFrame) -> list[str]:
    """How runs are grouped, and the completed runs that repeat a seed of their group."""
    lines = [
        "\n### Duplicate seeds\n",
        "Runs are grouped by their whole resolved config except `seed` and the "
        "infrastructure keys " + ", ".join(f"`{k}`" for k in INFRASTRUCTURE_KEYS) + "; "
        "groups that share an estimator label are told apart by the config keys in which "
        "they differ (`label [key=value]`).\n",
    ]
    dups = runs[runs["duplicate_of"].notna()] if "duplicate_of" in runs else runs.iloc[:0]
    if dups.empty:
        return [*lines, "No seed appears twice in a group.\n"]
    lines.append(
        "These completed runs repeat the seed of an earlier run (in run-id order) of the "
        "same group; only that run is in the figures and tables:\n"
    )
    table = dups[["run_id", "estimator_label", "seed", "duplicate_of", "run_dir"]]
    table = table.astype(object).sort_values("run_id")
    table["run_dir"] = table["run_dir"].map(_code)
    return [*lines, markdown_table(table.fillna(NA).astype(str))]


def _figures_section(out: Path, figures: list) -> list[str]:
    """Every figure (PNG inline, PDF linked), then the skipped ones with the reason."""
    lines = [
        "\n## Figures\n",
        "Each estimator keeps one colour and marker in every figure; groups of one estimator "
        "label with different settings share its colour, each with a marker of its own "
        "(mapping: [figures/palette.json](figures/palette.json)).\n",
    ]
    for fig in figures:
        if fig.skipped:
            continue
        png, pdf = (f.relative_to(out).as_posix() for f in fig.files)
        lines.append(
            f"### {fig.name}\n\n{fig.caption}\n\n![{fig.name}]({png})\n\n"
            f"Vector version: [{pdf}]({pdf})\n"
        )
    skipped = [f for f in figures if f.skipped]
    if skipped:
        lines.append("### Skipped figures\n")
        lines += [f"- `{f.name}`: {f.skipped}" for f in skipped]
        lines.append("")
    return lines


def _tables_section(out: Path, tables: list) -> list[str]:
    """Every table in Markdown, with links to its files."""
    lines = [
        "\n## Tables\n",
        "Per-run final values: `final_values.csv`; aggregated: `summary_stats.csv`.\n",
    ]
    for table in tables:
        links = ", ".join(f"[{f.name}]({f.relative_to(out).as_posix()})" for f in table.files)
        lines.append(f"### {table.name}\n\n{table.caption} Files: {links}.\n\n{table.markdown}")
    return lines


def _sweeps_section(runs: pd.DataFrame, sweeps: list) -> list[str]:
    """Each sweep's expected and found jobs and the commands that launched it."""
    lines = ["## Provenance\n\n### Sweeps\n"]
    if not sweeps:
        return [*lines, "- single run directories (no multirun.yaml)", ""]
    for sweep in sweeps:
        n = "unknown" if sweep.expected is None else len(sweep.expected)
        found = (runs["sweep_dir"] == str(sweep.path)).sum() if "sweep_dir" in runs else 0
        commands = ", then ".join(_code(c) for c in sweep.commands) or _code("unknown")
        lines.append(
            f"- {_code(sweep.path)}: {n} jobs expected, {found} listed here. "
            f"{'Commands' if len(sweep.commands) > 1 else 'Command'}: {commands}"
        )
    return [*lines, ""]


def _recompute_section(paths: Sequence[str]) -> list[str]:
    """A snippet that recomputes a table number from the records."""
    return [
        "\n## Recompute a table number\n",
        "```python\nfrom benchmarks.report import final_values, load_records\n\n"
        f"metrics, runs = load_records({list(map(str, paths))!r})\n"
        "fv = final_values(metrics)  # one row per (completed run, quantity)\n"
        f'fv[fv.quantity == "test/elbo"].groupby({[*FACET_COLUMNS, "estimator_label"]!r})'
        '["value"].agg(["mean", "std", "count"])\n```\n',
    ]


def write_report_md(
    out: Path,
    argv: Sequence[str],
    paths: Sequence[str],
    runs: pd.DataFrame,
    figures: list,
    tables: list,
    sweeps: list,
) -> Path:
    """Write ``out/report.md``: runs and their status, figures, tables, provenance."""
    lines = [
        *_runs_section(runs, argv, paths),
        *_left_out_section(runs),
        *_duplicates_section(runs),
        *_figures_section(out, figures),
        *_tables_section(out, tables),
        *_sweeps_section(runs, sweeps),
        *_provenance(runs),
        *_recompute_section(paths),
    ]
    return write_text(out / "report.md", "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``gradbench-report``."""
    parser = argparse.ArgumentParser(
        prog="gradbench-report",
        description="Figures and tables from gradbench run records (reads files only).",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="SWEEP_DIR",
        help="sweep directories, run directories, or folders holding them",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: FIRST_SWEEP_DIR/report)"
    )
    parser.add_argument(
        "--throughput",
        nargs="+",
        action="extend",
        default=[],
        metavar="JSON",
        help="pytest-benchmark JSON files (--benchmark-json) to plot",
    )
    parser.add_argument(
        "--overhead",
        nargs="+",
        action="extend",
        default=[],
        metavar="JSON",
        help="interleaved harness-overhead measurements (overhead_<device>.json written by "
        "`python -m benchmarks.throughput.summary --measure`) to plot and tabulate",
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="bootstrap resamples for 95%% bands (default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when any run is not completed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build a report; returns the process exit status (0 on success)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = args.out or Path(args.paths[0]) / "report"
    from benchmarks.report.figures import all_figures, palette_json
    from benchmarks.report.pictures import continuity_table, latent_figures
    from benchmarks.report.style import estimator_style
    from benchmarks.report.tables import all_tables

    try:
        _, sweeps = discover(args.paths)
        metrics, runs = load_records(args.paths)
        throughput = load_throughput(args.throughput) if args.throughput else None
        overhead = load_overhead(args.overhead) if args.overhead else None
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"gradbench-report: error: {err}", file=sys.stderr)
        return 1
    if runs.empty:
        print(f"gradbench-report: error: no run directories under {args.paths}", file=sys.stderr)
        return 1
    labels = set(runs["estimator_label"].dropna()) | set(metrics["estimator_label"].dropna())
    labels |= set(metrics.get("probe_label", pd.Series(dtype=str))) - {""}
    if throughput is not None and not throughput.empty:
        labels |= set(throughput["label"].dropna())
    if overhead is not None:
        labels |= set(overhead["label"].dropna())
    grouped = runs[runs["base_label"].notna() & (runs["estimator_label"] != runs["base_label"])]
    base = dict(zip(grouped["estimator_label"], grouped["base_label"], strict=True))
    style = estimator_style(labels, base)  # groups of one estimator keep its colour
    out.mkdir(parents=True, exist_ok=True)
    figures = all_figures(
        metrics, runs, throughput, style, out / "figures", args.n_boot, args.seed, overhead
    )
    figures += latent_figures(runs, style, out / "figures")  # from the qualitative records
    write_text(out / "figures" / "palette.json", palette_json(style, figures))
    tables, _ = all_tables(metrics, runs, throughput, out / "tables", overhead)
    tables += [t for t in [continuity_table(metrics, out / "tables")] if t is not None]
    write_text(out / "runs.csv", runs.drop(columns=["config"]).to_csv(index=False))
    report = write_report_md(out, argv, args.paths, runs, figures, tables, sweeps)
    n_bad = int((runs["status"] != "completed").sum())
    n_fig = sum(1 for f in figures if not f.skipped)
    print(
        f"gradbench-report: wrote {report} ({len(runs) - n_bad} completed runs, {n_bad} not "
        f"completed; {n_fig} figures, {len(figures) - n_fig} skipped; {len(tables)} tables)"
    )
    return 1 if args.strict and n_bad else 0
