"""gradbench-train: train one VAE with one gradient estimator; a Hydra app.

    python -m benchmarks.train estimator=rloo model=bernoulli data=mnist_subset steps=5000
    python -m benchmarks.train experiment=quick --multirun hydra/launcher=joblib

The run reads top to bottom (:func:`run`): validate the config; skip a finished run; build the
estimator, data, model, optimizer and batch stream; resume from ``checkpoint.pt`` if there is
one; train (:func:`train`: for each step estimate, optimize, then at sync points log, evaluate,
probe and checkpoint); record the outcome. Every ``run.json`` status is written by
:class:`~.lifecycle.RunLifecycle`; the run's state and its checkpoints are in :mod:`.state`.
See ``conf/config.yaml`` and ``benchmarks/harness/config.py`` for every key.

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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import estimators
from benchmarks.data.datasets import BatchStream, Dataset, eval_binarized
from benchmarks.harness import checkpoint, supervise
from benchmarks.harness.allocator import retain_freed_memory
from benchmarks.harness.build import (
    build_estimator,
    build_model,
    check_estimator_fits_model,
    estimator_label,
    load_data,
    make_optimizer,
    materialize_lazy,
    resolve_device,
    show_progress,
    temperature_schedule,
)
from benchmarks.harness.evaluate import eval_seed, evaluate
from benchmarks.harness.lifecycle import RunLifecycle
from benchmarks.harness.qualitative import Qualitative
from benchmarks.harness.schedules import TemperatureSchedule
from benchmarks.harness.state import Checkpointer, Parts, Progress, Window
from benchmarks.harness.step import (
    backward_inputs,
    compiled_estimate_loss,
    estimate_loss,
    optimizer_step,
)
from benchmarks.harness.timing import job_start
from benchmarks.harness.validate import ConfigError, validate
from benchmarks.probe.runner import (
    GradientEMA,
    ProbeRunner,
    basket_entry,
    eval_binarized_probe_batch,
)
from benchmarks.probe.runner import build_estimator as build_probe_estimator
from benchmarks.records.files import remove_stale_temp_files
from benchmarks.records.runs import (
    RUN_JSON,
    MetricsLog,
    RunRecord,
    git_state,
    new_run_id,
    versions,
)

log = logging.getLogger(__name__)

#: Folder of a run directory holding model snapshots along the trajectory.
SNAPSHOTS = "snapshots"
LOSS_NOTE = "mean over the batch of -surrogate, plus the estimator's aux_loss"
WALL_TIME_NOTE = "seconds of training since the start, excluding evaluation and checkpointing"


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
    remove_stale_temp_files(run_dir)  # left by a run killed while writing
    previous = RunRecord.load(run_dir / RUN_JSON)
    life = RunLifecycle(run_dir, previous, OmegaConf.to_container(cfg, resolve=True), on_claim)
    life.claim_if_new()
    est_cfg = life.config["estimator"]

    # 1. Validate before any work. Skip a finished run; refuse to mix two configs in one dir.
    try:
        device, objective_metric = check_config(cfg, est_cfg)
    except ConfigError as err:
        life.invalid_config(err)
        raise
    finished = life.check_previous(cfg.steps)
    if finished is not None:
        return finished

    # 2. Build data, model, optimizer, probe and batch stream (seeded).
    schedule = temperature_schedule(est_cfg)
    label = estimator_label(est_cfg, schedule)
    if cfg.model.family == "deterministic" and not est_cfg.get("label"):
        label = "autoencoder"  # not "reparam": it samples nothing (see harness.vae)
    try:
        parts = build(cfg, est_cfg, device, schedule, label, objective_metric)
    except Exception as err:
        life.build_failed(err)
        raise

    # 3. Records; resume from the newest checkpoint that verifies, if there is one.
    identity = run_identity(cfg, est_cfg, label, life.recorded_run_id)
    progress = Progress(MetricsLog(identity), Window(cfg.log_every, device))
    saver = Checkpointer(parts, life, run_dir / SNAPSHOTS)
    try:
        resumed_from = resume(saver, progress, life, cfg.steps, identity)
    except ConfigError:
        raise
    except Exception as err:
        life.cannot_resume(err)
        raise
    life.claim()  # the run found here (if any) is resumed or extended: now it is this command's
    life.running(identity, provenance(parts), progress.step, resumed_from)

    # 4. Train, and record the outcome.
    return train(cfg, parts, progress, saver, life, multirun)


# ------------------------------------------------------------------------------ 1. validate


def check_config(cfg: DictConfig, est_cfg: dict[str, Any]) -> tuple[torch.device, str]:
    """Validate ``cfg`` (a :class:`ConfigError` names the option); return the device and the
    train metric of the estimator's objective (``elbo`` or ``iwae``)."""
    validate(cfg)
    device = resolve_device(cfg.device)
    estimator = build_estimator(est_cfg)
    return device, check_estimator_fits_model(estimator, cfg)


