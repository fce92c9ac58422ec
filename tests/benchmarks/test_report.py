"""Tests for ``benchmarks.report``: figures, tables and report.md from run records only.

The records are written here (parquet/CSV + run.json + Hydra files), independently of the
training harness, following the record contract of DESIGN.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks.report import estimator_style, final_values, load_records, main
from benchmarks.report.figures import align_runs
from benchmarks.report.records import discover
from benchmarks.report.tables import NA, welch_p
from benchmarks.report.time_figure import time_breakdown

REPO = Path(__file__).resolve().parents[2]
GS1 = "gumbel_softmax (ST, τ=1)"
GS05 = "gumbel_softmax (ST, τ=0.5)"
RLOO = "rloo (S=2)"
REPARAM = "reparam"
FACET = {"family": "bernoulli", "model": "linear", "dataset": "mnist_subset"}
GAUSS = {"family": "gaussian", "model": "nonlinear", "dataset": "digits"}
STEPS = np.arange(0, 101, 10)
EXPECTED_FIGURES = [
    "elbo_vs_steps",
    "elbo_vs_wall_time",
    "elbo_vs_f_evals",
    "grad_var_vs_steps",
    "grad_var_basket",
    "grad_snr_vs_steps",
    "grad_bias_vs_steps",
    "temperature_ablation",
    "throughput_runs",
    "time_breakdown",
    "throughput_benchmark",
    "harness_overhead",
]
EXPECTED_TABLES = [
    "summary",
    "test_elbo",
    "test_iwae",
    "log10_probe_grad_var",
    "throughput_steps_per_s",
    "f_evals_per_step",
    "grad_var_basket",
    "throughput_benchmark",
    "harness_overhead",
]


# ------------------------------------------------------------------------- record writers


def _metrics(
    run_id: str,
    estimator: str,
    label: str,
    seed: int,
    *,
    diverge_at: int | None = None,
    facet: dict = FACET,
) -> pd.DataFrame:
    """Tidy long-format records of one synthetic run (deterministic in label and seed)."""
    rng = np.random.default_rng(zlib.crc32(f"{label}/{seed}".encode()))
    s_per_step = 2 if estimator == "rloo" else 1
    level = {GS1: -100.0, GS05: -102.0, RLOO: -98.0, REPARAM: -90.0}[label]
    basket = ((GS1, 0.5), (RLOO, 1.5)) if facet is FACET else ((REPARAM, -1.0),)
    rows = []

    def add(step: int, split: str, metric: str, value: float, probe: str = "") -> None:
        wall = step * 0.01 * (1.0 + 0.1 * seed) + 0.05 * rng.random()
        rows.append(
            {
                "run_id": run_id,
                "estimator": estimator,
                "estimator_label": label,
                **facet,
                "seed": seed,
                "step": int(step),
                "wall_time": wall,
                "f_evals": float(step * s_per_step),
                "split": split,
                "metric": metric,
                "value": float(value),
                "probe_estimator": probe,
            }
        )

    for step in STEPS:
        elbo = level - 50.0 * np.exp(-step / 30) + rng.normal(0, 0.5)
        if diverge_at is not None and step >= diverge_at:
            elbo = np.nan
        add(step, "train", "elbo", elbo)
        add(step, "train", "grad_var_ema", 10.0 ** (2 - step / 100 + rng.normal(0, 0.1)))
        if step % 50 == 0 and step > 0:
            add(step, "test", "elbo", elbo + rng.normal(0, 0.3))
            add(step, "test", "iwae", elbo + 1.5 + rng.normal(0, 0.3))
            add(step, "throughput", "steps_per_s", 120.0 / s_per_step + rng.normal(0, 3))
        if step % 50 == 0:
            for probe, base in basket:
                var = 10.0 ** (base - step / 200 + rng.normal(0, 0.05))
                add(step, "probe", "grad_var", var, probe)
                add(step, "probe", "grad_var_se", 0.1 * var, probe)
                add(step, "probe", "grad_snr", 1.0 / np.sqrt(var), probe)
                add(step, "probe", "grad_bias2", (0.01 if probe == GS1 else 1e-5) * var, probe)
                add(step, "probe", "grad_cos", 0.9 if probe == GS1 else 0.97, probe)
        if step % 50 == 0 and step > 0:  # cumulative seconds per phase, before each checkpoint
            for phase, seconds in _time_rows(label, seed, step).items():
                add(step, "time", phase, seconds)
    frame = pd.DataFrame(rows)
    frame["some_future_column"] = "ignored"  # unknown columns must be tolerated
    return frame


def _time_rows(label: str, seed: int, step: int) -> dict[str, float]:
    """Cumulative seconds per phase of a synthetic run at ``step``."""
    frac = step / STEPS[-1]
    return {
        "startup": 1.0 + 0.5 * seed, "train": frac * (10.0 + seed), "eval": frac * 2.0,
        "probe": frac * (3.0 if label == RLOO else 4.0), "checkpoint": frac * 0.5,
    }  # fmt: skip


def _write_run(
    job: Path,
    overrides: list[str],
    info: dict | None,
    metrics: pd.DataFrame | None,
    csv: bool = False,
) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    if info is not None:
        (job / "run.json").write_text(json.dumps(info))
    if metrics is not None:
        if csv:
            metrics.to_csv(job / "metrics.csv", index=False)
        else:
            metrics.to_parquet(job / "metrics.parquet", index=False)


def _info(
    run_id: str,
    estimator: str,
    label: str,
    seed: int,
    status: str,
    reason: str | None,
    temperature: float | None = None,
    facet: dict = FACET,
) -> dict:
    est = {"name": estimator, "num_samples": 2 if estimator == "rloo" else 1}
    if temperature is not None:
        est |= {"temperature": temperature, "straight_through": True}
    return {
        "run_id": run_id,
        "status": status,
        "reason": reason,
        "config": {
            "estimator": est,
            "model": {"family": facet["family"], "arch": facet["model"]},
            "data": {"name": facet["dataset"]},
            "seed": seed,
            "steps": 100,
        },
        "seed": seed,
        "device": "cpu",
        "versions": {"python": "3.11.0", "torch": "2.4.0", "numpy": "2.0.0", "gradbench": "0.1.0"},
        "git_commit": "abc1234",
        "start_time": "2024-01-01T00:00:00",
        "end_time": None,
        "last_step": 100,
        "estimator": estimator,
        "estimator_label": label,
        **facet,
    }


def _multirun_yaml(sweep: Path, task: list[str], name: str = "multirun.yaml") -> None:
    conf = {
        "hydra": {
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "max_batch_size": None,
                "params": None,
            },
            "overrides": {"task": task},
        },
        "seed": 0,
    }
    (sweep / name).write_text(yaml.safe_dump(conf))


def _main_sweep(root: Path) -> Path:
    """The main sweep of :func:`make_sweeps` (8 jobs, every status)."""
    sweep = root / "sweep"
    sweep.mkdir()
    _multirun_yaml(sweep, ["estimator=gumbel_softmax,rloo", "seed=0,1,2,3"])
    jobs = [(e, s) for e in ("gumbel_softmax", "rloo") for s in range(4)]
    for n, (est, seed) in enumerate(jobs):
        label = GS1 if est == "gumbel_softmax" else RLOO
        rid, job = f"main-{n}", sweep / str(n)
        ovs = [f"estimator={est}", f"seed={seed}"]
        tau = 1.0 if est == "gumbel_softmax" else None
        if seed < 2:
            _write_run(
                job,
                ovs,
                _info(rid, est, label, seed, "completed", None, tau),
                _metrics(rid, est, label, seed),
            )
        elif (est, seed) == ("gumbel_softmax", 2):
            _write_run(
                job,
                ovs,
                _info(rid, est, label, seed, "diverged", "non-finite loss", tau),
                _metrics(rid, est, label, seed, diverge_at=60),
            )
        elif (est, seed) == ("rloo", 2):
            _write_run(
                job, ovs, _info(rid, est, label, seed, "failed", "RuntimeError: boom"), None
            )
        elif (est, seed) == ("rloo", 3):
            _write_run(job, ovs, None, None)
    return sweep


def _tau_sweep(root: Path) -> Path:
    """The temperature sweep of :func:`make_sweeps` (metrics as CSV)."""
    tau_sweep = root / "sweep_tau"
    tau_sweep.mkdir()
    _multirun_yaml(
        tau_sweep, ["estimator=gumbel_softmax", "estimator.temperature=0.5", "seed=0,1"]
    )
    for seed in (0, 1):
        rid = f"tau-{seed}"
        ovs = ["estimator=gumbel_softmax", "estimator.temperature=0.5", f"seed={seed}"]
        _write_run(
            tau_sweep / str(seed),
            ovs,
            _info(rid, "gumbel_softmax", GS05, seed, "completed", None, 0.5),
            _metrics(rid, "gumbel_softmax", GS05, seed),
            csv=True,
        )
    return tau_sweep


def _bench_json(root: Path) -> Path:
    """A pytest-benchmark JSON: harness steps of two estimators and the reference step."""
    benches = []
    for kind in ("train_step", "reference_step"):
        for label, est in ((GS1, "gumbel_softmax"), (RLOO, "rloo"), (None, None)):
            if (kind == "reference_step") != (label is None):
                continue
            for bs in (32, 128):
                median = 1e-3 * bs / 32 * (2.0 if est == "rloo" else 1.5 if est else 1.0)
                params = {"family": "bernoulli", "batch_size": bs, "device": "cpu"}
                extra = {"reference": True} if est is None else {"estimator_label": label}
                if est:
                    params["estimator"] = est
                benches.append(
                    {
                        "name": f"test_{kind}[cpu-{est}-{bs}]",
                        "params": params,
                        "extra_info": extra,
                        "stats": {
                            "median": median,
                            "q1": 0.9 * median,
                            "q3": 1.1 * median,
                            "rounds": 10,
                        },
                    }
                )
    path = root / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return path


def make_sweeps(root: Path) -> tuple[Path, Path, Path, Path]:
    """Two sweeps, one single run directory and a pytest-benchmark JSON.

    Main sweep (``estimator=gumbel_softmax,rloo seed=0,1,2,3``, 8 jobs): seeds 0, 1 completed
    for both; gumbel_softmax seed 2 diverged, seed 3 never launched (no dir); rloo seed 2
    failed (no metrics), seed 3 has a job dir without run.json. Temperature sweep: gumbel_softmax
    with τ=0.5, seeds 0 and 1 completed (metrics as CSV). Single run: reparam on another
    (family, model, dataset), one seed.
    """
    sweep, tau_sweep, bench = _main_sweep(root), _tau_sweep(root), _bench_json(root)
    single = root / "single_run"
    _write_run(
        single,
        ["estimator=reparam"],
        _info("single", "reparam", REPARAM, 0, "completed", None, facet=GAUSS),
        _metrics("single", "reparam", REPARAM, 0, facet=GAUSS),
    )
    return sweep, tau_sweep, single, bench


# The report runs once, in a fresh interpreter, so that the modules it imports can be checked.
_RUN_REPORT = """
import json, sys
from benchmarks.report import main
rc = main(json.loads(sys.argv[1]))
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"rc": rc, "torch": torch}))
"""


def run_report_subprocess(argv: list[str]) -> dict:
    """``benchmarks.report.main(argv)`` in a subprocess; its exit code and torch modules."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_REPORT, json.dumps(argv)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_overhead(path: Path) -> dict:
    """An interleaved overhead measurement as ``throughput_summary --measure`` writes it:
    GS1 and RLOO at batch 100 (target 1.10) and 1024 (1.05 / 1.10), reparam without target."""
    results = []
    for batch, target in ((100, 1.10), (1024, 1.05)):
        for label, family, ratio in (
            (GS1, "bernoulli", 1.04 if batch == 100 else 1.07),
            (RLOO, "bernoulli", 1.02),
            (REPARAM, "gaussian", 1.2),
        ):
            limit = None if family == "gaussian" else (1.10 if label == RLOO else target)
            results.append({
                "label": label, "estimator": label.split(" ")[0], "family": family,
                "batch_size": batch, "num_samples": 2 if label == RLOO else 1, "device": "cpu",
                "threads": 1, "harness_ms": 4.2 * ratio, "handwritten_ms": 4.2, "ratio": ratio,
                "ci_low": ratio - 0.013, "ci_high": ratio + 0.021, "target": limit,
                "meets_target": None if limit is None else ratio <= limit, "blocks": 25,
            })  # fmt: skip
    data = {"machine": {"device": "cpu", "date": "2026-01-02T03:04:05+00:00",
                        "git_commit": "def5678"}, "results": results}  # fmt: skip
    path.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the report once on the synthetic sweeps; tests inspect its outputs."""
    root = tmp_path_factory.mktemp("records")
    sweep, tau_sweep, single, bench = make_sweeps(root)
    overhead = write_overhead(root / "overhead_cpu.json")
    out = root / "out"
    argv = [str(sweep), str(tau_sweep), str(single), "--out", str(out),
            "--throughput", str(bench), "--overhead", str(root / "overhead_cpu.json"),
            "--n-boot", "200"]  # fmt: skip
    result = run_report_subprocess(argv)
    return {**result, "out": out, "root": root, "paths": [sweep, tau_sweep, single],
            "bench": bench, "overhead": overhead, "argv": argv}  # fmt: skip


# --------------------------------------------------------------- independent recomputation


def recompute_final_values(paths: list[Path]) -> pd.DataFrame:
    """Per completed run: final quantities, read straight from the files (not via the report)."""
    rows = []
    for run_json in sorted(p for path in paths for p in path.rglob("run.json")):
        info = json.loads(run_json.read_text())
        if info["status"] != "completed":
            continue
        run = run_json.parent
        parquet = run / "metrics.parquet"
        m = pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(run / "metrics.csv")
        m["probe_estimator"] = m["probe_estimator"].fillna("")
        ident = {k: info[k] for k in ("family", "model", "dataset", "estimator_label")}

        def last(split: str, metric: str, frame: pd.DataFrame = m) -> float:
            r = frame[(frame.split == split) & (frame.metric == metric)]
            return float(r.loc[r.step.idxmax(), "value"])

        own = m[(m.split != "probe") | (m.probe_estimator == info["estimator_label"])]
        values = {
            "test/elbo": last("test", "elbo"),
            "test/iwae": last("test", "iwae"),
            "throughput/steps_per_s": float(
                m[(m.split == "throughput") & (m.metric == "steps_per_s")].value.median()
            ),
            "f_evals_per_step": float(m.loc[m.step.idxmax(), "f_evals"] / m.step.max()),
        }
        if ((own.split == "probe") & (own.metric == "grad_var")).any():
            values["log10 probe/grad_var"] = float(np.log10(last("probe", "grad_var", own)))
        rows += [{**ident, "quantity": q, "value": v} for q, v in values.items()]
    fv = pd.DataFrame(rows)
    keys = ["family", "model", "dataset", "estimator_label", "quantity"]
    return fv.groupby(keys)["value"].agg(["mean", "std", "count"]).reset_index()


def parse_cell(cell: str) -> tuple[float, float, int, bool]:
    """``**-1.23 ± 0.45 (2)**`` -> (-1.23, 0.45, 2, True); std NaN when absent."""
    bold = cell.startswith("**")
    match = re.fullmatch(r"\**(-?[\d.]+)(?: ± ([\d.]+))? \((\d+)\)\**", cell.strip())
    assert match, cell
    mean, std, n = match.groups()
    return float(mean), float(std) if std else math.nan, int(n), bold


def markdown_rows(path: Path) -> list[dict[str, str]]:
    """The first Markdown table of a file as dicts (header -> cell text, ``\\|`` unescaped)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = cells(lines[0])
    return [dict(zip(header, cells(ln), strict=True)) for ln in lines[2:]]


