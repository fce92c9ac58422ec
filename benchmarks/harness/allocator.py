"""CPU memory allocator settings for training and benchmark processes.

A training step on CPU allocates and frees the same large temporaries at every step (at batch
1024 a ``[S, B, 784]`` tensor is 3 MB; Gumbel-Rao's ``[K, S, B, L]`` noise is 8 MB). glibc's
``malloc`` serves blocks above its mmap threshold with fresh ``mmap`` pages and returns the top
of the heap to the system above its trim threshold, so such tensors are page-faulted in again
at every step, a cost that grows with the batch (measured by the command below, results in
``results/throughput/allocator_cpu.md``). :func:`retain_freed_memory` raises both thresholds so
that freed memory stays in the process and is reused; small batches, whose temporaries stay
below the thresholds, are unaffected. ``GRADBENCH_MALLOC=system`` keeps glibc's defaults.

Measure the effect (harness training steps, each setting in its own processes, alternated)::

    python -m benchmarks.throughput.allocator [--repeats 3] \
        [--out results/throughput/allocator_cpu.md]
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap kept by the process before returning it to the system.
TRIM_THRESHOLD = 512 * 2**20

_applied: dict[str, Any] | None = None


def retain_freed_memory() -> dict[str, Any] | None:
    """Set glibc's mmap threshold to :data:`MMAP_THRESHOLD` and its trim threshold to
    :data:`TRIM_THRESHOLD` for this process, so that freed tensors' memory is reused rather
    than unmapped and page-faulted in again.

    Returns the settings applied (``{"malloc": "glibc <version>", "mmap_threshold": ...,
    "trim_threshold": ...}``, also on repeated calls), or ``None`` where nothing is changed:
    the C library is not glibc (macOS, musl, Windows), or ``GRADBENCH_MALLOC=system``.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("GRADBENCH_MALLOC", "") == "system":
        return None
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return None
    _applied = {
        "malloc": f"glibc {version}",
        "mmap_threshold": MMAP_THRESHOLD,
        "trim_threshold": TRIM_THRESHOLD,
    }
    return _applied
