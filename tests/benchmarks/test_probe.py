"""The gradient variance probe: closed-form variances, bias against exact gradients, metric
definitions, and agreement of the batched computation with the naive loop."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal

import estimators
from benchmarks.harness.vae import VAE
from benchmarks.probe.moments import GroupedMoments, gradient_moments, gradient_moments_loop
from benchmarks.probe.reference import Reference, exact_reference, reference_gradient
from benchmarks.probe.runner import probe_basket, summarize
from benchmarks.records.runs import timing_rows
from tests.estimators.problems import z_critical

Z = z_critical(1e-3, 12)  # Bonferroni over the statistical comparisons of this module


class ToyModel(nn.Module):
    """A one-parameter 'encoder' w (x = 1): q = Normal(w, sigma) or Bernoulli(logits=w), and
    f(z) = z^2 (Gaussian) or (b - t)^2 (Bernoulli), so estimates have closed-form moments."""

    def __init__(self, family: str, w: float, sigma: float = 1.3, t: float = 0.35) -> None:
        super().__init__()
        self.family, self.sigma, self.t = family, sigma, t
        self.encoder = nn.Linear(1, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.encoder.weight.fill_(w)

    def distribution(self, out):
        base = (
            Normal(out, self.sigma)
            if self.family == "gaussian"
            else Bernoulli(logits=out, validate_args=False)
        )
        return Independent(base, 1)

    def learning_signal(self, x, q, kl):
        if self.family == "gaussian":
            return lambda z: (z**2).sum(-1)
        return lambda z: ((z - self.t) ** 2).sum(-1)


def _value(rows, metric, param="all"):
    return next(r["value"] for r in rows if r["metric"] == metric and r["param"] == param)


@pytest.mark.parametrize(
    ("family", "name", "closed_form"),
    [
        # mu = 0.7, sigma = 1.3: Var = 4 sigma^2 (reparam); mu^4/s^2 + 14 mu^2 + 15 s^2
        ("gaussian", "reparam", 4 * 1.3**2),
        ("gaussian", "reinforce", 0.7**4 / 1.3**2 + 14 * 0.7**2 + 15 * 1.3**2),
        # p = sigmoid(0.4): g = f(b)(b - p) takes (1-t)^2 (1-p) w.p. p and -t^2 p w.p. 1-p
        ("bernoulli", "reinforce", None),
    ],
)
def test_probe_variance_equals_closed_form(family, name, closed_form) -> None:
    """grad_var of M = 20000 probe estimates equals the closed-form variance within z * SE
    (jackknife SE), and the jackknife SE agrees with the closed-form SE within 30%."""
    torch.manual_seed(0)
    w = 0.7 if family == "gaussian" else 0.4
    model = ToyModel(family, w)
    if closed_form is None:
        p, t = 1 / (1 + math.exp(-w)), model.t
        g1, g0 = (1 - t) ** 2 * (1 - p), -(t**2) * p
        mean = p * g1 + (1 - p) * g0
        closed_form = p * g1**2 + (1 - p) * g0**2 - mean**2
    x = torch.ones(1, 1, dtype=torch.float64)
    moments = gradient_moments(model, x, estimators.get(name), 20_000, chunk=5000)
    rows = summarize(moments, None)
    var, se = _value(rows, "grad_var"), _value(rows, "grad_var_se")
    assert abs(var - closed_form) <= Z * se, (var, closed_form, se)
    assert _value(rows, "grad_var_total") == pytest.approx(var)


def _tiny_vae(family="bernoulli", latent=3, seed=0):
    torch.manual_seed(seed)
    model = VAE(data_dim=6, family=family, arch="linear", latent_dim=latent, n_categories=3)
    model.double()
    x = (torch.rand(4, 6, dtype=torch.float64) < 0.5).double()
    return model, x


@pytest.mark.parametrize("name", ["reinforce", "rloo"])
def test_bias_of_unbiased_estimators_is_statistically_zero(name) -> None:
    """Against the exact (enumerated) reference, an unbiased estimator's debiased squared bias
    is within z * SE of 0."""
    model, x = _tiny_vae()
    ref = exact_reference(model, x)
    torch.manual_seed(1)
    moments = gradient_moments(model, x, estimators.get(name), 4000, chunk=1000)
    rows = summarize(moments, ref)
    assert abs(_value(rows, "grad_bias2")) <= Z * _value(rows, "grad_bias2_se")


def test_bias_of_gumbel_softmax_is_detected() -> None:
    """Negative control: relaxed Gumbel-softmax at temperature 1 shows a squared bias more
    than z * SE above 0 on the same problem."""
    model, x = _tiny_vae()
    ref = exact_reference(model, x)
    torch.manual_seed(1)
    est = estimators.get("gumbel_softmax", temperature=1.0)
    rows = summarize(gradient_moments(model, x, est, 4000, chunk=1000), ref)
    assert _value(rows, "grad_bias2") > Z * _value(rows, "grad_bias2_se")


def test_snr_cosine_variance_definitions_on_constructed_gradients() -> None:
    """summarize() computes var, total var, SNR = mean |mean|/std, cosine and MSE = var + bias2
    exactly as defined, on a hand-made matrix of estimates (2 tensors, 3 coordinates)."""
    g = torch.tensor(
        [[1.0, 2.0, 0.0], [3.0, 2.5, 1.0], [2.0, 1.0, -1.0], [0.0, 4.0, 2.0]] * 10,
        dtype=torch.float64,
    )
    groups = 4
    ids = torch.arange(g.shape[0]) % groups
    sums = torch.zeros(groups, 3, dtype=torch.float64).index_add_(0, ids, g)
    sumsqs = torch.zeros(groups, 3, dtype=torch.float64).index_add_(0, ids, g**2)
    counts = torch.full((groups,), 10.0, dtype=torch.float64)
    moments = GroupedMoments(["a", "b"], [2, 1], sums, sumsqs, counts, f_evals=3)
    ref_vec = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)

    ref = Reference(ref_vec, torch.zeros(3, dtype=torch.float64), "exact")
    rows = summarize(moments, ref)
    mean, var = g.mean(0), g.var(0)
    n = g.shape[0]
    assert _value(rows, "grad_var") == pytest.approx(float(var.mean()))
    assert _value(rows, "grad_var_total") == pytest.approx(float(var.sum()))
    assert _value(rows, "grad_var_per_feval") == pytest.approx(3 * float(var.mean()))
    assert _value(rows, "grad_snr") == pytest.approx(float((mean.abs() / var.sqrt()).mean()))
    cos = float(mean @ ref_vec / (mean.norm() * ref_vec.norm()))
    assert _value(rows, "grad_cos") == pytest.approx(cos)
    bias2 = float(((mean - ref_vec) ** 2 - var / n).mean())
    assert _value(rows, "grad_bias2") == pytest.approx(bias2)
    assert _value(rows, "grad_mse") == pytest.approx(bias2 + float(var.mean()))
    assert _value(rows, "grad_var", "a") == pytest.approx(float(var[:2].mean()))
    assert _value(rows, "grad_var", "b") == pytest.approx(float(var[2]))


@pytest.mark.parametrize(
    ("family", "name"), [("bernoulli", "reinforce"), ("categorical", "gumbel_softmax")]
)
def test_batched_probe_agrees_with_naive_loop(family, name) -> None:
    """The batched estimates have the same mean (per coordinate, within z * SE) and the same
    grad_var (within z * jackknife SE) as one full forward/backward pass per estimate."""
    torch.set_num_threads(1)  # thousands of tiny steps: threads only add contention
    model, x = _tiny_vae(family, latent=2)
    est = estimators.get(name)
    torch.manual_seed(2)
    batched = gradient_moments(model, x, est, 2000, chunk=1000)
    torch.manual_seed(3)
    loop = gradient_moments_loop(model, x, est, 2000)
    (mb, vb, nb), (ml, vl, nl) = batched.leave_one_out(), loop.leave_one_out()
    z = z_critical(1e-3, mb.shape[1])
    se = (vb[0] / nb[0] + vl[0] / nl[0]).sqrt().clamp_min(1e-12)
    assert ((mb[0] - ml[0]).abs() / se).max() <= z
    rb, rl = summarize(batched, None), summarize(loop, None)
    se_var = math.hypot(_value(rb, "grad_var_se"), _value(rl, "grad_var_se"))
    assert abs(_value(rb, "grad_var") - _value(rl, "grad_var")) <= Z * se_var


def test_batched_probe_tells_its_copy_that_the_objective_is_not_read(monkeypatch) -> None:
    """The batched probe calls its copy of the estimator with ``objective_wanted = False``
    (Gumbel-softmax then evaluates ``f`` once per estimate, not twice) and leaves the
    caller's estimator as it was; the loop, the naive reference, keeps the full call."""
    model, x = _tiny_vae()
    est = estimators.get("gumbel_softmax")
    seen = []
    original = type(est).estimate

    def spy(self, *args, **kwargs):
        seen.append(self.objective_wanted)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(est), "estimate", spy)
    calls = []
    signal = model.learning_signal

    def counted_signal(*args):
        f = signal(*args)
        return lambda z: calls.append(1) or f(z)

    monkeypatch.setattr(model, "learning_signal", counted_signal)
    moments = gradient_moments(model, x, est, 40, chunk=20)
    assert seen == [False, False] and len(calls) == 2 and moments.f_evals == 2
    assert est.objective_wanted is True
    seen.clear()
    calls.clear()
    gradient_moments_loop(model, x, est, 40)
    assert seen == [True] * 40 and len(calls) == 80