# ------------------------------------------------------------------------------ 2. build


def build(
    cfg: DictConfig, est_cfg: dict[str, Any], device: torch.device,
    schedule: TemperatureSchedule | None, label: str, objective_metric: str,
) -> Parts:  # fmt: skip
    """Load the data, seed every RNG with ``cfg.seed``, then build the model, the estimator,
    the optimizer, the probe and the batch stream, in this order (the RNG draws of a run)."""
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
    materialize_lazy(estimator, model, data.train[: cfg.optim.batch_size].to(device), cfg.model.kl)
    params = [*model.parameters(), *estimator.parameters()]
    optimizer, fused = make_optimizer(params, cfg.optim)
    prober = build_probe(cfg, data, device)
    grad_ema = None
    if prober is not None and cfg.probe.ema_decay > 0:
        grad_ema = GradientEMA(list(model.encoder.parameters()), cfg.probe.ema_decay)
    try:
        stream = BatchStream(
            data.train, cfg.optim.batch_size, cfg.data.binarization, cfg.seed, device
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    eval_sets = {
        s: eval_binarized(getattr(data, s), cfg.data.binarization).to(device)
        for s in cfg.eval.splits
    }
    return Parts(
        device=device, model=model, estimator=estimator, params=params, optimizer=optimizer,
        fused=fused, stream=stream, prober=prober, grad_ema=grad_ema, eval_sets=eval_sets,
        iwae_k=cfg.eval.iwae_k or (1000 if data.full_size else 100), schedule=schedule,
        label=label, objective_metric=objective_metric, num_samples=est_cfg.get("num_samples"),
        qualitative=build_qualitative(cfg, data, device),
    )  # fmt: skip


def build_qualitative(cfg: DictConfig, data: Dataset, device: torch.device) -> Qualitative | None:
    """The qualitative records of ``eval.qualitative`` (fixed test digits, binarized as
    evaluated), or None when off."""
    if not cfg.eval.qualitative:
        return None
    test = eval_binarized(data.test, cfg.data.binarization).to(device)
    labels = data.labels["test"] if data.labels is not None else None
    return Qualitative(test, labels, data.image_shape)


def build_probe(cfg: DictConfig, data: Dataset, device: torch.device) -> ProbeRunner | None:
    """The probe of ``cfg.probe`` (None when ``probe.every`` is 0), its basket built and
    checked before training.

    The probe batch is the first ``optim.batch_size`` training examples, binarized once.
    """
    pr = cfg.probe
    if pr.every == 0:
        return None
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
    return ProbeRunner(
        basket, batch.to(device), num_estimates=pr.num_estimates, groups=pr.groups,
        chunk=pr.chunk, reference=pr.reference, reference_samples=pr.reference_samples,
        reference_estimates=pr.reference_estimates, kl=cfg.model.kl, decoder=pr.decoder,
    )  # fmt: skip


# ------------------------------------------------------------------------------ 3. resume


def run_identity(
    cfg: DictConfig, est_cfg: dict[str, Any], label: str, run_id: str | None
) -> dict[str, Any]:
    """What the run is, on every metric row and in ``run.json`` (a new run gets a new id)."""
    return {
        "run_id": run_id or new_run_id(),
        "estimator": est_cfg["name"],
        "estimator_label": label,
        "family": cfg.model.family,
        "dataset": cfg.data.name,
        "model": cfg.model.arch,
        "seed": cfg.seed,
    }


def resume(
    saver: Checkpointer, progress: Progress, life: RunLifecycle, steps: int,
    identity: dict[str, Any],
) -> list[int]:  # fmt: skip
    """Restore the newest checkpoint that verifies (``checkpoint.pt``, else
    ``checkpoint.prev.pt``) into the run, if any; return the steps of every resume so far.

    Then ``metrics.parquet`` holds exactly the checkpoint's rows. A corrupt checkpoint is set
    aside and noted in ``run.json``'s ``recovered``.
    """
    resumed_from = list(life.record.data.get("resumed_from") or [])
    state, source, notes = checkpoint.load_latest(saver.path)
    life.recovered += notes
    if state is not None:
        assert source is not None
        saver.restore(state, source, progress, steps)
        if not life.recorded_run_id and state.get("run_id"):  # run.json was lost
            identity["run_id"] = progress.metrics.identity["run_id"] = state["run_id"]
        resumed_from.append(progress.step)
        log.info("resuming %s from %s at step %d", life.run_dir, source.name, progress.step)
    elif notes:
        log.warning("no checkpoint in %s verifies: restarting from step 0", life.run_dir)
    if state is not None or notes:
        saver.write_metrics(progress)  # the file now holds exactly the checkpoint's rows
    return resumed_from


def provenance(parts: Parts) -> dict[str, Any]:
    """Where and how the run trains, for ``run.json``: Hydra overrides, device, threads,
    allocator setting, fused optimizer, IWAE samples, what loss and wall time mean, package
    versions and the git commit."""
    return {
        "overrides": _overrides(),
        "device": str(parts.device),
        "threads": torch.get_num_threads(),
        "cpu_malloc": retain_freed_memory(),
        "optim_fused": parts.fused,
        "iwae_k": parts.iwae_k,
        "loss": LOSS_NOTE,
        "wall_time": WALL_TIME_NOTE,
        "versions": versions(),
        **git_state(),
    }


def _overrides() -> list[str]:
    """The Hydra task overrides of this job (empty outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ------------------------------------------------------------------------------ 4. train


def train(
    cfg: DictConfig, parts: Parts, progress: Progress, saver: Checkpointer, life: RunLifecycle,
    multirun: bool,
) -> str:  # fmt: skip
    """Train from ``progress.step`` to ``cfg.steps`` and record the outcome: ``completed``,
    ``diverged``, ``failed`` (re-raised), or stopped by a signal after a checkpoint (then the
    signal is handed on). Returns the status."""
    hooks = FaultHooks.build(cfg.faults, progress.step, life.attempt)
    show = show_progress(cfg.progress, multirun)
    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not show)
    stop = supervise.StopSignals().install()  # SIGTERM/SIGINT/preemption: checkpoint, stop
    try:  # outcomes other than a stop are recorded while the stop handlers are installed
        first_bad = train_steps(cfg, parts, progress, saver, hooks, bar, stop)
        if first_bad is not None:
            return diverge(first_bad, bar, progress, saver, life)
    except (Exception, KeyboardInterrupt) as err:
        # Non-finite parameters surface as exceptions too (e.g. sampling Bernoulli(NaN)).
        first_bad = progress.first_bad_step(parts.params)
        if first_bad is not None:
            return diverge(first_bad, bar, progress, saver, life)
        life.failed(err)
        raise
    finally:
        bar.close()
        stop.restore()
    if stop.signum is not None and progress.step < cfg.steps:
        status = life.stopped(*stop.outcome(progress.step), progress.step)
        stop.honour()  # submitit requeues; a default disposition ends the process
        return status
    status = life.completed(progress.step, progress.timing.record(progress.train_time))
    log.info(
        "completed %d steps in %.1f s of training; records in %s; seconds per phase: %s",
        progress.step, progress.train_time, life.run_dir,
        progress.timing.record(progress.train_time),
    )  # fmt: skip
    return status


def diverge(
    first_bad: int, bar: tqdm, progress: Progress, saver: Checkpointer, life: RunLifecycle
) -> str:
    """End a run that diverged at ``first_bad``: the rows so far, then ``run.json``."""
    bar.close()
    saver.write_metrics(progress)
    return life.diverged(first_bad)


def train_steps(
    cfg: DictConfig, parts: Parts, p: Progress, saver: Checkpointer,
    hooks: FaultHooks | None, bar: tqdm, stop: supervise.StopSignals,
) -> int | None:  # fmt: skip
    """The training loop: for each step estimate, optimize; then, at a sync point, log,
    evaluate, probe, snapshot and checkpoint (:func:`sync_point`). Returns the first
    non-finite step (found at a sync point), or None when done or stopped by a signal.

    The loop syncs with the device only at sync points, and reads no config value per step
    (DictConfig lookups are slow): values are read into locals once.
    """
    model, estimator, optimizer = parts.model, parts.estimator, parts.optimizer
    stream, schedule, grad_ema = parts.stream, parts.schedule, parts.grad_ema
    steps, kl, num_samples = cfg.steps, cfg.model.kl, parts.num_samples
    loss_fn = compiled_estimate_loss() if cfg.compile else estimate_loss
    inputs = backward_inputs(optimizer, estimator)
    cadence = Cadence.of(cfg)
    before = p.timing.eval + p.timing.checkpoint
    if p.step == 0 and cadence.snapshot:
        with p.timing.phase("checkpoint"):
            saver.snapshot(p)
    if p.step == 0 and cadence.eval:
        with p.timing.phase("eval"):
            p.add(evaluate(model, parts.eval_sets, cfg.eval, parts.iwae_k, eval_seed(cfg.seed, 0)))
            if parts.qualitative is not None:
                seed = eval_seed(cfg.seed, 0) + 2
                p.add(parts.qualitative.record(model, 0, seed, saver.life.run_dir))
    if schedule is not None:  # the schedule is a function of the step: recompute it
        schedule.apply(estimator.temperature, p.step)
    p.timing.started_training(job_start(), p.timing.eval + p.timing.checkpoint - before)
    tick = time.perf_counter()
    while p.step < steps:
        if schedule is not None and p.step % schedule.every == 0:
            schedule.apply(estimator.temperature, p.step)
        x = stream.next()  # [B, D]
        loss, out = loss_fn(model, estimator, x, kl, num_samples)
        if hooks is not None:
            loss = hooks.before_step(p.step + 1, loss)
        optimizer_step(optimizer, loss, inputs)
        if grad_ema is not None:
            grad_ema.update()
        p.step += 1
        p.f_evals += out.f_evals
        p.window.add(loss, out.objective.mean())
        bar.update()

        due = cadence.due(p.step, stop.signum is not None)
        if due is None:
            continue
        # A sync point: check for divergence, then log, evaluate, probe and checkpoint.
        if parts.device.type == "cuda":
            torch.cuda.synchronize(parts.device)
        p.train_time += time.perf_counter() - tick
        first_bad = p.first_bad_step(parts.params)
        if first_bad is not None:
            return first_bad
        sync_point(cfg, parts, p, saver, due, bar)
        if due.stop:
            return None
        tick = time.perf_counter()
    return None


class Due(NamedTuple):
    """What a sync point does after a step (a signal to stop also checkpoints)."""

    log: bool
    eval: bool
    iwae: bool  # the evaluation includes the IWAE bound
    probe: bool
    snapshot: bool
    checkpoint: bool
    stop: bool


@dataclass(frozen=True)
class Cadence:
    """Every how many steps each sync-point action happens (0: never; the last step always
    logs, checkpoints and, where enabled, evaluates, probes and snapshots)."""

    steps: int
    log: int
    eval: int
    iwae: int
    probe: int
    snapshot: int
    checkpoint: int

    @classmethod
    def of(cls, cfg: DictConfig) -> Cadence:
        """The cadence of ``cfg`` (read once: DictConfig lookups are slow)."""
        return cls(
            steps=cfg.steps, log=cfg.log_every, eval=cfg.eval.every,
            iwae=cfg.eval.iwae_every or cfg.eval.every, probe=cfg.probe.every,
            snapshot=cfg.snapshot_every, checkpoint=cfg.checkpoint_every,
        )  # fmt: skip

    def due(self, step: int, stop: bool) -> Due | None:
        """What happens after ``step`` (``stop``: a stop signal arrived); None when nothing
        does (no sync with the device)."""
        last = step == self.steps
        evaluate = self.eval > 0 and (step % self.eval == 0 or last)
        due = Due(
            log=step % self.log == 0 or last,
            eval=evaluate,
            iwae=evaluate and (step % self.iwae == 0 or last),
            probe=self.probe > 0 and (step % self.probe == 0 or last),
            snapshot=self.snapshot > 0 and (step % self.snapshot == 0 or last),
            checkpoint=last or (self.checkpoint > 0 and step % self.checkpoint == 0),
            stop=stop,
        )
        return due if any(due) else None


def sync_point(
    cfg: DictConfig, parts: Parts, p: Progress, saver: Checkpointer, due: Due, bar: tqdm
) -> None:
    """Log, evaluate, probe, snapshot and checkpoint as ``due`` says, at ``p.step``."""
    if due.log:
        rows = train_rows(parts, p, cfg.optim.batch_size)
        p.add(rows)
        p.window.reset(p.step, p.f_evals, p.train_time)
        objective = rows[("train", parts.objective_metric)]
        bar.set_postfix({parts.objective_metric: f"{objective:.2f}"}, refresh=False)
        log.info(
            "step %d/%d | train/%s %.3f | train/loss %.3f | %.1f steps/s",
            p.step, cfg.steps, parts.objective_metric, objective, rows[("train", "loss")],
            rows[("throughput", "steps_per_s")],
        )  # fmt: skip
    if due.eval:
        seed = eval_seed(cfg.seed, 0)  # the same evaluation noise at every step
        with p.timing.phase("eval"):
            rows = evaluate(
                parts.model, parts.eval_sets, cfg.eval, parts.iwae_k, seed, iwae=due.iwae
            )
        p.add(rows)
        summary = " | ".join(f"{s}/{m} {v:.3f}" for (s, m), v in rows.items())
        log.info("step %d | %s", p.step, summary)
        if parts.qualitative is not None:  # after the evaluation, with its own fixed seed
            with p.timing.phase("eval"):
                record = parts.qualitative.record(
                    parts.model, p.step, seed + 2, saver.life.run_dir
                )
            p.add(record)
    if due.probe:
        with p.timing.phase("probe"):
            probe(parts, p, eval_seed(cfg.seed, p.step) + 1)
    if due.snapshot:
        with p.timing.phase("checkpoint"):
            saver.snapshot(p)
    if due.checkpoint or due.stop:
        if due.checkpoint:  # not at a stop: a resumed run has the rows of an uninterrupted one
            p.add(p.timing.rows(p.train_time))  # this checkpoint's own write is in the next
        with p.timing.phase("checkpoint"):
            saver.save(p)


def train_rows(parts: Parts, p: Progress, batch_size: int) -> dict[tuple[str, str], float]:
    """The rows of the logging window that ends at ``p.step``: mean train loss and objective
    over its steps; steps, examples and objective evaluations per second of training; the
    temperature of the last step (with a schedule) and the gradient variance EMA (if on)."""
    w = p.window
    values = w.values()
    steps_done = p.step - w.start_step
    seconds = max(p.train_time - w.start_time, 1e-9)
    rows = {
        ("train", "loss"): sum(v[0] for v in values) / len(values),
        ("train", parts.objective_metric): sum(v[1] for v in values) / len(values),
        ("throughput", "steps_per_s"): steps_done / seconds,
        ("throughput", "examples_per_s"): steps_done * batch_size / seconds,
        ("throughput", "f_evals_per_s"): (p.f_evals - w.start_f_evals) * batch_size / seconds,
    }
    if parts.schedule is not None:
        rows[("train", "temperature")] = parts.schedule(p.step - 1)
    if parts.grad_ema is not None:
        rows[("train", "grad_var_ema")] = parts.grad_ema.value()
    return rows


def probe(parts: Parts, p: Progress, seed: int) -> None:
    """Probe the run's estimator and the basket at the current parameters (rows per probed
    estimator and parameter tensor), and how many seconds the probe took."""
    assert parts.prober is not None
    started = time.perf_counter()
    for r in parts.prober(parts.model, (parts.label, parts.estimator), seed):
        where = (str(r["probe_estimator"]), str(r["param"]))
        p.add({("probe", str(r["metric"])): float(r["value"])}, *where)
    p.add({("probe", "seconds"): time.perf_counter() - started})


@dataclass
class FaultHooks:
    """The ``faults.*`` test hooks armed in this attempt: a NaN loss (``nan_at_step``) and an
    exception (``fail_at_step``) in the first attempt only, and the hard faults of
    :class:`supervise.DebugFaults`."""

    nan_at: int | None
    fail_at: int | None
    hard: supervise.DebugFaults | None

    @classmethod
    def build(cls, faults: Any, start_step: int, attempt: int) -> FaultHooks | None:
        """The hooks armed for an attempt starting at ``start_step``; None when none is (the
        loop then checks nothing)."""
        nan_at, fail_at = faults.nan_at_step, faults.fail_at_step
        if attempt > 1:
            nan_at = fail_at = None
        hooks = cls(nan_at, fail_at, supervise.DebugFaults.build(faults, start_step, attempt == 1))
        armed = hooks.nan_at is not None or hooks.fail_at is not None or hooks.hard is not None
        return hooks if armed else None

    def before_step(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Fire the hooks set for ``step`` (the step about to be taken, 1-based) on its loss."""
        if step == self.nan_at:
            loss = loss * float("nan")
        if step == self.fail_at:
            raise RuntimeError(f"faults.fail_at_step={step}: injected failure")
        if self.hard is not None:
            self.hard.before_step(step)
        return loss
