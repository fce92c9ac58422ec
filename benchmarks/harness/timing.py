"""Where a run's time goes: seconds spent starting, training, evaluating, probing and
checkpointing (:class:`Timings`), recorded in ``run.json`` (``timing``) and as ``time/*``
metric rows.

``startup`` is the time from the start of the job to its first training step, less the
evaluation and snapshot done before that step (counted under ``eval`` and ``checkpoint``). The
job starts when its process starts (read from ``/proc``, so the interpreter's own start and
every import count), or, for a later job of a reused worker process (the joblib launcher runs
many jobs in one process), when the process's previous job ended (:func:`job_started`). The
phases add up across the attempts of a resumed run; the time of an attempt after the state of
its last checkpoint was taken (that checkpoint's own write included) is lost with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

#: The phases, in the order the report stacks them (``train`` is ``Progress.train_time``).
PHASES: tuple[str, ...] = ("startup", "train", "eval", "probe", "checkpoint")
#: The split of the timing rows (``time/<phase>``, cumulative seconds).
SPLIT = "time"


def process_start_time() -> float:
    """When this process started, in ``time.time()`` seconds (Linux: ``/proc/self/stat``,
    to 10 ms; elsewhere the time this module was imported)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # starttime, field 22 of proc(5), in clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(age, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


_IMPORTED = time.time()
_job_start: float | None = None
_last_job_end: float | None = None


def job_started() -> float:
    """Mark (once per job, in the process that runs it before any fork) and return the start
    of the current job: the process start for its first job, else the end of its previous
    job (:func:`job_ended`)."""
    global _job_start
    _job_start = _last_job_end if _last_job_end is not None else process_start_time()
    return _job_start


def job_start() -> float:
    """The start of the current job (:func:`job_started`; the process start if unmarked)."""
    return _job_start if _job_start is not None else process_start_time()


def job_ended() -> None:
    """Mark the end of the current job: the next job of this process starts here."""
    global _last_job_end, _job_start
    _last_job_end, _job_start = time.time(), None


@dataclass
class Timings:
    """Seconds a run spent in each phase but training (training is ``Progress.train_time``)."""

    startup: float = 0.0
    eval: float = 0.0
    probe: float = 0.0
    checkpoint: float = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to phase ``name``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - started)

    def started_training(self, job_start: float, before: float) -> None:
        """Add this attempt's start-up: from ``job_start`` (``time.time()``) until now, less
        ``before`` seconds already counted in other phases meanwhile."""
        self.startup += max(time.time() - job_start - before, 0.0)

    def seconds(self, train: float) -> dict[str, float]:
        """Every phase's seconds, ``train`` included, in :data:`PHASES` order."""
        return {name: train if name == "train" else getattr(self, name) for name in PHASES}

    def rows(self, train: float) -> dict[tuple[str, str], float]:
        """The ``time/<phase>`` metric rows (cumulative seconds)."""
        return {(SPLIT, name): value for name, value in self.seconds(train).items()}

    def record(self, train: float) -> dict[str, float]:
        """``run.json``'s ``timing``: seconds per phase, rounded to milliseconds."""
        return {f"{name}_s": round(value, 3) for name, value in self.seconds(train).items()}

    def state_dict(self) -> dict[str, float]:
        """The phases so far, for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` (a checkpoint without timings restores zeros)."""
        for name, value in state.items():
            setattr(self, name, float(value))
