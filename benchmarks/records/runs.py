"""Run records: ``run.json`` (provenance and status, :class:`RunRecord`) and the tidy
``metrics.parquet`` (:class:`MetricsLog`), with the run's identity and provenance.

``metrics.parquet`` has one row per (step, split, metric) with the columns :data:`COLUMNS`;
it is rewritten in full at each checkpoint, so it always holds exactly the rows up to the last
checkpoint (a diverged run's file holds the rows up to its last finite logging step).
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import secrets
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.records.files import atomic_write_bytes, quarantine, read_json, write_json

if TYPE_CHECKING:  # pandas is imported where a table is built: not on a run's way to step 1
    import pandas as pd

log = logging.getLogger(__name__)

#: Columns of ``metrics.parquet``, in order.
COLUMNS: tuple[str, ...] = (
    "run_id",
    "estimator",
    "estimator_label",
    "probe_estimator",
    "param",
    "family",
    "dataset",
    "model",
    "seed",
    "step",
    "wall_time",
    "f_evals",
    "split",
    "metric",
    "value",
)
#: Columns that vary from row to row, in the order MetricsLog keeps them.
_ROW_COLUMNS = (
    "step", "wall_time", "f_evals", "split", "metric", "value", "probe_estimator", "param",
)  # fmt: skip
#: Columns that are the same on every row of one run.
IDENTITY: tuple[str, ...] = (
    "run_id",
    "estimator",
    "estimator_label",
    "family",
    "dataset",
    "model",
)
#: ``timeout``: stopped by the scheduler's preemption / time-limit signal after a checkpoint;
#: submitit requeues it (``hydra.launcher.max_num_timeout``) or a re-run resumes it.
STATUSES: tuple[str, ...] = ("running", "completed", "diverged", "failed", "timeout")

RUN_JSON = "run.json"
METRICS = "metrics.parquet"
#: Rows that measure time, the only rows (with ``wall_time`` and ``run_id``) in which two runs
#: of one config differ: every row of these splits, and these ``(split, metric)`` pairs.
TIMING_SPLITS: tuple[str, ...] = ("throughput", "time")
TIMING_METRICS: tuple[tuple[str, str], ...] = (("probe", "seconds"),)


def timing_rows(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the timing rows (:data:`TIMING_SPLITS`, :data:`TIMING_METRICS`) of a
    metrics frame."""
    pairs = [f"{s}/{m}" for s, m in TIMING_METRICS]
    return df["split"].isin(TIMING_SPLITS) | (df["split"] + "/" + df["metric"]).isin(pairs)


def new_run_id() -> str:
    """A unique run id: UTC start time, process id and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"


def now_iso() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages a run depends on (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "pandas", "pyarrow", "hydra-core", "omegaconf", "gradbench"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """``{"git_commit": sha | None, "git_dirty": bool | None}`` of the gradbench checkout."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
    }


class MetricsLog:
    """The tidy metric rows of one run, kept in memory and written in full.

    Args:
      identity: the per-run columns (:data:`IDENTITY` and ``seed``).
    """

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = {k: identity[k] for k in (*IDENTITY, "seed")}
        self.rows: list[tuple[int, float, int, str, str, float, str, str]] = []

    def add(
        self,
        step: int,
        wall_time: float,
        f_evals: int,
        split: str,
        metric: str,
        value: float,
        probe_estimator: str = "",
        param: str = "",
    ) -> None:
        """Append one row (``value`` a Python float). Probe rows name the probed estimator's
        label and the parameter tensor (``all`` for every encoder parameter together)."""
        self.rows.append(
            (step, wall_time, f_evals, split, metric, float(value), probe_estimator, param)
        )

    def truncate(self, last_step: int) -> None:
        """Drop rows with ``step > last_step`` (those after the checkpoint being resumed)."""
        self.rows = [r for r in self.rows if r[0] <= last_step]

    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame with the columns :data:`COLUMNS`."""
        import pandas as pd

        body = pd.DataFrame(self.rows, columns=list(_ROW_COLUMNS))
        df = pd.DataFrame({k: pd.Series([v] * len(body), dtype=object) for k, v in
                           self.identity.items()})  # fmt: skip
        df = pd.concat([df, body], axis=1)
        for col in (*IDENTITY, "probe_estimator", "param", "split", "metric"):
            df[col] = df[col].astype(str)
        df = df.astype({"seed": "int64", "step": "int64", "f_evals": "int64"})
        df = df.astype({"wall_time": "float64", "value": "float64"})
        return df[list(COLUMNS)]

    def write(self, path: Path) -> None:
        """Write all rows to ``path`` (parquet) atomically."""
        buf = io.BytesIO()
        self.frame().to_parquet(buf, index=False)
        atomic_write_bytes(path, buf.getvalue())

    def load(self, path: Path) -> None:
        """Replace the rows by those of ``path`` (a file this class wrote)."""
        import pandas as pd

        df = pd.read_parquet(path)
        for col in ("probe_estimator", "param"):  # files written before these columns
            if col not in df:
                df[col] = ""
        self.rows = [
            (int(s), float(w), int(f), str(sp), str(m), float(v), str(pe), str(pa))
            for s, w, f, sp, m, v, pe, pa in df[list(_ROW_COLUMNS)].itertuples(
                index=False, name=None
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """The rows for a checkpoint, as one JSON string (exact floats; cheap to checksum;
        loads with ``torch.load(..., weights_only=True)``)."""
        return {"rows": json.dumps(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.rows = [tuple(row) for row in json.loads(state["rows"])]


class RunRecord:
    """``run.json``: what the run is, where it stands, and where it came from.

    Keys: ``run_id``, ``status`` (:data:`STATUSES`), ``reason`` and ``traceback`` (failed or
    diverged runs), ``estimator``, ``estimator_label``, ``family``, ``dataset``, ``model``,
    ``seed``, ``device``, ``config`` (resolved), ``overrides``, ``versions``, ``git_commit``,
    ``git_dirty``, ``start_time``, ``end_time``, ``last_step``, ``resumed_from`` (steps of
    each resume), ``run_dir``, ``loss`` and ``wall_time`` (what those numbers mean).
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @classmethod
    def load(cls, path: Path) -> RunRecord | None:
        """The record at ``path``, or None if there is none.

        An unreadable record (empty, truncated or not a JSON object: never written by this
        module, whose writes are atomic) is moved aside to ``run.json.corrupt`` with a warning
        and counts as none; the run then resumes from its checkpoint.
        """
        try:
            data = read_json(path)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            data = err
        if data is not None and not isinstance(data, dict):
            aside = quarantine(path)
            log.warning("%s is unreadable (%s); moved it to %s", path, data, aside.name)
            return None
        return None if data is None else cls(path, data)

    def update(self, **fields: Any) -> None:
        """Set ``fields`` and rewrite the file atomically."""
        self.data.update(fields)
        write_json(self.path, self.data)

    def update_if_possible(self, **fields: Any) -> None:
        """:meth:`update` for recording a failure: if the write fails too (say, the same full
        disk), log it and keep the previous file, so the original error is the one raised."""
        try:
            self.update(**fields)
        except OSError as err:
            log.error("could not record %s in %s: %s", fields.get("status"), self.path, err)

    @property
    def status(self) -> str | None:
        """The recorded status."""
        return self.data.get("status")
