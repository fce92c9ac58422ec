"""Structured-config schemas of ``gradbench-train``, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto one of these dataclasses, so a misspelt key or a
value of the wrong type fails when Hydra composes the config, before any work is done. The
schemas are the one home of every config default: a YAML file holds only what differs. A field
with enumerated values declares them beside its default (:func:`choice`), and
:func:`check_choices` checks them all; the other value checks (ranges, data files) are in
:func:`.validate.validate`.

The estimator schemas are generated from the estimator registry: ``schema/estimator/<name>``
has one field per option of the registered class (its ``__init__`` signature: name, type by
default, default) plus the harness keys :data:`HARNESS_ESTIMATOR_KEYS`, so a new estimator
needs only its YAML file ``conf/estimator/<name>.yaml`` (the ``defaults`` line). Estimators
that keep a ``temperature`` buffer also get the keys of a temperature schedule
(:data:`SCHEDULE_KEYS`, defaults from :class:`.schedules.TemperatureSchedule`), which the
harness applies and never passes to ``estimators.get``.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import estimators
from benchmarks.data.datasets import BINARIZATIONS, DATASETS
from benchmarks.harness.errors import ConfigError
from benchmarks.harness.schedules import TemperatureSchedule
from benchmarks.harness.vae import ACTIVATIONS, ARCHS, KL_MODES, MODEL_FAMILIES, SCALES

# Optional[...] rather than "X | None": OmegaConf 2.3 reads typing.Optional only.
# ruff: noqa: UP045

#: Keys under ``estimator.`` that belong to the harness, not to ``estimators.get``.
HARNESS_ESTIMATOR_KEYS: tuple[str, ...] = ("name", "label")
#: Keys of the temperature schedule, added for estimators with a ``temperature`` buffer: each
#: sets an argument of :class:`.schedules.TemperatureSchedule`, whose signature holds the default.
SCHEDULE_KEYS: dict[str, str] = {
    "anneal_rate": "rate",
    "min_temperature": "minimum",
    "anneal_every": "every",
}


#: ``device``: where a run trains (``auto``: CUDA if available, else CPU).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: ``progress`` and ``supervise``: ``auto`` (the setting's own rule), or on / off.
SWITCHES: tuple[str, ...] = ("auto", "true", "false")
#: ``eval.splits``: the splits an evaluation may cover.
EVAL_SPLITS: tuple[str, ...] = ("train", "val", "test")


def choice(
    default: Any, choices: Iterable[str], option: str | None = None, ignore_case: bool = False
) -> Any:
    """A schema field whose value (each value, for a list) must be one of ``choices``.

    The allowed values sit beside the default, in the field's metadata, and
    :func:`check_choices` checks every such field; ``option`` is the name errors use (default:
    the dotted key); ``ignore_case`` compares ``str(value).lower()`` (for switches that YAML
    may read as booleans).
    """
    meta = {"choices": tuple(choices), "option": option, "ignore_case": ignore_case}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The VAE (``benchmarks.harness.vae.VAE``); ``model=<family>`` picks the family."""

    # latent family (set by conf/model/<family>.yaml); deterministic: the plain autoencoder
    family: str = choice(MISSING, MODEL_FAMILIES)
    arch: str = choice("linear", ARCHS)  # linear: one map each way; nonlinear: 2 hidden layers
    latent_dim: int = 200  # latent variables (categorical: number of variables)
    n_categories: int = 10  # categories per variable (categorical family only)
    hidden_dim: int = 200  # width of the two hidden layers (nonlinear arch only)
    activation: str = choice("leaky_relu", ACTIVATIONS)  # hidden activation (nonlinear arch)
    kl: str = choice("analytic", KL_MODES)  # f: log p(x|z) - KL, or sampled log p(x,z) - log q
    init_output_bias: bool = True  # decoder output bias = logit(mean training image)
    # Gaussian encoder scale: softplus (sigma = softplus(h) + 1e-4) | log_var (h = log sigma^2)
    scale: str = choice("softplus", SCALES)


