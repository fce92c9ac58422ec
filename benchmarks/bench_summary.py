"""Summarize a micro-benchmark JSON: median time per call and the S=8 / smallest-S ratio.

Usage: ``python -m benchmarks.bench_summary OUT.json``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def ratios(path: str) -> list[tuple[str, int, float, int, float, float]]:
    """Rows (estimator, S_small, median_small_ms, S_large, median_large_ms, ratio)."""
    with open(path) as fh:
        data = json.load(fh)
    by_est: dict[str, dict[int, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        by_est[info["estimator"]][info["num_samples"]] = bench["stats"]["median"]
    rows = []
    for est, times in sorted(by_est.items()):
        lo, hi = min(times), max(times)
        rows.append((est, lo, 1e3 * times[lo], hi, 1e3 * times[hi], times[hi] / times[lo]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of the ratios."""
    argv = sys.argv[1:] if argv is None else argv
    print("| estimator | S | median ms | S | median ms | ratio |")
    print("|---|---|---|---|---|---|")
    for est, lo, t_lo, hi, t_hi, ratio in ratios(argv[0]):
        print(f"| {est} | {lo} | {t_lo:.2f} | {hi} | {t_hi:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
