"""Building a run's pieces from its config: data, model, estimator (with its label and
temperature schedule), optimizer and device.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parameter import is_lazy

import estimators
from benchmarks.data.datasets import (
    Dataset,
    load_dataset,
)
from benchmarks.harness.config import HARNESS_ESTIMATOR_KEYS, SCHEDULE_KEYS, OptimConfig
from benchmarks.harness.eager_optim import eager_optimizer
from benchmarks.harness.errors import ConfigError
from benchmarks.harness.schedules import TemperatureSchedule
from benchmarks.harness.vae import VAE

#: Config keys that may change when a run is resumed (everything else must match); ``debug``
#: is the key of ``faults`` in records written before it was renamed.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "steps",
    "progress",
    "threads",
    "faults",
    "debug",
    "supervise",
)


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
    :func:`benchmarks.harness.config.estimator_schema`); a learned temperature is never scheduled.
    """
    if not est_cfg.get("anneal_rate"):
        return None
    given = {arg: est_cfg[key] for key, arg in SCHEDULE_KEYS.items() if key in est_cfg}
    return TemperatureSchedule(float(est_cfg["temperature"]), **given)


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
    """The train metric of the estimator's objective (``elbo`` or ``iwae``; ``recon_ll`` for
    the deterministic autoencoder), after checking
    that ``f`` suits it (an ``iwae`` objective needs log weights, i.e. ``model.kl=sampled``)
    and that ``compile=true`` is not asked of an estimator that needs a double backward."""
    if cfg.model.family == "deterministic":  # the autoencoder's objective: log p(x|enc(x))
        return "recon_ll"
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
        scale=cfg.model.scale,
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
    """The optimizer of ``cfg`` (``optim``: ``_target_``, default ``torch.optim.Adam``) over
    ``params``, and whether it is fused: Hydra's ``instantiate`` builds the partial from every
    key but ``batch_size`` and ``fused``; ``fused: null`` uses the fused kernel where torch
    supports it. Keys missing from ``cfg`` take their :class:`.config.OptimConfig` defaults."""
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), cfg)
    keys = [k for k in cfg if k not in ("batch_size", "fused")]
    factory = instantiate(OmegaConf.masked_copy(cfg, keys), _convert_="all")
    if isinstance(factory, functools.partial) and _is_optimizer_class(factory.func):
        factory = functools.partial(
            eager_optimizer(factory.func), *factory.args, **factory.keywords
        )  # torch's class without torch._dynamo's import (eager_optim)
    if cfg.fused is not None:
        return factory(params, fused=bool(cfg.fused)), bool(cfg.fused)
    try:
        return factory(params, fused=True), True
    except (RuntimeError, TypeError):
        return factory(params), False


def _is_optimizer_class(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, torch.optim.Optimizer)


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
