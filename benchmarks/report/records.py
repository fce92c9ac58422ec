"""Read run records (``run.json`` + tidy metrics) from sweep and run directories.

Everything downstream (figures, tables, ``report.md``) is computed from the two DataFrames that
:func:`load_records` returns, and the per-run table of :func:`final_values`. Nothing here imports
torch: a report is rebuilt from files alone.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from benchmarks.records.runs import COLUMNS as METRIC_COLUMNS

IDENTITY_COLUMNS = ("estimator", "estimator_label", "family", "dataset", "model", "seed")
FACET_COLUMNS = ("family", "model", "dataset")
NOT_COMPLETED = ("running", "diverged", "failed", "timeout", "missing")
STATUS_ORDER = ("completed", *NOT_COMPLETED)
#: Optional discriminator columns; the main series use rows where they are empty.
SUBSERIES_COLUMNS = ("stat", "param")
#: The run.json fields copied into the runs table.
_RUN_JSON_KEYS = ("run_id", "status", "reason", "device", "git_commit", "git_dirty",
                  "start_time", "end_time", "last_step", "config", *IDENTITY_COLUMNS)  # fmt: skip
#: Resolved-config keys that say how or where a run was executed, not what it measures: runs
#: whose configs differ only in these and in ``seed`` are seeds of one group. A key here
#: also covers every key below it (``faults`` covers ``faults.fail_at_step``; ``debug`` is
#: the faults' key in records written before it was renamed).
INFRASTRUCTURE_KEYS = (
    "device", "threads", "compile", "progress", "supervise", "log_every",
    "checkpoint_every", "snapshot_every", "data.root", "optim.fused", "eval.chunk",
    "eval.batch_size", "probe.chunk", "faults", "debug", "hydra",
)  # fmt: skip
#: Which Hydra override keys give a missing run its identity.
_OVERRIDE_IDENTITY = {
    "estimator": "estimator",
    "seed": "seed",
    "model.family": "family",
    "data": "dataset",
    "model.arch": "model",
}


@dataclass
class Sweep:
    """A Hydra multirun directory and the jobs its basic sweeper was asked to launch."""

    path: Path
    task_overrides: list[str] = field(default_factory=list)
    expected: list[list[str]] | None = None  # override list of every job, in launch order
    commands: list[str] = field(default_factory=list)  # one per sweep launched in the dir

    @property
    def command(self) -> str | None:
        """The first sweep's command (``multirun.yaml``), or None when unknown."""
        return self.commands[0] if self.commands else None


@dataclass
class Job:
    """One run directory, present or expected."""

    path: Path
    sweep: Sweep | None
    name: str
    overrides: list[str] = field(default_factory=list)
    expected_only: bool = False  # listed by multirun.yaml but no directory on disk


# ------------------------------------------------------------------------------- discovery


def _is_run_dir(path: Path) -> bool:
    return any(
        (path / name).exists() for name in ("run.json", ".hydra", "metrics.parquet", "metrics.csv")
    )


def _is_sweep_dir(path: Path) -> bool:
    if (path / "multirun.yaml").is_file():
        return True
    return any(c.is_dir() and c.name.isdigit() for c in path.iterdir())


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        warnings.warn(f"cannot read {path}: {err}", stacklevel=3)
        return None