PATHWISE = [
    ("reparam", {}, "gaussian"),
    ("gumbel_softmax", {}, "bernoulli"),
    ("gumbel_softmax", {"straight_through": True}, "categorical"),
    ("straight_through", {}, "bernoulli"),
    ("gumbel_rao", {}, "categorical"),
]


@pytest.mark.parametrize(("name", "options", "family"), PATHWISE)
@pytest.mark.parametrize("kl", ["analytic", "sampled"])
def test_pathwise_estimators_skip_the_likelihoods_values_when_the_objective_is_not_read(
    name, options, family, kl, monkeypatch
) -> None:
    """Through the VAE's learning signal, a pathwise estimator (surrogate ``mean_s f(z_s)``)
    told that its objective is not read computes no likelihood value (``f.gradient_only``)
    and returns a NaN objective, with the same surrogate gradient in every model parameter
    bit for bit, the same ``f_evals`` and the same next draw as the full call."""
    model, x = _tiny_vae(family)
    est = estimators.get(name, **options)
    valued = []
    likelihood = model.log_likelihood

    def counted(x, z, detached=False, values=True):
        valued.append(values)
        return likelihood(x, z, detached) if values else likelihood(x, z, detached, values)

    monkeypatch.setattr(model, "log_likelihood", counted)
    results = []
    for wanted in (True, False):
        est.objective_wanted = wanted
        valued.clear()
        torch.manual_seed(5)
        q = model.encode(x)
        out = est(q, model.learning_signal(x, q, kl), num_samples=3)
        grads = torch.autograd.grad(out.surrogate.sum(), list(model.parameters()))
        results.append((out, grads, torch.rand(1), any(valued)))
    (full, grads_full, next_full, values_full), (lean, grads_lean, next_lean, values_lean) = (
        results
    )
    assert values_full and not values_lean
    assert torch.isnan(lean.objective).all() and lean.objective.shape == full.objective.shape
    assert torch.isfinite(full.objective).all()
    assert all(torch.equal(a, b) for a, b in zip(grads_full, grads_lean, strict=True))
    assert lean.f_evals == full.f_evals and torch.equal(next_lean, next_full)


