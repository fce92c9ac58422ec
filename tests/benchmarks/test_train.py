"""Training runs: dev runs of every estimator x family, records, resume, faults, validation.

Fast tests call :func:`benchmarks.harness.train.run` in-process on the ``debug`` preset (synthetic
8x8 data, 20 steps). Tests that start ``python -m benchmarks.train`` in a subprocess are marked
slow, except one smoke run and one invalid-config exit code.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import estimators
from benchmarks.harness import checkpoint
from benchmarks.harness.build import estimator_label, temperature_schedule
from benchmarks.harness.schedules import TemperatureSchedule
from benchmarks.harness.train import run
from benchmarks.harness.validate import ConfigError, validate
from benchmarks.records.runs import COLUMNS, timing_rows

REPO = Path(__file__).resolve().parents[2]
MODEL_OF_FAMILY = {"gaussian": "gaussian", "bernoulli": "bernoulli", "categorical": "categorical"}
PAIRS = [(e, f) for e in estimators.available() for f in sorted(estimators.families(e))]
#: Estimators whose objective is the multi-sample bound (f must be log weights).
IWAE_KIND = [e for e in estimators.available() if estimators.get(e).objective_kind == "iwae"]
#: Metric rows every completed debug run has (split/metric), besides train/<objective>.
EXPECTED_METRICS = {
    "train/loss", "val/elbo", "val/iwae", "test/elbo", "test/iwae",
    "throughput/steps_per_s", "throughput/examples_per_s", "throughput/f_evals_per_s",
}  # fmt: skip


def _metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that do not depend on wall time, in a canonical order."""
    df = df[~timing_rows(df)]
    cols = ["step", "f_evals", "split", "metric", "value"]
    return df[cols].sort_values(["step", "split", "metric"]).reset_index(drop=True)


