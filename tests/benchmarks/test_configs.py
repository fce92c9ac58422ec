"""Configs: every file under conf/ composes against its schema and builds; typos fail early.

"Builds" means: the composed config passes :func:`benchmarks.harness.validate.validate`, the
estimator is built by ``estimators.get`` and the VAE is constructed (data files are not read).
Presets with a sweep are checked job by job (seeds aside, which never change validity).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import estimators
from benchmarks.harness.build import (
    build_estimator,
    check_estimator_fits_model,
    estimator_label,
    temperature_schedule,
)
from benchmarks.harness.config import (
    HARNESS_ESTIMATOR_KEYS,
    Config,
    DataConfig,
    FaultsConfig,
    ModelConfig,
    OptimConfig,
    ProbeConfig,
    estimator_schema,
    renamed_override,
)
from benchmarks.harness.errors import ConfigError
from benchmarks.harness.vae import VAE
from benchmarks.harness.validate import validate
from tests.conftest import CONF_DIR

GROUPS = ("estimator", "model", "data", "optim", "probe", "faults", "experiment", "pairing")
#: The schema of each group whose files are merged onto one node of the root config.
SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "probe": ProbeConfig,
    "faults": FaultsConfig,
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _build(cfg) -> None:
    """Validate ``cfg`` and build its estimator and VAE (no data is read)."""
    validate(cfg)
    est = build_estimator(OmegaConf.to_container(cfg.estimator))
    check_estimator_fits_model(est, cfg)
    m = cfg.model
    VAE(784, m.family, m.arch, m.latent_dim, m.n_categories, m.hidden_dim, m.activation)


def _compatible(name: str) -> list[str]:
    """Overrides that make estimator ``name`` valid: a family it supports and, for
    IWAE-objective estimators, model.kl=sampled."""
    family = "bernoulli" if "bernoulli" in estimators.families(name) else "gaussian"
    family = family if family in estimators.families(name) else min(estimators.families(name))
    kl = "sampled" if estimators.get(name).objective_kind == "iwae" else "analytic"
    return [f"model={family}", f"model.kl={kl}"]


def _sweep_jobs(params: dict[str, str]) -> list[list[str]]:
    """The override lists of a basic-sweeper sweep, without the seed axis."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
        for o in parsed
        if o.key_or_group != "seed"
    ]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_config_file_composes_and_builds(make_config, group: str, option: str) -> None:
    """conf/<group>/<option>.yaml composes onto its schema; the result validates and builds.
    For presets with a sweep, every job of the sweep (seeds aside) composes and builds."""
    extra = _compatible(option) if group == "estimator" else []
    if group == "model":
        extra = [
            f"estimator={'reparam' if option in ('gaussian', 'deterministic') else 'reinforce'}"
        ]
    cfg = make_config(f"{group}={option}", *extra, return_hydra_config=True)
    _build(cfg)
    params = cfg.hydra.sweeper.params
    for job in _sweep_jobs(OmegaConf.to_container(params)) if params else []:
        _build(make_config(f"{group}={option}", *job))