def test_batched_probe_is_exact_when_estimates_are_deterministic() -> None:
    """With (numerically) deterministic latents every estimate equals the one gradient of the
    naive pass: the batched VJP reproduces it to float precision and has zero variance."""
    model, x = _tiny_vae()
    with torch.no_grad():
        model.encoder[0].bias.fill_(40.0)  # p(b = 1) = 1 - 4e-18: the sample is always 1
    est = estimators.get("reinforce")
    batched = gradient_moments(model, x, est, 40, chunk=7)
    loop = gradient_moments_loop(model, x, est, 40)
    mb, vb, _ = batched.leave_one_out()
    ml, _, _ = loop.leave_one_out()
    assert torch.allclose(mb[0], ml[0], atol=1e-10)
    assert float(vb[0].max()) < 1e-20


@pytest.mark.parametrize("square_rows", [1, 16])
@pytest.mark.parametrize("arch", ["linear", "nonlinear"])
def test_batched_probe_is_exact_for_every_encoder_layer(monkeypatch, arch, square_rows) -> None:
    """With deterministic latents the batched probe's mean equals the naive pass's gradient
    for every encoder parameter (the last linear layer's moments summed from ``delta`` a few
    rows at a time, the earlier layers' by the batched VJP) and its variance is 0; on
    non-deterministic latents both give the same per-coordinate means within z * SE."""
    import benchmarks.probe.moments as moments_module

    monkeypatch.setattr(moments_module, "SQUARE_ROWS", square_rows)
    torch.manual_seed(0)
    model = VAE(data_dim=6, family="bernoulli", arch=arch, latent_dim=3, hidden_dim=5).double()
    x = (torch.rand(4, 6, dtype=torch.float64) < 0.5).double()
    with torch.no_grad():
        model.encoder[-1].bias.fill_(40.0)  # every sample is 1: every estimate is the same
    est = estimators.get("reinforce")
    mb, vb, _ = gradient_moments(model, x, est, 40, chunk=7).leave_one_out()
    ml, _, _ = gradient_moments_loop(model, x, est, 40).leave_one_out()
    assert torch.allclose(mb[0], ml[0], atol=1e-10)
    assert float(vb[0].max()) < 1e-20
    with torch.no_grad():
        model.encoder[-1].bias.zero_()
    torch.manual_seed(1)
    batched = gradient_moments(model, x, est, 1000, chunk=300)
    torch.manual_seed(2)
    loop = gradient_moments_loop(model, x, est, 1000)
    (mb, vb, nb), (ml, vl, nl) = batched.leave_one_out(), loop.leave_one_out()
    se = (vb[0] / nb[0] + vl[0] / nl[0]).sqrt().clamp_min(1e-12)
    assert ((mb[0] - ml[0]).abs() / se).max() <= z_critical(1e-3 / 4, mb.shape[1])


