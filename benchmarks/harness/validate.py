"""Config validation before any work: each bad value is a :class:`ConfigError` naming the
option, the bad value and the allowed values.
"""

from __future__ import annotations

import math

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

import estimators
from benchmarks.harness.build import estimator_label, estimator_options, temperature_schedule
from benchmarks.harness.config import HARNESS_ESTIMATOR_KEYS, check_choices
from benchmarks.harness.errors import ConfigError
from benchmarks.probe.runner import (
    basket_entry,
)
from estimators.exact import MAX_CONFIGS

# ------------------------------------------------------------------------------ validation


def _require(ok: bool, option: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{option}={value!r} is invalid; allowed: {allowed}")


#: What ``optim._target_`` may name.
OPTIMIZERS_ALLOWED = "a torch.optim.Optimizer class, e.g. torch.optim.Adam"


def is_optimizer(target: object) -> bool:
    """Whether ``target`` (a dotted path) names a ``torch.optim.Optimizer`` class."""
    try:
        cls = get_class(str(target))
    except (ImportError, ValueError):
        return False
    return issubclass(cls, torch.optim.Optimizer)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_autoencoder(cfg: DictConfig) -> None:
    """The plain autoencoder (``model.family=deterministic``) trains by the exact gradient of
    ``log p(x|enc(x))``: estimator ``reparam`` on its point mass, the analytic (zero) KL and
    no probe (nothing is sampled, so there is no gradient variance to measure)."""
    for option, value, allowed in (
        ("estimator", cfg.estimator.name, "reparam"),
        ("model.kl", cfg.model.kl, "analytic"),
        ("probe.every", cfg.probe.every, 0),
    ):
        if value != allowed:
            raise ConfigError(
                f"{option}={value!r} is invalid with model.family=deterministic (the plain "
                f"autoencoder: no sampling, no KL); allowed: {allowed}"
            )


def validate(cfg: DictConfig) -> None:
    """Check every value of ``cfg`` that composition cannot; raise :class:`ConfigError`."""
    e, m, o, ev = cfg.estimator, cfg.model, cfg.optim, cfg.eval
    names = estimators.available()
    _require(e.name in names, "estimator", e.name, ", ".join(names))
    check_choices(cfg)  # model.family, model.arch, data, device, ... (their schema fields)
    supported = estimators.families(e.name)
    if m.family == "deterministic":
        check_autoencoder(cfg)
    elif m.family not in supported:
        raise ConfigError(
            f"estimator={e.name} does not support model.family={m.family}; allowed families "
            f"for {e.name}: {', '.join(sorted(supported))}; estimators supporting {m.family}: "
            f"{', '.join(estimators.supporting(m.family))}"
        )
    _require(m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "an integer >= 1")
    _require(m.hidden_dim >= 1, "model.hidden_dim", m.hidden_dim, "an integer >= 1")
    if m.family == "categorical":
        _require(m.n_categories >= 2, "model.n_categories", m.n_categories, "an integer >= 2")
    _require(is_optimizer(o._target_), "optim._target_", o._target_, OPTIMIZERS_ALLOWED)
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
    _require(ev.every >= 0, "eval.every", ev.every, "an integer >= 0 (0: never)")
    ie = ev.iwae_every
    ok = ie == 0 or (ie > 0 and (ev.every == 0 or ie % ev.every == 0))  # every=0: no evaluation
    allowed = f"0 (every evaluation) or a multiple of eval.every={ev.every}"
    _require(ok, "eval.iwae_every", ev.iwae_every, allowed)
    ok = ev.iwae_k is None or ev.iwae_k >= 1
    _require(ok, "eval.iwae_k", ev.iwae_k, "null (100 or 1000 by data size) or an integer >= 1")
    _require(ev.num_samples >= 1, "eval.num_samples", ev.num_samples, "an integer >= 1")
    _require(ev.chunk >= 1, "eval.chunk", ev.chunk, "an integer >= 1")
    _require(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "an integer >= 1")
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
    for key in cfg.faults:  # fail_at_step, nan_at_step, ..., preempt_after
        value = cfg.faults[key]
        _require(value is None or value >= 1, f"faults.{key}", value, "null or an integer >= 1")
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
