"""Check 7: after a resume, every random stream and the batch order continue exactly where the
uninterrupted run is; a checkpoint missing a stream is an error, never a fresh stream."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.data.datasets
from benchmarks.harness import checkpoint
from benchmarks.harness.train import run

from .conftest import record


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Per training step (each ``BatchStream.next`` call): digests of the batch served and of
    the torch, numpy and ``random`` generator states at that moment."""
    seen: list[tuple[str, ...]] = []
    real_next = benchmarks.data.datasets.BatchStream.next

    def next_batch(self):
        batch = real_next(self)
        seen.append((
            _h(batch.numpy().tobytes()),
            _h(torch.get_rng_state().numpy().tobytes()),
            _h(np.random.get_state()[1].tobytes()),
            _h(repr(random.getstate()).encode()),
        ))  # fmt: skip
        return batch

    monkeypatch.setattr(benchmarks.data.datasets.BatchStream, "next", next_batch)
    return seen


@pytest.mark.parametrize("model", ["bernoulli", "categorical"])
def test_after_a_resume_every_generator_and_batch_continue_the_uninterrupted_run(
    tiny, draws, tmp_path: Path, model: str
) -> None:
    """Fault: a run fails at step 13 (checkpoint at 10) and is resumed in the same process
    after the process's own RNG streams were disturbed. Property: the batches served at steps
    11..20 (their data order and dynamic binarization draws) and the torch, numpy and
    ``random`` states before each of those steps are those of an uninterrupted run."""
    extra = (f"model={model}",) + (("estimator=gumbel_softmax",) if model != "bernoulli" else ())
    assert run(tiny(*extra), tmp_path / "whole") == "completed"
    whole = list(draws)
    draws.clear()
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tiny(*extra, "faults.fail_at_step=13"), tmp_path / "resumed")
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    torch.rand(7), np.random.rand(7), random.random()
    start = len(draws)
    assert run(tiny(*extra), tmp_path / "resumed") == "completed"
    assert record(tmp_path / "resumed")["resumed_from"] == [10]
    assert draws[start:] == whole[10:]
    assert len(whole) == 20


def _drop_from_rng(path: Path, key: str) -> None:
    """Re-save the checkpoint at ``path`` without ``rng[key]`` (its checksum stays valid)."""
    state = checkpoint.load(path)
    del state["rng"][key]
    checkpoint.save(path, state)


@pytest.mark.parametrize("key", ["torch", "numpy", "python"])
def test_a_checkpoint_missing_an_rng_stream_is_an_error(tiny, tmp_path: Path, key: str) -> None:
    """Fault: the resumed checkpoint (valid checksum) lacks one RNG stream. Property: resuming
    raises a CheckpointError naming the missing stream, records ``failed`` with that reason,
    and trains nothing (the metrics and checkpoint stay at step 10)."""
    with pytest.raises(RuntimeError):
        run(tiny("faults.fail_at_step=13"), tmp_path)
    _drop_from_rng(tmp_path / "checkpoint.pt", key)
    with pytest.raises(checkpoint.CheckpointError, match=f"lacks the RNG state of {key}"):
        run(tiny(), tmp_path)
    rec = record(tmp_path)
    assert rec["status"] == "failed" and f"lacks the RNG state of {key}" in rec["reason"]
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 10


def test_a_cpu_checkpoint_resumed_on_cuda_is_an_error_before_touching_any_stream() -> None:
    """Fault: RNG states without the ``cuda`` stream restored for a CUDA device. Property:
    CheckpointError naming ``cuda``, raised before any stream changes (checked on any
    machine: no CUDA call happens before the check)."""
    state = checkpoint.rng_state(torch.device("cpu"))
    before = torch.get_rng_state().clone()
    with pytest.raises(checkpoint.CheckpointError, match="lacks the RNG state of cuda"):
        checkpoint.set_rng_state(state, torch.device("cuda"))
    assert torch.equal(torch.get_rng_state(), before)
