"""The SLURM launcher's pieces that need no cluster (``benchmarks.harness.slurm``): the request
sized to the run, the accounting and still-held checks against stand-in SLURM commands, and
the sweep summary of a requeued job. The sweeps on a real cluster are in ``tests/slurm/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.harness import slurm, supervise

REPO = Path(__file__).resolve().parents[2]


def config(**overrides: object) -> object:
    base = {
        "threads": 1, "device": "auto", "data": {"name": "mnist_subset"},
        "model": {"family": "bernoulli", "arch": "linear", "latent_dim": 200},
    }  # fmt: skip
    return OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(overrides))


def test_the_request_follows_threads_the_model_and_the_device() -> None:
    """Unset keys are sized to the run: CPUs = threads, no GPU unless device=cuda, memory
    growing with the model; keys the user set are kept."""
    params = {"cpus_per_task": None, "gpus_per_node": None, "mem_gb": None, "timeout_min": 5}
    small = slurm.size_request(params, config(threads=3))
    assert small["cpus_per_task"] == 3 and "gpus_per_node" not in small
    assert small["timeout_min"] == 5 and 1 <= small["mem_gb"] < 2
    assert slurm.size_request(params, config(device="cuda"))["gpus_per_node"] == 1
    big = config(model={"arch": "nonlinear", "hidden_dim": 8000, "latent_dim": 2000})
    assert slurm.size_request(params, big)["mem_gb"] > small["mem_gb"] + 1
    mine = {"cpus_per_task": 2, "gpus_per_node": 0, "mem_gb": 7}
    assert slurm.size_request(mine, config(device="cuda", threads=8)) == mine


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``fake(name, output, code)``: a stand-in SLURM command first on PATH; each call is
    logged to ``calls.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def fake(name: str, output: str, code: int = 0) -> Path:
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho {name} "$@" >> {tmp_path / "calls.log"}\n'
            f"cat <<'EOF'\n{output}\nEOF\nexit {code}\n"
        )
        script.chmod(0o755)
        return script

    return fake


def test_a_cluster_without_accounting_is_refused_before_submitting(
    tmp_path: Path, fake_slurm
) -> None:
    """``sacct`` refusing (accounting storage off): the sweep exits 1 at once with one line
    saying what to enable, and nothing is submitted (a job dying without a result would
    otherwise leave the sweep waiting forever)."""
    fake_slurm("sacct", "sacct: error: Slurm accounting storage is disabled", 1)
    fake_slurm("sbatch", "Submitted batch job 1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--multirun", "experiment=debug",
         "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "accounting storage is disabled" in out and "AccountingStorageType" in out, out
    assert "Traceback" not in out
    assert "sbatch" not in (tmp_path / "calls.log").read_text()


def test_a_rerun_while_slurm_holds_an_earlier_job_says_so(tmp_path: Path, fake_slurm) -> None:
    """A job an earlier command submitted for the sweep dir is still pending: the preflight
    names it and its state instead of racing it."""
    sweep = tmp_path / "sweep"
    (sweep / ".slurm").mkdir(parents=True)
    (sweep / slurm.JOBS_FILE).write_text("7_0\n7_1\n")
    fake_slurm(
        "sacct",
        "JobID|State|ExitCode|Reason|Start\n7_0|COMPLETED|0:0|None|2026-01-01T00:00:00\n"
        "7_1|PENDING|0:0|BeginTime|Unknown",
    )
    with pytest.raises(SystemExit) as err:
        slurm.preflight(sweep, executor=None)
    assert "SLURM still holds job(s)" in str(err.value.code) and "7_1 PENDING" in str(
        err.value.code
    )
    assert "7_0" not in str(err.value.code).split("(")[1].split(")")[0]


def test_an_accounting_outage_while_waiting_is_reported_and_outlasted(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """``sacct`` failing while the sweep waits (slurmdbd restarting): one warning names the
    error and says the wait goes on, one line says when it answers again, and the job's
    state is then read as usual (no silent wait, no abandoned sweep)."""
    bin_dir, count = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        f"#!/bin/sh\necho x >> {count}\n"
        f'if [ "$(wc -l < {count})" -le 3 ]; then\n'
        "  echo 'sacct: error: Problem talking to the database: Connection refused'; exit 1\n"
        "fi\n"
        "printf 'JobID|State|ExitCode|Start\\n7_0|COMPLETED|0:0|2026-01-01T00:00:00\\n'\n"
    )
    (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "POLL_S", 0.01)

    class Job:
        job_id = "7_0"

    with caplog.at_level("WARNING", logger=slurm.__name__):
        ended = slurm.wait_for_jobs([Job()])
    assert ended["7_0"]["State"] == "COMPLETED"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "Connection refused" in lines[0] and "still waiting for 1 job" in lines[0]
    assert lines[1].startswith("sacct answers again after")


def test_a_requeued_job_counts_by_its_last_report(tmp_path: Path, monkeypatch) -> None:
    """A job requeued by SLURM reports twice (``failed`` by the stopped attempt, then
    ``completed``): the sweep summary counts the last report only."""
    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "run.json").write_text(json.dumps({"status": "completed"}))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    outcome = supervise.SweepOutcome()
    outcome.on_multirun_start(config)
    for status in ("failed", "completed"):
        monkeypatch.setattr(os, "getpid", lambda s=status: 1000 + len(s))  # distinct names
        supervise.record_job_outcome(sweep, job, status, status)
        time.sleep(0.01)  # distinct modification times
    outcome.on_multirun_end(config)
    assert supervise.sweep_problems == []


def test_the_presets_leave_the_request_to_the_run_and_the_gpu_preset_asks_one(make_config):
    """``slurm``: CPUs, memory and GPUs unset (sized per run: no GPU on a CPU-only cluster);
    ``slurm_gpu``: one GPU per run."""
    cpu = make_config("hydra/launcher=slurm", return_hydra_config=True).hydra.launcher
    assert cpu.cpus_per_task is None and cpu.mem_gb is None and cpu.gpus_per_node is None
    gpu = make_config("hydra/launcher=slurm_gpu", return_hydra_config=True).hydra.launcher
    assert gpu.gpus_per_node == 1 and gpu._target_ == cpu._target_
