"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values (ints, floats, strings, lists, dicts):
module and optimizer ``state_dict()``s, the batch stream's state, and the torch, CUDA, numpy and
``random`` RNG states (numpy's and ``random``'s converted to tensors and int lists), so that a
resumed run continues bit-for-bit where the saved one stood. It is written atomically: into a
temporary file in the same directory, fsynced, then moved into place.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.records import atomic_write

CHECKPOINT = "checkpoint.pt"


def save(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` to ``path`` atomically with ``torch.save``."""
    atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` with ``weights_only=True``, tensors on the CPU.

    ``load_state_dict`` moves module and optimizer tensors to their parameters' devices.
    """
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch (and CUDA, on a CUDA device), numpy and ``random`` RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the states returned by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
