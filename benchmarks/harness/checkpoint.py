"""Checkpoints: atomic, checksummed, two kept, loading with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values (ints, floats, strings, lists, dicts):
module and optimizer ``state_dict()``s, the batch stream's state, the metric rows, and the
torch, CUDA, numpy and ``random`` RNG states (numpy's and ``random``'s converted to tensors and
int lists), so that a resumed run continues bit-for-bit where the saved one stood. Nothing in
it needs pickle's arbitrary-object support, so :func:`load` refuses any file that would (a
planted or malicious pickle is an error, with no side effect).

Integrity: the saved dict carries ``sha256``, a SHA-256 digest of its content (tensor bytes,
dtypes, shapes and every plain value); :func:`load` recomputes it, so a truncated or
bit-flipped file is detected (:class:`CorruptCheckpointError`), never silently resumed.

Crash safety: a file is written atomically (a temporary file in the same directory, fsynced,
then moved into place with ``os.replace``). The training checkpoint keeps its previous version:
``save(path, state, keep_previous=True)`` first makes the current ``checkpoint.pt`` the new
``checkpoint.prev.pt`` (a hard link, so ``checkpoint.pt`` never disappears), then moves the new
file in. :func:`load_latest` returns the newest of the two that verifies, setting a corrupt
one aside as ``<name>.corrupt``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.records.files import atomic_write, file_sha256, quarantine
from benchmarks.records.runs import METRICS

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: The key of the content digest inside a saved checkpoint.
CHECKSUM_KEY = "sha256"
#: RNG streams every checkpoint holds (plus ``cuda`` for runs on a CUDA device).
RNG_KEYS: tuple[str, ...] = ("torch", "numpy", "python")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


class CorruptCheckpointError(CheckpointError):
    """An unreadable, truncated, refused (unsafe pickle) or checksum-mismatched file."""


# ------------------------------------------------------------------------------ digest


def digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes; dicts by sorted
    keys; lists and tuples element by element; other values by type and ``repr``.

    It is computed on the objects, not on the file, so it survives a ``torch.save`` /
    ``torch.load`` round trip and is independent of pickle's framing.
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)};".encode())
        if all(isinstance(x, (int, float, str, bool, type(None))) for x in obj):
            h.update(repr(obj).encode())  # plain values: one repr (e.g. 625 RNG words)
        else:
            for x in obj:
                _feed(h, x)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


# ------------------------------------------------------------------------------ save / load


def previous_path(path: Path) -> Path:
    """Where :func:`save` keeps the previous version (``checkpoint.pt`` -> ``.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(path: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Save ``state`` (with its digest) to ``path`` atomically with ``torch.save``.

    With ``keep_previous``, the current ``path`` becomes :func:`previous_path` once the new
    file is complete, just before the new file replaces it.
    """
    path = Path(path)
    payload = {**state, CHECKSUM_KEY: digest(state)}

    def rotate() -> None:
        prev = previous_path(path)
        # (If prev is already a hard link to path, rename would leave the new link behind.)
        if keep_previous and path.exists() and not (prev.exists() and prev.samefile(path)):
            tmp = path.with_name(f".{prev.name}.{secrets.token_hex(4)}.tmp")
            try:
                os.link(path, tmp)  # checkpoint.pt stays in place until the new one replaces it
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, tmp)
            os.replace(tmp, prev)

    atomic_write(path, lambda fh: torch.save(payload, fh), before_replace=rotate)


def load(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save`; tensors on the CPU.

    Always ``torch.load(..., weights_only=True)``: a file that needs more than tensors and
    plain values is refused. Raises :class:`CorruptCheckpointError` (naming the file) if it is
    unreadable, truncated, refused, or its content does not match its digest; a checkpoint
    written before digests existed loads with a warning. ``load_state_dict`` moves module and
    optimizer tensors to their parameters' devices.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # zip / unpickling errors, including refused globals
        raise CorruptCheckpointError(
            f"{path} is unreadable or unsafe ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"{path} holds a {type(state).__name__}, not a checkpoint dict"
        )
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        log.warning("%s has no checksum (written by an older gradbench); not verified", path)
    elif digest(state) != stored:
        raise CorruptCheckpointError(f"{path} is corrupt: its content does not match its SHA-256")
    return state


def load_latest(path: Path) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """The newest checkpoint that verifies: ``(state, its path, notes)``; ``(None, None,
    notes)`` if none does.

    Tries ``path`` then :func:`previous_path`; each corrupt file is moved aside to
    ``<name>.corrupt`` and described in ``notes``.
    """
    notes: list[str] = []
    for candidate in (Path(path), previous_path(path)):
        if not candidate.exists():
            continue
        try:
            return load(candidate), candidate, notes
        except CorruptCheckpointError as err:
            aside = quarantine(candidate)
            notes.append(f"{err}; moved it to {aside.name}")
            log.warning("%s; moved it to %s", err, aside.name)
    return None, None, notes


# ------------------------------------------------------------------------------ RNG


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
    """Restore the states returned by :func:`rng_state`.

    Raises :class:`CheckpointError` if a stream is missing or malformed (``cuda`` is required
    on a CUDA device), before changing any: a resumed run must never continue with a fresh
    stream where the saved one stood.
    """
    needed = (*RNG_KEYS, "cuda") if device.type == "cuda" else RNG_KEYS
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks the RNG state of {', '.join(missing)}: resuming would not "
            "continue the saved run's random streams (written by another gradbench version or "
            "on another device?). Resume on the device it was saved on, or move "
            "checkpoint.pt and checkpoint.prev.pt away to restart from step 0"
        )
    try:
        n, p = state["numpy"], state["python"]
        numpy_state = (
            n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
            n["cached_gaussian"],
        )  # fmt: skip
        python_state = (p["version"], tuple(p["state"]), p["gauss_next"])
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"the checkpoint's RNG state is malformed ({err!r})") from err
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


# ------------------------------------------------------------------------------ completeness


def finished_problem(run_dir: Path, record: dict[str, Any]) -> str | None:
    """Why a run whose ``run.json`` says completed or diverged is not finished, or None.

    ``run.json``'s status is the commit marker, written after everything it vouches for; it
    counts only while those files are intact: the metrics file readable (with the SHA-256
    recorded at completion, if any) and, for a completed run, reaching ``last_step``, with a
    checkpoint at ``last_step`` that verifies.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file():
        return f"{METRICS} is missing"
    expected = record.get("metrics_sha256")
    if expected and file_sha256(metrics) != expected:
        return f"{METRICS} does not match the SHA-256 recorded at completion"
    try:
        import pandas as pd  # only to verify a finished run: not on a job's way to step 1

        steps = pd.read_parquet(metrics, columns=["step"])["step"]
    except Exception as err:  # truncated, empty or not parquet
        return f"{METRICS} is unreadable ({type(err).__name__})"
    if record.get("status") != "completed":
        return None
    last = int(record.get("last_step") or 0)
    if steps.empty or int(steps.max()) != last:
        return f"{METRICS} does not reach the recorded last step {last}"
    ckpt = run_dir / CHECKPOINT
    try:
        saved = load(ckpt)["step"]
    except FileNotFoundError:
        return f"{CHECKPOINT} is missing"
    except (CheckpointError, KeyError) as err:
        return str(err)
    return None if saved == last else f"{CHECKPOINT} is at step {saved}, not {last}"