# ------------------------------------------------------------------------------- the tests


def test_every_figure_is_written_as_png_and_pdf_at_paper_size(report: dict) -> None:
    """Each expected figure exists as a ≥200 dpi PNG 3.3 or 7 in wide and as a vector PDF."""
    from PIL import Image

    figures = report["out"] / "figures"
    for name in EXPECTED_FIGURES:
        png, pdf = figures / f"{name}.png", figures / f"{name}.pdf"
        assert png.is_file() and pdf.is_file(), name
        assert pdf.read_bytes()[:5] == b"%PDF-"
        with Image.open(png) as img:
            dpi = img.info["dpi"][0]
            width_in = img.size[0] / dpi
        assert dpi >= 200, (name, dpi)
        assert min(abs(width_in - 3.3), abs(width_in - 7.0)) < 0.05, (name, width_in)
    assert not list(figures.glob(".*")), "temporary files left behind"


def test_every_table_is_written_as_markdown_and_latex(report: dict) -> None:
    """Summary, per-quantity, basket and throughput tables exist in .md and booktabs .tex."""
    tables = report["out"] / "tables"
    for name in EXPECTED_TABLES:
        assert (tables / f"{name}.md").is_file(), name
        tex = (tables / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex, name
    assert (report["out"] / "report.md").is_file()


def test_table_values_equal_values_recomputed_from_the_records(report: dict) -> None:
    """mean, std and n in summary_stats.csv and summary.md match an independent computation."""
    expected = recompute_final_values(report["paths"])
    stats = pd.read_csv(report["out"] / "tables" / "summary_stats.csv")
    keys = ["family", "model", "dataset", "estimator_label", "quantity"]
    merged = expected.merge(stats, on=keys, how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    np.testing.assert_allclose(merged["mean_x"], merged["mean_y"], rtol=1e-9)
    np.testing.assert_allclose(merged["std_x"], merged["std_y"], rtol=1e-9)  # NaN == NaN
    assert (merged["count"] == merged["n"]).all()

    from benchmarks.report.records import QUANTITIES

    title = {q.key: (q.title, q.decimals) for q in QUANTITIES}
    rows = markdown_rows(report["out"] / "tables" / "summary.md")
    assert len(rows) == expected.groupby(keys[:4]).ngroups
    for _, r in expected.iterrows():
        row = next(
            x
            for x in rows
            if x["family"] == r.family and x["estimator"].removesuffix(" †") == r.estimator_label
        )
        col, decimals = title[r.quantity]
        mean, std, n, _ = parse_cell(row[col])
        assert mean == pytest.approx(r["mean"], abs=0.51 * 10**-decimals)
        assert n == r["count"]
        if r["count"] > 1:
            assert std == pytest.approx(r["std"], abs=0.51 * 10**-decimals)
        else:
            assert math.isnan(std)


def test_best_value_per_column_and_problem_is_bold(report: dict) -> None:
    """Bold exactly where the mean is best (max ELBO/IWAE/steps per s, min variance/f-evals)."""
    from benchmarks.report.records import QUANTITIES

    expected = recompute_final_values(report["paths"])
    rows = markdown_rows(report["out"] / "tables" / "summary.md")
    tex = (report["out"] / "tables" / "summary.tex").read_text()
    for q in QUANTITIES:
        part = expected[expected.quantity == q.key]
        for family, block in part.groupby("family"):
            best = block["mean"].max() if q.higher_is_better else block["mean"].min()
            for _, r in block.iterrows():
                row = next(
                    x
                    for x in rows
                    if x["family"] == family
                    and x["estimator"].removesuffix(" †") == r.estimator_label
                )
                assert parse_cell(row[q.title])[3] == np.isclose(r["mean"], best), (q.key, r)
    assert "\\textbf{\\boldmath$" in tex
    elbo = markdown_rows(report["out"] / "tables" / "test_elbo.md")
    assert {r["p (Welch)"] for r in elbo if r["test ELBO (nats)"].startswith("**")} == {"best"}
    assert all(
        re.fullmatch(r"<0\.001|0\.\d{3}|1\.000|\u2013", r["p (Welch)"])
        for r in elbo
        if not r["test ELBO (nats)"].startswith("**")
    )


def test_failed_diverged_and_missing_runs_are_listed_never_dropped(report: dict) -> None:
    """report.md and every table's footnotes name each run that is not completed, and why."""
    listed = {
        "main-2": "diverged",
        "main-6": "failed",
        "sweep/3": "missing",
        "sweep/7": "missing",
    }
    report_md = (report["out"] / "report.md").read_text()
    for run_id, status in listed.items():
        assert re.search(rf"\| {re.escape(run_id)} +\|.*\| {status} ", report_md), run_id
    assert "no job directory (listed in multirun.yaml)" in report_md
    assert "no run.json" in report_md
    for name in ("summary", "test_elbo", "log10_probe_grad_var"):
        md = (report["out"] / "tables" / f"{name}.md").read_text()
        tex = (report["out"] / "tables" / f"{name}.tex").read_text()
        for run_id, status in listed.items():
            assert f"- {run_id} (" in md and f"— {status}" in md, (name, run_id)
            assert tex_run(run_id) in tex and f"--- {status}" in tex, (name, run_id)
    runs = pd.read_csv(report["out"] / "runs.csv")
    assert runs["status"].value_counts().to_dict() == {
        "completed": 7,
        "missing": 2,
        "diverged": 1,
        "failed": 1,
    }


def tex_run(run_id: str) -> str:
    """A run id as it appears in LaTeX footnotes."""
    return run_id.replace("_", "\\_")


def test_overhead_table_gives_each_measured_ratio_with_its_interval_and_target(
    report: dict,
) -> None:
    """Every case of the overhead JSON is a row with its times, ratio, interval and target;
    'met' says whether the ratio is within the target (no target: a dash)."""
    rows = markdown_rows(report["out"] / "tables" / "harness_overhead.md")
    assert len(rows) == len(report["overhead"]["results"]) == 6
    by_case = {(r["estimator"], int(r["B"])): r for r in rows}
    for case in report["overhead"]["results"]:
        row = by_case[(case["label"], case["batch_size"])]
        assert float(row["ratio"]) == pytest.approx(case["ratio"], abs=5e-4)
        low, high = (float(x) for x in row["95% CI"].strip("[]").split(","))
        assert (low, high) == pytest.approx((case["ci_low"], case["ci_high"]), abs=5e-4)
        assert float(row["hand-written (ms)"]) == pytest.approx(case["handwritten_ms"], abs=5e-3)
        if case["target"] is None:
            assert row["target"] == row["met"] == NA
        else:
            assert row["target"] == f"≤ {case['target']:.2f}"
            assert row["met"] == ("yes" if case["ratio"] <= case["target"] else "no")
    assert by_case[(REPARAM, 100)]["met"] == NA and by_case[(GS1, 1024)]["met"] == "no"
    text = (report["out"] / "tables" / "harness_overhead.md").read_text()
    assert "def5678" in text and "2026-01-02" in text  # which measurement, from when


def test_a_file_that_is_not_an_overhead_measurement_is_an_error(report: dict) -> None:
    """--overhead with a pytest-benchmark JSON: exit 1 naming the file, nothing written."""
    out = report["root"] / "bad_overhead"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(report["paths"][2]), "--out", str(out),
         "--overhead", str(report["bench"])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert str(report["bench"]) in proc.stderr and "not an overhead measurement" in proc.stderr
    assert not out.exists()


def test_report_md_has_provenance_skips_and_regeneration_command(report: dict) -> None:
    """Commits, versions, devices, configs, the sweep command, skipped figures, the command."""
    text = (report["out"] / "report.md").read_text()
    for needle in (
        "abc1234",
        "2.4.0",
        "| cpu ",
        "`estimator=gumbel_softmax estimator.temperature=0.5`",
        "python -m benchmarks.train --multirun estimator=gumbel_softmax,rloo seed=0,1,2,3",
        "python -m benchmarks.report",
        "--throughput",
        "--overhead",
        "`estimator.temperature`",
    ):
        assert needle in text, needle
    skipped = text.split("### Skipped figures", 1)[1].split("##", 1)[0]
    assert "`val_elbo_vs_steps`" in skipped and "`temperature_vs_steps`" in skipped
    assert not (report["out"] / "figures" / "temperature_vs_steps.png").exists()
    for name in EXPECTED_FIGURES:
        assert f"](figures/{name}.png)" in text


def test_one_colour_and_marker_per_label_in_every_figure(report: dict) -> None:
    """The mapping depends only on the label set; every figure draws a label in its colour."""
    from matplotlib.colors import to_hex

    labels = [GS1, RLOO, GS05, REPARAM, "reference (hand-written)"]
    style = estimator_style(labels)
    assert style == estimator_style(reversed([*labels, GS1]))
    assert len(set(style.colors.values())) == len(labels) == len(set(style.markers.values()))

    palette = json.loads((report["out"] / "figures" / "palette.json").read_text())
    assert set(palette["palette"]) == set(labels)
    for label in labels:
        assert palette["palette"][label] == {
            "color": to_hex(style.color(label)), "marker": style.marker(label)
        }  # fmt: skip
    drawn = palette["figures"]
    assert set(drawn) == set(EXPECTED_FIGURES) - {"time_breakdown"}  # coloured by phase
    for name, colors in drawn.items():  # colours read back from legends and bars as drawn
        assert colors, name
        for label, color in colors.items():
            assert color == palette["palette"][label]["color"], (name, label)
    assert sum(GS1 in c and RLOO in c for c in drawn.values()) >= 5


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not on PATH")
def test_latex_tables_compile(report: dict, tmp_path: Path) -> None:
    """Every .tex table compiles with pdflatex inside a minimal booktabs document."""
    tables = sorted((report["out"] / "tables").glob("*.tex"))
    body = "\n".join(
        f"\\begin{{table}}\\resizebox{{\\linewidth}}{{!}}{{\\input{{{t}}}}}\\end{{table}}"
        for t in tables
    )
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\\usepackage[T1]{fontenc}\\usepackage[utf8]{inputenc}"
        "\\usepackage{booktabs}\\usepackage{graphicx}\\begin{document}\n"
        + body.replace("\\resizebox{\\linewidth}{!}{", "{")
        + "\n\\end{document}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").is_file()


def test_report_process_never_imports_torch(report: dict) -> None:
    """Building the whole report (records -> figures, tables) leaves torch out of sys.modules."""
    assert report["rc"] == 0
    assert report["torch"] == []


def test_discover_lists_jobs_expected_by_multirun_yaml(report: dict) -> None:
    """Jobs of the basic sweeper's product without a directory come back as expected-only."""
    jobs, sweeps = discover([report["paths"][0]])
    assert len(jobs) == 8 and len(sweeps) == 1 and len(sweeps[0].expected) == 8
    absent = [j for j in jobs if j.expected_only]
    assert [(j.name, j.overrides) for j in absent] == [
        ("3", ["estimator=gumbel_softmax", "seed=3"])
    ]


def test_jobs_added_to_a_sweep_dir_are_expected_and_their_command_listed(
    tmp_path: Path,
) -> None:
    """A sweep dir that a later sweep added jobs to (``multirun.1.yaml`` beside the first
    ``multirun.yaml``) expects the jobs of both, each once, and lists both commands."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _multirun_yaml(sweep, ["estimator=rloo", "seed=0,1"])
    _multirun_yaml(sweep, ["estimator=rloo", "seed=1,2"], name="multirun.1.yaml")
    jobs, sweeps = discover([sweep])
    assert sorted(map(sorted, sweeps[0].expected)) == [
        ["estimator=rloo", f"seed={s}"] for s in (0, 1, 2)
    ]
    assert len(sweeps[0].commands) == 2 and "seed=1,2" in sweeps[0].commands[1]
    assert sweeps[0].command == sweeps[0].commands[0]
    assert sorted(j.name for j in jobs if j.expected_only) == ["0", "1", "2"]


def test_strict_mode_fails_on_incomplete_runs_and_bad_paths_fail(
    tmp_path: Path, report: dict
) -> None:
    """--strict exits 1 when a run failed; a path that does not exist exits 1."""
    sweep = tmp_path / "only_failed"
    sweep.mkdir()
    shutil.copytree(report["paths"][0] / "6", sweep / "0")
    assert main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    assert main([str(sweep), "--out", str(tmp_path / "r"), "--strict"]) == 1
    text = (tmp_path / "r" / "report.md").read_text()
    assert "RuntimeError: boom" in text and "no test/elbo" not in text
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 1


def test_align_runs_interpolates_runs_logged_at_different_x() -> None:
    """Unaligned runs are interpolated onto the x range every run covers; aligned runs kept."""
    frame = pd.DataFrame(
        {
            "g": "a",
            "run_id": ["r1"] * 3 + ["r2"] * 3,
            "x": [0.0, 1.0, 2.0, 0.5, 1.5, 2.5],
            "y": [0.0, 1.0, 2.0, 10.0, 11.0, 12.0],
        }
    )
    out = align_runs(frame, ["g"], max_points=4)  # 3 points: the most any run has
    r1, r2 = (out[out.run_id == r] for r in ("r1", "r2"))
    np.testing.assert_allclose(r1.x, [0.5, 1.25, 2.0])
    np.testing.assert_allclose(r1.y, r1.x)
    np.testing.assert_allclose(r2.y, r2.x + 9.5)
    aligned = frame.assign(x=[0.0, 1.0, 2.0] * 2)
    kept = align_runs(aligned, ["g"])
    np.testing.assert_allclose(kept.sort_values(["run_id", "x"]).y, aligned.y)


def test_welch_p_is_scipys_welch_test() -> None:
    """welch_p equals scipy's Welch test, and is NaN for a sample of one value."""
    from scipy.stats import ttest_ind

    a, b = [1.0, 1.2, 0.9, 1.1], [2.0, 2.4, 1.8]
    assert welch_p(a, b) == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isnan(welch_p([1.0], b))


def test_final_values_reads_csv_records_and_tolerates_unknown_columns(report: dict) -> None:
    """CSV records (tau sweep) load; unknown columns are kept; one row per run and quantity."""
    metrics, runs = load_records([report["paths"][1]])
    assert "some_future_column" in metrics and (runs.status == "completed").all()
    fv = final_values(metrics)
    assert not fv.duplicated(["run_id", "quantity"]).any()
    assert set(fv.quantity) == {
        "test/elbo",
        "test/iwae",
        "throughput/steps_per_s",
        "f_evals_per_step",
    }


def test_time_breakdown_is_the_mean_over_seeds_of_each_phase_at_the_last_step(
    report: dict,
) -> None:
    """The stacked-bar numbers: per label and phase, the mean over the completed runs' seeds
    of the cumulative ``time/<phase>`` seconds at each run's last step (the diverged run is
    left out)."""
    metrics, _ = load_records([report["paths"][0]])
    table = time_breakdown(metrics).set_index(["estimator_label", "phase"])
    for label in (GS1, RLOO):  # seeds 0 and 1 completed
        for phase in ("startup", "train", "eval", "probe", "checkpoint"):
            want = np.mean([_time_rows(label, seed, STEPS[-1])[phase] for seed in (0, 1)])
            assert table.loc[(label, phase), "seconds"] == pytest.approx(want)
            assert table.loc[(label, phase), "n"] == 2


# ------------------------------------------------- hostile records: groups, seeds, shapes

PIPE = "rloo | S=2"  # a label with a character that ends a Markdown table cell


def _small_metrics(run_id: str, label: str, seed: int, level: float) -> pd.DataFrame:
    """A few rows of one run (train/test ELBO, steps/s): enough for the tables, cheap to plot."""
    rows = [
        {"run_id": run_id, "estimator": "rloo", "estimator_label": label, **FACET, "seed": seed,
         "step": step, "wall_time": 0.01 * step, "f_evals": 2.0 * step, "split": split,
         "metric": metric, "value": level + 0.1 * seed + 1e-3 * step}
        for step in (0, 50, 100)
        for split, metric in (("train", "elbo"), ("test", "elbo"), ("throughput", "steps_per_s"))
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _small_run(
    job: Path, run_id: str, seed: int | None, *, label: str = RLOO, level: float = -100.0,
    status: str = "completed", **config: object,
) -> None:  # fmt: skip
    """A run directory of rloo with ``config`` merged over the resolved config of :func:`_info`."""
    info = _info(run_id, "rloo", label, 0 if seed is None else seed, status, None)
    info["config"] |= config
    if seed is None:  # a run that failed before its config was resolved has no seed
        del info["seed"], info["config"]["seed"]
    metrics = _small_metrics(run_id, label, seed or 0, level) if status == "completed" else None
    _write_run(job, [f"seed={seed}"], info, metrics)


def test_runs_without_a_seed_are_listed_and_report_md_is_written(tmp_path: Path) -> None:
    """A failed run without a seed and a truncated run.json do not stop the report: report.md
    is written and lists both."""
    sweep = tmp_path / "sweep"
    _small_run(sweep / "0", "ok", 0)
    _small_run(sweep / "1", "no-seed", None, status="failed")
    _small_run(sweep / "2", "truncated", 1)
    (sweep / "2" / "run.json").write_text('{"run_id": "truncated", "status": "compl')
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--n-boot", "20"]) == 0
    text = (out / "report.md").read_text()
    assert re.search(rf"\| no-seed +\| rloo \(S=2\) +\| {NA} +\| failed ", text), text
    assert re.search(r"\| sweep/2 +\|.*\| missing +\| unreadable run.json", text), text


@pytest.mark.parametrize(("content", "kind"), [("null", "null"), ("[1, 2]", "list")])
def test_run_json_that_is_not_an_object_is_listed_as_unreadable(
    tmp_path: Path, content: str, kind: str
) -> None:
    """A run.json holding JSON null or a list is an unreadable run, like a truncated one."""
    _small_run(tmp_path / "sweep" / "0", "ok", 0)
    _small_run(tmp_path / "sweep" / "1", "odd", 1)
    (tmp_path / "sweep" / "1" / "run.json").write_text(content)
    _, runs = load_records([tmp_path / "sweep"])
    odd = runs.set_index("run_id").loc["sweep/1"]
    assert odd["status"] == "missing"
    assert odd["reason"] == f"unreadable run.json: a JSON {kind}, not an object"


_OVERHEAD_CASE = {"label": RLOO, "ratio": 1.02, "ci_low": 1.0, "ci_high": 1.04,
                  "harness_ms": 4.3, "handwritten_ms": 4.2}  # fmt: skip


@pytest.mark.parametrize(
    ("option", "content", "says"),
    [
        ("--throughput", "[]", "not a pytest-benchmark JSON"),
        ("--throughput", '{"benchmarks": [null]}', "benchmarks[0] is a JSON null"),
        ("--throughput", '{"benchmarks": [{"stats": {"median": "fast"}}]}', "'median'"),
        ("--throughput", '{"benchmarks": [{"params": [1]}]}', "'params' is a JSON list"),
        ("--throughput", '{"benchmarks": [', "not valid JSON"),
        ("--overhead", '{"results": [null]}', "results[0] is a JSON null"),
        ("--overhead", json.dumps({"results": [_OVERHEAD_CASE | {"ratio": "1.02"}]}), "'ratio'"),
        ("--overhead", json.dumps({"machine": [], "results": []}), "'machine' is a JSON list"),
    ],
)
def test_throughput_or_overhead_json_of_the_wrong_shape_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, option: str, content: str, says: str
) -> None:
    """A --throughput / --overhead file of the wrong shape: one line naming the option, the
    file and what is wrong, exit 1, nothing written."""
    _small_run(tmp_path / "run", "ok", 0)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "out"
    assert main([str(tmp_path / "run"), "--out", str(out), option, str(bad)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(bad) in err and says in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A report over runs of one label with different settings, a repeated seed, runs that
    differ only in infrastructure keys, and a label with a ``|``.

    rloo (S=2): steps=100 seeds 0, 1 (seed 1 run twice: ``a2`` repeats ``a1``), and
    steps=500 seeds 0, 1 (device cuda and threads 4: infrastructure, same group). PIPE: one
    run, seed 0.
    """
    root = tmp_path_factory.mktemp("grouped")
    a, b = root / "a", root / "b"
    _small_run(a / "0", "a0", 0, steps=100, level=-100.0)
    _small_run(a / "1", "a1", 1, steps=100, level=-100.0)
    _small_run(a / "2", "a2", 1, steps=100, level=-130.0)  # the duplicate: far off
    _small_run(b / "0", "b0", 0, steps=500, level=-90.0)
    _small_run(b / "1", "b1", 1, steps=500, level=-90.0, device="cuda", threads=4)
    pipe_estimator = {"name": "rloo", "num_samples": 2, "label": PIPE}
    _small_run(root / "pipe", "pipe", 0, label=PIPE, level=-95.0, estimator=pipe_estimator)
    out = root / "out"
    assert main([str(a), str(b), str(root / "pipe"), "--out", str(out), "--n-boot", "20"]) == 0
    return {"root": root, "out": out, "paths": [a, b, root / "pipe"]}


def test_runs_with_different_settings_are_not_pooled_and_their_labels_differ(
    grouped: dict,
) -> None:
    """Runs of one label whose resolved configs differ (other than in seed and
    infrastructure keys) are separate rows, labelled with the keys that differ, in the same
    colour with different markers."""
    rows = markdown_rows(grouped["out"] / "tables" / "test_elbo.md")
    by_label = {r["estimator"]: parse_cell(r["test ELBO (nats)"]) for r in rows}
    short, long = f"{RLOO} [steps=100]", f"{RLOO} [steps=500]"
    assert set(by_label) == {short, long, PIPE}
    assert by_label[long][0] == pytest.approx(-90.0 + 0.1 + 0.05, abs=0.01)
    assert by_label[long][2] == 2  # device and threads are not settings of the experiment
    palette = json.loads((grouped["out"] / "figures" / "palette.json").read_text())["palette"]
    assert palette[short]["color"] == palette[long]["color"]
    assert palette[short]["marker"] != palette[long]["marker"]


def test_a_repeated_seed_is_counted_once_and_listed(grouped: dict) -> None:
    """Two completed runs of one group with the same seed: the first (in run-id order) is in
    the tables, the other is listed under 'Duplicate seeds' in report.md."""
    rows = markdown_rows(grouped["out"] / "tables" / "test_elbo.md")
    mean, _, n, _ = parse_cell(
        next(r for r in rows if r["estimator"] == f"{RLOO} [steps=100]")["test ELBO (nats)"]
    )
    assert n == 2 and mean == pytest.approx(-100.0 + 0.05 + 0.1, abs=0.01)
    text = (grouped["out"] / "report.md").read_text()
    dups = text.split("### Duplicate seeds", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\| a2 +\| rloo \(S=2\) \[steps=100\] +\| 1 +\| a1 ", dups), dups
    assert not re.search(r"\| (a0|b0|b1|pipe) ", dups), dups


def test_a_pipe_in_a_label_does_not_break_any_markdown_table(grouped: dict) -> None:
    """Every Markdown table the report writes keeps its column count when a label holds a
    ``|``: the pipe is escaped."""
    files = [grouped["out"] / "report.md", *sorted((grouped["out"] / "tables").glob("*.md"))]
    for file in files:
        table: list[str] = []
        for line in [*file.read_text().splitlines(), ""]:
            if line.startswith("|"):
                table.append(line)
                continue
            widths = {len(re.split(r"(?<!\\)\|", row)) for row in table}
            assert len(widths) <= 1, (file.name, table)
            table = []
    assert "rloo \\| S=2" in (grouped["out"] / "tables" / "summary.md").read_text()
