"""Crash safety around one training run: supervision, stop signals, run-directory locks.

- :func:`launch` is what the Hydra app calls. It locks the run directory (:class:`RunDirLock`:
  two processes never write one run) and, in ``--multirun`` sweeps (``supervise=auto``), runs
  the training in a forked child process it waits for. A hard crash of the child (SIGKILL, the
  OOM killer, ``os._exit``, a segfault) is then recorded in ``run.json`` as ``failed`` with the
  exit signal or code, and the Hydra job returns normally, so the basic and joblib launchers go
  on with the other jobs instead of losing the whole sweep. Forking costs milliseconds (a
  fresh interpreter would re-import torch: seconds), the child inherits Hydra's logging, and
  the training loop is untouched.
- :class:`StopSignals`: SIGTERM, SIGINT and the scheduler's preemption signal (SIGUSR2, or
  ``$SUBMITIT_PREEMPT_SIGNAL``, as submitit and SLURM send before a time limit) only set a
  flag; the training loop checkpoints at the end of the current step, records ``failed``
  (terminated / interrupted) or ``timeout`` (preempted), then hands the signal to whoever
  handled it before (submitit requeues the job, which resumes from the checkpoint; otherwise
  the process ends as the signal asks). A supervisor forwards these signals to its child and
  honours them itself once the child has stopped.
- :class:`DebugFaults`: the hard-fault test hooks ``faults.exit_at_step``, ``kill_at_step``,
  ``term_at_step`` (first attempt only) and ``preempt_after`` (every attempt).
- :class:`SweepOutcome`: a Hydra callback that lists the jobs of a sweep that did not finish
  (refused, failed, timed out; reported by each job, in folders of any name);
  ``gradbench-train --multirun`` then exits 1 (jobs never raise, so every job runs). It keeps
  a sweep dir's first ``multirun.yaml``. :class:`OutputDirCheck`: an unusable run or sweep
  directory is one line naming it.
- :class:`UsageError`: a user error (:class:`RunDirBusyError`, ``train.ConfigError``), reported
  as one line, also from a supervised child (through a pipe), never as a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmarks.harness.errors import UsageError
from benchmarks.harness.lifecycle import RunLifecycle
from benchmarks.records.files import atomic_write_bytes, read_json, write_json
from benchmarks.records.runs import RUN_JSON, RunRecord

try:
    import fcntl
except ImportError:  # not POSIX: no run-directory locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: The signal a scheduler sends before preempting or timing out a job (submitit's choice).
PREEMPT_SIGNAL: signal.Signals = getattr(
    signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2
)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, PREEMPT_SIGNAL)
#: Set in a supervised child: the supervisor's pid (where a scheduler's signals arrive).
SUPERVISOR_ENV = "GRADBENCH_SUPERVISOR_PID"
#: The lock file of a run directory (held while a process writes the run).
LOCK = ".lock"
#: Jobs of the last ``--multirun`` sweep that did not finish (set by :class:`SweepOutcome`).
sweep_problems: list[str] = []


class RunDirBusyError(UsageError, RuntimeError):
    """Another live process holds the run directory."""


class RunFailedError(RuntimeError):
    """A supervised single run did not succeed (its ``run.json`` says why)."""


# ------------------------------------------------------------------------------ locks


class RunDirLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as the ``with`` block runs.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a lock is never stale;
    a second writer fails at once with :class:`RunDirBusyError`. A forked child shares it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fh: Any = None

    def __enter__(self) -> RunDirLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # held open as long as the lock is held
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunDirBusyError(
                f"{self.path.parent} is in use by another process (pid {holder}); two writers "
                "must never share a run directory: wait for it to end, or choose another "
                "hydra.run.dir / hydra.sweep.dir"
            ) from None
        except OSError as err:  # e.g. ENOLCK on a filesystem without locks
            log.warning("cannot lock %s (%s); continuing without a lock", self.path, err)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------ signals


def deliver(signum: int, handler: Any) -> None:
    """Let ``handler`` (a previous disposition of ``signum``) act on the signal now.

    A Python handler is called; ``SIG_IGN`` does nothing; the default action is taken by
    re-raising the signal with the default disposition (the process usually ends).
    """
    if callable(handler):
        handler(signum, None)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        raise SystemExit(128 + signum)  # if the default action did not end the process


class StopSignals:
    """SIGTERM, SIGINT and :data:`PREEMPT_SIGNAL` as a request to checkpoint and stop.

    The handler only records the first signal in :attr:`signum` (a second SIGINT raises
    ``KeyboardInterrupt`` at once); the training loop reads it once per step. Handlers are
    installed from the main thread only (elsewhere the signals keep their dispositions).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        """Install the handlers, remembering the previous ones."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def restore(self) -> None:
        """Put the previous handlers back, except for the signal already received: it is
        ignored until the outcome is recorded (a scheduler or a supervisor may send it again
        meanwhile); :meth:`honour` then restores and delivers it."""
        for sig, handler in self.previous.items():
            handler = signal.SIG_DFL if handler is None else handler
            signal.signal(sig, signal.SIG_IGN if sig == self.signum else handler)

    def outcome(self, step: int) -> tuple[str, str]:
        """The ``(status, reason)`` of a run stopped by :attr:`signum` after ``step``."""
        name = signal.Signals(self.signum).name
        if self.signum == PREEMPT_SIGNAL:
            return "timeout", (
                f"preempted or out of time ({name}) at step {step}; checkpoint saved: submitit "
                "requeues the job, or re-run the same command to resume"
            )
        verb = "interrupted" if self.signum == signal.SIGINT else "terminated"
        return "failed", (
            f"{verb} by {name} at step {step}; checkpoint saved: re-run the same command to resume"
        )

    def honour(self) -> None:
        """Hand the received signal to its previous handler, once the stopped run's outcome
        is recorded (:meth:`RunLifecycle.stopped`): submitit requeues; a default disposition
        ends the process. Returns if the process goes on."""
        assert self.signum is not None
        handler = self.previous.get(self.signum) or signal.SIG_DFL
        if self.signum in self.previous:
            signal.signal(self.signum, handler)
        deliver(self.signum, handler)


# ------------------------------------------------------------------------------ test hooks


class DebugFaults:
    """Hard faults injected by the ``faults.*`` test hooks before a given step.

    ``exit_at_step`` (``os._exit(3)``), ``kill_at_step`` (SIGKILL to itself) and
    ``term_at_step`` (SIGTERM to itself) fire in a run's first attempt only, like a transient
    crash, so re-running the same command shows the recovery; ``preempt_after`` sends the
    preemption signal to every process of the job (the supervisor, if any, and itself) after
    that many steps of every attempt, like SLURM before a time limit.
    """

    def __init__(self, hooks: Any, start_step: int, first_attempt: bool) -> None:
        def first(key: str) -> int | None:
            return hooks.get(key) if first_attempt else None

        self.exit_at, self.kill_at, self.term_at = (
            first("exit_at_step"), first("kill_at_step"), first("term_at_step"),
        )  # fmt: skip
        after = hooks.get("preempt_after")
        self.preempt_at = start_step + after if after else None

    @classmethod
    def build(cls, hooks: Any, start_step: int, first_attempt: bool) -> DebugFaults | None:
        """The armed hooks, or None when none is (the training loop then checks nothing)."""
        faults = cls(hooks, start_step, first_attempt)
        armed = (faults.exit_at, faults.kill_at, faults.term_at, faults.preempt_at)
        return faults if any(v is not None for v in armed) else None

    def before_step(self, step: int) -> None:
        """Fire the hooks set for ``step`` (the step about to be taken, 1-based)."""
        if step == self.exit_at:
            os._exit(3)
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.preempt_at:  # to every process of the job, as SLURM signals a step
            supervisor = os.environ.get(SUPERVISOR_ENV)
            if supervisor:
                os.kill(int(supervisor), PREEMPT_SIGNAL)
            os.kill(os.getpid(), PREEMPT_SIGNAL)


# ------------------------------------------------------------------------------ supervision


def _should_supervise(cfg: DictConfig, multirun: bool) -> bool:
    setting = str(cfg.get("supervise", "auto")).lower()
    wanted = setting == "true" or (setting == "auto" and multirun)
    return wanted and hasattr(os, "fork") and sys.platform.startswith("linux")


def launch(
    run: Callable[..., str], cfg: DictConfig, run_dir: Path, multirun: bool = False,
    **kwargs: Any,
) -> str:  # fmt: skip
    """``run(cfg, run_dir, multirun=..., **kwargs)`` under the run-directory lock, supervised
    when ``cfg.supervise`` says so (``auto``: in ``--multirun`` sweeps). Returns the run's
    status.

    A :class:`UsageError` of the run (an invalid config, a directory holding another run) is
    raised, also from a supervised child. Supervised, a failure never raises in a sweep
    (``run.json`` holds it and :class:`SweepOutcome` makes the sweep exit 1); in a single run
    it raises :class:`RunFailedError`.
    """
    run_dir = Path(run_dir)
    with RunDirLock(run_dir):
        if not _should_supervise(cfg, multirun):
            return run(cfg, run_dir, multirun=multirun, **kwargs)
        status, reason = _supervise(run, cfg, run_dir, multirun, kwargs)
    if status == USAGE_ERROR:
        raise UsageError(reason)
    if status == "failed" and not multirun:
        raise RunFailedError(f"{run_dir}: {reason}")
    return status


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


#: The status :func:`_supervise` returns for a child that stopped on a :class:`UsageError`.
USAGE_ERROR = "usage error"


def _supervise(
    run: Callable[..., str], cfg: DictConfig, run_dir: Path, multirun: bool,
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, str | None]:  # fmt: skip
    """Fork, run in the child, wait, record a hard crash, honour forwarded signals. A child's
    :class:`UsageError` comes back through a pipe as ``(USAGE_ERROR, message)``."""
    received: list[int] = []
    child = 0

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    _warm_up(str(cfg.get("data", {}).get("name", "")))
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if main else {}
    read_end, write_end = os.pipe()
    try:
        _flush()
        parent = os.getpid()
        child = os.fork()
        if child == 0:
            os.close(read_end)
            _child(run, cfg, run_dir, multirun, parent, kwargs or {}, write_end)  # no return
        os.close(write_end)
        for sig in received:  # arrived while forking
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)
        _warm_up_after_fork()
        with os.fdopen(read_end, "rb") as pipe:  # EOF once the child has exited
            usage = pipe.read().decode(errors="replace")
        _, wait_status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(wait_status)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if usage:  # refused before any work: the records are the run's own (or the refusal's)
        return USAGE_ERROR, usage
    status, reason = _post_mortem(run_dir, code, received)
    if received:  # the signal was meant for this process too: act on it now the child is done
        try:
            deliver(received[0], previous.get(received[0], signal.SIG_DFL))
        except Exception as err:  # submitit: "timed-out too many times" (not requeued)
            log.warning("%s: not requeued: %s", run_dir, err)
            reason = _not_requeued(run_dir, status, reason, err)
    return status, reason


def _not_requeued(run_dir: Path, status: str, reason: str | None, err: Exception) -> str | None:
    """A timed-out run whose scheduler gave up requeuing it: its reason says so (not that
    submitit requeues it)."""
    record = RunRecord.load(run_dir / RUN_JSON)
    if status != "timeout" or record is None or record.status != "timeout":
        return reason
    step = record.data.get("last_step")
    reason = (
        f"out of time at step {step} and not requeued ({str(err).rstrip('.')}; "
        "hydra.launcher.max_num_timeout "
        "spent); checkpoint saved: re-run the same command to resume"
    )
    record.update_if_possible(reason=reason)
    return reason


_warmed = False


def _warm_up(dataset: str = "") -> None:
    """Do once, in the supervisor, the lazy imports every run triggers (the optimizer's
    modules, as :func:`.build.make_optimizer` builds it: without ``torch._dynamo``; pyarrow
    for the metrics file), so that forked children inherit them instead of repeating them;
    and create tqdm's multiprocessing lock here, where it is released at exit (a child leaves
    with ``os._exit``). No tensor work happens here: a child forked after its parent ran
    OpenMP threads can deadlock. A built-in ``dataset`` is parsed here once per process (numpy
    only), not in every child."""
    global _warmed
    if dataset:
        from benchmarks.data.datasets import prefetch

        with contextlib.suppress(Exception):  # a problem shows in the child, with its message
            prefetch(dataset)
    if _warmed:
        return
    import pyarrow.parquet  # noqa: F401
    import torch
    from tqdm import tqdm

    from benchmarks.harness.eager_optim import eager_optimizer

    eager_optimizer(torch.optim.Adam)([torch.zeros(1, requires_grad=True)])
    tqdm.get_lock()
    _warmed = True


def _warm_up_after_fork() -> None:
    """While the first child trains: import what every run imports only after its first step
    (pandas, to write the metrics file), so later children inherit it; the first child's
    start-up is not made to wait for it."""
    import pandas  # noqa: F401


def _child(
    run: Callable[..., str], cfg: DictConfig, run_dir: Path, multirun: bool, parent: int,
    kwargs: dict[str, Any], usage_pipe: int,
) -> None:  # fmt: skip
    """The forked child: default signal dispositions, die with the parent, run, exit. A
    :class:`UsageError` goes to the parent through ``usage_pipe`` (no traceback)."""
    code = 1
    try:
        for sig in STOP_SIGNALS:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default)
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
        os.environ[SUPERVISOR_ENV] = str(parent)
        if cfg.get("threads"):  # before any tensor work (see _warm_up)
            import torch

            torch.set_num_threads(int(cfg.threads))
        run(cfg, run_dir, multirun=multirun, **kwargs)
        code = 0
    except UsageError as err:
        with contextlib.suppress(OSError):
            os.write(usage_pipe, (str(err) or type(err).__name__).encode())
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        _flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG), so
    an orphan checkpoints and stops instead of writing on beside a re-run."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _post_mortem(run_dir: Path, code: int, received: list[int]) -> tuple[str, str | None]:
    """The run's status after its child exited with ``code``; record a death the child could
    not record itself (its ``run.json`` still says ``running``, or there is none)."""
    record = RunRecord.load(run_dir / RUN_JSON)
    if record is not None and record.status != "running":
        if record.status == "failed":
            log.error("%s failed: %s", run_dir, record.data.get("reason"))
        return str(record.status), record.data.get("reason")
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    last = record.data.get("last_step") if record is not None else None
    where = f" (last checkpoint at step {last})" if last else ""
    preempted = -code == PREEMPT_SIGNAL and PREEMPT_SIGNAL in received
    status = "timeout" if preempted else "failed"
    reason = (
        f"the training process {how} before recording an outcome{where}; re-run the same "
        "command to resume from the last checkpoint"
    )
    RunLifecycle.died(run_dir, record, status, reason)
    log.error("%s %s: %s", run_dir, status, reason)
    return status, reason


# ------------------------------------------------------------------------------ sweeps


#: Where the jobs of a sweep leave their outcomes for :class:`SweepOutcome` (in the sweep dir).
OUTCOMES = ".outcomes"
#: The environment variable naming the current sweep (its outcomes folder), set by
#: :class:`SweepOutcome` before any job starts; launchers pass the environment to their jobs.
SWEEP_ENV = "GRADBENCH_SWEEP"
#: A copy of a sweep directory's first ``multirun.yaml`` while a later sweep runs there.
MULTIRUN_BACKUP = ".multirun.first.yaml"


def record_job_outcome(sweep_dir: Path, job_dir: Path, status: str, reason: str | None) -> None:
    """Leave a sweep job's outcome where :class:`SweepOutcome` reads it at the end of the
    sweep (a job may run in another process or on another machine). Also a refused job's,
    whose directory holds another run's records."""
    token = os.environ.get(SWEEP_ENV)
    if not token:  # not started by gradbench-train --multirun: the records say it all
        return
    entry = {"dir": str(Path(job_dir).resolve()), "status": status, "reason": reason}
    name = f"{os.getpid()}-{time.monotonic_ns()}.json"
    with contextlib.suppress(OSError):  # the job's own records stay the ground truth
        write_json(Path(sweep_dir) / OUTCOMES / token / name, entry)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every directory under ``sweep_dir`` holding a ``run.json``, whatever its name (numbers,
    ``${hydra.job.override_dirname}``, nested), except hidden ones."""
    out = []
    for path in sorted(sweep_dir.rglob(RUN_JSON)):
        rel = path.parent.relative_to(sweep_dir).parts
        if rel and not any(part.startswith(".") for part in rel):
            out.append(path.parent)
    return out


def _same_sweep(a: dict, b: dict) -> bool:
    """Whether two ``multirun.yaml`` contents launch the same jobs (task overrides and the
    sweeper's parameters)."""

    def plan(m: dict) -> tuple[Any, Any]:
        h = (m or {}).get("hydra") or {}
        return ((h.get("overrides") or {}).get("task"), (h.get("sweeper") or {}).get("params"))

    return plan(a) == plan(b)


class OutputDirCheck(Callback):
    """Hydra callback: a run or sweep directory that cannot be created (a dangling symbolic
    link, a file where a folder must be, no permission) ends the command with one line
    naming it, before anything is written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(path: str) -> None:
        from benchmarks.harness.config import OutputDirError, ensure_output_dir

        try:
            ensure_output_dir(str(path))
        except OutputDirError as err:
            raise SystemExit(f"error: {err}") from None


class SweepOutcome(Callback):
    """Hydra callback: at the end of a ``--multirun`` sweep, log every job of the sweep that
    did not finish (refused, or ``run.json`` not ``completed`` or ``diverged``) and remember
    them in :data:`sweep_problems` (``gradbench-train`` then exits 1).

    The jobs report their outcomes (:func:`record_job_outcome`) into a folder of this sweep
    named in ``$GRADBENCH_SWEEP``, so a refused job (its folder holds another run) counts
    too, and only this sweep's jobs count; without any report every ``run.json`` under the
    sweep dir is read. A sweep dir's first ``multirun.yaml`` (its provenance, the report's
    command) is kept: a later sweep's with other jobs is saved as ``multirun.<n>.yaml``.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self.first: bytes | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.token = uuid.uuid4().hex
        os.environ[SWEEP_ENV] = self.token
        backup, current = sweep_dir / MULTIRUN_BACKUP, sweep_dir / "multirun.yaml"
        if backup.is_file():  # a sweep killed before it could put the first one back
            self.first = backup.read_bytes()
        elif current.is_file():
            self.first = current.read_bytes()
            atomic_write_bytes(backup, self.first)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        os.environ.pop(SWEEP_ENV, None)
        self._keep_first_multirun_yaml(sweep_dir)
        outcomes = self._outcomes(sweep_dir)
        if outcomes is None:  # no job reported (another launcher's environment): the records
            outcomes = []
            for job in _job_dirs(sweep_dir):
                record = RunRecord.load(job / RUN_JSON)
                status = record.status if record is not None else "missing"
                reason = record.data.get("reason") if record is not None else "no run.json"
                outcomes.append((job, str(status), reason))
        problems = [
            f"{job}: {status}: {reason}"
            for job, status, reason in outcomes
            if status not in ("completed", "diverged")
        ]
        sweep_problems[:] = problems
        for line in problems:
            log.error("not finished: %s", line)
        if problems:
            log.error(
                "%d job(s) of %s did not finish; fix what is refused, then re-run the same "
                "command to resume them", len(problems), sweep_dir,
            )  # fmt: skip

    def _outcomes(self, sweep_dir: Path) -> list[tuple[Path, str, str | None]] | None:
        """The outcomes this sweep's jobs reported (None if none did); a finished status is
        checked against the job's ``run.json`` (what a report will read)."""
        folder = sweep_dir / OUTCOMES / str(self.token)
        files = sorted(folder.glob("*.json")) if self.token else []
        if not files:
            return None
        out = []
        last: dict[str, Path] = {}  # a requeued job reports each attempt: the last one counts
        for file in sorted(files, key=lambda f: f.stat().st_mtime_ns):
            last[str((read_json(file) or {}).get("dir"))] = file
        for file in sorted(last.values()):
            entry = read_json(file) or {}
            job, status, reason = (
                Path(entry.get("dir", "?")),
                entry.get("status"),
                entry.get("reason"),
            )
            if status in ("completed", "diverged"):
                record = RunRecord.load(job / RUN_JSON)
                if record is None or record.status != status:
                    status, reason = "missing", f"run.json does not say {status}"
            out.append((job, str(status), reason))
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (sweep_dir / OUTCOMES).rmdir()  # when no other sweep is running there
        return out

    def _keep_first_multirun_yaml(self, sweep_dir: Path) -> None:
        """Put the first ``multirun.yaml`` back (Hydra rewrote it at the start); keep this
        sweep's as ``multirun.<n>.yaml`` when it launched other jobs."""
        if self.first is None:
            return
        current = sweep_dir / "multirun.yaml"
        if current.is_file() and current.read_bytes() != self.first:
            mine = yaml.safe_load(current.read_bytes()) or {}
            if not _same_sweep(yaml.safe_load(self.first) or {}, mine):
                n = 1
                while (sweep_dir / f"multirun.{n}.yaml").exists():
                    n += 1
                atomic_write_bytes(sweep_dir / f"multirun.{n}.yaml", current.read_bytes())
        atomic_write_bytes(current, self.first)
        (sweep_dir / MULTIRUN_BACKUP).unlink(missing_ok=True)