@dataclass
class DataConfig:
    """The data set (``benchmarks.data.datasets``); ``data=<name>`` picks it."""

    name: str = choice(MISSING, DATASETS, option="data")  # set by conf/data/<name>.yaml
    root: Optional[str] = None  # data root for file-based sets; null: $GRADBENCH_DATA or cache
    binarization: str = choice("dynamic", BINARIZATIONS)  # dynamic: a draw per batch; static


@dataclass
class OptimConfig:
    """The optimizer, built by Hydra's ``instantiate`` from ``_target_`` as a partial that
    :func:`.build.make_optimizer` calls with the parameters; every key but ``batch_size`` is
    an argument of the optimizer."""

    _target_: str = "torch.optim.Adam"  # the optimizer class
    _partial_: bool = True  # instantiate gives a partial; make_optimizer adds the parameters
    lr: float = 1e-3  # learning rate (> 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon
    fused: Optional[bool] = None  # fused kernel; null: use it where torch supports it
    batch_size: int = 100  # examples per step (the loss is the batch mean); not an argument


@dataclass
class EvalConfig:
    """Evaluation bounds on held-out splits (exact samples from q, estimator-independent)."""

    every: int = 1000  # evaluate every N steps (and at steps 0 and final); 0: never
    # the IWAE bound too every N steps (a multiple of every; and at steps 0 and final); 0: at
    # every evaluation. Between, an evaluation draws only the ELBO's num_samples samples.
    iwae_every: int = 0
    iwae_k: Optional[int] = None  # IWAE samples; null: 100 on small data, 1000 on full-size data
    num_samples: int = 10  # samples per example of the evaluation ELBO (the first of IWAE's)
    # samples decoded at once, and examples evaluated at once: batch_size x chunk decoder rows
    # (about 1,000 fit in a CPU's cache: 2x faster than 50,000 here; raise both on a GPU)
    chunk: int = 10
    batch_size: int = 100
    # splits to evaluate (choice returns a dataclasses.field with a default_factory)
    splits: list[str] = choice(lambda: ["val", "test"], EVAL_SPLITS)  # noqa: RUF009
    # also write the qualitative records (reconstructions, samples, interpolations, 2-D maps)
    # of fixed test digits at each evaluation (benchmarks.harness.qualitative)
    qualitative: bool = False


@dataclass
class ProbeConfig:
    """Gradient-variance probe (:mod:`benchmarks.probe`) during training.

    Every ``every`` steps (and at the last step) the run's own estimator and each estimator of
    ``basket`` draw ``num_estimates`` gradient estimates of the encoder at the same parameters
    on one fixed probe batch; ``split=probe`` rows record variance, SNR, bias, MSE and cosine
    (each with ``<metric>_se``). With probing on, ``train/grad_var_ema`` also records the
    moving-average variance of the training gradient along the run's own trajectory.
    """

    every: int = 0  # probe every N steps and at the end; 0: never
    num_estimates: int = 100  # gradient estimates M per estimator per probe (>= 2 * groups)
    # other estimators probed at the same parameters and batch: registry names, or mappings
    # {name: ..., <options>} (e.g. {name: rloo, num_samples: 8})
    basket: list[Any] = field(default_factory=list)
    reference: str = "auto"  # auto | exact | none | <registry name>: the reference gradient
    reference_samples: int = 10  # samples per estimate of a Monte Carlo reference
    reference_estimates: int = 40  # estimates averaged into a Monte Carlo reference
    groups: int = 20  # jackknife groups for the standard errors
    chunk: int = 50  # estimates computed at once (bounds memory)
    ema_decay: float = 0.999  # decay of train/grad_var_ema (REBAR/DisARM papers); 0: off
    decoder: bool = False  # also probe the decoder's gradients (param=decoder, decoder.*)


@dataclass
class FaultsConfig:
    """Fault injection for tests (``faults.*``, config group ``conf/faults/``); leave the hooks
    null outside tests. Apart from the ``experiment=debug`` preset (a tiny run), which sets none.

    The ``*_at_step`` hooks fire in a run's first attempt only (a transient fault: re-running
    the same command resumes and finishes); ``preempt_after`` fires in every attempt.
    """

    fail_at_step: Optional[int] = None  # raise RuntimeError at this step
    nan_at_step: Optional[int] = None  # make the loss NaN at this step
    exit_at_step: Optional[int] = None  # os._exit(3) at this step (a hard crash)
    kill_at_step: Optional[int] = None  # SIGKILL the training process at this step
    term_at_step: Optional[int] = None  # SIGTERM the training process at this step
    preempt_after: Optional[int] = None  # SIGUSR2 (preemption) to the job after N steps/attempt


