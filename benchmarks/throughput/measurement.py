"""What a side-by-side measurement (``probe_speed``, ``peers``) records about the machine it
ran on, and how its record and table are written."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def machine_before(device: str, note: str, **extra: Any) -> dict[str, Any]:
    """The machine's record at the start of a measurement: device, note, git state, the CPU
    allocator setting (kept freed memory, as training runs do), 1/5/15-minute load averages
    and the UTC date, plus ``extra`` fields."""
    from benchmarks.harness.allocator import retain_freed_memory
    from benchmarks.records.runs import git_state

    return {
        "device": device, "note": note, **git_state(), **extra,
        "cpu_malloc": retain_freed_memory(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def write_measurement(stem: Path, machine: dict[str, Any], rows: list, text: str) -> None:
    """Write ``<stem>.json`` (``{"machine", "results"}``) and the table ``text`` as
    ``<stem>.md``, each atomically."""
    from benchmarks.records.files import atomic_write_bytes, write_json

    write_json(stem.with_suffix(".json"), {"machine": machine, "results": rows})
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
