"""Check 10: corrupt checkpoints are detected; the run falls back to the previous one."""

from __future__ import annotations

import signal
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.harness import checkpoint
from benchmarks.harness.train import run
from benchmarks.records.files import FAULT_ENV
from benchmarks.report.records import load_records

from .conftest import assert_same_run, comparable, in_child, metrics, record


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _flip_a_bit_in_the_largest_tensor(path: Path) -> None:
    """Flip one bit inside the bytes of the largest tensor stored in the zip archive (the
    zip and pickle framing stay intact: only the content digest can tell)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The local header is 30 bytes + name + extra; the stored (uncompressed) data follows.
    header = info.header_offset
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _tamper(path: Path) -> None:
    """Change a parameter and re-save with the old digest (a well-formed file whose content
    no longer matches its checksum)."""
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name] + 1e-3
    torch.save(state, path)


DAMAGE = {"truncated": _truncate, "bit flip": _flip_a_bit_in_the_largest_tensor,
          "tampered": _tamper}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(
    tiny, reference_runs, tmp_path: Path, damage: str
) -> None:
    """Fault: a run that stopped at step 13 (checkpoints kept at 10 and 5) has its
    ``checkpoint.pt`` truncated, bit-flipped inside a tensor, or re-saved with a changed
    parameter. Property: ``checkpoint.load`` detects it; the next run sets it aside
    (``checkpoint.pt.corrupt``, noted in run.json) and resumes from ``checkpoint.prev.pt``
    at step 5, its metrics truncated to step 5 (checked by killing the resumed run at its
    next metrics write); a report builds from the records at that point; the resumed run
    ends identical to an uninterrupted run."""
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tiny("faults.fail_at_step=13"), tmp_path)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 10
    assert checkpoint.load(tmp_path / "checkpoint.prev.pt")["step"] == 5
    DAMAGE[damage](tmp_path / "checkpoint.pt")
    with pytest.raises(checkpoint.CorruptCheckpointError):
        checkpoint.load(tmp_path / "checkpoint.pt")

    # Resume, and die at the second metrics write (the first rewrites the file on resume).
    code = in_child(run, tiny(), tmp_path, env={FAULT_ENV: "metrics.parquet:2"})
    assert code == -signal.SIGKILL
    assert (tmp_path / "checkpoint.pt.corrupt").exists()
    assert record(tmp_path)["resumed_from"] == [5]
    assert "checkpoint.pt" in record(tmp_path)["recovered"][0]
    assert metrics(tmp_path)["step"].max() == 5
    df, runs = load_records([tmp_path])
    assert list(runs["status"]) == ["running"] and df["step"].max() == 5

    assert run(tiny(), tmp_path) == "completed"
    assert record(tmp_path)["resumed_from"] == [5, 5]  # the step-10 checkpoint never came
    assert_same_run(tmp_path, reference_runs())
    df, runs = load_records([tmp_path])
    assert list(runs["status"]) == ["completed"] and df["step"].max() == 20


def test_a_bit_flip_in_a_finished_run_checkpoint_makes_it_incomplete(tiny, tmp_path: Path):
    """Fault: a bit flip in the final checkpoint of a completed run. Property: the run no
    longer counts as finished; re-running redoes the last segment from the previous
    checkpoint and completes with the same metrics."""
    assert run(tiny(), tmp_path) == "completed"
    before = metrics(tmp_path)
    _flip_a_bit_in_the_largest_tensor(tmp_path / "checkpoint.pt")
    assert run(tiny(), tmp_path) == "completed"
    rec = record(tmp_path)
    assert rec["resumed_from"] == [15] and "redone" in rec["recovered"][0]
    assert comparable(metrics(tmp_path)).equals(comparable(before))