@dataclass
class Config:
    """The root config of one training run."""

    estimator: Any = MISSING  # estimator name and options (schema/estimator/<name>)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    steps: int = 10_000  # optimizer steps
    seed: int = 0  # seeds torch, numpy, random and the batch stream
    device: str = choice("auto", DEVICES)  # auto (CUDA if available) | cpu | cuda
    log_every: int = 500  # train and throughput rows every N steps
    checkpoint_every: int = 5000  # checkpoint (and metrics file) every N steps; 0: at the end
    snapshot_every: int = 0  # keep model snapshots every N steps (gradbench-probe); 0: none
    threads: Optional[int] = None  # torch threads; null: leave torch's (or the launcher's) choice
    compile: bool = False  # torch.compile the loss (estimator + model forward); not for
    # rebar / relax; compiled / eager step times: results/throughput/overhead_cpu.md
    progress: str = choice(
        "auto", SWITCHES, ignore_case=True
    )  # tqdm bar: auto (TTY, not CI, not multirun) | true | false
    supervise: str = choice(
        "auto", SWITCHES, ignore_case=True
    )  # train in a child process that a hard crash cannot take down with
    # the job: auto (in --multirun sweeps) | true | false (benchmarks.harness.supervise)


def check_choices(cfg: Any, schema: type | None = None, prefix: str = "") -> None:
    """Check every field declared with :func:`choice` in ``cfg`` (a composed config) against
    its allowed values; raise :class:`.errors.ConfigError` naming the option, the bad value and
    the allowed ones."""
    for f in dataclasses.fields(schema or Config):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory):  # a nested schema (model, data, ...)
            check_choices(cfg[f.name], f.default_factory, f"{key}.")
            continue
        allowed = f.metadata.get("choices")
        if allowed is None:
            continue
        value = cfg[f.name]
        for v in value if OmegaConf.is_list(value) else [value]:
            seen = str(v).lower() if f.metadata["ignore_case"] else v
            if seen not in allowed:
                raise ConfigError(
                    f"{f.metadata['option'] or key}={v!r} is invalid; allowed: "
                    f"{', '.join(allowed)}"
                )


#: Renamed config groups and keys: old -> new. An override with the old spelling is refused
#: with a message naming the new one (:func:`renamed_override`).
RENAMED: dict[str, str] = {"variant": "pairing", "debug": "faults"}


