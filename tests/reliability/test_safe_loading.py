"""Check 8: checkpoints load only with ``torch.load(..., weights_only=True)``; a planted
malicious pickle is refused with no side effect."""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import torch

from benchmarks.harness import checkpoint
from benchmarks.harness.train import run

from .conftest import REPO, assert_same_run, record

#: Calls that unpickle arbitrary objects; never allowed on our files.
UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"),
    ("pandas", "read_pickle"), ("joblib", "load"), ("torch", "jit.load"),
}  # fmt: skip


def _call_name(node: ast.Call) -> tuple[str, str] | None:
    """``("torch", "load")`` for ``torch.load(...)``, ``("torch", "jit.load")`` for
    ``torch.jit.load(...)``; None for other calls."""
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or not parts:
        return None
    return func.id, ".".join(reversed(parts))


def unsafe_loads(root: Path) -> list[str]:
    """Every ``torch.load`` without ``weights_only=True`` (a literal) and every call that
    unpickles arbitrary objects, in the Python files of the code base: ``benchmarks/``,
    ``estimators/`` and the top-level modules (tests hold deliberate unsafe controls)."""
    found = []
    files = [p for d in ("benchmarks", "estimators") for p in (root / d).rglob("*.py")]
    for path in [*files, *root.glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or (name := _call_name(node)) is None:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            if name == ("torch", "load"):
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and (
                    kw["weights_only"].value is True
                )
                if not safe:
                    found.append(f"{where}: torch.load without weights_only=True")
            elif name in UNSAFE_CALLS or (name[0] == "np" and name[1] == "load" and any(
                k.arg == "allow_pickle" for k in node.keywords
            )):  # fmt: skip
                found.append(f"{where}: {'.'.join(name)}")
    return found


def test_the_code_base_loads_torch_files_only_with_weights_only_true() -> None:
    """Fault: any code path that could unpickle arbitrary objects from a run directory.
    Property: an ``ast`` scan of the code base finds every ``torch.load`` call with a
    literal ``weights_only=True`` and no pickle-style loader."""
    assert unsafe_loads(REPO) == []


def test_the_scan_finds_an_unsafe_load(tmp_path: Path) -> None:
    """Negative control: the scan reports a planted ``torch.load(path)`` and a
    ``pickle.loads``, so an empty result above means something."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bad.py").write_text(
        "import pickle, torch\nx = torch.load('a.pt')\ny = pickle.loads(b'')\n"
        "z = torch.load('b.pt', weights_only=False)\n"
    )
    assert len(unsafe_loads(tmp_path)) == 3


class Evil:
    """Unpickling this object creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"step": 5, "model": {"w": torch.zeros(2)}, "payload": Evil(marker)}, path)


def test_a_malicious_pickle_is_refused_without_side_effect(tiny, reference_runs, tmp_path):
    """Fault: a checkpoint file whose unpickling would run code (here: create a marker file)
    is planted as ``checkpoint.pt`` of a run and as ``checkpoint.prev.pt``. Property:
    ``checkpoint.load`` refuses it (CorruptCheckpointError) and the marker never appears;
    the run sets both aside and restarts from step 0, ending identical to an uninterrupted
    run. Positive control: loading the same file with ``weights_only=False`` does create
    the marker, so the planted pickle is live."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _plant(evil, marker)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="unreadable or unsafe"):
        checkpoint.load(evil)
    assert not marker.exists()

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run(tiny("faults.fail_at_step=13"), run_dir)
    _plant(run_dir / "checkpoint.pt", marker)
    _plant(run_dir / "checkpoint.prev.pt", marker)
    assert run(tiny(), run_dir) == "completed"
    assert not marker.exists()
    assert (run_dir / "checkpoint.pt.corrupt").exists()
    assert len(record(run_dir)["recovered"]) == 2
    assert_same_run(run_dir, reference_runs())

    torch.load(evil, weights_only=False)  # the positive control
    assert marker.exists()