def test_probe_basket_labels_rows_and_skips_bias_for_other_objectives() -> None:
    """probe_basket returns labelled rows for each estimator and parameter tensor, a reference
    row, and no bias rows for estimators of another objective (VIMCO's IWAE bound)."""
    model, x = _tiny_vae()
    ref = reference_gradient(model, x)
    assert ref.kind == "exact"
    basket = [("reinforce", estimators.get("reinforce")), ("rloo (S=2)", estimators.get("rloo"))]
    if "vimco" in estimators.available():
        basket.append(("vimco", estimators.get("vimco")))
    rows = probe_basket(model, x, basket, num_estimates=40, reference=ref, chunk=20)
    labels = {r["probe_estimator"] for r in rows}
    assert {"reinforce", "rloo (S=2)", "reference:exact"} <= labels
    params = {r["param"] for r in rows if r["probe_estimator"] == "reinforce"}
    assert params == {"all", "encoder.0.weight", "encoder.0.bias"}
    assert all(math.isfinite(r["value"]) for r in rows)
    if "vimco" in estimators.available():
        assert not any(r["probe_estimator"] == "vimco" and "bias" in r["metric"] for r in rows)


def test_monte_carlo_reference_carries_its_standard_error() -> None:
    """Without enumeration the reference is a many-sample rloo estimate with a positive SE."""
    model, x = _tiny_vae(latent=3)
    torch.manual_seed(4)
    ref = reference_gradient(model, x, method="rloo", num_samples=20, num_estimates=40, chunk=20)
    assert ref.kind == "rloo(S=20)" and float(ref.se.max()) > 0 and ref.moments is not None
    exact = exact_reference(model, x)
    noisy = ref.se > 0  # weights of pixels that are 0 in every example get exactly 0
    assert torch.equal(ref.mean[~noisy], exact.mean[~noisy])
    z = ((ref.mean - exact.mean)[noisy] / ref.se[noisy]).abs().max()
    assert z <= z_critical(1e-3, int(noisy.sum()))


# --------------------------------------------------------------------- probing during training


