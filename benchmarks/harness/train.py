"""gradbench-train: train one VAE with one gradient estimator; a Hydra app.

    python -m benchmarks.train estimator=rloo model=bernoulli data=mnist_subset steps=5000
    python -m benchmarks.train experiment=quick --multirun hydra/launcher=joblib

The run reads top to bottom (:func:`run`): validate the config; skip a finished run; build the
estimator, data, model, optimizer and batch stream; resume from ``checkpoint.pt`` if there is
one; train, logging train / eval / throughput rows and checkpointing periodically; record the
outcome in ``run.json``. See ``conf/config.yaml`` and ``benchmarks/config.py`` for every key.

Loss: ``-mean_b surrogate_b + aux_loss`` (the mean over the batch; ``aux_loss`` trains the
estimator's own parameters). The harness never looks at the estimator's name: options come from
the config, and a temperature schedule applies to any estimator with a ``temperature`` buffer.

Outcomes: ``completed``; ``diverged`` (a non-finite loss or parameter, found at a sync point:
records the last finite step, exits 0 so a sweep goes on); ``failed`` (any exception: message
and traceback tail in ``run.json``, then re-raised, exit 1). An invalid config fails before any
training with one line naming the option (no traceback; exit 1), writes ``run.json`` (status
``failed``, unless the directory already holds a record) and never a metrics file; a directory
holding a run of another config, or a run further than ``steps``, is refused untouched.
SIGTERM / SIGINT / the scheduler's SIGUSR2 stop the run after the current step with a
checkpoint: ``failed`` (terminated; never exit 0) or ``timeout`` (preempted; submitit requeues
it). In a sweep each run trains in a supervised child process, so a hard crash is
recorded as ``failed`` and the sweep goes on (:mod:`.supervise`). Re-running the same
command in the same run directory resumes from the newest checkpoint that verifies
(``checkpoint.pt``, else ``checkpoint.prev.pt``); a completed or diverged run is skipped while
its files are intact (``run.json``'s status is written last, as a commit marker).
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import estimators
from benchmarks.data.datasets import (
    BatchStream,
    Dataset,
    eval_binarized,
)
from benchmarks.harness import checkpoint, supervise
from benchmarks.harness.allocator import retain_freed_memory
from benchmarks.harness.build import (
    build_estimator,
    build_model,
    check_estimator_fits_model,
    config_changes,
    estimator_label,
    load_data,
    make_optimizer,
    materialize_lazy,
    resolve_device,
    show_progress,
    temperature_schedule,
)
from benchmarks.harness.evaluate import eval_seed, evaluate
from benchmarks.harness.step import (
    backward_inputs,
    compiled_estimate_loss,
    estimate_loss,
    optimizer_step,
)
from benchmarks.harness.validate import ConfigError, validate
from benchmarks.probe.runner import (
    GradientEMA,
    ProbeRunner,
    basket_entry,
    eval_binarized_probe_batch,
)
from benchmarks.probe.runner import build_estimator as build_probe_estimator
from benchmarks.records.files import file_sha256, remove_stale_temp_files
from benchmarks.records.runs import (
    METRICS,
    RUN_JSON,
    MetricsLog,
    RunRecord,
    git_state,
    new_run_id,
    now_iso,
    versions,
)

log = logging.getLogger(__name__)

#: Folder of a run directory holding model snapshots along the trajectory.
SNAPSHOTS = "snapshots"
LOSS_NOTE = "mean over the batch of -surrogate, plus the estimator's aux_loss"
WALL_TIME_NOTE = "seconds of training since the start, excluding evaluation and checkpointing"


class Window:
    """Per-step loss and train ELBO since the last logging step, kept on the device.

    Writing a step costs one small device copy (no host sync); values are read only at sync
    points. ``start_*`` mark where the window began, for throughput.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.buf = torch.zeros(size, 2, device=device)  # [log_every, (loss, elbo)]
        self.n = 0
        self.start_step, self.start_f_evals, self.start_time = 0, 0, 0.0

    def add(self, loss: torch.Tensor, elbo: torch.Tensor) -> None:
        """Store this step's loss and batch-mean ELBO (0-d tensors)."""
        self.buf[self.n].copy_(torch.stack((loss.detach(), elbo.detach())))
        self.n += 1

    def values(self) -> list[list[float]]:
        """``[[loss, elbo], ...]`` of the steps in the window (a host sync)."""
        return self.buf[: self.n].tolist()

    def reset(self, step: int, f_evals: int, train_time: float) -> None:
        """Start a new window after ``step``."""
        self.n, self.start_step, self.start_f_evals, self.start_time = 0, step, f_evals, train_time

    def state_dict(self) -> dict[str, Any]:
        """The window for a checkpoint (so a resumed run logs the same window means)."""
        return {
            "values": self.buf[: self.n].cpu().clone(),
            "start_step": self.start_step,
            "start_f_evals": self.start_f_evals,
            "start_time": self.start_time,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.n = len(state["values"])
        self.buf[: self.n].copy_(state["values"])
        self.start_step, self.start_f_evals = state["start_step"], state["start_f_evals"]
        self.start_time = state["start_time"]


def params_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


def build_probe(
    cfg: DictConfig, data: Dataset, device: torch.device
) -> tuple[ProbeRunner | None, bool | None]:
    """The probe of ``cfg.probe`` (None when ``probe.every`` is 0), its basket built and
    checked before training, and whether to track ``train/grad_var_ema``.

    The probe batch is the first ``optim.batch_size`` training examples, binarized once.
    """
    pr = cfg.probe
    if pr.every == 0:
        return None, None
    basket = []
    family = cfg.model.family
    for i, raw in enumerate(OmegaConf.to_container(pr.basket, resolve=True)):
        try:
            entry = basket_entry(raw)
            if entry["name"] in estimators.available():  # defaults make labels comparable
                entry = {**estimators.options(entry["name"]), **entry}
            est = build_probe_estimator(entry, family, f"probe.basket[{i}]")
        except ValueError as err:
            raise ConfigError(f"probe.basket[{i}]: {err}") from err
        label = entry.get("label") or estimator_label(entry, None)
        basket.append((label, est.to(device)))
    batch = eval_binarized_probe_batch(cfg, data)
    runner = ProbeRunner(
        basket, batch.to(device), num_estimates=pr.num_estimates, groups=pr.groups,
        chunk=pr.chunk, reference=pr.reference, reference_samples=pr.reference_samples,
        reference_estimates=pr.reference_estimates, kl=cfg.model.kl,
    )  # fmt: skip
    return runner, (True if pr.ema_decay > 0 else None)


# ------------------------------------------------------------------------------ the run


def _holds_records(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's records (run.json aside): a checkpoint or metrics."""
    ckpt = run_dir / checkpoint.CHECKPOINT
    return any(p.exists() for p in (ckpt, checkpoint.previous_path(ckpt), run_dir / METRICS))


def steps_below(steps: int, done: int, where: Path) -> ConfigError:
    """The error of a ``steps`` below the step a run has already reached (a run cannot be
    shortened: its metrics and final evaluation would stop at the wrong step)."""
    return ConfigError(
        f"steps={steps} is invalid here: {where} is at step {done}; allowed: steps >= {done} "
        "(resume or extend that run), or a new hydra.run.dir / hydra.sweep.dir"
    )


def run(
    cfg: DictConfig, run_dir: Path | str, multirun: bool = False,
    on_claim: Callable[[], None] | None = None,
) -> str:  # fmt: skip
    """Train one VAE as ``cfg`` says, recording into ``run_dir``; return the final status.

    Returns ``completed``, ``diverged``, or the status of a finished run it skipped. Raises
    :class:`ConfigError` for an invalid config (before any training) and re-raises any other
    exception after recording it as ``failed``. ``on_claim()`` (the app writes ``.hydra/``)
    is called once the directory is this run's: at once in a new directory, else when the
    run it holds is resumed or extended; never when the run is refused or skipped.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / checkpoint.CHECKPOINT, run_dir / METRICS
    remove_stale_temp_files(run_dir)  # left by a run killed while writing
    previous = RunRecord.load(run_dir / RUN_JSON)
    config = OmegaConf.to_container(cfg, resolve=True)
    est_cfg = config["estimator"]
    claimed = False
    if on_claim is not None and previous is None and not _holds_records(run_dir):
        on_claim()  # a new directory: nobody else's records to keep
        claimed = True

    # 1. Validate before any work. Skip a finished run; refuse to mix two configs in one dir.
    try:
        validate(cfg)
        device = resolve_device(cfg.device)
        estimator = build_estimator(est_cfg)
        objective_metric = check_estimator_fits_model(estimator, cfg)
    except ConfigError as err:
        # Record the failure in a new run.json, or in a failed one; never over a live record.
        reason = f"invalid config: {err}"
        if previous is None:
            new = RunRecord(run_dir / RUN_JSON, {"status": "failed", "config": config})
            new.update(reason=reason, end_time=now_iso())
        elif previous.status == "failed":
            previous.update(reason=reason, end_time=now_iso())
        raise
    if (
        previous is not None
        and "config" in previous.data
        and (ckpt_path.exists() or previous.status != "failed")
    ):
        changed = config_changes(previous.data["config"], config)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different config (differs in: "
                f"{', '.join(changed)}); resume it with its own config or choose a new "
                "hydra.run.dir / hydra.sweep.dir"
            )
    last = int(previous.data.get("last_step") or 0) if previous is not None else 0
    if previous is not None and previous.status != "diverged" and last > cfg.steps:
        raise steps_below(cfg.steps, last, run_dir / RUN_JSON)
    recovered: list[str] = []  # what was wrong with the records found, for run.json
    if previous is not None and (
        previous.status == "diverged" or (previous.status == "completed" and last >= cfg.steps)
    ):
        # run.json's status is the commit marker; it counts only if the files are intact.
        problem = checkpoint.finished_problem(run_dir, previous.data)
        if problem is None:
            log.info("run in %s is already %s at step %d; skip", run_dir, previous.status, last)
            return str(previous.status)
        recovered.append(f"run.json said {previous.status} but {problem}; redone")
        log.warning("%s: %s", run_dir, recovered[-1])

    # 2. Build data, model, optimizer and batch stream (seeded).
    schedule = temperature_schedule(est_cfg)
    label = estimator_label(est_cfg, schedule)
    record = previous or RunRecord(run_dir / RUN_JSON, {})
    try:
        data = load_data(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        model = build_model(cfg, data).to(device)
        # Rebuilt after seeding: the estimator validated above initialized its networks (NVIL's
        # baseline, RELAX's control variate) from whatever the RNG state was then.
        estimator = build_estimator(est_cfg).to(device).train()
        materialize_lazy(
            estimator, model, data.train[: cfg.optim.batch_size].to(device), cfg.model.kl
        )
        params = [*model.parameters(), *estimator.parameters()]
        optimizer, fused = make_optimizer(params, cfg.optim)
        batch_size = cfg.optim.batch_size
        prober, grad_ema = build_probe(cfg, data, device)
        if grad_ema is not None:
            grad_ema = GradientEMA(list(model.encoder.parameters()), cfg.probe.ema_decay)
        try:
            stream = BatchStream(data.train, batch_size, cfg.data.binarization, cfg.seed, device)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        eval_sets = {
            s: eval_binarized(getattr(data, s), cfg.data.binarization).to(device)
            for s in cfg.eval.splits
        }
        iwae_k = cfg.eval.iwae_k or (1000 if data.full_size else 100)
    except Exception as err:
        if record.status != "completed":
            record.update(status="failed", reason=f"{type(err).__name__}: {err}",
                          config=config, end_time=now_iso())  # fmt: skip
        raise
    num_samples = est_cfg.get("num_samples")

    # 3. Records; resume from the checkpoint if there is one.
    identity = {
        "run_id": record.data.get("run_id") or new_run_id(),
        "estimator": est_cfg["name"],
        "estimator_label": label,
        "family": cfg.model.family,
        "dataset": cfg.data.name,
        "model": cfg.model.arch,
        "seed": cfg.seed,
    }
    metrics = MetricsLog(identity)
    window = Window(cfg.log_every, device)
    step, f_evals, train_time = 0, 0, 0.0
    resumed_from = list(record.data.get("resumed_from") or [])
    attempt = int(record.data.get("attempts") or 0) + 1
    try:  # the newest checkpoint that verifies (checkpoint.pt, else checkpoint.prev.pt)
        state, source, notes = checkpoint.load_latest(ckpt_path)
        recovered += notes
        if state is not None:
            changed = config_changes(state["config"], config) if "config" in state else []
            if changed:
                raise ConfigError(
                    f"{source} holds a run with a different config (differs in: "
                    f"{', '.join(changed)}); resume it with its own config or choose a new "
                    "hydra.run.dir / hydra.sweep.dir"
                )
            if state["step"] > cfg.steps:
                raise steps_below(cfg.steps, state["step"], source)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            estimator.load_state_dict(state["estimator"])
            stream.load_state_dict(state["stream"])
            window.load_state_dict(state["window"])
            if grad_ema is not None:
                grad_ema.load_state_dict(state["grad_ema"])
            checkpoint.set_rng_state(state["rng"], device)
            step, f_evals, train_time = state["step"], state["f_evals"], state["train_time"]
            if "metrics" in state:  # the rows up to the checkpoint, whatever the file holds
                metrics.load_state_dict(state["metrics"])
            else:
                metrics.load(metrics_path)
            metrics.truncate(step)
            if not record.data.get("run_id") and state.get("run_id"):  # run.json was lost
                identity["run_id"] = metrics.identity["run_id"] = state["run_id"]
            resumed_from.append(step)
            log.info("resuming %s from %s at step %d", run_dir, source.name, step)
        elif notes:
            log.warning("no checkpoint in %s verifies: restarting from step 0", run_dir)
        if state is not None or notes:
            metrics.write(metrics_path)  # the file now holds exactly the checkpoint's rows
    except ConfigError:
        raise
    except Exception as err:
        why = f"cannot resume: {type(err).__name__}: {err}"
        record.update_if_possible(status="failed", reason=why, config=config, end_time=now_iso())
        raise
    if on_claim is not None and not claimed:
        on_claim()  # the run found here is resumed or extended: now it is this command's
    record.update(
        **identity,
        status="running",
        reason=None,
        traceback=None,
        config=config,
        overrides=_overrides(),
        device=str(device),
        threads=torch.get_num_threads(),
        cpu_malloc=retain_freed_memory(),
        optim_fused=fused,
        iwae_k=iwae_k,
        loss=LOSS_NOTE,
        wall_time=WALL_TIME_NOTE,
        versions=versions(),
        **git_state(),
        start_time=record.data.get("start_time") or now_iso(),
        end_time=None,
        last_step=step,
        resumed_from=resumed_from,
        attempts=attempt,
        recovered=[*(record.data.get("recovered") or []), *recovered],
        run_dir=str(run_dir.resolve()),
    )

    def add_rows(
        at: int, rows: dict[tuple[str, str], float], probe_estimator: str = "", param: str = ""
    ) -> None:
        for (split, metric), value in rows.items():
            metrics.add(at, train_time, f_evals, split, metric, value, probe_estimator, param)

    def save_checkpoint() -> None:
        metrics.write(metrics_path)  # first the rows, then the state they belong to
        checkpoint.save(ckpt_path, {
            "step": step, "f_evals": f_evals, "train_time": train_time,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "estimator": estimator.state_dict(), "stream": stream.state_dict(),
            "window": window.state_dict(), "rng": checkpoint.rng_state(device),
            "grad_ema": grad_ema.state_dict() if grad_ema is not None else {},
            "metrics": metrics.state_dict(), "config": config, "run_id": identity["run_id"],
        }, keep_previous=True)  # fmt: skip
        record.update(last_step=step)

    def first_bad_step() -> int | None:
        """The first step of the window with a non-finite loss or ELBO; else the last step if
        the parameters are non-finite; else None (a host sync)."""
        values = window.values()
        bad = next((i for i, v in enumerate(values) if not all(map(math.isfinite, v))), None)
        if bad is None and not params_finite(params):
            bad = len(values) - 1
        return None if bad is None else window.start_step + bad + 1

    def diverge(first_bad: int) -> str:
        bar.close()
        metrics.write(metrics_path)
        record.update(
            status="diverged",
            reason=f"non-finite loss or parameters at step {first_bad}",
            last_step=first_bad - 1,
            end_time=now_iso(),
        )
        log.warning("diverged at step %d (last finite step %d)", first_bad, first_bad - 1)
        return "diverged"

    # 4. Train. Sync with the device only at logging, evaluation and checkpoint steps.
    # Config values are read into locals once: a DictConfig lookup costs ~10 us.
    steps, log_every, eval_every = cfg.steps, cfg.log_every, cfg.eval.every
    ckpt_every, kl = cfg.checkpoint_every, cfg.model.kl
    loss_fn = compiled_estimate_loss() if cfg.compile else estimate_loss
    inputs = backward_inputs(optimizer, estimator)
    probe_every, snapshot_every = cfg.probe.every, cfg.snapshot_every

    def save_snapshot() -> None:
        """The model at this step, for probing the trajectory later (gradbench-probe)."""
        path = run_dir / SNAPSHOTS / f"step_{step:09d}.pt"
        checkpoint.save(path, {"step": step, "f_evals": f_evals, "model": model.state_dict()})

    # Test hooks (faults.*): the *_at_step ones fire in the first attempt only.
    nan_at, fail_at = cfg.faults.nan_at_step, cfg.faults.fail_at_step
    if attempt > 1:
        nan_at = fail_at = None
    faults = supervise.DebugFaults.build(cfg.faults, step, attempt == 1)
    show = show_progress(cfg.progress, multirun)
    bar = tqdm(total=steps, initial=step, disable=not show)
    stop = supervise.StopSignals().install()  # SIGTERM/SIGINT/preemption: checkpoint, stop
    try:
        if step == 0 and snapshot_every:
            save_snapshot()
        if step == 0 and eval_every:
            add_rows(0, evaluate(model, eval_sets, cfg.eval, iwae_k, eval_seed(cfg.seed, 0)))
        if schedule is not None:  # the schedule is a function of the step: recompute it
            schedule.apply(estimator.temperature, step)
        tick = time.perf_counter()
        while step < steps:
            if schedule is not None and step % schedule.every == 0:
                schedule.apply(estimator.temperature, step)
            x = stream.next()  # [B, D]
            loss, out = loss_fn(model, estimator, x, kl, num_samples)
            if step + 1 == nan_at:
                loss = loss * float("nan")
            if step + 1 == fail_at:
                raise RuntimeError(f"faults.fail_at_step={step + 1}: injected failure")
            if faults is not None:
                faults.before_step(step + 1)
            optimizer_step(optimizer, loss, inputs)
            if grad_ema is not None:
                grad_ema.update()
            step += 1
            f_evals += out.f_evals
            window.add(loss, out.objective.mean())
            bar.update()

            log_now = step % log_every == 0 or step == steps
            eval_now = eval_every > 0 and (step % eval_every == 0 or step == steps)
            ckpt_now = step == steps or (ckpt_every > 0 and step % ckpt_every == 0)
            probe_now = probe_every > 0 and (step % probe_every == 0 or step == steps)
            snap_now = snapshot_every > 0 and (step % snapshot_every == 0 or step == steps)
            stop_now = stop.signum is not None
            if not (log_now or eval_now or ckpt_now or probe_now or snap_now or stop_now):
                continue

            # A sync point: check for divergence, then log, evaluate and checkpoint.
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - tick
            first_bad = first_bad_step()
            if first_bad is not None:
                return diverge(first_bad)
            if log_now:
                values = window.values()
                steps_done = step - window.start_step
                seconds = max(train_time - window.start_time, 1e-9)
                rows = {
                    ("train", "loss"): sum(v[0] for v in values) / len(values),
                    ("train", objective_metric): sum(v[1] for v in values) / len(values),
                    ("throughput", "steps_per_s"): steps_done / seconds,
                    ("throughput", "examples_per_s"): steps_done * batch_size / seconds,
                    ("throughput", "f_evals_per_s"): (f_evals - window.start_f_evals)
                    * batch_size
                    / seconds,
                }
                if schedule is not None:
                    rows[("train", "temperature")] = schedule(step - 1)
                if grad_ema is not None:
                    rows[("train", "grad_var_ema")] = grad_ema.value()
                add_rows(step, rows)
                window.reset(step, f_evals, train_time)
                objective = rows[("train", objective_metric)]
                bar.set_postfix({objective_metric: f"{objective:.2f}"}, refresh=False)
                log.info(
                    "step %d/%d | train/%s %.3f | train/loss %.3f | %.1f steps/s",
                    step, steps, objective_metric, objective, rows[("train", "loss")],
                    rows[("throughput", "steps_per_s")],
                )  # fmt: skip
            if eval_now:
                rows = evaluate(model, eval_sets, cfg.eval, iwae_k, eval_seed(cfg.seed, step))
                add_rows(step, rows)
                summary = " | ".join(f"{s}/{m} {v:.3f}" for (s, m), v in rows.items())
                log.info("step %d | %s", step, summary)
            if probe_now:
                started = time.perf_counter()
                own = (label, estimator)
                for r in prober(model, own, eval_seed(cfg.seed, step) + 1):
                    where = (str(r["probe_estimator"]), str(r["param"]))
                    add_rows(step, {("probe", str(r["metric"])): float(r["value"])}, *where)
                add_rows(step, {("probe", "seconds"): time.perf_counter() - started})
            if snap_now:
                save_snapshot()
            if ckpt_now or stop_now:
                save_checkpoint()
            if stop_now:
                break
            tick = time.perf_counter()
    except (Exception, KeyboardInterrupt) as err:
        # Non-finite parameters surface as exceptions too (e.g. sampling Bernoulli(NaN)).
        first_bad = first_bad_step()
        if first_bad is not None:
            return diverge(first_bad)
        tail = traceback.format_exc().strip().splitlines()[-20:]
        record.update_if_possible(  # (if the disk is full, the first error is the one raised)
            status="failed",
            reason=f"{type(err).__name__}: {err}",
            traceback="\n".join(tail),
            end_time=now_iso(),
        )
        raise
    finally:
        bar.close()
        stop.restore()
    if stop.signum is not None and step < steps:
        return stop.finish(record, step)  # status failed / timeout, then honour the signal
    record.update(status="completed", last_step=step, end_time=now_iso(),
                  metrics_sha256=file_sha256(metrics_path))  # fmt: skip
    log.info("completed %d steps in %.1f s of training; records in %s", step, train_time, run_dir)
    return "completed"


def _overrides() -> list[str]:
    """The Hydra task overrides of this job (empty outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