def _expected_jobs(multirun: dict) -> tuple[list[str], list[list[str]] | None]:
    """The task overrides and, for Hydra's basic sweeper, every job's override list."""
    hydra_cfg = (multirun or {}).get("hydra") or {}
    task = list(((hydra_cfg.get("overrides") or {}).get("task")) or [])
    sweeper = hydra_cfg.get("sweeper") or {}
    target = str(sweeper.get("_target_", "BasicSweeper"))
    if not target.endswith("BasicSweeper"):
        return task, None  # other sweepers (optuna, ...) choose jobs at run time
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(params + task)
    except Exception as err:  # any parse failure: plan unknown
        warnings.warn(f"cannot expand sweep overrides {params + task}: {err}", stacklevel=3)
        return task, None
    axes: dict[str, list[str]] = {}
    for ov in parsed:
        key = ov.get_key_element()
        if ov.is_sweep_override():
            if not ov.is_discrete_sweep():
                return task, None
            axes[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={ov.get_value_element_as_str()}"]
    return task, [list(combo) for combo in itertools.product(*axes.values())]


def _multirun_files(path: Path) -> list[Path]:
    """The sweep plans in a sweep dir, in launch order: ``multirun.yaml`` (the first sweep),
    then ``multirun.1.yaml``, ``multirun.2.yaml``, ... (later sweeps there with other jobs)."""
    later = [f for f in path.glob("multirun.*.yaml") if f.name.split(".")[1].isdigit()]
    first = [path / "multirun.yaml"] if (path / "multirun.yaml").is_file() else []
    return first + sorted(later, key=lambda f: int(f.name.split(".")[1]))


def _load_sweep(path: Path) -> Sweep:
    """The sweep dir's plans together: every job any of its sweeps launched (each listed
    once), and each sweep's command."""
    sweep = Sweep(path=path)
    plans: list[list[list[str]] | None] = []
    for file in _multirun_files(path):
        multirun = _read_yaml(file)
        multirun = multirun if isinstance(multirun, dict) else {}
        task, expected = _expected_jobs(multirun)
        sweep.task_overrides = sweep.task_overrides or task
        plans.append(expected)
        hydra_overrides = ((multirun.get("hydra") or {}).get("overrides") or {}).get("hydra")
        launcher = [str(o) for o in hydra_overrides or [] if not str(o).startswith("hydra.mode=")]
        args = [*task, *launcher]
        sweep.commands.append(
            shlex.join(["python", "-m", "benchmarks.train", "--multirun", *args])
            if task
            else "unknown"
        )
    if plans and None not in plans:  # one unknown plan makes the union unknown
        unique: dict[frozenset[str], list[str]] = {}
        for job in (job for plan in plans for job in plan):
            unique.setdefault(frozenset(job), job)  # each job once, as first planned
        sweep.expected = list(unique.values())
    return sweep


def _job_overrides(path: Path) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"  # absent for runs started outside Hydra
    data = _read_yaml(file) if file.is_file() else None
    return [str(x) for x in data] if isinstance(data, list) else []


def _sweep_jobs(sweep: Sweep) -> list[Job]:
    children = sorted(
        (c for c in sweep.path.iterdir() if c.is_dir() and not c.name.startswith(".")),
        key=lambda c: (not c.name.isdigit(), int(c.name) if c.name.isdigit() else 0, c.name),
    )
    present = [
        Job(path=c, sweep=sweep, name=c.name, overrides=_job_overrides(c))
        for c in children
        if c.name.isdigit() or _is_run_dir(c)
    ]
    expected = sweep.expected
    if expected is None:  # unknown sweep plan: gaps in the job numbering are missing jobs
        numbers = {int(j.name) for j in present if j.name.isdigit()}
        gaps = sorted(set(range(max(numbers) + 1)) - numbers) if numbers else []
        missing = [Job(sweep.path / str(i), sweep, str(i), [], True) for i in gaps]
        return present + missing
    index = {frozenset(ovs): i for i, ovs in enumerate(expected)}
    matched: set[int] = set()
    for job in present:
        i = index.get(frozenset(job.overrides)) if job.overrides else None
        if i is None and not job.overrides and job.name.isdigit():
            i = int(job.name) if int(job.name) < len(expected) else None
        if i is not None:
            matched.add(i)
            job.overrides = job.overrides or list(expected[i])
    missing = [
        Job(sweep.path / str(i), sweep, str(i), list(ovs), True)
        for i, ovs in enumerate(expected)
        if i not in matched
    ]
    return present + missing


def discover(paths: Iterable[str | Path], max_depth: int = 4) -> tuple[list[Job], list[Sweep]]:
    """Find run directories under ``paths``: run dirs, sweep dirs, or folders holding either.

    A sweep's expected-but-absent jobs (from ``multirun.yaml``) come back as ``Job``s with
    ``expected_only=True``. Raises ``FileNotFoundError`` for a path that does not exist.
    """
    jobs: list[Job] = []
    sweeps: list[Sweep] = []
    seen: set[Path] = set()

    def visit(path: Path, depth: int) -> None:
        real = path.resolve()
        if real in seen:
            return
        seen.add(real)
        if _is_run_dir(path):
            jobs.append(Job(path=path, sweep=None, name=path.name, overrides=_job_overrides(path)))
        elif _is_sweep_dir(path):
            sweep = _load_sweep(path)
            sweeps.append(sweep)
            jobs.extend(_sweep_jobs(sweep))
            seen.update(j.path.resolve() for j in jobs)
        elif depth < max_depth:
            for child in sorted(path.iterdir()):
                if child.is_dir() and not child.name.startswith("."):
                    visit(child, depth + 1)

    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise FileNotFoundError(f"not a directory: {p}")
        visit(p, 0)
    return jobs, sweeps


# ---------------------------------------------------------------------------------- loading


def _identity_from_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key in _OVERRIDE_IDENTITY:
            out[_OVERRIDE_IDENTITY[key]] = value
    return out


def main_series(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of the main series: ``stat`` empty, and ``param`` empty or ``all`` (probe rows
    carry one row per parameter tensor plus ``all`` for every encoder parameter together)."""
    for col, main in (("stat", ("",)), ("param", ("", "all"))):
        if col in rows and rows[col].isin(main).any():
            rows = rows[rows[col].isin(main)]
    return rows


def _read_metrics(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    """The run's metrics table, or ``None`` and why not."""
    for name, reader in (("metrics.parquet", pd.read_parquet), ("metrics.csv", pd.read_csv)):
        file = path / name
        if file.is_file():
            try:
                frame = reader(file)
            except Exception as err:  # a corrupt file is reported
                return None, f"unreadable {name}: {type(err).__name__}: {err}"
            if frame.empty:
                return None, f"empty {name}"
            lacking = [c for c in ("step", "split", "metric", "value") if c not in frame]
            if lacking:
                return None, f"{name} lacks columns {lacking}"
            trajectory = path / "probe_trajectory.parquet"  # written by gradbench-probe
            if trajectory.is_file():
                try:
                    extra = pd.read_parquet(trajectory)
                except Exception as err:
                    return None, f"unreadable {trajectory.name}: {type(err).__name__}: {err}"
                # Shown as the probe when the run was not probed during training.
                split = "probe_trajectory" if (frame["split"] == "probe").any() else "probe"
                frame = pd.concat([frame, extra.assign(split=split)], ignore_index=True)
            return frame, None
    return None, "no metrics file"


def _json_kind(value: object) -> str:
    """The JSON name of a parsed value's type (for messages about files of the wrong shape)."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "list", dict: "object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _run_row(job: Job) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One row of the runs table and the run's (normalized) metrics."""
    row: dict[str, Any] = {
        "run_id": None,
        "status": "missing",
        "reason": None,
        "run_dir": str(job.path),
        "sweep_dir": str(job.sweep.path) if job.sweep else None,
        "job": job.name,
        "overrides": " ".join(job.overrides),
        "estimator": None,
        "estimator_label": None,
        "family": None,
        "model": None,
        "dataset": None,
        "seed": None,
        "device": None,
        "git_commit": None,
        "git_dirty": None,
        "start_time": None,
        "end_time": None,
        "last_step": None,
        "config": None,
        "n_metric_rows": 0,
    }
    row.update(_identity_from_overrides(job.overrides))
    row["run_id"] = f"{job.sweep.path.name}/{job.name}" if job.sweep else job.path.name
    if job.expected_only or not job.path.is_dir():
        row["reason"] = "no job directory (listed in multirun.yaml)"
        return row, None
    run_json = job.path / "run.json"
    if not run_json.is_file():
        row["reason"] = "no run.json"
        return row, None
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        row["reason"] = f"unreadable run.json: {err}"
        return row, None
    if not isinstance(info, dict):
        row["reason"] = f"unreadable run.json: a JSON {_json_kind(info)}, not an object"
        return row, None
    for key in _RUN_JSON_KEYS:
        if info.get(key) is not None:
            row[key] = info[key]
    for name, version in (info.get("versions") or {}).items():
        row[f"version_{name}"] = version
    if not job.overrides and isinstance(info.get("overrides"), list):
        row["overrides"] = " ".join(map(str, info["overrides"]))
    if row["config"] is None and (job.path / ".hydra" / "config.yaml").is_file():
        row["config"] = _read_yaml(job.path / ".hydra" / "config.yaml")
    row["estimator_label"] = row["estimator_label"] or row["estimator"]
    row["status"] = str(row["status"]) if info.get("status") else "missing"
    if not info.get("status"):
        row["reason"] = "run.json has no status"

    metrics, why = _read_metrics(job.path)
    if metrics is None:
        if row["status"] == "completed":
            row["status"], row["reason"] = "missing", f"{why} (run.json says completed)"
        else:
            row["reason"] = "; ".join(x for x in (row["reason"], why) if x)
        return row, None
    row["n_metric_rows"] = len(metrics)
    return row, metrics


def _normalize_metrics(metrics: pd.DataFrame, row: dict[str, Any]) -> pd.DataFrame:
    m = metrics.copy()
    for col in IDENTITY_COLUMNS:
        if col not in m or m[col].isna().all():
            m[col] = row[col]
        elif row[col] is not None:
            m[col] = m[col].where(m[col].notna(), row[col])
    m["run_id"] = row["run_id"]
    m["status"] = row["status"]
    for col in ("wall_time", "f_evals"):
        if col not in m:
            m[col] = np.nan
    for col in ("probe_estimator", *SUBSERIES_COLUMNS):
        if col in m or col == "probe_estimator":
            values = m[col] if col in m else pd.Series("", index=m.index)
            m[col] = values.astype(object).where(values.notna(), "").astype(str)
    m["step"] = pd.to_numeric(m["step"], errors="coerce")
    for col in ("value", "wall_time", "f_evals"):
        m[col] = pd.to_numeric(m[col], errors="coerce").astype(float)
    m = m[m["step"].notna()].copy()
    m["step"] = m["step"].astype("int64")
    for col in ("split", "metric", "estimator", "estimator_label", *FACET_COLUMNS):
        m[col] = m[col].astype(str)
    # The estimator whose gradient a probe row measures (the "basket"); own estimator if empty.
    is_probe = m["split"] == "probe"
    m["probe_label"] = np.where(
        is_probe,
        np.where(m["probe_estimator"] != "", m["probe_estimator"], m["estimator_label"]),
        "",
    )
    return m


def load_records(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load every run under ``paths`` into tidy DataFrames.

    Args:
      paths: sweep directories (with ``multirun.yaml`` and numbered job dirs), single run
        directories, or folders that contain them.

    Returns:
      ``(metrics, runs)``. ``metrics`` has one row per (run, step, split, metric[,
      probe_estimator]) with the contract's columns plus ``status`` (the run's status),
      ``probe_estimator`` and ``probe_label`` (the probed estimator's label on probe rows, the
      run's own label when the record leaves it empty; ``""`` elsewhere); unknown columns are
      kept. ``runs`` has one row per run, present or expected: ``status`` (``completed``,
      ``running``, ``diverged``, ``failed``, ``timeout`` or ``missing``; an unreadable
      ``run.json`` is ``missing`` with the reason), ``reason``, identity, provenance (device,
      git commit, ``version_*``, times, overrides, config) and the grouping of
      :func:`assign_groups` (``group``, ``base_label``, ``duplicate_of``; ``estimator_label``
      tells apart groups that share a label, and metric rows of a duplicate seed have
      ``status`` ``duplicate``).
    """
    jobs, _ = discover(paths)
    rows: list[dict[str, Any]] = []
    frames: list[pd.DataFrame] = []
    ids: set[str] = set()
    for job in jobs:
        row, metrics = _run_row(job)
        if row["run_id"] in ids:  # two directories claim one id: keep both, tell them apart
            row["run_id"] = f"{row['run_id']}@{job.path}"
        ids.add(row["run_id"])
        rows.append(row)
        if metrics is not None:
            frames.append(_normalize_metrics(metrics, row))
    runs = pd.DataFrame(rows)
    if runs.empty:
        runs = pd.DataFrame(columns=["run_id", "status", "reason", "run_dir", *IDENTITY_COLUMNS])
    runs["seed"] = pd.to_numeric(runs["seed"], errors="coerce").astype("Int64")
    if frames:
        metrics = pd.concat(frames, ignore_index=True)
        metrics["seed"] = pd.to_numeric(metrics["seed"], errors="coerce").astype("Int64")
    else:
        numeric = {"step": "int64", "seed": "Int64", "wall_time": float, "f_evals": float,
                   "value": float}  # fmt: skip
        metrics = pd.DataFrame(
            {c: pd.Series(dtype=numeric.get(c, object)) for c in
             [*METRIC_COLUMNS, "status", "probe_label"]}
        )  # fmt: skip
    return assign_groups(metrics, runs)


def is_infrastructure_key(key: str) -> bool:
    """Whether the dotted config ``key`` is in (or below) :data:`INFRASTRUCTURE_KEYS`."""
    return key == "seed" or any(key == k or key.startswith(k + ".") for k in INFRASTRUCTURE_KEYS)


def experiment_config(config: Any) -> dict[str, Any] | None:
    """The flattened resolved config without seed and infrastructure keys; None without one."""
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in flatten_config(config).items() if not is_infrastructure_key(k)}


def _config_key(flat: dict[str, Any] | None) -> str | None:
    return None if flat is None else json.dumps(flat, sort_keys=True, default=str)


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value)


def assign_groups(metrics: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group runs by their whole resolved config except seed and infrastructure keys.

    Adds to ``runs``: ``group`` (the config without seed and :data:`INFRASTRUCTURE_KEYS`, as
    JSON; None for a run without a recorded config), ``base_label`` (the label the run
    recorded) and ``duplicate_of`` (for a completed run whose group already has a completed
    run of the same seed: that run's id, the first in run-id order; else None). Where groups
    of one (family, model, dataset) share a label, ``estimator_label`` becomes the label
    followed by the config keys that tell them apart, e.g. ``rloo (S=2) [steps=500]``, in
    both frames (and in ``probe_label`` of the runs' own probe rows), so that no two groups
    are pooled. Metric rows of duplicate runs get ``status`` ``duplicate``, which keeps them
    out of every figure and table (``final_values`` takes completed rows only).
    """
    runs = runs.copy()
    configs = [experiment_config(c) for c in runs.get("config", pd.Series(index=runs.index))]
    runs["group"] = [_config_key(c) for c in configs]
    runs["base_label"] = runs["estimator_label"]
    labels = runs["estimator_label"].astype(object).copy()
    facet = [*FACET_COLUMNS, "base_label"]
    flat_of = {g: c for g, c in zip(runs["group"], configs, strict=True) if g is not None}

    def text(flat: dict[str, Any], key: str) -> str | None:  # None: the key is absent
        return json.dumps(flat[key], sort_keys=True, default=str) if key in flat else None

    for _, block in runs[runs["group"].notna()].groupby(facet, dropna=False, sort=False):
        groups = list(dict.fromkeys(block["group"]))
        if len(groups) < 2 or pd.isna(block["base_label"].iloc[0]):
            continue
        flats = [flat_of[g] for g in groups]
        keys = sorted(set().union(*flats))
        varying = [k for k in keys if len({text(f, k) for f in flats}) > 1]
        for g, flat in zip(groups, flats, strict=True):
            parts = ", ".join(
                f"{k}={_value_text(flat[k]) if k in flat else 'unset'}" for k in varying
            )
            labels.loc[block.index[block["group"] == g]] = (
                f"{block['base_label'].iloc[0]} [{parts}]"
            )
    runs["estimator_label"] = labels
    runs["duplicate_of"] = None
    done = runs[(runs["status"] == "completed") & runs["group"].notna() & runs["seed"].notna()]
    same = [*facet, "group", "seed"]  # the label too: a record may set it outside the config
    for _, block in done.sort_values("run_id").groupby(same, dropna=False, sort=False):
        runs.loc[block.index[1:], "duplicate_of"] = block["run_id"].iloc[0]
    if metrics.empty:
        return metrics, runs
    metrics = metrics.copy()
    changed = runs[runs["base_label"].notna() & (runs["estimator_label"] != runs["base_label"])]
    relabel = dict(zip(changed["run_id"], changed["estimator_label"], strict=True))
    rows = metrics["run_id"].isin(list(relabel))
    own = rows & (metrics["probe_label"] == metrics["estimator_label"])
    metrics.loc[own, "probe_label"] = metrics.loc[own, "run_id"].map(relabel)
    metrics.loc[rows, "estimator_label"] = metrics.loc[rows, "run_id"].map(relabel)
    dup = set(runs.loc[runs["duplicate_of"].notna(), "run_id"])
    metrics.loc[metrics["run_id"].isin(dup), "status"] = "duplicate"
    return metrics, runs


def _read_json_file(path: str | Path, option: str, expected: str) -> Any:
    """The parsed JSON of ``path``; ``ValueError`` naming the file and ``option`` otherwise."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot read it: {err.strerror or err}") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{option} {path}: not valid JSON ({err}); expected {expected}") from err


def _check_entry(
    entry: Any,
    where: str,
    expected: str,
    numbers: Sequence[str] = (),
    optional_numbers: Sequence[str] = (),
    mappings: Sequence[str] = (),
) -> dict:
    """``entry`` if it is a JSON object whose ``numbers`` are numbers (``optional_numbers``:
    numbers or null) and ``mappings`` objects or null; ``ValueError`` naming ``where``."""

    def is_number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if not isinstance(entry, dict):
        raise ValueError(
            f"{where} is a JSON {_json_kind(entry)}, not an object; expected {expected}"
        )
    for key in numbers:
        if not is_number(entry.get(key)):
            raise ValueError(
                f"{where}: {key!r} is {json.dumps(entry.get(key))}, not a number; "
                f"expected {expected}"
            )
    for key in optional_numbers:
        if entry.get(key) is not None and not is_number(entry[key]):
            raise ValueError(
                f"{where}: {key!r} is {json.dumps(entry[key])}, not a number or null; "
                f"expected {expected}"
            )
    for key in mappings:
        if entry.get(key) is not None and not isinstance(entry[key], dict):
            raise ValueError(
                f"{where}: {key!r} is a JSON {_json_kind(entry[key])}, not an object; "
                f"expected {expected}"
            )
    return entry


_BENCHMARK_JSON = "a pytest-benchmark JSON (--benchmark-json) with a 'benchmarks' list"


def load_throughput(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Tidy rows from pytest-benchmark JSON files (``--benchmark-json``).

    One row per benchmark with ``name``, ``kind`` (the benchmark group or test function),
    ``label`` (``estimator_label``/``estimator`` from ``extra_info`` or ``params``),
    ``reference`` (the hand-written loop), every param, ``median_s``, ``q1_s``, ``q3_s`` and
    ``per_s = 1 / median_s`` (calls per second).
    """
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = _read_json_file(path, "--throughput", _BENCHMARK_JSON)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ValueError(f"--throughput {path}: not {_BENCHMARK_JSON}")
        for i, bench in enumerate(data["benchmarks"]):
            where = f"--throughput {path}: benchmarks[{i}]"
            _check_entry(bench, where, _BENCHMARK_JSON, mappings=("params", "extra_info", "stats"))
            _check_entry(
                bench.get("stats") or {}, f"{where}.stats", _BENCHMARK_JSON,
                optional_numbers=("median", "q1", "q3", "rounds"),
            )  # fmt: skip
            params = dict(bench.get("params") or {})
            extra = dict(bench.get("extra_info") or {})
            stats = bench.get("stats") or {}
            name = str(bench.get("name", ""))
            base = name.split("[")[0]
            kind = bench.get("group") or base.removeprefix("test_")
            label = next(
                (
                    str(d[k])
                    for k in ("estimator_label", "estimator")
                    for d in (extra, params)
                    if d.get(k) not in (None, "")
                ),
                None,
            )
            reference = bool(extra.get("reference")) or "reference" in name.lower()
            if reference and label is None:
                label = "reference (hand-written)"
            row: dict[str, Any] = {"source": str(path), "name": name, "kind": str(kind)}
            for key, value in {**extra, **params}.items():
                if key not in row and (value is None or isinstance(value, str | int | float)):
                    row[key] = value
            median = stats.get("median")
            row.update(
                label=label or base,
                reference=reference,
                median_s=median,
                q1_s=stats.get("q1"),
                q3_s=stats.get("q3"),
                rounds=stats.get("rounds"),
                per_s=1.0 / median if median else math.nan,
            )
            rows.append(row)
    return pd.DataFrame(rows)


#: Columns of :func:`load_overhead`.
OVERHEAD_COLUMNS = (
    "source", "label", "estimator", "family", "batch_size", "num_samples", "device", "threads",
    "harness_ms", "handwritten_ms", "ratio", "ci_low", "ci_high", "blocks", "target",
    "meets_target", "date", "git_commit",
)  # fmt: skip


def load_overhead(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Tidy rows from interleaved overhead measurements
    (``python -m benchmarks.throughput.summary --measure``: ``overhead_<device>.json``).

    One row per case (:data:`OVERHEAD_COLUMNS`): the harness / hand-written ratio (median over
    blocks) with its 95% bootstrap interval, both step times, the target where the case has
    one, and the file's date and commit. Raises ``ValueError`` for a file that is not such a
    measurement.
    """
    expected = (
        "the JSON written by `python -m benchmarks.throughput.summary --measure`, with "
        "'machine' and 'results'"
    )
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = _read_json_file(path, "--overhead", expected)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise ValueError(f"{path}: not an overhead measurement (expected {expected})")
        _check_entry(data, f"--overhead {path}", expected, mappings=("machine",))
        machine = data.get("machine") or {}
        for i, r in enumerate(data["results"]):
            _check_entry(
                r, f"--overhead {path}: results[{i}]", expected,
                numbers=("ratio", "ci_low", "ci_high", "harness_ms", "handwritten_ms"),
                optional_numbers=("target",),
            )  # fmt: skip
            row = {k: r.get(k) for k in OVERHEAD_COLUMNS}
            row.update(source=str(path), date=machine.get("date"),
                       git_commit=machine.get("git_commit"))  # fmt: skip
            row["device"] = row["device"] or machine.get("device")
            rows.append(row)
    return pd.DataFrame(rows, columns=list(OVERHEAD_COLUMNS))


def with_reference(tp: pd.DataFrame) -> pd.DataFrame:
    """``tp`` (from :func:`load_throughput`) plus ``ref_s``, the median time of the matching
    hand-written reference row, and ``ratio = median_s / ref_s`` (NaN without a match).

    Rows match on ``family``, ``batch_size``, ``device`` and, where present, ``arch``,
    ``num_samples`` and ``threads``; also on ``label`` when the reference rows are labelled
    by estimator (one hand-written step per estimator), so a harness step is compared with
    the hand-written step of the same estimator.
    """
    tp = tp.copy()
    refs = tp[tp["reference"]]
    if refs.empty:
        return tp.assign(ref_s=math.nan, ratio=math.nan)
    keys = [k for k in ("family", "batch_size", "device", "arch", "num_samples", "threads")
            if k in tp]  # fmt: skip
    if set(refs["label"]) & set(tp.loc[~tp["reference"], "label"]):
        keys.append("label")
    if keys:
        ref = refs.groupby(keys, dropna=False)["median_s"].median().rename("ref_s")
        tp = tp.merge(ref.reset_index(), on=keys, how="left")
    else:
        tp["ref_s"] = refs["median_s"].median()
    return tp.assign(ratio=tp["median_s"] / tp["ref_s"])


# ------------------------------------------------------------------------------ final values


@dataclass(frozen=True)
class Quantity:
    """A per-run summary number that the tables report."""

    key: str
    title: str
    higher_is_better: bool
    decimals: int
    description: str


QUANTITIES: tuple[Quantity, ...] = (
    Quantity(
        "test/elbo", "test ELBO (nats)", True, 2, "`test/elbo` at the run's last evaluation step"
    ),
    Quantity(
        "test/iwae", "test IWAE (nats)", True, 2, "`test/iwae` at the run's last evaluation step"
    ),
    Quantity(
        "log10 probe/grad_var",
        "log10 grad. variance",
        False,
        2,
        "log10 of `probe/grad_var` of the run's own estimator at its last probe step",
    ),
    Quantity(
        "throughput/steps_per_s",
        "steps/s",
        True,
        1,
        "median of the run's `throughput/steps_per_s` records",
    ),
    Quantity(
        "f_evals_per_step",
        "f-evals/step",
        False,
        2,
        "`f_evals` (cumulative, per example) / `step` at the run's last logged step",
    ),
)
QUANTITY_BY_KEY = {q.key: q for q in QUANTITIES}


def primary_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The main series: own-estimator probe rows, and empty ``stat``/``param`` sub-series.

    A probe row is the run's own when its ``probe_label`` equals the run's label (or, if the
    basket names estimators by registry name, the run's ``estimator``). For the optional
    ``stat``/``param`` columns, rows with an empty value (``param``: empty or ``all``, the
    probe's value over every encoder parameter) are kept for every metric that has them;
    metrics that only come with other values keep all their rows (averaged later).
    """
    keep = df["split"] != "probe"
    if "probe_label" in df:
        own = df["probe_label"] == df["estimator_label"]
        by_name = df["probe_label"] == df["estimator"]
        has_own = own.groupby([df["run_id"], df["metric"]]).transform("any")
        keep |= (df["split"] == "probe") & (own | (~has_own & by_name))
    out = df[keep]
    for col in SUBSERIES_COLUMNS:
        if col in out:
            main = out[col].isin(("", "all") if col == "param" else ("",))
            any_main = main.groupby([out["split"], out["metric"]]).transform("any")
            out = out[main | ~any_main]
    return out


def _last(df: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    rows = df[(df["split"] == split) & (df["metric"] == metric) & np.isfinite(df["value"])]
    if rows.empty:
        return rows.assign(step=pd.Series(dtype="int64"))
    last = rows.groupby("run_id")["step"].transform("max")
    return (
        rows[rows["step"] == last]
        .groupby("run_id", as_index=False)
        .agg(value=("value", "mean"), step=("step", "max"))
    )


def final_values(
    df: pd.DataFrame, statuses: Sequence[str] | None = ("completed",)
) -> pd.DataFrame:
    """Per-run final values: the numbers every summary table is built from.

    Args:
      df: the metrics frame of :func:`load_records`.
      statuses: keep runs with these statuses (``None`` keeps all).

    Returns:
      A tidy frame, one row per (run, quantity), with columns ``run_id, family, model,
      dataset, estimator, estimator_label, seed, status, quantity, value, step``. The
      quantities are listed in ``QUANTITIES`` (final test ELBO/IWAE, log10 probe variance,
      median steps/s, f-evaluations per step). A table cell is then, e.g.::

          fv = final_values(metrics)
          keys = ["family", "model", "dataset", "estimator_label"]
          fv[fv.quantity == "test/elbo"].groupby(keys).value.agg(["mean", "std", "count"])
    """
    cols = [
        "run_id",
        "family",
        "model",
        "dataset",
        "estimator",
        "estimator_label",
        "seed",
        "status",
        "quantity",
        "value",
        "step",
    ]
    if statuses is not None:
        df = df[df["status"].isin(list(statuses))]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = primary_rows(df)
    parts: list[pd.DataFrame] = []
    for key in ("test/elbo", "test/iwae"):
        split, metric = key.split("/")
        parts.append(_last(df, split, metric).assign(quantity=key))
    var = _last(df, "probe", "grad_var")
    var = var[var["value"] > 0]
    parts.append(var.assign(value=np.log10(var["value"]), quantity="log10 probe/grad_var"))
    tp = df[(df["split"] == "throughput") & (df["metric"] == "steps_per_s")]
    tp = tp[np.isfinite(tp["value"])]
    parts.append(
        tp.groupby("run_id", as_index=False)
        .agg(value=("value", "median"), step=("step", "max"))
        .assign(quantity="throughput/steps_per_s")
    )
    fe = df[(df["step"] > 0) & np.isfinite(df["f_evals"])]
    fe = fe[fe["step"] == fe.groupby("run_id")["step"].transform("max")]
    fe = fe.groupby("run_id", as_index=False).agg(f_evals=("f_evals", "max"), step=("step", "max"))
    parts.append(
        fe.assign(value=fe["f_evals"] / fe["step"], quantity="f_evals_per_step").drop(
            columns="f_evals"
        )
    )
    ident = df.drop_duplicates("run_id")[
        ["run_id", "family", "model", "dataset", "estimator", "estimator_label", "seed", "status"]
    ]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True).merge(ident, on="run_id", how="left")
    order = {q.key: i for i, q in enumerate(QUANTITIES)}
    out = out.sort_values(
        ["family", "model", "dataset", "estimator_label", "seed", "quantity"],
        key=lambda s: s.map(order) if s.name == "quantity" else s,
    )
    return out[cols].reset_index(drop=True)


def config_value(config: Any, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``dotted="a.b"``; ``None`` when absent."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}`` (lists are kept as values)."""
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name))
        else:
            out[name] = value
    return out
