"""``python -m benchmarks.throughput.allocator``: harness step times in fresh processes with
glibc's default allocator settings and with freed memory retained
(:func:`benchmarks.harness.allocator.retain_freed_memory`), alternating the settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

# ----------------------------------------------------------------------------- measurement

#: ``(estimator, batch size)`` of :func:`main`'s cases: linear Bernoulli VAE, default options.
CASES = (("reinforce", 100), ("reinforce", 1024), ("gumbel_softmax", 1024), ("gumbel_rao", 1024))

_TIME_STEPS = """
import statistics, sys, time
import torch
from benchmarks.harness.allocator import retain_freed_memory
from benchmarks.throughput.bench_throughput import build, harness_step, make_case
retain_freed_memory()
torch.set_num_threads(1)
name, batch = sys.argv[1], int(sys.argv[2])
step = harness_step(build(make_case(name, {}, "bernoulli", batch, 1, "linear", "cpu", 1)))
for _ in range(5):
    step()
start = time.perf_counter()
step()
n = max(3, round(0.3 / (time.perf_counter() - start)))  # steps per block of about 0.3 s
times = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(n):
        step()
    times.append((time.perf_counter() - t) / n)
print(1e3 * statistics.median(times))
"""


def step_ms(name: str, batch: int, malloc: str) -> float:
    """Median harness training-step time (ms) in a fresh process, with ``GRADBENCH_MALLOC``
    set to ``malloc`` (``system``: glibc's defaults; ``retain``: :func:`retain_freed_memory`)."""
    env = {**os.environ, "GRADBENCH_MALLOC": malloc}
    out = subprocess.run(
        [sys.executable, "-c", _TIME_STEPS, name, str(batch)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Print harness step times with glibc's defaults and with freed memory retained."""
    parser = argparse.ArgumentParser(description="Step time: glibc defaults vs retained memory.")
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting and case")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    import pandas as pd

    from benchmarks.report.tables import markdown_table

    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid; allowed: an integer >= 1")
    lines = [
        "# Harness step time: glibc malloc defaults vs freed memory retained",
        "",
        f"`python -m benchmarks.throughput.allocator --repeats {args.repeats}`: "
        "linear Bernoulli VAE, "
        "1 torch thread, default estimator options; median over 7 blocks of about 0.3 s in "
        f"each of {args.repeats} fresh processes per setting (alternated), median over "
        "processes. Retained: mmap threshold "
        f"{MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB.",
        "",
        f"- {platform.platform()}, {os.cpu_count()} CPUs; load average before: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for name, batch in CASES:
        times: dict[str, list[float]] = {"system": [], "retain": []}
        for _ in range(args.repeats):  # alternated, so slow load changes hit both alike
            for malloc in times:
                times[malloc].append(step_ms(name, batch, malloc))
        system, retain = (statistics.median(times[m]) for m in ("system", "retain"))
        rows.append({"estimator": name, "B": batch, "glibc defaults (ms)": f"{system:.2f}",
                     "retained (ms)": f"{retain:.2f}",
                     "retained / defaults": f"{retain / system:.3f}"})  # fmt: skip
        print(" ".join(str(v) for v in rows[-1].values()), flush=True)  # progress
    lines.append(markdown_table(pd.DataFrame(rows)))
    print(lines[-1])
    lines.append("- load average after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(lines[-1])
    if args.out:
        from benchmarks.records.files import atomic_write_bytes

        atomic_write_bytes(Path(args.out), ("\n".join(lines) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