def _run(make_config, tmp_path, name, *overrides):
    from benchmarks.harness.train import run

    run_dir = tmp_path / name
    run(make_config("experiment=debug", *overrides), run_dir)
    return pd.read_parquet(run_dir / "metrics.parquet")


PROBE = ("probe.every=10", "probe.num_estimates=40", "probe.basket=[reinforce,rloo]")


def test_training_probe_writes_labelled_rows_with_standard_errors(make_config, tmp_path):
    """probe.every makes a run write split=probe rows for its own estimator and the basket at
    every probe step, per parameter tensor and overall, each metric with its _se row, a bias
    against the exact reference (8 latent bits), and train/grad_var_ema at logging steps."""
    df = _run(make_config, tmp_path, "a", "estimator=gumbel_softmax", *PROBE)
    probe = df[df["split"] == "probe"]
    assert set(probe["step"]) == {10, 20}
    labels = set(probe["probe_estimator"])
    assert {"gumbel_softmax (τ=1)", "reinforce (none)", "rloo (S=2)", "reference:exact"} <= labels
    overall = probe[(probe["param"] == "all") & (probe["probe_estimator"] == "rloo (S=2)")]
    for metric in ("grad_var", "grad_var_total", "grad_var_per_feval", "grad_snr",
                   "grad_bias2", "grad_mse", "grad_cos"):  # fmt: skip
        assert {metric, f"{metric}_se"} <= set(overall["metric"]), metric
    assert {"encoder.0.weight", "encoder.0.bias"} <= set(probe["param"])
    assert probe["value"].notna().all()
    ema = df[df["metric"] == "grad_var_ema"]
    assert len(ema) == 4 and (ema["value"] > 0).all()


def test_probing_does_not_change_the_training_trajectory(make_config, tmp_path):
    """Probing draws from its own RNG stream: every non-probe metric of a probed run equals
    that of the same run without probing."""

    def comparable(df):
        df = df[(df["split"] != "probe") & ~timing_rows(df)]
        df = df[df["metric"] != "grad_var_ema"]
        return df[["step", "split", "metric", "value"]].sort_values(["step", "split", "metric"])

    plain = _run(make_config, tmp_path, "plain")
    probed = _run(make_config, tmp_path, "probed", *PROBE)
    pd.testing.assert_frame_equal(
        comparable(plain).reset_index(drop=True), comparable(probed).reset_index(drop=True)
    )


