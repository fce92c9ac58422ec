"""Sweeps on a SLURM cluster through submitit that survive whatever happens to a job.

``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``) uses the Hydra plugin
``hydra_plugins.gradbench_slurm_launcher.launcher.SlurmSweepLauncher``: hydra-submitit-launcher's
``SlurmLauncher`` whose :func:`launch` adds what a sweep needs on a real scheduler:

- **Before submitting** (:func:`preflight`): ``sacct`` must answer (submitit sees a job that
  left no result end only through accounting; without it the sweep would wait forever), no
  job an earlier command submitted for this sweep dir may still be queued or running (a
  re-run says so and stops, instead of racing the attempt SLURM still holds), and
  ``sbatch --test-only`` must accept the request (GPUs, CPUs, memory, partition, account).
- **Resources** (:func:`size_request`): ``cpus_per_task`` follows ``threads``; GPUs only when
  the run wants CUDA (``device=cuda``) or the ``slurm_gpu`` preset asks; ``mem_gb`` from the
  model's size; partition and account from overrides or SLURM's own ``SBATCH_PARTITION`` /
  ``SBATCH_ACCOUNT``.
- **Waiting** (:func:`wait_for_jobs`): each job is watched through ``sacct`` until SLURM no
  longer holds it (a job requeued by ``scontrol requeue`` or by submitit is waited for, its
  first attempt's result is not its last); a job pending for a reason that never clears
  (``PartitionConfig``, ...) cancels the sweep with one line. A job that ended without a
  result (its supervisor killed, a time-limit signal before any handler, requeues spent,
  cancelled) gets its outcome recorded here (:func:`post_mortem`): ``run.json`` and the
  sweep's "not finished" list say what SLURM saw; the launcher never raises for one job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf

from benchmarks.harness.config import job_signature, recorded_overrides
from benchmarks.harness.lifecycle import RunLifecycle
from benchmarks.harness.supervise import RunDirBusyError, RunDirLock, record_job_outcome
from benchmarks.records.files import atomic_write_bytes
from benchmarks.records.runs import RUN_JSON, RunRecord

log = logging.getLogger(__name__)

#: Seconds between two ``sacct`` polls while waiting for a sweep's jobs.
POLL_S = float(os.environ.get("GRADBENCH_SLURM_POLL_S", "5"))
#: Seconds between two warnings while ``sacct`` keeps failing during the wait.
OUTAGE_WARN_S = 600.0
#: The sweep dir's list of the SLURM job ids its commands submitted (one per line).
JOBS_FILE = Path(".slurm") / "jobs"
#: SLURM states in which the scheduler still holds a job (it may run again).
ACTIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip
#: Pending reasons that never clear by waiting: the request exceeds what the cluster offers.
BLOCKED = {
    "PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit",
    "InvalidAccount", "InvalidQOS", "PartitionDown", "PartitionInactive", "QOSMaxCpuPerJobLimit",
    "QOSMaxMemoryPerJob", "QOSMaxWallDurationPerJobLimit", "AssocMaxWallDurationPerJobLimit",
}  # fmt: skip
#: Bytes per parameter a run holds (parameters, gradients, Adam's two moments, the model in
#: the current and previous checkpoint and a snapshot), and the interpreter with torch, data
#: and activations of a small model, in GB.
BYTES_PER_PARAMETER, BASE_GB = 32, 1.0
#: Input dimension of each data set (a model's size follows it); others count as MNIST.
INPUT_DIMS = {"digits": 64, "synthetic": 64}


class SlurmUnusableError(SystemExit):
    """The cluster cannot run the sweep as asked (one line, exit 1, nothing left running)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


# ------------------------------------------------------------------------------ the cluster


