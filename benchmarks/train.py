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
recorded as ``failed`` and the sweep goes on (:mod:`benchmarks.supervise`). Re-running the same
command in the same run directory resumes from the newest checkpoint that verifies
(``checkpoint.pt``, else ``checkpoint.prev.pt``); a completed or diverged run is skipped while
its files are intact (``run.json``'s status is written last, as a commit marker).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parameter import is_lazy
from tqdm import tqdm

import estimators
from benchmarks import checkpoint, supervise
from benchmarks.allocator import retain_freed_memory
from benchmarks.config import HARNESS_ESTIMATOR_KEYS, SCHEDULE_KEYS
from benchmarks.data import (
    BINARIZATIONS,
    DATASETS,
    BatchStream,
    Dataset,
    eval_binarized,
    load_dataset,
)
from benchmarks.probe import GradientEMA, ProbeRunner, basket_entry, eval_binarized_probe_batch
from benchmarks.probe import build_estimator as build_probe_estimator
from benchmarks.records import (
    METRICS,
    RUN_JSON,
    MetricsLog,
    RunRecord,
    atomic_write_bytes,
    file_sha256,
    git_state,
    new_run_id,
    now_iso,
    remove_stale_temp_files,
    versions,
)
from benchmarks.schedules import TemperatureSchedule
from benchmarks.vae import ACTIVATIONS, ARCHS, FAMILIES, KL_MODES, VAE
from estimators.exact import MAX_CONFIGS

log = logging.getLogger(__name__)

#: Folder of a run directory holding model snapshots along the trajectory.
SNAPSHOTS = "snapshots"

#: The config directory (absolute: console scripts have no calling file to resolve it from).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
#: Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES: tuple[str, ...] = ("steps", "progress", "threads", "debug", "supervise")
EVAL_SPLITS: tuple[str, ...] = ("train", "val", "test")
LOSS_NOTE = "mean over the batch of -surrogate, plus the estimator's aux_loss"
WALL_TIME_NOTE = "seconds of training since the start, excluding evaluation and checkpointing"


class ConfigError(supervise.UsageError, ValueError):
    """An invalid config value; the message names the option and the allowed values."""


# ------------------------------------------------------------------------------ validation


def _require(ok: bool, option: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{option}={value!r} is invalid; allowed: {allowed}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: DictConfig) -> None:
    """Check every value of ``cfg`` that composition cannot; raise :class:`ConfigError`."""
    e, m, d, o, ev = cfg.estimator, cfg.model, cfg.data, cfg.optim, cfg.eval
    names = estimators.available()
    _require(e.name in names, "estimator", e.name, ", ".join(names))
    _require(m.family in FAMILIES, "model.family", m.family, ", ".join(FAMILIES))
    supported = estimators.families(e.name)
    if m.family not in supported:
        raise ConfigError(
            f"estimator={e.name} does not support model.family={m.family}; allowed families "
            f"for {e.name}: {', '.join(sorted(supported))}; estimators supporting {m.family}: "
            f"{', '.join(estimators.supporting(m.family))}"
        )
    _require(m.arch in ARCHS, "model.arch", m.arch, ", ".join(ARCHS))
    _require(m.activation in ACTIVATIONS, "model.activation", m.activation, ", ".join(ACTIVATIONS))
    _require(m.kl in KL_MODES, "model.kl", m.kl, ", ".join(KL_MODES))
    _require(m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "an integer >= 1")
    _require(m.hidden_dim >= 1, "model.hidden_dim", m.hidden_dim, "an integer >= 1")
    if m.family == "categorical":
        _require(m.n_categories >= 2, "model.n_categories", m.n_categories, "an integer >= 2")
    _require(d.name in DATASETS, "data", d.name, ", ".join(DATASETS))
    _require(
        d.binarization in BINARIZATIONS, "data.binarization", d.binarization,
        ", ".join(BINARIZATIONS),
    )  # fmt: skip
    _require(o.name == "adam", "optim.name", o.name, "adam")
    _require(_is_number(o.lr) and o.lr > 0, "optim.lr", o.lr, "a finite number > 0")
    _require(o.batch_size >= 1, "optim.batch_size", o.batch_size, "an integer >= 1")
    betas_ok = len(o.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in o.betas)
    _require(betas_ok, "optim.betas", list(o.betas), "two numbers in [0, 1)")
    _require(_is_number(o.eps) and o.eps > 0, "optim.eps", o.eps, "a finite number > 0")
    _require(cfg.steps >= 1, "steps", cfg.steps, "an integer >= 1")
    _require(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _require(cfg.log_every >= 1, "log_every", cfg.log_every, "an integer >= 1")
    ok = cfg.checkpoint_every >= 0
    _require(ok, "checkpoint_every", cfg.checkpoint_every, "an integer >= 0 (0: at the end)")
    ok = cfg.snapshot_every >= 0
    _require(ok, "snapshot_every", cfg.snapshot_every, "an integer >= 0 (0: none)")
    ok = cfg.threads is None or cfg.threads >= 1
    _require(ok, "threads", cfg.threads, "null or an integer >= 1")
    _require(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "auto, cpu, cuda")
    progress = str(cfg.progress).lower()
    _require(progress in ("auto", "true", "false"), "progress", cfg.progress, "auto, true, false")
    _require(ev.every >= 0, "eval.every", ev.every, "an integer >= 0 (0: never)")
    ok = ev.iwae_k is None or ev.iwae_k >= 1
    _require(ok, "eval.iwae_k", ev.iwae_k, "null (100 or 1000 by data size) or an integer >= 1")
    _require(ev.num_samples >= 1, "eval.num_samples", ev.num_samples, "an integer >= 1")
    _require(ev.chunk >= 1, "eval.chunk", ev.chunk, "an integer >= 1")
    _require(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "an integer >= 1")
    for split in ev.splits:
        _require(split in EVAL_SPLITS, "eval.splits", split, ", ".join(EVAL_SPLITS))
    pr = cfg.probe
    _require(pr.every >= 0, "probe.every", pr.every, "an integer >= 0 (0: never)")
    _require(pr.groups >= 2, "probe.groups", pr.groups, "an integer >= 2")
    ok = pr.num_estimates >= 2 * pr.groups
    _require(ok, "probe.num_estimates", pr.num_estimates, f">= 2 * probe.groups = {2 * pr.groups}")
    _require(pr.chunk >= 1, "probe.chunk", pr.chunk, "an integer >= 1")
    ok = _is_number(pr.ema_decay) and 0 <= pr.ema_decay < 1
    _require(ok, "probe.ema_decay", pr.ema_decay, "a number in [0, 1) (0: off)")
    refs = ("auto", "exact", "none", *estimators.available())
    _require(pr.reference in refs, "probe.reference", pr.reference, ", ".join(refs))
    _require(pr.reference_samples >= 1, "probe.reference_samples", pr.reference_samples, ">= 1")
    ok = pr.reference_estimates >= 2 * pr.groups
    _require(ok, "probe.reference_estimates", pr.reference_estimates, ">= 2 * probe.groups")
    if pr.every > 0:
        validate_probe(cfg)
    for key in cfg.debug:  # fail_at_step, nan_at_step, ..., preempt_after
        value = cfg.debug[key]
        _require(value is None or value >= 1, f"debug.{key}", value, "null or an integer >= 1")
    if "anneal_rate" in e:
        ok = _is_number(e.anneal_rate) and e.anneal_rate >= 0
        _require(ok, "estimator.anneal_rate", e.anneal_rate, "a finite number >= 0")
        ok = _is_number(e.min_temperature) and e.min_temperature > 0
        _require(ok, "estimator.min_temperature", e.min_temperature, "a finite number > 0")
        _require(e.anneal_every >= 1, "estimator.anneal_every", e.anneal_every, "an integer >= 1")


def validate_probe(cfg: DictConfig) -> None:
    """Check what the probe would otherwise find only at its first probing step: that
    ``probe.reference`` can give a reference for this model, and that the basket's labels
    (the ``probe_estimator`` of its rows) tell its entries and the run's own estimator apart.
    """
    pr, m = cfg.probe, cfg.model
    discrete = m.family in ("bernoulli", "categorical")
    if pr.reference == "exact":
        base = 2 if m.family == "bernoulli" else m.n_categories
        if not discrete or base**m.latent_dim > MAX_CONFIGS:
            what = (
                f"{m.family} latents cannot be enumerated" if not discrete else
                f"model.latent_dim={m.latent_dim} gives {base}^{m.latent_dim} latent "
                f"configurations per example, more than the {MAX_CONFIGS} that can be enumerated"
            )  # fmt: skip
            raise ConfigError(
                f"probe.reference='exact' is invalid here: {what}; allowed: auto, none, or an "
                f"estimator supporting {m.family}: {', '.join(estimators.supporting(m.family))}"
            )
    elif pr.reference not in ("auto", "none") and m.family not in estimators.families(
        pr.reference
    ):
        allowed = ["auto", "none", *(["exact"] if discrete else [])]
        raise ConfigError(
            f"probe.reference={pr.reference!r} is invalid for model.family={m.family}: it does "
            f"not support {m.family} latents; allowed: {', '.join(allowed)}, or "
            f"{', '.join(estimators.supporting(m.family))}"
        )
    est_cfg = OmegaConf.to_container(cfg.estimator, resolve=True)
    own_label = estimator_label(est_cfg, temperature_schedule(est_cfg))
    own = (est_cfg["name"], estimator_options(est_cfg))
    seen: dict[str, int] = {}
    for i, raw in enumerate(OmegaConf.to_container(pr.basket, resolve=True)):
        try:
            entry = basket_entry(raw)
        except ValueError as err:
            raise ConfigError(f"probe.basket[{i}]: {err}") from err
        name = entry["name"]
        names = estimators.available()
        _require(name in names, f"probe.basket[{i}].name", name, ", ".join(names))
        entry = {**estimators.options(name), **entry}
        label = entry.get("label") or estimator_label(entry, None)
        options = {k: v for k, v in entry.items() if k not in HARNESS_ESTIMATOR_KEYS}
        if label in seen:
            raise ConfigError(
                f"probe.basket[{i}] has the label {label!r} of probe.basket[{seen[label]}]: "
                "their rows would merge; allowed: entries with distinct labels (drop the "
                "duplicate, or give it another 'label')"
            )
        if label == own_label and (name, options) != own:
            raise ConfigError(
                f"probe.basket[{i}] has the label {label!r} of the run's own estimator but "
                "other options: its rows would merge with the run's; allowed: the run's own "
                "estimator as it is configured, or another 'label'"
            )
        seen[label] = i


def estimator_options(est_cfg: dict[str, Any]) -> dict[str, Any]:
    """The options of ``estimators.get``: ``estimator.*`` minus the harness and schedule keys."""
    harness = (*HARNESS_ESTIMATOR_KEYS, *SCHEDULE_KEYS)
    return {k: v for k, v in est_cfg.items() if k not in harness}


def build_estimator(est_cfg: dict[str, Any]) -> estimators.EstimatorBase:
    """``estimators.get(name, **options)``; its ``ValueError`` becomes a :class:`ConfigError`."""
    try:
        return estimators.get(est_cfg["name"], **estimator_options(est_cfg))
    except ValueError as err:
        raise ConfigError(f"invalid estimator options (estimator.*): {err}") from err


def temperature_schedule(est_cfg: dict[str, Any]) -> TemperatureSchedule | None:
    """The annealing schedule of ``estimator.temperature``, or None if it is constant.

    Only estimators with a ``temperature`` buffer have the schedule keys (see
    :func:`benchmarks.config.estimator_schema`); a learned temperature is never scheduled.
    """
    if float(est_cfg.get("anneal_rate") or 0.0) == 0.0:
        return None
    return TemperatureSchedule(
        initial=float(est_cfg["temperature"]),
        rate=float(est_cfg.get("anneal_rate", 0.0)),
        minimum=float(est_cfg.get("min_temperature", 0.5)),
        every=int(est_cfg.get("anneal_every", 1000)),
    )


def estimator_label(est_cfg: dict[str, Any], schedule: TemperatureSchedule | None) -> str:
    """A human label telling configurations apart, e.g. ``gumbel_softmax (ST, τ=1)``.

    Built from the option names (never the estimator's): ``baseline`` by value,
    ``straight_through`` as ``ST``, ``temperature`` as ``τ=`` (``τ=1→0.5`` when annealed),
    ``num_samples`` as ``S=`` when not 1, any other option as ``key=value`` when it differs
    from the default. ``estimator.label`` overrides it.
    """
    if est_cfg.get("label"):
        return str(est_cfg["label"])
    name, opts = est_cfg["name"], estimator_options(est_cfg)
    defaults = estimators.options(name)
    parts: list[str] = []
    if "baseline" in opts:
        parts.append(str(opts["baseline"]))
    if opts.get("straight_through"):
        parts.append("ST")
    if "temperature" in opts:
        tau = f"τ={float(opts['temperature']):g}"
        if schedule is not None:
            tau += f"→{schedule.minimum:g}"
        parts.append(tau)
    if opts.get("num_samples", 1) not in (1, None):
        parts.append(f"S={opts['num_samples']}")
    handled = {"baseline", "straight_through", "temperature", "num_samples"}
    for key, value in opts.items():
        if key not in handled and value != defaults.get(key):
            parts.append(f"{key}={value}")
    return f"{name} ({', '.join(parts)})" if parts else name


def check_estimator_fits_model(estimator: estimators.EstimatorBase, cfg: DictConfig) -> str:
    """The train metric of the estimator's objective (``elbo`` or ``iwae``), after checking
    that ``f`` suits it (an ``iwae`` objective needs log weights, i.e. ``model.kl=sampled``)
    and that ``compile=true`` is not asked of an estimator that needs a double backward."""
    kind = getattr(estimator, "objective_kind", "mean")
    if kind == "iwae" and cfg.model.kl != "sampled":
        raise ConfigError(
            f"model.kl={cfg.model.kl!r} is invalid for estimator={cfg.estimator.name}, whose "
            "objective is the multi-sample (IWAE) bound of log weights "
            "f = log p(x, z) - log q(z|x); allowed: sampled"
        )
    if cfg.get("compile") and getattr(estimator, "double_backward", False):
        compilable = [n for n in estimators.available() if not estimators.get(n).double_backward]
        raise ConfigError(
            f"compile=true is invalid for estimator={cfg.estimator.name}: its estimate "
            "differentiates through a gradient (autograd.grad with create_graph=True, to train "
            "its control variate), which torch.compile does not support; allowed: "
            f"compile=false; estimators that compile: {', '.join(compilable)}"
        )
    return "iwae" if kind == "iwae" else "elbo"


def materialize_lazy(
    estimator: estimators.EstimatorBase, model: VAE, x: torch.Tensor, kl: str
) -> None:
    """Give lazily sized estimator layers (``nn.LazyLinear``) their shapes before the optimizer
    is built, by one call on ``x`` that changes no state: in eval mode (estimator state
    frozen) and inside ``fork_rng`` (the RNG streams are restored afterwards)."""
    if not any(is_lazy(p) for p in estimator.parameters()):
        return
    device = x.device
    estimator.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        q = model.encode(x)
        estimator(q, model.learning_signal(x, q, kl), context=x)
    estimator.train()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` without CUDA is a :class:`ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device='cuda' is invalid here: CUDA is not available; allowed: auto, cpu"
        )
    return torch.device(device)


def build_model(cfg: DictConfig, data: Dataset) -> VAE:
    """The VAE of ``cfg.model`` for ``data`` (initialized from the current torch RNG)."""
    return VAE(
        data_dim=data.train.shape[1],
        family=cfg.model.family,
        arch=cfg.model.arch,
        latent_dim=cfg.model.latent_dim,
        n_categories=cfg.model.n_categories,
        hidden_dim=cfg.model.hidden_dim,
        activation=cfg.model.activation,
        data_mean=data.train.mean(0) if cfg.model.init_output_bias else None,
    )


def load_data(cfg: DictConfig) -> Dataset:
    """``load_dataset(data.name, data.root)``; missing files become a :class:`ConfigError`."""
    try:
        return load_dataset(cfg.data.name, cfg.data.root)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err


def show_progress(setting: str, multirun: bool) -> bool:
    """Whether to draw a tqdm bar: ``auto`` means on a TTY, outside CI and outside multirun."""
    setting = str(setting).lower()
    if setting != "auto":
        return setting == "true"
    return sys.stderr.isatty() and not os.environ.get("CI") and not multirun


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: DictConfig
) -> tuple[torch.optim.Optimizer, bool]:
    """Adam over ``params``; fused where torch supports it (``optim.fused: null``)."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused is not None:
        return torch.optim.Adam(params, fused=bool(cfg.fused), **kwargs), bool(cfg.fused)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs), True
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, **kwargs), False


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (except resumable ones)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, prefix=f"{dotted}.")
        elif a != b:
            changed.append(dotted)
    return changed


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: VAE, splits: dict[str, torch.Tensor], cfg: DictConfig, iwae_k: int, seed: int
) -> dict[tuple[str, str], float]:
    """ELBO and IWAE(k) per split, averaged over examples: ``{(split, metric): value}``.

    Samples come from a fixed generator state (``seed`` and the step, via ``seed``) inside
    ``fork_rng``, so evaluation never perturbs the training RNG stream, and two runs at the
    same step evaluate with the same noise.
    """
    device = next(model.parameters()).device
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for split, x in splits.items():
            elbo = iwae = 0.0
            for xb in x.split(cfg.batch_size):
                elbo += float(model.elbo(xb, cfg.num_samples).sum())
                iwae += float(model.iwae(xb, iwae_k, cfg.chunk).sum())
            out[(split, "elbo")] = elbo / len(x)
            out[(split, "iwae")] = iwae / len(x)
    return out


def eval_seed(seed: int, step: int) -> int:
    """Seed of the evaluation at ``step`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])


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


# ------------------------------------------------------------------------- one step


def estimate_loss(
    model: VAE,
    estimator: estimators.EstimatorBase,
    x: torch.Tensor,
    kl: str,
    num_samples: int | None,
) -> tuple[torch.Tensor, estimators.Estimate]:
    """The training loss on batch ``x`` and the estimator's output.

    ``loss = -(1/B) sum_b surrogate_b + aux_loss``: its gradient is minus the estimator's
    estimate of the gradient of the batch-mean objective, plus the estimator's own loss.
    """
    q = model.encode(x)
    out = estimator(q, model.learning_signal(x, q, kl), num_samples=num_samples, context=x)
    loss = -out.surrogate.sum() / x.shape[0]
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    return loss, out


def compiled_estimate_loss() -> Callable[..., tuple[torch.Tensor, estimators.Estimate]]:
    """:func:`estimate_loss` under ``torch.compile`` (the ``compile=true`` option).

    Inductor is told to draw random numbers with eager PyTorch's generators
    (``fallback_random``), so a seed gives the same samples with and without compiling and a
    resumed run continues the same random stream; losses then agree with eager mode up to
    float32 rounding of the fused kernels.
    """
    # Looked up by name: with ``python -m benchmarks.train`` this module is ``__main__``, which
    # submitit's requeue pickles by value (cloudpickle), and a ``torch._inductor.config``
    # attribute chain in this function would make it pickle that config module (it cannot).
    inductor_config = importlib.import_module("torch._inductor.config")
    inductor_config.fallback_random = True
    return torch.compile(estimate_loss)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    inputs: Sequence[torch.Tensor] | None = None,
) -> None:
    """Backpropagate ``loss`` (into ``inputs`` only, if given) and take one optimizer step.

    ``inputs`` (see :func:`backward_inputs`) restricts the backward pass to the optimized
    parameters, skipping graph branches that lead only to an estimator's private leaves.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=inputs)
    optimizer.step()


def backward_inputs(
    optimizer: torch.optim.Optimizer, estimator: estimators.EstimatorBase
) -> list[torch.Tensor] | None:
    """The optimizer's parameters when ``estimator`` has private leaves (REBAR, RELAX), else
    ``None`` (a plain ``backward``, which is faster for every other estimator)."""
    if not getattr(estimator, "private_leaves", False):
        return None
    return [p for group in optimizer.param_groups for p in group["params"]]


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

    # Test hooks (debug.*): the *_at_step ones fire in the first attempt only.
    nan_at, fail_at = cfg.debug.nan_at_step, cfg.debug.fail_at_step
    if attempt > 1:
        nan_at = fail_at = None
    faults = supervise.DebugFaults.build(cfg.debug, step, attempt == 1)
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
                raise RuntimeError(f"debug.fail_at_step={step + 1}: injected failure")
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
        status, reason = "refused" if isinstance(err, supervise.UsageError) else "failed", str(err)
        if multirun:
            log.error("refused: %s", reason)
        else:
            _exit.append((1, f"error: {reason}"))
        return status
    finally:
        if multirun:
            supervise.record_job_outcome(Path(hc.sweep.dir), run_dir, status, reason)
    if status not in ("completed", "diverged") and not multirun:  # e.g. stopped by a signal
        _exit.append((1, f"error: {run_dir}: {status}: {reason}"))
    return status


def main() -> None:
    """Entry point of ``gradbench-train`` and ``python -m benchmarks.train``.

    Hydra's argument parser rejects overrides after a flag, so ``-m`` / ``--multirun`` are
    moved in front first: ``gradbench-train experiment=quick --multirun ...`` works.
    """
    args = sys.argv[1:]
    flags = [a for a in args if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in args if a not in flags]
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