def test_resumed_probed_run_matches_uninterrupted(make_config, tmp_path):
    """A probed run stopped at step 10 and extended to 20 gives the same probe rows and
    grad_var_ema as an uninterrupted 20-step run (the EMA is checkpointed)."""
    from benchmarks.harness.train import run

    whole = _run(make_config, tmp_path, "whole", *PROBE)
    run_dir = tmp_path / "split"
    run(make_config("experiment=debug", "steps=10", *PROBE), run_dir)
    run(make_config("experiment=debug", "steps=20", *PROBE), run_dir)
    split = pd.read_parquet(run_dir / "metrics.parquet")

    def comparable(df):
        df = df[(df["split"] == "probe") | (df["metric"] == "grad_var_ema")]
        df = df[df["metric"] != "seconds"]
        cols = ["step", "probe_estimator", "param", "metric", "value"]
        return df[cols].sort_values(cols[:-1]).reset_index(drop=True)

    pd.testing.assert_frame_equal(comparable(whole), comparable(split))


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("probe.basket=[reinfroce]", r"probe.basket\[0\].*allowed: .*reinforce"),
        ("probe.basket=[reparam]", r"probe.basket\[0\].*model.family='bernoulli'.*allowed"),
        ("probe.basket=[{name:rloo,num_samples:1}]", r"probe.basket\[0\].*num_samples=1"),
        ("probe.num_estimates=10", r"probe.num_estimates.*>= 2 \* probe.groups"),
        ("probe.reference=median", r"probe.reference.*auto, exact, none"),
        ("probe.ema_decay=1.0", r"probe.ema_decay.*\[0, 1\)"),
    ],
)
def test_invalid_probe_configs_fail_before_training(make_config, tmp_path, override, pattern):
    """Bad probe options raise a ConfigError naming the option and the allowed values, and
    leave no metrics file."""
    from benchmarks.harness.train import run
    from benchmarks.harness.validate import ConfigError

    with pytest.raises(ConfigError, match=pattern):
        run(make_config("experiment=debug", "probe.every=10", override), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.parquet").exists()


def test_trajectory_probe_cli_probes_every_snapshot(make_config, tmp_path, capsys):
    """gradbench-probe measures every basket estimator at every model snapshot of one run
    (the shared trajectory), writes tidy rows beside the run's metrics and prints a ranking
    table; the report then reads those rows; a run without snapshots is a clear error."""
    from benchmarks.cli.probe import main
    from benchmarks.harness.train import run
    from benchmarks.report import load_records

    run_dir = tmp_path / "traj"
    run(make_config("experiment=debug", "snapshot_every=10"), run_dir)
    code = main([str(run_dir), "--estimators", "reinforce:baseline=moving_average", "rloo",
                 "--num-estimates", "40"])  # fmt: skip
    assert code == 0
    rows = pd.read_parquet(run_dir / "probe_trajectory.parquet")
    assert set(rows["step"]) == {0, 10, 20}
    assert {"reinforce (moving_average)", "rloo (S=2)"} <= set(rows["probe_estimator"])
    assert "grad_var_per_feval / best" in capsys.readouterr().out
    metrics, _ = load_records([run_dir])
    assert (metrics["split"] == "probe").any()
    other = tmp_path / "plain"
    run(make_config("experiment=debug"), other)
    assert main([str(other), "--estimators", "rloo"]) == 2
    assert "snapshot_every" in capsys.readouterr().err


def _unbiased_bernoulli_estimators() -> list[str]:
    names = []
    for name in estimators.supporting("bernoulli"):
        est = estimators.get(name)
        if est.unbiased and est.objective_kind == "mean":
            names.append(name)
    return names


@pytest.mark.parametrize("name", _unbiased_bernoulli_estimators())
def test_unbiased_estimators_match_exact_gradient_on_the_synthetic_vae(name) -> None:
    """On a VAE of the synthetic data set (64 binary pixels from the fixed sigmoid belief
    network) with 6 Bernoulli latents (64 configurations, enumerated), the mean of M
    estimates of every unbiased estimator equals the exact encoder gradient per coordinate
    within z * SE (Bonferroni over coordinates and estimators, family-wise rate 1e-3)."""
    from benchmarks.data.datasets import load_dataset

    torch.manual_seed(5)
    data = load_dataset("synthetic")
    model = VAE(data_dim=64, family="bernoulli", arch="linear", latent_dim=6).double()
    x = data.train[:8].double()
    ref = exact_reference(model, x)
    moments = gradient_moments(model, x, estimators.get(name), 4000, chunk=1000)
    mean, var, n = moments.leave_one_out()
    se = (var[0] / n[0]).sqrt()
    noisy = se > 0
    z = z_critical(1e-3 / len(_unbiased_bernoulli_estimators()), int(noisy.sum()))
    assert (((mean[0] - ref.mean)[noisy] / se[noisy]).abs() <= z).all()
    assert torch.allclose(mean[0][~noisy], ref.mean[~noisy], atol=1e-10)


# ------------------------------------------------------- gradbench-probe: arguments, outputs


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory: pytest.TempPathFactory):
    """A debug run with model snapshots at steps 0 and 10, and a probe_trajectory.parquet
    that stands for the result of an earlier probe (its bytes must survive failures)."""
    from hydra import compose, initialize_config_dir

    import benchmarks.harness.config  # noqa: F401  (registers the schemas)
    from benchmarks.harness.train import run
    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=debug", "steps=10", "snapshot_every=10"])
    run_dir = tmp_path_factory.mktemp("snapshots") / "run"
    run(cfg, run_dir)
    return run_dir


