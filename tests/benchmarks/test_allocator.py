"""The CPU allocator settings of training and benchmark processes
(``benchmarks.harness.allocator``) and their measurement."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import allocator
from benchmarks.throughput import allocator as allocator_measurement

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: Allocates and frees a 16 MiB tensor and prints how much of it glibc served by ``mmap``
#: (``mallinfo2().hblkhd``, bytes in mmapped blocks, read while the tensor is alive).
_PROBE = """
import ctypes, sys
import torch
from benchmarks.harness.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "retain":
    print(retain_freed_memory() is not None)
before = mallinfo2().hblkhd
x = torch.ones(16 * 2**20, dtype=torch.uint8)
print(mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(mode: str) -> tuple[list[str], int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[:-1], int(out[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_retained_memory_serves_large_tensors_from_the_heap_not_fresh_mmaps() -> None:
    """With the default settings a fresh process maps a 16 MiB tensor with mmap (pages
    faulted in anew at each allocation); after retain_freed_memory() it comes from the heap."""
    _, default = _mmapped_bytes("default")
    applied, retained = _mmapped_bytes("retain")
    assert default >= 16 * 2**20
    assert applied == ["True"] and retained == 0


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_settings_are_reported_and_repeated_calls_return_them() -> None:
    first = allocator.retain_freed_memory()
    assert first is not None and first["malloc"].startswith("glibc")
    assert first["mmap_threshold"] == allocator.MMAP_THRESHOLD
    assert first["trim_threshold"] == allocator.TRIM_THRESHOLD
    assert allocator.retain_freed_memory() == first


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the C library is not glibc nothing is changed and None is reported."""
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_freed_memory() is None


def test_gradbench_malloc_system_keeps_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRADBENCH_MALLOC=system: nothing is changed and None is reported."""
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("GRADBENCH_MALLOC", "system")
    assert allocator.retain_freed_memory() is None


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_measurement_writes_a_table_of_both_settings(tmp_path: Path) -> None:
    """`python -m benchmarks.throughput.allocator --repeats 1 --out F` times every case both
    ways."""
    out = tmp_path / "allocator.md"
    assert allocator_measurement.main(["--repeats", "1", "--out", str(out)]) == 0
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "ms" not in ln]
    assert len(rows) == len(allocator_measurement.CASES)
    for row in rows:
        system, retained, ratio = (float(c) for c in row.strip("|").split("|")[2:])
        assert system > 0 and retained > 0 and ratio == pytest.approx(retained / system, 1e-2)


def test_measurement_refuses_zero_repeats(capsys) -> None:
    """--repeats 0: exit 2 naming the option and the allowed values, before any timing."""
    with pytest.raises(SystemExit) as exit_info:
        allocator_measurement.main(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats=0 is invalid; allowed: an integer >= 1" in capsys.readouterr().err