def renamed_override(override: str) -> str | None:
    """The message refusing ``override`` (``key=value``, optionally ``+``/``~``/``++``) when its
    key or group was renamed (:data:`RENAMED`), else None."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    if key == "optim.name":  # the optimizer is a class now, built from optim._target_
        return (
            f"optim.name is now optim._target_ (a torch.optim class, default torch.optim.Adam); "
            f"use optim._target_=torch.optim.{str(value).capitalize() or 'Adam'}"
        )
    head, dot, rest = key.partition(".")
    if head not in RENAMED:
        return None
    new = f"{RENAMED[head]}{dot}{rest}"
    return f"{key} is now {new} (conf/{RENAMED[head]}/); use {new}={value}"


def has_temperature_buffer(name: str) -> bool:
    """Whether estimator ``name`` (with default options) keeps ``temperature`` in a buffer."""
    try:
        est = estimators.get(name)
    except (TypeError, ValueError):
        return False
    return "temperature" in dict(est.named_buffers())


def _field_type(default: object) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return type(default)
    return Any


def estimator_schema(name: str) -> type:
    """A dataclass with the keys of ``conf/estimator/<name>.yaml``.

    Fields: ``name`` (the registry name), ``label`` (a human label; null builds one from the
    options), one field per option of the estimator typed by its default (an option without
    a default is required), and, for estimators that keep a ``temperature`` buffer (a fixed,
    schedulable temperature, not a learned one), the schedule ``anneal_rate`` (``r``; 0:
    constant), ``min_temperature`` and ``anneal_every`` of ``tau = max(tau_min, tau0 e^{-r t})``.
    """
    fields: list[tuple[str, Any, Any]] = [
        ("name", str, field(default=name)),
        ("label", Optional[str], field(default=None)),
    ]
    for option, default in estimators.options(name).items():
        if default is inspect.Parameter.empty:
            fields.append((option, Any, field(default=MISSING)))
        else:
            fields.append((option, _field_type(default), field(default=default)))
    if has_temperature_buffer(name):
        schedule = inspect.signature(TemperatureSchedule).parameters
        for key, arg in SCHEDULE_KEYS.items():
            default = schedule[arg].default
            fields.append((key, _field_type(default), field(default=default)))
    return dataclasses.make_dataclass(f"EstimatorConfig_{name}", fields)


#: How many names :func:`unique_dir` tries (``path``, ``path_1``, ...) before giving up.
MAX_CLAIMS = 10_000


class OutputDirError(OSError):
    """A run or sweep directory that cannot be created; the message names the path."""


def unique_dir(path: str) -> str:
    """``path``, or else ``path_1``, ``path_2``, ...: the first one this call creates.

    The resolver ``${unique_dir:...}`` of the default ``hydra.run.dir`` / ``hydra.sweep.dir``.
    ``os.mkdir`` is an exclusive claim (atomic, also on NFS), so runs started in the same
    second (``${now:%H-%M-%S}``) get distinct directories and never share a writer. Hydra
    resolves the directory once per command (the resolver is cached, and sweep jobs reuse
    the cache of the sweep), so a run, or a sweep and its jobs, keep the one they claimed.
    A claimed directory still empty when the process exits (the config was only composed or
    printed, or the command failed before writing) is removed again.

    Raises :class:`OutputDirError` naming the path when a parent cannot be a directory (a
    dangling symbolic link, a file, no permission) or after :data:`MAX_CLAIMS` taken names.
    """
    base = Path(path)
    for i in range(MAX_CLAIMS):
        candidate = base if i == 0 else base.with_name(f"{base.name}_{i}")
        new_parents = [p for p in reversed(candidate.parents) if not p.exists()]
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:  # a parent was removed meanwhile: try again
            continue
        except OSError as err:  # a file or dangling link where a folder must be, no permission
            raise OutputDirError(_unusable(candidate.parent, err)) from None
        try:
            candidate.mkdir()
        except (FileExistsError, FileNotFoundError):  # taken; or a parent removed meanwhile
            continue
        except OSError as err:
            raise OutputDirError(_unusable(candidate, err)) from None
        _claimed.append((candidate, new_parents))
        return str(candidate)
    raise OutputDirError(
        f"cannot claim a new directory {base} (or {base.name}_1 ... {base.name}_{MAX_CLAIMS - 1}"
        "): every name is taken; choose another hydra.run.dir / hydra.sweep.dir"
    )


def job_signature(overrides: list[str]) -> tuple[str, ...]:
    """What identifies a sweep job: its task overrides, in any order. Every override counts
    (also ``steps``): two jobs of one sweep that differ only there need two folders."""
    return tuple(sorted(overrides))


def recorded_overrides(job_dir: Path) -> list[str] | None:
    """The task overrides recorded in ``job_dir/.hydra/overrides.yaml`` (None if unreadable)."""
    try:
        data = OmegaConf.load(Path(job_dir) / ".hydra" / "overrides.yaml")
    except Exception:  # absent, unreadable or not YAML: the directory matches no job
        return None
    return [str(o) for o in data] if OmegaConf.is_list(data) else None


def job_subdir(sweep_dir: str | Path, overrides: list[str], num: int) -> str:
    """The numbered folder of ``sweep_dir`` for the job with task ``overrides``.

    The folder whose recorded overrides (``.hydra/overrides.yaml``) name the same job
    (:func:`job_signature`) when there is one, so re-running a sweep resumes or skips its
    jobs in place; otherwise a folder this call creates (an exclusive claim): ``num`` (the
    job's number) if free, else the next number after every existing folder. So jobs added
    to an existing sweep get new folders and never touch another job's records.
    """
    sweep_dir = Path(sweep_dir)
    ensure_output_dir(sweep_dir)
    wanted = job_signature(overrides)
    numbers = sorted(int(c.name) for c in sweep_dir.iterdir() if c.name.isdigit())
    for n in numbers:
        recorded = recorded_overrides(sweep_dir / str(n))
        if recorded is not None and job_signature(recorded) == wanted:
            return str(n)
    candidates = [num] if num not in numbers else []
    start = max(numbers, default=-1) + 1
    candidates += range(start, start + MAX_CLAIMS)
    for n in candidates:
        try:
            (sweep_dir / str(n)).mkdir()
        except FileExistsError:  # claimed meanwhile by another job of a parallel launcher
            continue
        except OSError as err:
            raise OutputDirError(_unusable(sweep_dir / str(n), err)) from None
        return str(n)
    raise OutputDirError(f"cannot claim a job folder in {sweep_dir}: every number is taken")


_job_subdirs: dict[tuple[str, str, tuple[str, ...]], str] = {}


def _job_subdir_resolver(num: str, *, _root_: Any) -> str:
    """:func:`job_subdir` as the ``${job_subdir:${hydra.job.num}}`` resolver of the default
    ``hydra.sweep.subdir``; the same job asking twice in a process gets the same folder."""
    sweep_dir = str(_root_.hydra.sweep.dir)
    overrides = [str(o) for o in _root_.hydra.overrides.task]
    key = (sweep_dir, str(num), tuple(overrides))
    if key not in _job_subdirs:
        try:
            _job_subdirs[key] = job_subdir(sweep_dir, overrides, int(num))
        except OutputDirError as err:
            raise SystemExit(f"error: {err}") from None
    return _job_subdirs[key]


def _unique_dir_resolver(path: str) -> str:
    """:func:`unique_dir` as the ``${unique_dir:...}`` resolver. Hydra may resolve the default
    directory while composing even when an override replaces it, so an unusable one is not
    an error here: its path comes back unclaimed, and the command fails on it only if it is
    the directory it uses (:class:`.supervise.OutputDirCheck`, with one line naming it)."""
    try:
        return unique_dir(path)
    except OutputDirError:
        return path


def ensure_output_dir(path: str | Path) -> None:
    """Create the directory ``path`` (and its parents) if needed; raise
    :class:`OutputDirError` naming the culprit if it cannot be a directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(_unusable(path, err)) from None


def _unusable(path: Path, err: OSError) -> str:
    """The message of an output directory that cannot be created, naming the culprit."""
    culprit = next((p for p in (path, *path.parents) if p.is_symlink() or p.exists()), path)
    if culprit.is_symlink() and not culprit.exists():
        why = f"{culprit} is a symbolic link to {os.readlink(culprit)}, which does not exist"
    elif culprit.exists() and not culprit.is_dir():
        why = f"{culprit} is a file, not a directory"
    else:
        why = f"{type(err).__name__}: {err.strerror or err}"
    return (
        f"cannot create the output directory {path}: {why}; fix or remove it, or choose "
        "another hydra.run.dir / hydra.sweep.dir"
    )


_claimed: list[tuple[Path, list[Path]]] = []


@atexit.register
def _release_unused_claims() -> None:
    """Remove the directories :func:`unique_dir` claimed (and the parents it made) that are
    still empty."""
    for claimed, parents in reversed(_claimed):
        for d in (claimed, *reversed(parents)):
            try:
                d.rmdir()  # only succeeds on an empty directory
            except OSError:
                break


def register_configs() -> None:
    """Store the root schema (``base_config``) and each ``schema/estimator/<name>``; register
    the ``unique_dir`` and ``job_subdir`` resolvers."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in estimators.available():
        cs.store(group="schema/estimator", name=name, node=estimator_schema(name))
    OmegaConf.register_new_resolver(
        "unique_dir", _unique_dir_resolver, use_cache=True, replace=True
    )
    OmegaConf.register_new_resolver("job_subdir", _job_subdir_resolver, replace=True)


register_configs()