def test_trajectory_probe_cli_gives_the_same_rows_twice(snapshot_run, tmp_path) -> None:
    """The same gradbench-probe command twice gives identical rows whatever the global random
    state before it, for an estimator whose moving-average baseline is warmed up at each
    snapshot (the warm-up draws from a stream of its own, seeded by --seed and the step)."""
    import shutil

    from benchmarks.cli.probe import main

    frames = []
    for before in (1, 2):
        run_dir = tmp_path / f"copy{before}"
        shutil.copytree(snapshot_run, run_dir)
        torch.manual_seed(before)
        args = ["--estimators", "reinforce:baseline=moving_average", "--num-estimates", "40"]
        assert main([str(run_dir), *args]) == 0
        frames.append(pd.read_parquet(run_dir / "probe_trajectory.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1])


def _probe_cli(run_dir, *args: str) -> int:
    from benchmarks.cli.probe import main

    return main([str(run_dir), "--estimators", "rloo", "--num-estimates", "40", *args])


EARLIER = b"an earlier, complete probe result"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--groups", "1"], r"--groups=1 is invalid; allowed: an integer >= 2"),
        (["--seed", "-1"], r"--seed=-1 is invalid; allowed: an integer >= 0"),
        (["--groups", "30"], r"--num-estimates=40 is invalid; allowed: .* >= 2 \* --groups = 60"),
        (["--chunk", "0"], r"--chunk=0 is invalid; allowed: an integer >= 1"),
        (["--reference-samples", "0"], r"--reference-samples=0 is invalid; allowed: >= 1"),
        (["--reference", "rloo", "--reference-samples", "1"], r"--reference-samples=1 .*rloo"),
        (["--reference-estimates", "5"], r"--reference-estimates=5 is invalid; allowed: .*40"),
        (["--reference", "median"], r"--reference=median is invalid; allowed: auto, exact, none"),
        (["--device", "cuda"], r"--device=cuda: CUDA is not available here; allowed: cpu"),
        (["--device", "gpu0"], r"--device=gpu0 is invalid; allowed: cpu, cuda, cuda:N"),
    ],
)
def test_invalid_probe_arguments_are_refused_before_any_work(
    snapshot_run, monkeypatch, capsys, args, says
) -> None:
    """An invalid option: exit 2 with one line naming the option and the allowed values, no
    traceback, and the existing probe_trajectory.parquet left as it was."""
    import benchmarks.cli.probe
    import benchmarks.probe.runner

    def no_work(*_args, **_kwargs):
        raise AssertionError("probing started despite an invalid option")

    monkeypatch.setattr(benchmarks.probe.runner, "gradient_moments", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on GPU machines
    out = snapshot_run / "probe_trajectory.parquet"
    out.write_bytes(EARLIER)
    assert _probe_cli(snapshot_run, *args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(says, err), err
    assert out.read_bytes() == EARLIER


def test_probe_output_is_replaced_only_by_a_complete_result(snapshot_run, monkeypatch) -> None:
    """When anything fails after probing (here: the ranking table), the earlier
    probe_trajectory.parquet is untouched; a successful probe then replaces it."""
    import benchmarks.probe

    out = snapshot_run / "probe_trajectory.parquet"
    out.write_bytes(EARLIER)
    ranking = benchmarks.cli.probe.ranking_table

    def broken(*_args, **_kwargs):
        raise RuntimeError("ranking failed")

    monkeypatch.setattr(benchmarks.cli.probe, "ranking_table", broken)
    with pytest.raises(RuntimeError, match="ranking failed"):
        _probe_cli(snapshot_run)
    assert out.read_bytes() == EARLIER
    monkeypatch.setattr(benchmarks.cli.probe, "ranking_table", ranking)
    assert _probe_cli(snapshot_run) == 0
    rows = pd.read_parquet(out)
    assert set(rows["step"]) == {0, 10} and rows["value"].notna().all()


@pytest.mark.parametrize("damage", ["snapshot", "config"])
def test_damaged_run_records_are_a_one_line_probe_error(snapshot_run, tmp_path, capsys, damage):
    """A truncated snapshot or a run.json whose config is not a run's: exit 2 with one line
    naming the file, and the earlier probe output untouched."""
    import json
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(snapshot_run, run_dir)
    (run_dir / "probe_trajectory.parquet").write_bytes(EARLIER)
    if damage == "snapshot":
        bad = sorted((run_dir / "snapshots").glob("step_*.pt"))[-1]
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = run_dir / "run.json"
        bad.write_text(json.dumps({**json.loads(bad.read_text()), "config": {"seed": 0}}))
    assert _probe_cli(run_dir) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err, err
    assert (run_dir / "probe_trajectory.parquet").read_bytes() == EARLIER
