"""The life of one run as ``run.json`` tells it: every status change of a run, in one place.

A run directory's ``run.json`` (:class:`~benchmarks.records.runs.RunRecord`) says what the run
is and where it stands. Its ``status`` moves through these transitions, each one method of
:class:`RunLifecycle`:

=====================  =============  ============================================================
method                 status         when
=====================  =============  ============================================================
``invalid_config``     ``failed``     the config fails validation (before any work)
``build_failed``       ``failed``     building data, model, optimizer or probe raised
``cannot_resume``      ``failed``     the checkpoint found cannot be resumed from
``running``            ``running``    training starts (or resumes); the provenance is recorded
``diverged``           ``diverged``   a non-finite loss or parameter (the sweep goes on)
``failed``             ``failed``     an exception during training (message, traceback tail)
``stopped``            ``failed`` /   SIGTERM / SIGINT (``failed``) or the scheduler's preemption
                       ``timeout``    signal (``timeout``), after a checkpoint
``completed``          ``completed``  every step trained, the last checkpoint written
``died``               ``failed`` /   (the supervisor) the training process died before it could
                       ``timeout``    record an outcome itself
=====================  =============  ============================================================

``run.json`` is the commit marker of a run directory: each status is written after the files
it vouches for (the metrics rows, then the checkpoint, then ``run.json``), so a finished status
counts only while those files are intact (:meth:`RunLifecycle.check_previous`).

The lifecycle also decides who owns a directory: ``on_claim`` (the app writes ``.hydra/``) is
called at once in a new directory, or once the run found there is resumed or extended; never
when that run is refused or skipped.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import checkpoint
from benchmarks.harness.build import config_changes
from benchmarks.harness.errors import ConfigError
from benchmarks.records.files import file_sha256
from benchmarks.records.runs import METRICS, RUN_JSON, RunRecord, now_iso

log = logging.getLogger(__name__)

#: Lines of the traceback a ``failed`` run keeps in ``run.json``.
TRACEBACK_LINES = 20


def foreign_run(where: Path, changed: list[str]) -> ConfigError:
    """The error of a directory (or a checkpoint) holding a run of another config."""
    return ConfigError(
        f"{where} holds a run with a different config (differs in: {', '.join(changed)}); "
        "resume it with its own config or choose a new hydra.run.dir / hydra.sweep.dir"
    )


def steps_below(steps: int, done: int, where: Path) -> ConfigError:
    """The error of a ``steps`` below the step a run has already reached (a run cannot be
    shortened: its metrics and final evaluation would stop at the wrong step)."""
    return ConfigError(
        f"steps={steps} is invalid here: {where} is at step {done}; allowed: steps >= {done} "
        "(resume or extend that run), or a new hydra.run.dir / hydra.sweep.dir"
    )


def holds_records(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's records (run.json aside): a checkpoint or metrics."""
    ckpt = run_dir / checkpoint.CHECKPOINT
    return any(p.exists() for p in (ckpt, checkpoint.previous_path(ckpt), run_dir / METRICS))


