"""The gradbench harness, by pipeline stage (``conf -> run -> records -> report``):

- :mod:`benchmarks.data`: data sets, binarization, the batch stream; ``gradbench-data``.
- :mod:`benchmarks.harness`: config schemas and validation, building a run's pieces, the
  training step, evaluation, the run and its lifecycle, checkpoints, supervision.
- :mod:`benchmarks.probe`: gradient-variance probing (moments, references, the in-run prober,
  trajectories).
- :mod:`benchmarks.records`: run records and the one atomic writer (torch-free).
- :mod:`benchmarks.report`: figures and tables from records (torch-free); ``gradbench-report``.
- :mod:`benchmarks.throughput`: timed cases, hand-written reference steps, pytest-benchmark
  suites and their summaries.
- :mod:`benchmarks.cli`: the console entry points; ``python -m benchmarks.train`` is
  ``gradbench-train``, and ``benchmarks.vae.VAE`` stays importable.

Modules that moved are refused by their old name with a message naming the new one.
"""

from __future__ import annotations

import importlib.abc
import sys

#: Old module names (before the harness was grouped by stage) and where they went.
MOVED: dict[str, str] = {
    "benchmarks.allocator": "benchmarks.throughput.allocator (measurement) or "
    "benchmarks.harness.allocator (the setting)",
    "benchmarks.bench_estimators": "benchmarks.throughput.bench_estimators",
    "benchmarks.bench_probe": "benchmarks.throughput.bench_probe",
    "benchmarks.bench_summary": "benchmarks.throughput.bench_summary",
    "benchmarks.bench_throughput": "benchmarks.throughput.bench_throughput",
    "benchmarks.checkpoint": "benchmarks.harness.checkpoint",
    "benchmarks.config": "benchmarks.harness.config",
    "benchmarks.demo": "benchmarks.cli.demo (gradbench-demo)",
    "benchmarks.download": "benchmarks.data.download (gradbench-data)",
    "benchmarks.handwritten": "benchmarks.throughput.handwritten",
    "benchmarks.handwritten_control_variate": "benchmarks.throughput.handwritten_control_variate",
    "benchmarks.schedules": "benchmarks.harness.schedules",
    "benchmarks.supervise": "benchmarks.harness.supervise",
    "benchmarks.throughput_summary": "benchmarks.throughput.summary",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Refuses an old module name with an error that names the new module."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname in MOVED:
            raise ModuleNotFoundError(
                f"{fullname} has moved: use {MOVED[fullname]}", name=fullname
            )


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
