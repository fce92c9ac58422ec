"""Helpers of the fault-injection suite: runs in-process, in forked children and on the CLI.

Fast tests call :func:`benchmarks.harness.train.run` in-process, or in a forked child when the
fault kills the process (:func:`in_child`): forking copies the already imported torch, so a killed
run costs a fraction of a second instead of a fresh interpreter's import. Slow tests start ``python
-m benchmarks.train`` (:func:`cli`) like a user does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from benchmarks.harness import checkpoint
from benchmarks.records.runs import timing_rows

REPO = Path(__file__).resolve().parents[2]
#: Test-only configs (the ``fault`` group: ``+fault=sigkill`` etc.), added with --config-dir.
TEST_CONF = Path(__file__).resolve().parent / "conf"
#: A 20-step debug run: checkpoints at 5, 10, 15, 20; logs and evaluates every 5 steps.
TINY = ("experiment=debug", "steps=20", "checkpoint_every=5", "eval.every=5", "device=cpu")
#: One estimator of each latent family (model, estimator).
FAMILIES = {
    "gaussian": ("model=gaussian", "estimator=reparam"),
    "bernoulli": ("model=bernoulli", "estimator=reinforce"),
    "categorical": ("model=categorical", "estimator=gumbel_softmax"),
}
#: The files a run writes atomically (the write sites of the fault hook).
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.parquet", "run.json")


def record(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of ``run_dir``."""
    return json.loads((Path(run_dir) / "run.json").read_text())


def metrics(run_dir: Path) -> pd.DataFrame:
    """``metrics.parquet`` of ``run_dir``."""
    return pd.read_parquet(Path(run_dir) / "metrics.parquet")


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that do not depend on wall time, in a canonical order."""
    df = df[~timing_rows(df)]
    cols = ["step", "f_evals", "split", "metric", "value"]
    return df[cols].sort_values(["step", "split", "metric"]).reset_index(drop=True)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model parameters in the run's final checkpoint."""
    return checkpoint.load(Path(run_dir) / checkpoint.CHECKPOINT)["model"]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """``resumed`` ended exactly like the uninterrupted ``reference``: completed at the same
    step, the same metric rows (every step, no gap, no duplicate) with the same values, one
    run id, and bit-identical final parameters."""
    a, b = record(resumed), record(reference)
    assert a["status"] == b["status"] == "completed", (a.get("reason"), b.get("reason"))
    assert a["last_step"] == b["last_step"]
    ma, mb = metrics(resumed), metrics(reference)
    key = ["step", "split", "metric", "probe_estimator", "param"]
    assert not ma.duplicated(key).any(), "duplicate metric rows"
    assert set(map(tuple, ma[key].to_numpy())) == set(map(tuple, mb[key].to_numpy())), "gap"
    assert ma["run_id"].nunique() == 1 and ma["run_id"].iloc[0] == a["run_id"]
    pd.testing.assert_frame_equal(comparable(ma), comparable(mb))
    pa, pb = final_model(resumed), final_model(reference)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    assert not list(Path(resumed).glob(".*.tmp")), "temporary files left behind"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def in_child(
    target: Callable[..., object], *args: Any, env: dict[str, str] | None = None,
    timeout: float = 120,
) -> int:  # fmt: skip
    """Run ``target(*args)`` in a forked child; return its exit code (``-N``: killed by
    signal N; 1: it raised). The child uses one torch thread (a child forked from a process
    that ran OpenMP threads must not start its own team) and adds ``env`` to its environment.
    """
    _flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            os.environ.update(env or {})
            target(*args)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            _flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {target} did not finish in {timeout} s")
        time.sleep(0.01)


def env_for_cli() -> dict[str, str]:
    """The environment of a CLI subprocess: the checkout on PYTHONPATH, no CI, no fault."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("CI", "GRADBENCH_FAULT"):
        env.pop(key, None)
    return env


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
    multirun: bool = False,
) -> subprocess.CompletedProcess:  # fmt: skip
    """``python -m benchmarks.train [--multirun] ARGS`` in ``cwd``."""
    flags = ["--multirun", "--config-dir", str(TEST_CONF)] if multirun else []
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.train", *flags, *args],
        cwd=cwd, env={**env_for_cli(), **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def jobs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """``run.json`` of each job of a sweep, keyed by its ``+fault=...`` choice (or number)."""
    out = {}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
        fault = [o.split("=", 1)[1] for o in overrides if o.startswith("- +fault=")]
        out[fault[0] if fault else job.name] = {**record(job), "dir": job}
    return out


@pytest.fixture(scope="session", autouse=True)
def _cached_datasets() -> Any:
    """Load each data set once per test session (the synthetic set computes exact
    log-likelihoods: about half of a debug run) and do a first run's lazy imports once;
    forked children inherit both."""
    import functools

    from benchmarks.harness import build, supervise

    original = build.load_dataset
    build.load_dataset = functools.lru_cache(maxsize=None)(original)
    build.load_dataset("synthetic", None)  # as load_data calls it
    supervise._warm_up()  # the lazy imports of a first run, inherited by forked children
    yield
    build.load_dataset = original


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``reference(*overrides)``: the directory of an uninterrupted in-process run of
    ``TINY + overrides``, computed once per session and shared by the tests."""
    from hydra import compose, initialize_config_dir

    import benchmarks.harness.config  # noqa: F401  (registers the schemas)
    from benchmarks.cli.train import CONF_DIR
    from benchmarks.harness.train import run

    cache: dict[tuple[str, ...], Path] = {}
    root = tmp_path_factory.mktemp("reference")

    def reference(*overrides: str) -> Path:
        key = tuple(overrides)
        if key not in cache:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[*TINY, *overrides])
            run_dir = root / str(len(cache))
            assert run(cfg, run_dir) == "completed"
            cache[key] = run_dir
        return cache[key]

    return reference


@pytest.fixture
def tiny(make_config: Callable[..., Any]) -> Callable[..., Any]:
    """``tiny(*overrides)``: the composed config of ``TINY + overrides``."""

    def compose(*overrides: str) -> Any:
        return make_config(*TINY, *overrides)

    return compose
