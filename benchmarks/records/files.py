"""Atomic file writes (the one writer every record, report and measurement goes through),
checksums, quarantine of damaged files and the fault-injection test hook.

Every file is written into a temporary file in the destination's own directory, flushed and
fsynced, then moved over the destination with ``os.replace``: a reader (or a run killed
mid-write) sees the old file or the new one, never a torn one; a failed write leaves the old
file and raises an ``OSError`` naming the destination; leftover temporary files
(``.<name>.*.tmp``) never block a later write and are removed when a run starts.

Test hook: ``GRADBENCH_FAULT=<file name>:<n>[:<phase>]`` makes the process SIGKILL itself at
the ``n``-th atomic write of that file name (e.g. ``checkpoint.pt:2``, ``run.json:1``,
``metrics.parquet:3:before_fsync``, ``report.md:1``), after the temporary file is written and
before it is fsynced (``before_fsync``) or moved into place (``before_replace``, the default).
It exists for the fault-injection tests (``tests/reliability``); leave it unset otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# mkstemp creates files readable by the owner only; records get the usual umask permissions.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


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