def _cli(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks.train ARGS` (or the `gradbench-train` console script)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CI", None)
    command = [str(Path(sys.executable).with_name("gradbench-train"))] if script else [
        sys.executable, "-m", "benchmarks.train"]  # fmt: skip
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


# ------------------------------------------------------------------------------ dev runs


@pytest.mark.parametrize(("name", "family"), PAIRS, ids=[f"{e}-{f}" for e, f in PAIRS])
def test_dev_run_of_each_estimator_and_family_completes_with_complete_records(
    make_config, tmp_path: Path, name: str, family: str
) -> None:
    """A 12-step debug run of every registered estimator x supported family completes:
    run.json says completed with identity fields; metrics.parquet has every column, the
    expected metrics (train/elbo, or train/iwae for IWAE-objective estimators, which run with
    model.kl=sampled), no NaN, non-decreasing f_evals; no temporary files remain; the
    checkpoint loads with weights_only=True."""
    kl = "sampled" if name in IWAE_KIND else "analytic"
    cfg = make_config(
        "experiment=debug", f"estimator={name}", f"model={MODEL_OF_FAMILY[family]}",
        f"model.kl={kl}", "steps=12", "checkpoint_every=6",
    )  # fmt: skip
    assert run(cfg, tmp_path) == "completed"
    rec = _record(tmp_path)
    assert rec["status"] == "completed" and rec["last_step"] == 12
    assert (rec["estimator"], rec["family"], rec["dataset"]) == (name, family, "synthetic")
    for key in ("run_id", "estimator_label", "model", "seed", "device", "config", "versions",
                "git_commit", "git_dirty", "start_time", "end_time", "cpu_malloc"):  # fmt: skip
        assert key in rec
    df = _metrics(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert not df.isna().any().any()
    objective = "train/iwae" if name in IWAE_KIND else "train/elbo"
    assert set(df["split"] + "/" + df["metric"]) >= {*EXPECTED_METRICS, objective}
    assert (df["run_id"] == rec["run_id"]).all()
    assert (df["estimator_label"] == rec["estimator_label"]).all()
    assert df.sort_values("step")["f_evals"].is_monotonic_increasing
    assert not list(tmp_path.glob(".*.tmp"))
    state = torch.load(tmp_path / checkpoint.CHECKPOINT, weights_only=True)
    assert state["step"] == 12


def test_f_evals_count_the_estimators_f_evaluations_per_example(make_config, tmp_path) -> None:
    """f_evals is cumulative per example: rloo with S=3 makes 3 per step."""
    cfg = make_config("experiment=debug", "estimator=rloo", "estimator.num_samples=3", "steps=10")
    run(cfg, tmp_path)
    df = _metrics(tmp_path)
    last = df[df["step"] == 10]
    assert (last["f_evals"] == 30).all()
    assert _record(tmp_path)["estimator_label"] == "rloo (S=3)"


def test_temperature_schedule_is_applied_and_logged(make_config, tmp_path) -> None:
    """gumbel_softmax with anneal_rate > 0 logs train/temperature = max(min, tau0 e^{-r t})
    updated every anneal_every steps, and the label shows the annealing."""
    cfg = make_config(
        "experiment=debug", "estimator=gumbel_softmax", "estimator.anneal_rate=0.05",
        "estimator.anneal_every=5", "estimator.min_temperature=0.5", "steps=20",
    )  # fmt: skip
    run(cfg, tmp_path)
    df = _metrics(tmp_path)
    temps = df[df["metric"] == "temperature"].set_index("step")["value"]
    sched = TemperatureSchedule(1.0, rate=0.05, minimum=0.5, every=5)
    for step, value in temps.items():
        assert value == pytest.approx(sched(step - 1))
    assert temps.is_monotonic_decreasing and temps.iloc[-1] < 1.0
    assert _record(tmp_path)["estimator_label"] == "gumbel_softmax (τ=1→0.5)"


def test_temperature_schedule_follows_jang_et_al() -> None:
    """tau(t) = max(tau_min, tau0 exp(-r N floor(t/N))): constant within N steps, floored."""
    s = TemperatureSchedule(1.0, rate=3e-5, minimum=0.5, every=1000)
    assert s(0) == s(999) == 1.0
    assert s(1000) == pytest.approx(math.exp(-0.03))
    assert s(20_500) == pytest.approx(math.exp(-0.6))
    assert s(10**6) == 0.5
    assert TemperatureSchedule(2.0).active is False and TemperatureSchedule(2.0)(10**6) == 2.0


def test_estimator_labels_tell_configurations_apart(make_config) -> None:
    """Labels: reinforce (moving_average), rloo (S=2), gumbel_softmax (τ=1) and (ST, τ=1),
    reparam; estimator.label overrides them."""
    cases = {
        ("estimator=reinforce",): "reinforce (moving_average)",
        ("estimator=rloo",): "rloo (S=2)",
        ("estimator=gumbel_softmax",): "gumbel_softmax (τ=1)",
        (
            "estimator=gumbel_softmax",
            "estimator.straight_through=true",
        ): "gumbel_softmax (ST, τ=1)",
        ("estimator=reparam", "model=gaussian"): "reparam",
        ("estimator=reinforce", "estimator.decay=0.9"): "reinforce (moving_average, decay=0.9)",
        ("estimator=rloo", "estimator.label=mine"): "mine",
    }
    for overrides, label in cases.items():
        est = dict(make_config(*overrides).estimator)
        assert estimator_label(est, temperature_schedule(est)) == label


# ------------------------------------------------------------------------------ resume


def test_resume_after_a_failure_continues_from_the_checkpoint_with_identical_metrics(
    make_config, tmp_path
) -> None:
    """A run that fails at step 15 (checkpoint at 10) and is re-run without the fault resumes
    from step 10 and ends with metric values identical to an uninterrupted run."""
    common = ("experiment=debug", "estimator=reinforce", "steps=20", "checkpoint_every=10")
    with pytest.raises(RuntimeError, match="fail_at_step=15"):
        run(make_config(*common, "faults.fail_at_step=15"), tmp_path / "a")
    assert _record(tmp_path / "a")["status"] == "failed"
    assert _metrics(tmp_path / "a")["step"].max() == 10  # the file ends at the checkpoint
    torch.manual_seed(12345)  # the resumed run must not depend on the process's RNG state
    assert run(make_config(*common), tmp_path / "a") == "completed"
    assert run(make_config(*common), tmp_path / "b") == "completed"
    rec = _record(tmp_path / "a")
    assert rec["resumed_from"] == [10] and rec["status"] == "completed"
    pd.testing.assert_frame_equal(
        _comparable(_metrics(tmp_path / "a")), _comparable(_metrics(tmp_path / "b"))
    )


def test_completed_run_is_skipped_and_a_longer_run_extends_it(make_config, tmp_path) -> None:
    """Re-running a completed run does nothing; raising steps resumes it to the new end."""
    run(make_config("experiment=debug", "steps=10"), tmp_path)
    before = (tmp_path / "metrics.parquet").stat().st_mtime_ns
    assert run(make_config("experiment=debug", "steps=10"), tmp_path) == "completed"
    assert (tmp_path / "metrics.parquet").stat().st_mtime_ns == before
    assert run(make_config("experiment=debug", "steps=20"), tmp_path) == "completed"
    assert _record(tmp_path)["last_step"] == 20
    assert _metrics(tmp_path)["step"].max() == 20


def test_a_different_config_in_the_same_run_dir_is_refused(make_config, tmp_path) -> None:
    """Resuming with a different config raises ConfigError naming the keys that differ."""
    run(make_config("experiment=debug", "steps=10"), tmp_path)
    with pytest.raises(ConfigError, match=r"differs in: optim\.lr"):
        run(make_config("experiment=debug", "steps=10", "optim.lr=0.01"), tmp_path)
    assert _record(tmp_path)["status"] == "completed"


def test_an_invalid_re_run_leaves_the_existing_record_alone(make_config, tmp_path) -> None:
    """Re-running a finished run dir with an invalid value raises ConfigError and leaves its
    run.json (status, run id) and metrics untouched."""
    run(make_config("experiment=debug", "steps=10"), tmp_path)
    before = _record(tmp_path)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        run(make_config("experiment=debug", "steps=10", "optim.lr=0"), tmp_path)
    assert _record(tmp_path) == before


def test_steps_below_the_step_a_run_reached_are_refused_with_both_numbers(
    make_config, tmp_path
) -> None:
    """Issue 13 item 7. A run cannot be shortened: ``steps`` below the step of a completed
    run, or of the checkpoint a failed run would resume from, raises ConfigError naming the
    requested steps and the step reached, before any work; run.json, metrics and checkpoint
    stay byte for byte as they were (a re-run never marks it completed at the wrong step)."""
    done, failed = tmp_path / "done", tmp_path / "failed"
    common = ("experiment=debug", "checkpoint_every=2", "eval.every=2")
    run(make_config(*common, "steps=4"), done)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(make_config(*common, "steps=10", "faults.fail_at_step=4"), failed)
    for run_dir, steps, reached in ((done, 3, 4), (failed, 1, 2)):
        files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        with pytest.raises(ConfigError, match=rf"steps={steps} .* at step {reached}\b"):
            run(make_config(*common, f"steps={steps}"), run_dir)
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files
    # The checkpoint is what counts when run.json was lost.
    (failed / "run.json").unlink()
    with pytest.raises(ConfigError, match=r"steps=1 .*checkpoint\.pt is at step 2"):
        run(make_config(*common, "steps=1"), failed)
    assert not (failed / "run.json").exists()


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (("probe.reference=reparam",), "probe.reference='reparam'"),
        (("model=categorical", "estimator=gumbel_softmax", "probe.reference=reparam"),
         "probe.reference='reparam'"),
        (("model=gaussian", "estimator=reparam", "probe.reference=exact"),
         "probe.reference='exact'"),
        (("model.latent_dim=17", "probe.reference=exact"), "probe.reference='exact'"),
        (("model=categorical", "estimator=gumbel_softmax", "model.latent_dim=5",
          "model.n_categories=10", "probe.reference=exact"), "probe.reference='exact'"),
        (("probe.basket=[disarm,{name:rloo,label:disarm}]",), r"probe.basket\[1\]"),
        (("probe.basket=[rloo,rloo]",), r"probe.basket\[1\]"),
        (("estimator=disarm", "probe.basket=[{name:rloo,label:disarm}]"),
         r"probe.basket\[0\] has the label 'disarm' of the run's own estimator"),
        (("probe.basket=[nosuch]",), r"probe.basket\[0\].name"),
    ],
    ids=["reparam-bernoulli", "reparam-categorical", "exact-gaussian", "exact-2^17",
         "exact-10^5", "label-duplicate", "entry-duplicate", "own-label", "unknown-name"],
)  # fmt: skip
def test_probe_options_that_would_fail_mid_training_are_refused_before_it(
    make_config, tmp_path, overrides: tuple[str, ...], option: str
) -> None:
    """Issue 13 item 9. With probing on, a reference the model cannot have (``reparam`` for
    discrete latents, ``exact`` for Gaussian latents or more configurations than can be
    enumerated) and basket labels that would merge rows (two entries, or an entry and the
    run's own estimator with other options) raise ConfigError naming the option and the
    allowed values before any training: no metrics file."""
    cfg = make_config("experiment=debug", "probe.every=5", *overrides)
    with pytest.raises(ConfigError, match=option) as err:
        run(cfg, tmp_path)
    assert "allowed" in str(err.value)
    assert not (tmp_path / "metrics.parquet").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ("probe.reference=exact", "model.latent_dim=16"),
        ("probe.reference=rloo",),
        ("estimator=rloo", "estimator.num_samples=2", "probe.basket=[{name:rloo,num_samples:2}]"),
        ("experiment=quick", "pairing=bernoulli_gumbel"),
        ("experiment=quick", "pairing=gaussian_reparam"),
    ],
    ids=["exact-2^16", "rloo-reference", "own-in-basket", "quick-gumbel", "quick-reparam"],
)
def test_probe_options_that_work_still_validate(make_config, overrides) -> None:
    """The probe checks refuse nothing that works: an enumerable exact reference, an
    estimator reference of the family, and the run's own estimator in its basket (the
    presets' pairings do that)."""
    validate(make_config("experiment=debug", "probe.every=5", *overrides))


# ------------------------------------------------------------------------------ faults


def test_nan_loss_marks_the_run_diverged_with_the_last_finite_step(make_config, tmp_path):
    """faults.nan_at_step=7: run returns 'diverged', run.json has status diverged, last_step 6
    and a reason; the metrics hold only finite rows; a re-run is skipped."""
    cfg = make_config("experiment=debug", "faults.nan_at_step=7")
    assert run(cfg, tmp_path) == "diverged"
    rec = _record(tmp_path)
    assert rec["status"] == "diverged" and rec["last_step"] == 6
    assert "step 7" in rec["reason"]
    df = _metrics(tmp_path)
    assert df["value"].map(math.isfinite).all() and df["step"].max() <= 6
    assert run(cfg, tmp_path) == "diverged"


def test_exception_marks_the_run_failed_and_is_re_raised(make_config, tmp_path) -> None:
    """faults.fail_at_step=3: the RuntimeError propagates; run.json says failed with the
    message and a traceback tail; no metrics file (no checkpoint was reached)."""
    with pytest.raises(RuntimeError, match="injected failure"):
        run(make_config("experiment=debug", "faults.fail_at_step=3"), tmp_path)
    rec = _record(tmp_path)
    assert rec["status"] == "failed"
    assert "RuntimeError" in rec["reason"] and "injected failure" in rec["reason"]
    assert "Traceback" in rec["traceback"] or "RuntimeError" in rec["traceback"]
    assert not (tmp_path / "metrics.parquet").exists()


# ------------------------------------------------------------------------------ validation

INVALID = [
    (("estimator.name=nope",), r"estimator='nope'.*allowed: .*reinforce"),
    (("model.family=poisson",), r"model\.family='poisson'.*allowed: gaussian, bernoulli"),
    (("model.arch=deep",), r"model\.arch='deep'.*allowed: linear, nonlinear"),
    (("model.kl=exact",), r"model\.kl='exact'.*allowed: analytic, sampled"),
    (("data.name=cifar",), r"data='cifar'.*allowed: mnist_subset"),
    (("data.binarization=soft",), r"data\.binarization='soft'.*allowed: dynamic, static"),
    (("estimator=reparam", "model=bernoulli"), r"reparam does not support model\.family"),
    (("estimator=gumbel_softmax", "model=gaussian"), r"estimators supporting gaussian: "),
    (("estimator=gumbel_softmax", "estimator.temperature=0"), r"temperature=0\.0.*allowed"),
    (("estimator=gumbel_softmax", "estimator.min_temperature=0"), r"min_temperature=0\.0"),
    (("estimator=reinforce", "estimator.baseline=mean"), r"baseline='mean'.*allowed"),
    (("estimator=rloo", "estimator.num_samples=1"), r"num_samples=1.*allowed: an integer >= 2"),
    (("optim.lr=0",), r"optim\.lr=0\.0.*allowed: a finite number > 0"),
    (("optim.lr=-1e-3",), r"optim\.lr=-0\.001.*allowed"),
    (("optim.batch_size=0",), r"optim\.batch_size=0.*allowed"),
    (("optim.batch_size=100000",), r"optim\.batch_size=100000"),
    (("steps=0",), r"steps=0.*allowed: an integer >= 1"),
    (("device=tpu",), r"device='tpu'.*allowed: auto, cpu, cuda"),
    (("progress=sometimes",), r"progress='sometimes'.*allowed: auto, true, false"),
    (("eval.splits=[val,holdout]",), r"eval\.splits='holdout'.*allowed: train, val, test"),
    (("data=mnist", "data.root=MISSING_ROOT"), r"data=mnist: .* not found.*gradbench-data"),
    (
        ("estimator=rebar", "compile=true"),
        r"compile=true is invalid for estimator=rebar.*"
        r"allowed: compile=false; estimators that compile: .*reinforce",
    ),
    (("estimator=relax", "compile=true"), r"compile=true is invalid for estimator=relax"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_config_fails_before_training_naming_the_option(
    make_config, tmp_path, overrides: tuple[str, ...], message: str
) -> None:
    """Each invalid value raises ConfigError naming the option and the allowed values, before
    any training: no metrics file, no checkpoint; run.json records status failed."""
    overrides = tuple(o.replace("MISSING_ROOT", str(tmp_path / "no_data")) for o in overrides)
    with pytest.raises(ConfigError, match=message):
        run(make_config("experiment=debug", *overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.parquet").exists()
    assert not (tmp_path / "run" / checkpoint.CHECKPOINT).exists()
    rec = _record(tmp_path / "run")
    assert rec["status"] == "failed" and rec["reason"].startswith(
        ("invalid config", "ConfigError")
    )


@pytest.mark.parametrize("name", IWAE_KIND)
def test_iwae_objective_estimators_need_sampled_kl(make_config, tmp_path, name: str) -> None:
    """An estimator whose objective is the IWAE bound refuses model.kl=analytic (its f must be
    the log weight log p(x, z) - log q(z|x)), naming the option and the allowed value."""
    with pytest.raises(ConfigError, match=r"model\.kl='analytic' is invalid.*allowed: sampled"):
        family = "bernoulli" if "bernoulli" in estimators.families(name) else "gaussian"
        run(make_config("experiment=debug", f"model={family}", f"estimator={name}"), tmp_path)
    assert not (tmp_path / "metrics.parquet").exists()


# ------------------------------------------------------------------------------ command line


def test_cli_smoke_run_writes_records(tmp_path: Path) -> None:
    """The console script `gradbench-train experiment=debug` exits 0 and writes run.json,
    metrics.parquet, checkpoint.pt and Hydra's .hydra/ into hydra.run.dir."""
    out = tmp_path / "run"
    proc = _cli("experiment=debug", "steps=10", f"hydra.run.dir={out}", cwd=tmp_path, script=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("run.json", "metrics.parquet", "checkpoint.pt", ".hydra/config.yaml"):
        assert (out / name).exists(), name
    assert _record(out)["status"] == "completed"


def test_cli_invalid_config_exits_non_zero_without_metrics(tmp_path: Path) -> None:
    """An invalid value exits with code 1 before training; stderr names the option and the
    allowed values; there is no metrics file."""
    out = tmp_path / "run"
    proc = _cli("experiment=debug", "optim.lr=-1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "optim.lr=-1.0 is invalid; allowed: a finite number > 0" in proc.stderr
    assert not (out / "metrics.parquet").exists()


def test_cli_user_errors_are_a_line_naming_the_option_not_a_traceback(tmp_path: Path) -> None:
    """Issue 13 item 13. An invalid value (here one that only the run's checks catch, after
    Hydra has composed the config) exits 1 with one line naming the option and the allowed
    values, and no traceback."""
    out = tmp_path / "run"
    proc = _cli("experiment=debug", "probe.every=5", "probe.reference=reparam",
                f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2, proc.stderr
    assert "probe.reference='reparam' is invalid" in lines[-1] and "allowed: " in lines[-1]
    assert not (out / "metrics.parquet").exists()


def test_cli_run_stopped_by_a_signal_and_recorded_failed_exits_non_zero(tmp_path: Path) -> None:
    """Issue 13 item 15. A run stopped by SIGTERM checkpoints and records ``failed``
    ("terminated by SIGTERM at step N"); the command must not exit 0 even when the signal's
    previous disposition does not end the process (here: SIGTERM ignored, as a launcher or
    ``nohup``-like wrapper may leave it)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "experiment=debug", "faults.term_at_step=3",
         f"hydra.run.dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )  # fmt: skip
    rec = _record(out)
    assert rec["status"] == "failed" and "terminated by SIGTERM at step 3" in rec["reason"]
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "terminated by SIGTERM at step 3" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_cli_divergence_exits_zero_and_failure_exits_one(tmp_path: Path) -> None:
    """From the command line a diverged run exits 0 (a sweep goes on), a failed one exits 1."""
    proc = _cli("experiment=debug", "faults.nan_at_step=4", f"hydra.run.dir={tmp_path / 'd'}",
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _record(tmp_path / "d")["status"] == "diverged"
    proc = _cli("experiment=debug", "faults.fail_at_step=4", f"hydra.run.dir={tmp_path / 'f'}",
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert _record(tmp_path / "f")["status"] == "failed"


@pytest.mark.slow
def test_sigkill_and_resume_gives_metrics_identical_to_an_uninterrupted_run(tmp_path) -> None:
    """A CPU run killed with SIGKILL right after its first checkpoint and re-run with the same
    command ends with the same metric values (all but wall-time-derived throughput) as an
    uninterrupted run of the same config in another directory."""
    args = ["experiment=debug", "estimator=rloo", "steps=3000", "log_every=50",
            "checkpoint_every=100", "eval.every=500", "device=cpu"]  # fmt: skip
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.train", *args, f"hydra.run.dir={killed}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / checkpoint.CHECKPOINT).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = _record(killed)
    assert rec["status"] == "running" and rec["last_step"] < 3000, "killed too late to test"
    assert _cli(*args, f"hydra.run.dir={killed}", cwd=tmp_path).returncode == 0
    assert _cli(*args, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path).returncode == 0
    rec = _record(killed)
    assert rec["status"] == "completed" and len(rec["resumed_from"]) == 1
    a, b = _metrics(killed), _metrics(tmp_path / "whole")
    assert a["run_id"].nunique() == 1
    pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.gpu
def test_dev_run_on_cuda_completes(make_config, tmp_path) -> None:
    """A debug run with device=cuda completes and records device cuda."""
    assert run(make_config("experiment=debug", "device=cuda"), tmp_path) == "completed"
    assert _record(tmp_path)["device"].startswith("cuda")


def test_compiled_run_gives_the_eager_runs_losses(make_config, tmp_path) -> None:
    """``compile=true`` trains through ``torch.compile`` with the same random stream as eager
    mode: the logged training losses agree up to float32 rounding of fused kernels."""
    common = ("experiment=debug", "estimator=reinforce", "steps=6", "log_every=2")
    assert run(make_config(*common, "compile=true"), tmp_path / "compiled") == "completed"
    assert run(make_config(*common), tmp_path / "eager") == "completed"
    loss = {}
    for name in ("compiled", "eager"):
        df = _metrics(tmp_path / name)
        rows = df[(df["split"] == "train") & (df["metric"] == "loss")].sort_values("step")
        loss[name] = rows["value"].to_numpy()
    assert len(loss["eager"]) == 3
    assert loss["compiled"] == pytest.approx(loss["eager"], rel=1e-4)
    assert _record(tmp_path / "compiled")["config"]["compile"] is True


def test_the_training_app_pickles_by_value_for_submitit_requeue() -> None:
    """With ``python -m benchmarks.train`` the app lives in ``__main__``, which submitit's
    requeue checkpoint pickles by value (cloudpickle): every function it reaches must pickle
    (a ``torch._inductor.config`` attribute chain once made requeue fail: the slow
    submitit_local test caught it)."""
    cloudpickle = pytest.importorskip("cloudpickle")
    import torch._inductor.config  # noqa: F401  (imported in a job once torch.optim warms up)

    from benchmarks.cli import train as app_module
    from benchmarks.harness import train

    for module in (app_module, train):
        cloudpickle.register_pickle_by_value(module)
    try:
        for fn in (app_module.app, train.run, app_module.main):
            assert cloudpickle.loads(cloudpickle.dumps(fn)).__name__ == fn.__name__
    finally:
        for module in (app_module, train):
            cloudpickle.unregister_pickle_by_value(module)
