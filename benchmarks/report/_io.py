"""Atomic file writes: a temporary file in the target directory, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.records.files import fault_point


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix so that writers which dispatch on the
    extension (matplotlib's ``savefig``, pandas' ``to_parquet``) pick the right format.
    Readers never see a half-written file, and a failed write leaves the old file intact.
    An ``OSError`` (full disk, read-only directory) is raised again with ``path`` in its
    message. ``$GRADBENCH_FAULT`` (see :mod:`benchmarks.records`) can kill the process here.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        fault_point(path.name, "before_fsync")
        with open(tmp, "rb") as fh:  # the content is on disk before the rename is
            os.fsync(fh.fileno())
        fault_point(path.name, "before_replace")
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
