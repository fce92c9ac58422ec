"""The state of one training run: what it trains (:class:`Parts`), where it stands
(:class:`Progress`, with its logging :class:`Window`), and the :class:`Checkpointer` that saves
both and restores them, bit for bit, when the run resumes.

Crash consistency: a checkpoint writes the metric rows first, then the checkpoint they belong
to, then ``run.json``'s ``last_step`` (through :class:`~.lifecycle.RunLifecycle`), each file
atomically; a kill between any two writes leaves files that resume to the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.data.datasets import BatchStream
from benchmarks.harness import checkpoint
from benchmarks.harness.build import config_changes
from benchmarks.harness.lifecycle import RunLifecycle, foreign_run, steps_below
from benchmarks.harness.qualitative import Qualitative
from benchmarks.harness.schedules import TemperatureSchedule
from benchmarks.harness.timing import Timings
from benchmarks.harness.vae import VAE
from benchmarks.probe.runner import GradientEMA, ProbeRunner
from benchmarks.records.runs import METRICS, MetricsLog


@dataclass
class Parts:
    """What one run trains, built from its config (seeded) before any resume."""

    device: torch.device
    model: VAE
    estimator: torch.nn.Module
    #: Every trained parameter: the model's, then the estimator's own (baselines, control
    #: variates).
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    #: Whether the optimizer runs its fused implementation (recorded in ``run.json``).
    fused: bool
    stream: BatchStream
    #: The in-run probe (None when ``probe.every`` is 0) and the training-gradient variance
    #: EMA (None when ``probe.ema_decay`` is 0).
    prober: ProbeRunner | None
    grad_ema: GradientEMA | None
    #: The binarized evaluation splits, on the device.
    eval_sets: dict[str, torch.Tensor]
    iwae_k: int
    #: The estimator's temperature schedule (None without one) and the label it gives.
    schedule: TemperatureSchedule | None
    label: str
    #: The train metric of the estimator's objective (``elbo`` or ``iwae``).
    objective_metric: str
    #: The estimator's ``num_samples`` option (None where it has none).
    num_samples: int | None
    #: The qualitative records written at each evaluation (None unless ``eval.qualitative``).
    qualitative: Qualitative | None = None


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


@dataclass
class Progress:
    """Where training stands: steps taken, objective evaluations ``f_evals`` (summed over the
    batch's samples, per example), seconds of training (``train_time``: evaluation and
    checkpointing excluded), the metric rows so far, the current logging window, and the
    seconds spent in every other phase (``timing``)."""

    metrics: MetricsLog
    window: Window
    step: int = 0
    f_evals: int = 0
    train_time: float = 0.0
    timing: Timings = field(default_factory=Timings)

    def add(
        self, rows: dict[tuple[str, str], float], probe_estimator: str = "", param: str = ""
    ) -> None:
        """Append ``{(split, metric): value}`` as metric rows of the current step."""
        for (split, metric), value in rows.items():
            self.metrics.add(
                self.step, self.train_time, self.f_evals, split, metric, value,
                probe_estimator, param,
            )  # fmt: skip

    def first_bad_step(self, params: list[torch.nn.Parameter]) -> int | None:
        """The first step of the window with a non-finite loss or ELBO; else the window's last
        step if a parameter is non-finite; else None (a host sync)."""
        values = self.window.values()
        bad = next((i for i, v in enumerate(values) if not all(map(math.isfinite, v))), None)
        if bad is None and not params_finite(params):
            bad = len(values) - 1
        return None if bad is None else self.window.start_step + bad + 1


def params_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


class Checkpointer:
    """Saves a run's checkpoint (``checkpoint.pt``, the previous one kept) and its trajectory
    snapshots, and restores a checkpoint into the run's parts and progress.

    Args:
      parts: what the run trains.
      life: the run's lifecycle: its directory, its resolved config (saved with the checkpoint:
        a resume under another config is refused), and ``run.json``'s ``last_step``, which
        follows each checkpoint.
      snapshots: the folder of the model snapshots along the trajectory.
    """

    def __init__(self, parts: Parts, life: RunLifecycle, snapshots: Path) -> None:
        self.path = life.run_dir / checkpoint.CHECKPOINT
        self.metrics_path = life.run_dir / METRICS
        self.parts, self.life, self.snapshots = parts, life, snapshots

    def write_metrics(self, p: Progress) -> None:
        """Rewrite ``metrics.parquet`` with every row so far."""
        p.metrics.write(self.metrics_path)

    def save(self, p: Progress) -> None:
        """Checkpoint the run at ``p.step``: the rows, then the state they belong to, then
        ``run.json``'s ``last_step`` (each write atomic; this order keeps them consistent)."""
        parts = self.parts
        self.write_metrics(p)
        checkpoint.save(self.path, {
            "step": p.step, "f_evals": p.f_evals, "train_time": p.train_time,
            "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "estimator": parts.estimator.state_dict(), "stream": parts.stream.state_dict(),
            "window": p.window.state_dict(), "rng": checkpoint.rng_state(parts.device),
            "grad_ema": parts.grad_ema.state_dict() if parts.grad_ema is not None else {},
            "metrics": p.metrics.state_dict(), "config": self.life.config,
            "run_id": p.metrics.identity["run_id"], "timing": p.timing.state_dict(),
        }, keep_previous=True)  # fmt: skip
        self.life.checkpointed(p.step, p.timing.record(p.train_time))

    def snapshot(self, p: Progress) -> None:
        """The model at ``p.step``, for probing the trajectory later (gradbench-probe)."""
        path = self.snapshots / f"step_{p.step:09d}.pt"
        state = {"step": p.step, "f_evals": p.f_evals, "model": self.parts.model.state_dict()}
        checkpoint.save(path, state)

    def restore(self, state: dict[str, Any], source: Path, p: Progress, steps: int) -> None:
        """Load the checkpoint ``state`` (read from ``source``) into the parts and ``p``: the
        run continues bit for bit where it stood, RNG streams included. Refuses
        (:class:`ConfigError`) a checkpoint of another config or beyond ``steps``."""
        changed = config_changes(state["config"], self.life.config) if "config" in state else []
        if changed:
            raise foreign_run(source, changed)
        if state["step"] > steps:
            raise steps_below(steps, state["step"], source)
        parts = self.parts
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.estimator.load_state_dict(state["estimator"])
        parts.stream.load_state_dict(state["stream"])
        p.window.load_state_dict(state["window"])
        if parts.grad_ema is not None:
            parts.grad_ema.load_state_dict(state["grad_ema"])
        checkpoint.set_rng_state(state["rng"], parts.device)
        p.step, p.f_evals, p.train_time = state["step"], state["f_evals"], state["train_time"]
        p.timing.load_state_dict(state.get("timing", {}))
        if "metrics" in state:  # the rows up to the checkpoint, whatever the file holds
            p.metrics.load_state_dict(state["metrics"])
        else:
            p.metrics.load(self.metrics_path)
        p.metrics.truncate(p.step)
