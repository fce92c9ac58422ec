"""Reports from run records: figures, tables and ``report.md`` (never imports torch).

``python -m benchmarks.report SWEEP_DIR... [--out DIR] [--throughput JSON...]
[--overhead JSON...]`` or, from Python, :func:`main`. :func:`load_records` and
:func:`final_values` give the tidy frames that every figure and table is computed from.
"""

from benchmarks.report.cli import main
from benchmarks.report.records import (
    QUANTITIES,
    final_values,
    load_overhead,
    load_records,
    load_throughput,
)
from benchmarks.report.style import estimator_style

__all__ = [
    "QUANTITIES",
    "estimator_style",
    "final_values",
    "load_overhead",
    "load_records",
    "load_throughput",
    "main",
]
