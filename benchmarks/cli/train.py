"""``gradbench-train`` (also ``python -m benchmarks.train``): the Hydra app around
:func:`benchmarks.harness.train.run`.

    gradbench-train estimator=rloo model=bernoulli data=mnist_subset steps=5000
    gradbench-train experiment=quick --multirun hydra/launcher=joblib

A user error (an invalid value, a directory holding another run or in use) is one line and
exit 1; a sweep lists the jobs that did not finish and exits 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from benchmarks.harness import supervise, timing
from benchmarks.harness.config import renamed_override
from benchmarks.harness.train import run
from benchmarks.records.files import atomic_write_bytes
from benchmarks.records.runs import (
    RUN_JSON,
    RunRecord,
)

log = logging.getLogger(__name__)

#: The config directory (absolute: console scripts have no calling file to resolve it from).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def hydra_files() -> dict[str, bytes]:
    """What Hydra writes into ``<run dir>/.hydra/`` (``config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``) for the current job; the app writes it itself once the run has
    claimed its directory (``hydra.output_subdir`` is null)."""
    hydra_cfg = HydraConfig.instance().cfg
    task = OmegaConf.create(OmegaConf.to_container(hydra_cfg.hydra.overrides.task))
    files = {"hydra.yaml": hydra_cfg, "overrides.yaml": task}
    return {name: OmegaConf.to_yaml(c).encode() for name, c in files.items()}


def write_hydra_dir(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``run_dir/.hydra/``, each atomically."""
    for name, data in files.items():
        atomic_write_bytes(run_dir / HYDRA_DIR / name, data)


#: The folder of a run directory holding Hydra's record of the command.
HYDRA_DIR = ".hydra"
#: ``(exit code, message)`` of a single run that must not exit 0 (set by :func:`app`).
_exit: list[tuple[int, str]] = []


def detach_log_files(run_dir: Path) -> None:
    """Stop logging into files inside ``run_dir`` (Hydra's ``train.log``), closing them."""
    root, where = logging.getLogger(), run_dir.resolve()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == where:
            root.removeHandler(handler)
            handler.close()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> str:
    """The Hydra app: one run in Hydra's output directory (a job directory in a sweep),
    holding the directory's lock; in a sweep, supervised (``supervise``).

    A user error (:class:`supervise.UsageError`: an invalid value, a directory that holds
    another run or is in use) is one line, not a traceback: a single run then exits 1; a
    sweep job is listed at the end of the sweep, which exits 1. A single run that ends
    neither ``completed`` nor ``diverged`` (e.g. ``failed``: stopped by SIGTERM or SIGINT
    after its checkpoint, when the signal's previous handler let the process go on) exits 1.
    ``.hydra/`` is written only once the run has claimed its directory (see :func:`run`).
    """
    timing.job_started()  # before the fork of a supervised child: its start-up counts from here
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    files = {"config.yaml": OmegaConf.to_yaml(cfg).encode(), **hydra_files()}
    status, reason = "failed", "the job raised an exception"
    try:
        status = supervise.launch(
            run, cfg, run_dir, multirun=multirun, on_claim=lambda: write_hydra_dir(run_dir, files)
        )
        record = RunRecord.load(run_dir / RUN_JSON)
        reason = record.data.get("reason") if record is not None else None
    except (supervise.UsageError, supervise.RunFailedError) as err:
        refused = isinstance(err, supervise.UsageError)
        status, reason = "refused" if refused else "failed", str(err)
        if refused:  # the directory is not this command's: its log stays as it was
            detach_log_files(run_dir)
        if multirun:
            log.error("%s: %s", status, reason)
        else:
            _exit.append((1, f"error: {reason}"))
        return status
    except SystemExit:  # submitit's handler requeued the job: the next attempt reports
        status = ""
        raise
    finally:
        timing.job_ended()
        if multirun and status:
            supervise.record_job_outcome(Path(hc.sweep.dir), run_dir, status, reason)
    if status not in ("completed", "diverged") and not multirun:  # e.g. stopped by a signal
        _exit.append((1, f"error: {run_dir}: {status}: {reason}"))
    return status


def main() -> None:
    """Entry point of ``gradbench-train`` and ``python -m benchmarks.train``.

    Hydra's argument parser rejects overrides after a flag, so ``-m`` / ``--multirun`` are
    moved in front first: ``gradbench-train experiment=quick --multirun ...`` works. An
    override of a renamed group or key (``variant=``, ``debug.*``) is refused naming the new
    one (``pairing=``, ``faults.*``).
    """
    args = sys.argv[1:]
    flags = [a for a in args if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in args if a not in flags]
    for arg in args:  # an old spelling: one line naming the new one, exit 1
        refusal = None if arg.startswith("-") else renamed_override(arg)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            sys.exit(1)
    _exit.clear()
    app()
    if _exit:  # a single run refused or failed: its message, exit 1
        code, message = _exit[-1]
        print(message, file=sys.stderr)
        sys.exit(code)
    if supervise.sweep_problems:  # jobs of the sweep that did not finish (logged): exit 1
        sys.exit(1)


if __name__ == "__main__":
    main()