def test_every_registered_estimator_has_a_config_file() -> None:
    """Registry name = config file name: conf/estimator/<name>.yaml exists for every registered
    estimator and extends its schema (``/schema/estimator/<name>``), whose fields are the
    class's options with the class's defaults."""
    for name in estimators.available():
        path = CONF_DIR / "estimator" / f"{name}.yaml"
        assert path.is_file(), f"missing {path}"
        assert f"/schema/estimator/{name}@_here_" in yaml.safe_load(path.read_text())["defaults"]
        schema = OmegaConf.structured(estimator_schema(name))
        assert schema.name == name
        assert set(HARNESS_ESTIMATOR_KEYS) <= set(schema)
        assert estimators.options(name).items() <= OmegaConf.to_container(schema).items()


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """``{dotted key: value}`` of every leaf of a mapping (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def _base_of(group: str, option: str, make_config) -> dict[str, object]:
    """What ``conf/<group>/<option>.yaml`` is merged onto: its schema's defaults (a group
    file), or the config composed without it but with its own group overrides (a preset)."""
    if group == "estimator":
        return OmegaConf.to_container(OmegaConf.structured(estimator_schema(option)))
    if group in SCHEMAS:
        return OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]))
    data = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    overrides = [
        f"{k.split('/')[-1]}={v}" for d in data.get("defaults", []) if isinstance(d, dict)
        for k, v in d.items()
    ]  # fmt: skip
    return OmegaConf.to_container(make_config(*overrides))


@pytest.mark.parametrize(
    ("group", "option"),
    [("", "config")] + [(g, o) for g in GROUPS for o in _options(g)],
    ids=lambda v: str(v),
)
def test_no_config_file_restates_a_default(make_config, group: str, option: str) -> None:
    """One home for a default: no key of a file under conf/ sets the value it would have
    without that file (the schema's default, or for a preset the composed config's)."""
    path = CONF_DIR / group / f"{option}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}  # YAML 1.2 numbers (1e-3)
    data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
    if group == "":
        base = OmegaConf.to_container(OmegaConf.structured(Config))
    else:
        base = _base_of(group, option, make_config)
    restated = [
        k for k, v in _leaves(data).items() if k in _leaves(base) and _leaves(base)[k] == v
    ]
    assert not restated, f"{path.relative_to(CONF_DIR)} restates default(s): {restated}"


@pytest.mark.parametrize("group", ["estimator", "model", "data", "optim", "probe"])
def test_every_config_field_has_a_one_line_comment(group: str) -> None:
    """Each `key: value` line of the group files carries a `# comment` saying what it means."""
    for path in (CONF_DIR / group).glob("*.yaml"):
        for line in path.read_text().splitlines():
            if re.match(r"^\w+:", line) and not line.startswith("defaults:"):
                assert "#" in line, f"{path.name}: no comment on {line!r}"


def test_quick_preset_sweeps_the_six_configurations_over_three_seeds(make_config) -> None:
    """experiment=quick sweeps linear VAEs on mnist_subset: Bernoulli with reinforce
    (moving_average), rloo (S=2), gumbel_softmax relaxed and ST at τ=1; Gaussian with reparam
    and reinforce; seeds 0, 1, 2; joblib-friendly one thread per run."""
    cfg = make_config("experiment=quick", return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert [s.strip() for s in params["seed"].split(",")] == ["0", "1", "2"]
    seen = set()
    for job in _sweep_jobs(params):
        c = make_config("experiment=quick", *job)
        assert (c.data.name, c.model.arch, c.threads) == ("mnist_subset", "linear", 1)
        est = OmegaConf.to_container(c.estimator)
        seen.add((c.model.family, estimator_label(est, temperature_schedule(est))))
    assert seen == {
        ("bernoulli", "reinforce (moving_average)"),
        ("bernoulli", "rloo (S=2)"),
        ("bernoulli", "gumbel_softmax (τ=1)"),
        ("bernoulli", "gumbel_softmax (ST, τ=1)"),
        ("gaussian", "reparam"),
        ("gaussian", "reinforce (moving_average)"),
    }


def test_quick_preset_draws_every_curve_with_at_least_eight_points(make_config) -> None:
    """Every quick job evaluates its ELBO (step 0 included) and probes (variance, SNR, bias)
    at >= 8 steps, and computes the IWAE bound at least at the first and last step."""
    from benchmarks.harness.train import Cadence

    cfg = make_config("experiment=quick", "pairing=bernoulli_rloo")
    cadence = Cadence.of(cfg)
    due = [cadence.due(step, False) for step in range(1, cfg.steps + 1)]
    elbo = 1 + sum(d is not None and d.eval for d in due)  # step 0 is evaluated before training
    probes = sum(d is not None and d.probe for d in due)
    assert elbo >= 8 and probes >= 8, (elbo, probes)
    iwae = 1 + sum(d is not None and d.iwae for d in due)
    assert iwae >= 2 and due[-1].iwae


def test_paper_presets_follow_their_protocols(make_config) -> None:
    """discrete_vae: 200 Bernoulli latents, dynamic binarization, Adam 1e-4, batch 50, 1M steps,
    IWAE k=100, linear and nonlinear; categorical_vae: 20x10 categorical, tau0=1, r in
    {1e-5, 3e-5}, tau_min=0.5, every 1000 steps."""
    d = make_config("experiment=discrete_vae", return_hydra_config=True)
    assert (d.model.family, d.model.latent_dim, d.data.binarization) == (
        "bernoulli", 200, "dynamic",
    )  # fmt: skip
    assert (d.optim.lr, d.optim.batch_size, d.steps, d.eval.iwae_k) == (1e-4, 50, 10**6, 100)
    assert d.hydra.sweeper.params["model.arch"].replace(" ", "") == "linear,nonlinear"
    c = make_config("experiment=categorical_vae", return_hydra_config=True)
    assert (c.model.family, c.model.latent_dim, c.model.n_categories) == ("categorical", 20, 10)
    e = c.estimator
    assert (e.name, e.temperature, e.min_temperature, e.anneal_every) == (
        "gumbel_softmax", 1.0, 0.5, 1000,
    )  # fmt: skip
    assert c.hydra.sweeper.params["estimator.anneal_rate"].replace(" ", "") == "1e-5,3e-5"


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "slurm"])
def test_launcher_presets_compose(make_config, launcher: str) -> None:
    """hydra/launcher=<x> composes; the slurm preset is gradbench's subclass of submitit's
    SLURM launcher with partition, time, CPU, GPU and memory fields and requeues timed-out
    (resumable) jobs."""
    cfg = make_config(f"hydra/launcher={launcher}", return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    if launcher == "slurm":
        assert target.endswith("SlurmSweepLauncher")
        for key in ("partition", "timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb"):
            assert key in cfg.hydra.launcher
        assert cfg.hydra.launcher.max_num_timeout > 0


def test_default_output_dirs_are_under_results(make_config) -> None:
    """Single runs go to results/runs/<date>/<time>, sweeps to results/sweeps/<date>/<time>/<n>
    (``n`` from ``job_subdir``: the job's existing folder, else a new number)."""
    cfg = make_config(return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("results/runs/")
    assert cfg.hydra.sweep.dir.startswith("results/sweeps/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${job_subdir:${hydra.job.num}}"


@pytest.mark.parametrize(
    "overrides",
    [("stpes=3",), ("model.famly=gaussian",), ("estimator.tempreature=2",), ("optim.lr=fast",),
     ("estimator=gumbel_softmax", "estimator.straight_through=maybe"), ("seed=1.5",),
     ("eval.iwae_k=many",), ("estimator=reinforce", "estimator.anneal_rate=0.1")],
    ids=lambda v: " ".join(v),
)  # fmt: skip
def test_typos_and_wrong_types_fail_at_composition(make_config, overrides) -> None:
    """Misspelt keys, keys the chosen estimator does not have, and values of the wrong type
    are rejected when Hydra composes the config."""
    with pytest.raises(ConfigCompositionException):
        make_config(*overrides)


def test_unknown_group_option_lists_the_available_ones(make_config) -> None:
    """estimator=nope fails at composition with the list of available estimator configs."""
    with pytest.raises(MissingConfigException) as info:
        make_config("estimator=nope")
    assert all(name in str(info.value) for name in estimators.available())


def test_conf_dir_is_where_the_app_looks() -> None:
    """The Hydra app of benchmarks.train reads this conf/ directory."""
    from benchmarks.cli.train import CONF_DIR as APP_CONF_DIR

    assert Path(APP_CONF_DIR) == CONF_DIR


@pytest.mark.parametrize(
    ("override", "new"),
    [("variant=bernoulli_rloo", "pairing=bernoulli_rloo"),
     ("debug.kill_at_step=3", "faults.kill_at_step=3"),
     ("+debug.preempt_after=8", "faults.preempt_after=8"),
     ("optim.name=adam", "optim._target_=torch.optim.Adam")],
)  # fmt: skip
def test_renamed_keys_are_refused_naming_the_new_spelling(override: str, new: str) -> None:
    """The old spellings variant= and debug.* are refused with a message naming pairing= and
    faults.*; the new spellings and look-alikes (experiment=debug) pass."""
    assert new in renamed_override(override)
    assert renamed_override(new) is None
    assert renamed_override("experiment=debug") is None


def test_cli_refuses_a_renamed_key_in_one_line(monkeypatch, capsys) -> None:
    """gradbench-train debug.kill_at_step=3 exits 1 with one line naming faults.kill_at_step."""
    from benchmarks.cli import train as cli

    monkeypatch.setattr("sys.argv", ["gradbench-train", "debug.kill_at_step=3"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    assert "use faults.kill_at_step=3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.family=poisson", "model.family='poisson' is invalid; allowed: gaussian, bernoulli"),
     ("data.name=cifar", "data='cifar' is invalid; allowed: mnist_subset, digits"),
     ("model.arch=deep", "model.arch='deep' is invalid; allowed: linear, nonlinear"),
     ("model.kl=exact", "model.kl='exact' is invalid; allowed: analytic, sampled"),
     ("data.binarization=soft", "data.binarization='soft' is invalid; allowed: dynamic, static"),
     ("device=tpu", "device='tpu' is invalid; allowed: auto, cpu, cuda"),
     ("progress=maybe", "progress='maybe' is invalid; allowed: auto, true, false"),
     ("supervise=maybe", "supervise='maybe' is invalid; allowed: auto, true, false"),
     ("eval.splits=[val,dev]", "eval.splits='dev' is invalid; allowed: train, val, test"),
     ("optim._target_=torch.nn.Linear", "optim._target_='torch.nn.Linear' is invalid; allowed: "
      "a torch.optim.Optimizer class")],
)  # fmt: skip
def test_enumerated_values_are_checked_against_their_schema_field(
    make_config, override: str, message: str
) -> None:
    """A value outside a schema field's enumerated choices is a ConfigError naming the option,
    the value and the allowed ones (the choices live once, beside the field's default)."""
    with pytest.raises(ConfigError) as info:
        validate(make_config(override))
    assert message in str(info.value)


def test_optimizer_is_built_from_its_target(make_config) -> None:
    """optim is built by Hydra's instantiate from _target_ (torch.optim.Adam by default) with
    the schema's settings; make_optimizer returns (optimizer, fused). The class is the
    target's eager subclass (eager_optim: the same class without torch._dynamo's wrappers)."""
    import torch

    from benchmarks.harness.build import make_optimizer
    from benchmarks.harness.eager_optim import eager_optimizer

    cfg = make_config("optim.lr=0.01", "optim.fused=false")
    assert cfg.optim._target_ == "torch.optim.Adam"
    opt, fused = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optim)
    assert type(opt) is eager_optimizer(torch.optim.Adam) and fused is False
    assert isinstance(opt, torch.optim.Adam)
    assert (opt.defaults["lr"], tuple(opt.defaults["betas"]), opt.defaults["eps"]) == (
        0.01, (0.9, 0.999), 1e-8,
    )  # fmt: skip
    adamw, _ = make_optimizer(
        [torch.nn.Parameter(torch.zeros(2))],
        make_config("optim._target_=torch.optim.AdamW", "optim.fused=false").optim,
    )
    assert type(adamw) is eager_optimizer(torch.optim.AdamW)
    assert isinstance(adamw, torch.optim.AdamW)