def slurm(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run a SLURM command; ``(exit code, stdout + stderr)`` (127 when it is not installed)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, f"{args[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, f"{args[0]} did not answer in {timeout:.0f} s"
    return done.returncode, (done.stdout + done.stderr).strip()


def accounting_problem() -> str | None:
    """Why ``sacct`` cannot report job states here, or None when it can."""
    code, out = slurm("sacct", "-n", "-X", "-P", "-S", "now", "-o", "JobID")
    if code == 0:
        return None
    return (
        f"sacct does not work on this cluster ({out.splitlines()[-1] if out else code}); "
        "gradbench sees a SLURM job that ended without a result only through accounting: "
        "ask for AccountingStorageType=accounting_storage/slurmdbd (slurmdbd running), or "
        "use hydra/launcher=joblib"
    )


def job_states(
    job_ids: Sequence[str], errors: list[str] | None = None
) -> dict[str, dict[str, str]]:
    """``sacct``'s ``State``, ``ExitCode`` and ``Start`` of each task of the
    given (array) jobs, keyed ``<array id>_<task>`` (pending ranges expanded); ``{}`` when
    ``sacct`` fails, whose last line is then appended to ``errors``."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    ids = sorted({str(j).split("_")[0] for j in job_ids})
    if not ids:
        return {}
    code, out = slurm("sacct", "-X", "-P", "-o", "JobID,State,ExitCode,Start", "-j", ",".join(ids))
    if code != 0:
        if errors is not None:
            errors.append(out.splitlines()[-1] if out else f"exit code {code}")
        return {}
    return SlurmInfoWatcher().read_info(out)


def state_of(info: dict[str, str]) -> str:
    """The bare state (``CANCELLED by 0`` -> ``CANCELLED``); ``UNKNOWN`` before sacct knows."""
    return (info.get("State") or "UNKNOWN").split()[0].rstrip("+")


def still_held(sweep_dir: Path) -> list[str]:
    """``<job id> <state>`` of every job an earlier command submitted for ``sweep_dir`` that
    SLURM still holds (queued, held, running or requeued)."""
    path = sweep_dir / JOBS_FILE
    ids = path.read_text().split() if path.is_file() else []
    states = job_states(ids)
    return [f"{jid} {state_of(i)}" for jid, i in sorted(states.items()) if state_of(i) in ACTIVE]


def test_only(script: str) -> str | None:
    """What ``sbatch --test-only`` says against the batch ``script`` (None: accepted)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    try:
        code, out = slurm("sbatch", "--test-only", fh.name)
    finally:
        os.unlink(fh.name)
    return None if code == 0 else (out.splitlines()[-1] if out else f"exit {code}")


def preflight(sweep_dir: Path, executor: Any) -> None:
    """Refuse, with one line, a sweep the cluster cannot run or watch (see the module doc)."""
    problem = accounting_problem()
    if problem:
        raise SlurmUnusableError(problem)
    held = still_held(sweep_dir)
    if held:
        ids = sorted({h.split("_")[0].split()[0] for h in held})
        raise SlurmUnusableError(
            f"{sweep_dir}: SLURM still holds job(s) of an earlier command for this sweep "
            f"({', '.join(held)}); wait until they end (squeue -j {','.join(ids)}), or "
            f"cancel them (scancel {' '.join(ids)}), then re-run"
        )
    slurm_executor = executor._executor  # submitit.AutoExecutor's SlurmExecutor
    refusal = test_only(slurm_executor._make_submission_file_text("true", "preflight"))
    if refusal:
        wanted = {k: v for k, v in slurm_executor.parameters.items() if k in REQUEST_KEYS}
        raise SlurmUnusableError(
            f"SLURM cannot run a job of this sweep as requested ({refusal}; sbatch "
            f"--test-only); request: {wanted}: change hydra.launcher.* (partition, account, "
            "cpus_per_task, mem_gb, gpus_per_node, timeout_min)"
        )


#: Executor parameters that a refused request names.
REQUEST_KEYS = (
    "partition", "account", "cpus_per_task", "mem", "gpus_per_node", "gres", "time", "qos",
)  # fmt: skip


# ------------------------------------------------------------------------------ resources


def model_parameters(cfg: DictConfig) -> int:
    """The number of parameters of the run's encoder and decoder (linear: one layer each way;
    nonlinear: two hidden layers of ``hidden_dim``); categorical latents count every
    category."""
    m = cfg.get("model") or {}
    latent = int(m.get("latent_dim") or 200) * (
        int(m.get("n_categories") or 10) if m.get("family") == "categorical" else 1
    )
    dim = INPUT_DIMS.get(str((cfg.get("data") or {}).get("name")), 784)
    if m.get("arch") == "nonlinear":
        hidden = int(m.get("hidden_dim") or 200)
        one_way = dim * hidden + hidden * hidden + hidden * latent
    else:
        one_way = dim * latent
    return 2 * one_way


def size_request(params: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The launcher parameters with the unset ones sized to the run: ``cpus_per_task`` =
    ``threads``, ``mem_gb`` from the model's size (:data:`BYTES_PER_PARAMETER`,
    :data:`BASE_GB`), one GPU when ``device=cuda`` (none asked otherwise)."""
    out = dict(params)
    if out.get("cpus_per_task") is None:
        out["cpus_per_task"] = int(cfg.get("threads") or 1)
    if out.get("mem_gb") is None:
        gb = BASE_GB + model_parameters(cfg) * BYTES_PER_PARAMETER / 1e9
        out["mem_gb"] = math.ceil(gb * 4) / 4  # quarter GB steps
    if out.get("gpus_per_node") is None:
        out.pop("gpus_per_node", None)
        if str(cfg.get("device")) == "cuda":
            out["gpus_per_node"] = 1
    return out


# ------------------------------------------------------------------------------ the launcher


def launch(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """``SlurmSweepLauncher.launch`` (``hydra_plugins.gradbench_slurm_launcher``): check,
    submit one array job, wait for every task, and return each job's outcome."""
    config = launcher.config
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(launcher.params, config)
    preflight(sweep_dir, executor)
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        job_params.append(
            (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
        )
    jobs = executor.map_array(launcher, *zip(*job_params, strict=True))
    remember_jobs(sweep_dir, [job.job_id for job in jobs])
    log.info("submitted %s to SLURM; waiting for them", ", ".join(j.job_id for j in jobs))
    ended = wait_for_jobs(jobs)
    return [
        job_return(job, ended[job.job_id], list(ov), sweep_dir)
        for job, ov in zip(jobs, job_overrides, strict=True)
    ]


def make_executor(launcher_params: dict[str, Any], config: DictConfig) -> Any:
    """submitit's executor for the sweep, as hydra-submitit-launcher builds it, with the
    request sized to the run (:func:`size_request`)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = size_request(launcher_params, config)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"],
        slurm_max_num_timeout=params["max_num_timeout"],
    )  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = {"submitit_folder", "max_num_timeout"}
    executor.update_parameters(
        **{(k if k in base else f"slurm_{k}"): v for k, v in params.items() if k not in skip}
    )
    return executor


def remember_jobs(sweep_dir: Path, job_ids: list[str]) -> None:
    """Add ``job_ids`` to the sweep dir's :data:`JOBS_FILE` (what a re-run checks first)."""
    path = sweep_dir / JOBS_FILE
    old = path.read_text() if path.is_file() else ""
    atomic_write_bytes(path, (old + "".join(f"{j}\n" for j in job_ids)).encode())


def wait_for_jobs(jobs: Sequence[Any]) -> dict[str, dict[str, str]]:
    """Poll ``sacct`` until SLURM holds none of ``jobs``; their last ``sacct`` entries, keyed
    by job id. A job pending for a :data:`BLOCKED` reason cancels them all (one line).

    While ``sacct`` fails (slurmdbd down or restarting) the jobs keep running and the wait
    goes on: a warning names the error when the outage starts and every
    :data:`OUTAGE_WARN_S` seconds, and one line says when ``sacct`` answers again."""
    waiting = {job.job_id for job in jobs}
    ended: dict[str, dict[str, str]] = {}
    outage_since = warned_at = None
    while waiting:
        errors: list[str] = []
        states = job_states(sorted(waiting), errors)
        now = time.monotonic()
        if errors:
            outage_since = now if outage_since is None else outage_since
            if warned_at is None or now - warned_at >= OUTAGE_WARN_S:
                log.warning(
                    "sacct fails (%s) since %.0f s; still waiting for %d job(s), which SLURM "
                    "keeps running; asking again every %g s",
                    errors[0], now - outage_since, len(waiting), POLL_S,
                )  # fmt: skip
                warned_at = now
        elif outage_since is not None:
            log.warning("sacct answers again after %.0f s", now - outage_since)
            outage_since = warned_at = None
        pending = [j for j in waiting if state_of(states.get(j, {})) == "PENDING"]
        reasons = pending_reasons(pending) if pending else {}
        for jid in sorted(waiting):
            info = states.get(jid, {})
            state = state_of(info)
            if reasons.get(jid) in BLOCKED:
                slurm("scancel", *sorted({j.job_id.split("_")[0] for j in jobs}))
                raise SlurmUnusableError(
                    f"SLURM will never start job {jid} (pending, Reason={reasons[jid]}): "
                    "the request exceeds what the partition offers; cancelled this sweep's "
                    "jobs: change hydra.launcher.* and re-run"
                )
            if state != "UNKNOWN" and state not in ACTIVE:
                ended[jid] = info
                waiting.discard(jid)
        if waiting:
            time.sleep(POLL_S)
    return ended


def result_of(job: Any, info: dict[str, str]) -> tuple[str, Any] | None:
    """submitit's ``(outcome, value)`` of the job's last attempt; None when that attempt left
    none (an older attempt's result, from before a requeue, does not count)."""
    from submitit.core import utils

    path = job.paths.result_pickle
    if not path.is_file():
        return None
    started = info.get("Start", "")
    with contextlib.suppress(ValueError):
        if path.stat().st_mtime < datetime.fromisoformat(started).timestamp():
            return None
    try:
        return utils.pickle_load(path)
    except Exception:  # a truncated result counts as none
        return None


def job_return(job: Any, info: dict[str, str], overrides: list[str], sweep: Path) -> JobReturn:
    """The job's ``JobReturn``: its own when it returned; else its outcome recorded by
    :func:`post_mortem`. Never an exception: one job never takes the sweep down."""
    result = result_of(job, info)
    if result is not None and result[0] == "success" and isinstance(result[1], JobReturn):
        ret = result[1]
        if ret.status == JobStatus.COMPLETED:
            return ret
    error = str(result[1]) if result is not None else ""
    with contextlib.suppress(Exception):  # srun's last words name a deadly signal
        error += "\n" + "\n".join((job.stderr() or "").splitlines()[-20:])
    status = post_mortem(job.job_id, info, error, overrides, sweep)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=status)


def job_dir(sweep_dir: Path, overrides: list[str]) -> Path | None:
    """The numbered folder of ``sweep_dir`` whose recorded overrides are ``overrides``."""
    wanted = job_signature(overrides)
    for child in sorted(sweep_dir.iterdir()):
        recorded = recorded_overrides(child) if child.name.isdigit() else None
        if recorded is not None and job_signature(recorded) == wanted:
            return child
    return None


def death(job_id: str, info: dict[str, str], error: str) -> tuple[str, str]:
    """``(status, reason)`` of a SLURM job that ended without a result from its Hydra job."""
    state, exit_code = state_of(info), info.get("ExitCode", "?")
    # the preemption signal killed it: srun says so; exit code 12 or signal 12 (SIGUSR2)
    usr2 = "User defined signal 2" in error or exit_code in ("0:12", "12:0", "140:0")
    seen = f"SLURM job {job_id} ended {state} (exit {exit_code})"
    if "timed-out too many times" in error:
        return "timeout", (
            f"{seen}: out of time again after its last requeue (hydra.launcher."
            "max_num_timeout spent); re-run the same command to resume from the last "
            "checkpoint, or give it more time (hydra.launcher.timeout_min)"
        )
    if state in ("TIMEOUT", "DEADLINE") or usr2:
        return "timeout", (
            f"{seen}: its time-limit signal ended it before it could checkpoint or requeue; "
            "re-run the same command to resume, or give it more time "
            "(hydra.launcher.timeout_min, hydra.launcher.signal_delay_s)"
        )
    why = "cancelled" if state == "CANCELLED" else "its supervising process died"
    return "failed", f"{seen}: {why} without a result; re-run the same command to resume"


def post_mortem(
    job_id: str, info: dict[str, str], error: str, overrides: list[str], sweep_dir: Path
) -> str:
    """Record the outcome of a job that ended without a result; its status. A run that had
    recorded ``completed`` or ``diverged`` keeps it; otherwise ``run.json`` says what SLURM
    saw (:func:`death`), keeping the run's own last words after it."""
    status, reason = death(job_id, info, error)
    where = job_dir(sweep_dir, overrides)
    record = RunRecord.load(where / RUN_JSON) if where is not None else None
    if record is not None and record.status in ("completed", "diverged"):
        status, reason = str(record.status), record.data.get("reason")
    elif where is not None:
        said = record.data.get("reason") if record is not None else None
        if said and record is not None and record.status != "running":
            reason = f"{reason} (the run had recorded: {record.status}: {said})"
        try:
            with RunDirLock(where):
                RunLifecycle.died(where, record, status, reason)
        except RunDirBusyError as err:
            status, reason = "refused", str(err)
    label = where if where is not None else sweep_dir / f"<job {' '.join(overrides)}>"
    log.error("%s %s: %s", label, status, reason)
    record_job_outcome(sweep_dir, label, status, reason)
    return status


def pending_reasons(job_ids: Sequence[str]) -> dict[str, str]:
    """``squeue``'s reason of each pending task of the given (array) jobs (``sacct`` does not
    know why a job waits), keyed ``<array id>_<task>``."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    ids = sorted({str(j).split("_")[0] for j in job_ids})
    if not ids:
        return {}
    code, out = slurm("squeue", "-h", "-t", "PD", "-j", ",".join(ids), "-o", "%i|%r")
    if code != 0:
        return {}
    info = SlurmInfoWatcher().read_info("JobID|Reason\n" + out)
    return {jid: i.get("Reason", "") for jid, i in info.items()}


def release_requeued(job_ids: Sequence[str]) -> list[str]:
    """Let requeued jobs start now instead of after SLURM's hold (``BeginTime`` about 120 s
    ahead); the ids released. For impatient users and tests."""
    released = []
    for jid, reason in pending_reasons(job_ids).items():
        if (
            reason == "BeginTime"
            and slurm("scontrol", "update", f"JobId={jid}", "StartTime=now")[0] == 0
        ):
            released.append(jid)
    return released