class RunLifecycle:
    """Every status change of one run's ``run.json``, and the claim on its directory.

    Args:
      run_dir: the run directory.
      previous: the ``run.json`` found there (None if there is none).
      config: the resolved config of this run (recorded with every failure).
      on_claim: called once the directory is this run's (see the module docstring).
    """

    def __init__(
        self,
        run_dir: Path,
        previous: RunRecord | None,
        config: dict[str, Any],
        on_claim: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.previous = previous
        self.config = config
        self.on_claim = on_claim
        self.claimed = False
        #: The record this run writes: the one found, or a new one (written at its first update).
        self.record = previous or RunRecord(run_dir / RUN_JSON, {})
        #: What was wrong with the records found (for ``run.json``'s ``recovered``).
        self.recovered: list[str] = []
        #: This attempt's number: 1 for a new run, one more than the attempts recorded.
        self.attempt = int(self.record.data.get("attempts") or 0) + 1

    # -------------------------------------------------------------------------- the claim

    def claim_if_new(self) -> None:
        """Claim a new directory at once: it holds nobody else's records to keep."""
        if self.on_claim is not None and self.previous is None and not holds_records(self.run_dir):
            self.on_claim()
            self.claimed = True

    def claim(self) -> None:
        """Claim the directory (once): the run found here is now resumed or extended."""
        if self.on_claim is not None and not self.claimed:
            self.on_claim()
            self.claimed = True

    # -------------------------------------------------------------------------- the run found

    @property
    def last_step(self) -> int:
        """The last step the run found here recorded (0 if none)."""
        return int(self.previous.data.get("last_step") or 0) if self.previous is not None else 0

    @property
    def recorded_run_id(self) -> str | None:
        """The run id in the ``run.json`` found (None for a new run, or when ``run.json`` was
        lost); read before :meth:`running` records this run's."""
        return self.record.data.get("run_id")

    def check_previous(self, steps: int) -> str | None:
        """Refuse a directory holding another config's run, or a run beyond ``steps``
        (:class:`ConfigError`); return the status of a finished run to skip, else None.

        A ``completed`` or ``diverged`` status counts only while the files it vouches for are
        intact; otherwise the run is redone and ``recovered`` says why.
        """
        previous, run_dir = self.previous, self.run_dir
        if previous is None:
            return None
        ckpt = run_dir / checkpoint.CHECKPOINT
        if "config" in previous.data and (ckpt.exists() or previous.status != "failed"):
            changed = config_changes(previous.data["config"], self.config)
            if changed:
                raise foreign_run(run_dir, changed)
        last = self.last_step
        if previous.status != "diverged" and last > steps:
            raise steps_below(steps, last, run_dir / RUN_JSON)
        if previous.status == "diverged" or (previous.status == "completed" and last >= steps):
            problem = checkpoint.finished_problem(run_dir, previous.data)
            if problem is None:
                log.info(
                    "run in %s is already %s at step %d; skip", run_dir, previous.status, last
                )
                return str(previous.status)
            self.recovered.append(f"run.json said {previous.status} but {problem}; redone")
            log.warning("%s: %s", run_dir, self.recovered[-1])
        return None

    # -------------------------------------------------------------------------- before training

    def invalid_config(self, err: ConfigError) -> None:
        """``failed``: the config is invalid. Written into a new ``run.json``, or over a failed
        one; never over a live record (another config's run stays untouched)."""
        reason = f"invalid config: {err}"
        if self.previous is None:
            new = RunRecord(self.run_dir / RUN_JSON, {"status": "failed", "config": self.config})
            new.update(reason=reason, end_time=now_iso())
        elif self.previous.status == "failed":
            self.previous.update(reason=reason, end_time=now_iso())

    def build_failed(self, err: BaseException) -> None:
        """``failed``: building the run raised ``err`` (a completed run being extended keeps
        its record)."""
        if self.record.status != "completed":
            self.record.update(status="failed", reason=f"{type(err).__name__}: {err}",
                               config=self.config, end_time=now_iso())  # fmt: skip

    def cannot_resume(self, err: BaseException) -> None:
        """``failed``: the checkpoint found cannot be resumed from."""
        why = f"cannot resume: {type(err).__name__}: {err}"
        self.record.update_if_possible(
            status="failed", reason=why, config=self.config, end_time=now_iso()
        )

    def running(
        self,
        identity: dict[str, Any],
        provenance: dict[str, Any],
        last_step: int,
        resumed_from: list[int],
    ) -> None:
        """``running``: record the run's identity and provenance as training starts at
        ``last_step`` (clearing a previous attempt's failure)."""
        record = self.record
        record.update(
            **identity,
            status="running",
            reason=None,
            traceback=None,
            config=self.config,
            **provenance,
            start_time=record.data.get("start_time") or now_iso(),
            end_time=None,
            last_step=last_step,
            resumed_from=resumed_from,
            attempts=self.attempt,
            recovered=[*(record.data.get("recovered") or []), *self.recovered],
            run_dir=str(self.run_dir.resolve()),
        )

    # -------------------------------------------------------------------------- while training

    def checkpointed(self, step: int, timing: dict[str, float] | None = None) -> None:
        """The checkpoint of ``step`` is written (after the metrics it belongs to); ``timing``:
        the seconds per phase so far (:meth:`.timing.Timings.record`)."""
        self.record.update(last_step=step, **({"timing": timing} if timing else {}))

    # -------------------------------------------------------------------------- outcomes

    def diverged(self, first_bad: int) -> str:
        """``diverged`` at step ``first_bad`` (the metrics file is written first): the last
        finite step is the one before."""
        self.record.update(
            status="diverged",
            reason=f"non-finite loss or parameters at step {first_bad}",
            last_step=first_bad - 1,
            end_time=now_iso(),
        )
        log.warning("diverged at step %d (last finite step %d)", first_bad, first_bad - 1)
        return "diverged"

    def failed(self, err: BaseException) -> None:
        """``failed``: training raised ``err``; its message and traceback tail are recorded if
        the disk allows (if it is full, the first error is the one raised)."""
        lines = traceback.format_exception(type(err), err, err.__traceback__)
        tail = "".join(lines).strip().splitlines()[-TRACEBACK_LINES:]
        self.record.update_if_possible(
            status="failed",
            reason=f"{type(err).__name__}: {err}",
            traceback="\n".join(tail),
            end_time=now_iso(),
        )

    def stopped(self, status: str, reason: str, step: int) -> str:
        """``failed`` or ``timeout``: a stop signal ended the run after the checkpoint of
        ``step`` (``status`` and ``reason`` from :meth:`supervise.StopSignals.outcome`)."""
        self.record.update(status=status, reason=reason, last_step=step, end_time=now_iso())
        log.warning(reason)
        return status

    def completed(self, step: int, timing: dict[str, float] | None = None) -> str:
        """``completed`` after ``step``, with the SHA-256 of the final metrics file and the
        seconds per phase (``timing``)."""
        self.record.update(
            status="completed",
            last_step=step,
            end_time=now_iso(),
            metrics_sha256=file_sha256(self.run_dir / METRICS),
            **({"timing": timing} if timing else {}),
        )
        return "completed"

    @staticmethod
    def died(run_dir: Path, record: RunRecord | None, status: str, reason: str) -> None:
        """``failed`` or ``timeout``, written by the supervisor: the training process of
        ``run_dir`` died before it could record an outcome (``record`` is its ``run.json``, if
        there is one)."""
        record = record or RunRecord(run_dir / RUN_JSON, {})
        record.update(status=status, reason=reason, end_time=now_iso())
