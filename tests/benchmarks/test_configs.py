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
from benchmarks.harness.config import HARNESS_ESTIMATOR_KEYS, estimator_schema
from benchmarks.harness.vae import VAE
from benchmarks.harness.validate import validate
from tests.conftest import CONF_DIR

GROUPS = ("estimator", "model", "data", "optim", "probe", "experiment", "variant")


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
        extra = [f"estimator={'reparam' if option == 'gaussian' else 'reinforce'}"]
    cfg = make_config(f"{group}={option}", *extra, return_hydra_config=True)
    _build(cfg)
    params = cfg.hydra.sweeper.params
    for job in _sweep_jobs(OmegaConf.to_container(params)) if params else []:
        _build(make_config(f"{group}={option}", *job))


def test_every_registered_estimator_has_a_config_file_listing_all_its_options() -> None:
    """Registry name = config file name: conf/estimator/<name>.yaml exists for every registered
    estimator and sets exactly the keys of its schema (name, label, each option and, for a
    temperature buffer, the schedule keys), so every option is documented."""
    for name in estimators.available():
        path = CONF_DIR / "estimator" / f"{name}.yaml"
        assert path.is_file(), f"missing {path}"
        keys = set(yaml.safe_load(path.read_text())) - {"defaults"}
        schema = set(OmegaConf.structured(estimator_schema(name)))
        assert keys == schema, f"{path.name}: {sorted(keys ^ schema)}"
        assert yaml.safe_load(path.read_text())["name"] == name
        assert set(HARNESS_ESTIMATOR_KEYS) <= keys


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
    """hydra/launcher=<x> composes; the slurm preset is submitit's SLURM launcher with
    partition, time, CPU, GPU and memory fields and requeues timed-out (resumable) jobs."""
    cfg = make_config(f"hydra/launcher={launcher}", return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    if launcher == "slurm":
        assert target.endswith("SlurmLauncher")
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
