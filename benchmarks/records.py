"""Run records: ``run.json`` (provenance and status) and tidy ``metrics.parquet``.

Every file is written atomically: into a temporary file in the destination's own directory,
flushed and fsynced, then moved over the destination with ``os.replace``. A reader (or a run
killed mid-write) sees either the old file or the new one, never a torn one; a failed write
leaves the old file and raises an ``OSError`` naming the destination; leftover temporary files
(``.<name>.*.tmp``) never block a later write and are removed when a run starts.

``metrics.parquet`` has one row per (step, split, metric) with the columns :data:`COLUMNS`;
it is rewritten in full at each checkpoint, so it always holds exactly the rows up to the last
checkpoint (a diverged run's file holds the rows up to its last finite logging step).

Test hook: ``GRADBENCH_FAULT=<file name>:<n>[:<phase>]`` makes the process SIGKILL itself at
the ``n``-th atomic write of that file name (e.g. ``checkpoint.pt:2``, ``run.json:1``,
``metrics.parquet:3:before_fsync``, ``report.md:1``), after the temporary file is written and
before it is fsynced (``before_fsync``) or moved into place (``before_replace``, the default).
It exists for the fault-injection tests (``tests/reliability``); leave it unset otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import pandas as pd

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

# mkstemp creates files readable by the owner only; records get the usual umask permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
METRICS = "metrics.parquet"


log = logging.getLogger(__name__)
#: The environment variable of the fault-injection test hook (see the module docstring).
FAULT_ENV = "GRADBENCH_FAULT"
FAULT_PHASES = ("before_fsync", "before_replace")
_fault_hits: dict[tuple[str, str], int] = {}


def fault_point(site: str, phase: str) -> None:
    """Test hook: SIGKILL this process here if ``$GRADBENCH_FAULT`` names this write.

    ``site`` is the destination's file name, ``phase`` one of :data:`FAULT_PHASES`; the
    ``n``-th call with the same site and phase kills the process (see the module docstring).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    name, n, when = (*parts, "before_replace") if len(parts) == 2 else (*parts, "", "")[:3]
    if len(parts) > 3 or not n.isdigit() or int(n) < 1 or when not in FAULT_PHASES:
        raise ValueError(
            f"{FAULT_ENV}={spec!r} is invalid; allowed: <file name>:<n >= 1>[:<phase>] with "
            f"phase one of {', '.join(FAULT_PHASES)}"
        )
    if name != site or when != phase:
        return
    hits = _fault_hits[(site, phase)] = _fault_hits.get((site, phase), 0) + 1
    if hits == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(
    path: Path,
    write: Callable[[IO[bytes]], object],
    before_replace: Callable[[], object] | None = None,
) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, then move it there.

    The temporary file lives in ``path``'s own directory (never ``$TMPDIR``), so the final
    ``os.replace`` is a same-filesystem rename: atomic. ``before_replace()`` runs once the new
    content is complete and synced, right before the move (checkpoint rotation). Any
    ``OSError`` (full disk, read-only or unwritable directory) removes the temporary file,
    leaves the old ``path`` as it was, and is raised again as an ``OSError`` of the same
    ``errno`` whose message names ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            fault_point(path.name, "before_fsync")
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        fault_point(path.name, "before_replace")
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise OSError(
            err.errno, f"cannot write {path}: {err.strerror or err} (the previous version, "
            "if any, is intact)"
        ) from err  # fmt: skip
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):  # e.g. a read-only directory: a later run removes it
            Path(tmp).unlink(missing_ok=True)


def quarantine(path: Path) -> Path:
    """Move an unreadable ``path`` aside to ``<path>.corrupt`` (kept for inspection)."""
    aside = Path(path).with_name(Path(path).name + ".corrupt")
    os.replace(path, aside)
    return aside


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files that a killed writer left in ``directory``; return them."""
    stale = [p for p in Path(directory).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n").encode()
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """``path``'s JSON object, or None if the file does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


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
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent

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
