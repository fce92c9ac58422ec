"""Summarize a micro-benchmark JSON (``benchmarks/throughput/bench_estimators.py``).

Per estimator (medians of pytest-benchmark):

- ``S=8 / S=1``: the cost of one vectorized call with 8 samples over one with the smallest
  ``S`` (1; 2 for rloo);
- ``vectorized / looped``: the S = 8 call over the same 8 samples drawn by a Python loop of
  smallest calls (a loop costs about 8x the smallest call; vectorizing should cost less);
- ``f share``: the fraction of the S = 8 call spent in f and its backward alone;
- ``f S=8 / S=1``: the same ratio for f and its backward alone, the part no estimator can
  avoid (linear in S): where f dominates, no call can scale much better than this.

Usage: ``python -m benchmarks.throughput.bench_summary OUT.json``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Scaling:
    """Median seconds of one estimator's micro-benchmarks and the ratios derived from them."""

    estimator: str
    s_small: int
    s_large: int
    small: float  # one vectorized call with s_small samples
    large: float  # one vectorized call with s_large samples
    looped: float | None = None  # s_large samples through a loop of s_small calls
    f_small: float | None = None  # f and its backward alone at s_small
    f_large: float | None = None  # ... at s_large

    @property
    def ratio(self) -> float:
        """``large / small``: the S = 8 / S = 1 cost ratio."""
        return self.large / self.small

    @property
    def vs_looped(self) -> float | None:
        """``large / looped``: vectorized over looped cost of the same samples."""
        return None if self.looped is None else self.large / self.looped

    @property
    def f_share(self) -> float | None:
        """Fraction of the ``s_large`` call spent in f alone."""
        return None if self.f_large is None else self.f_large / self.large

    @property
    def f_ratio(self) -> float | None:
        """``f_large / f_small``: the S = 8 / S = 1 ratio of f and its backward alone."""
        if self.f_small is None or self.f_large is None:
            return None
        return self.f_large / self.f_small


def scalings(path: str) -> list[Scaling]:
    """One :class:`Scaling` per estimator in a pytest-benchmark JSON file."""
    with open(path) as fh:
        data = json.load(fh)
    times: dict[str, dict[tuple[str, int], float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        kind = info.get("kind", "vectorized")  # files from before the looped / f tests
        times[info["estimator"]][kind, info["num_samples"]] = bench["stats"]["median"]
    rows = []
    for est, t in sorted(times.items()):
        sizes = sorted(s for kind, s in t if kind == "vectorized")
        lo, hi = sizes[0], sizes[-1]
        rows.append(
            Scaling(
                est,
                lo,
                hi,
                t["vectorized", lo],
                t["vectorized", hi],
                t.get(("looped", hi)),
                t.get(("f_alone", lo)),
                t.get(("f_alone", hi)),
            )
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def scaling_frame(rows: list[Scaling]) -> pd.DataFrame:
    """The cells (text) of the summary table, one row per estimator."""
    return pd.DataFrame(
        [
            {
                "estimator": r.estimator,
                "small S": r.s_small,
                "ms": f"{1e3 * r.small:.2f}",
                "large S": r.s_large,
                "ms at large S": f"{1e3 * r.large:.2f}",
                "S=8 / S=1": f"{r.ratio:.2f}x",
                "looped ms": _fmt(None if r.looped is None else 1e3 * r.looped, ".2f"),
                "vectorized / looped": _fmt(r.vs_looped, ".2f"),
                "f share at S=8": _fmt(r.f_share, ".0%"),
                "f alone S=8 / S=1": _fmt(r.f_ratio, ".2f") + ("" if r.f_ratio is None else "x"),
            }
            for r in rows
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of the ratios."""
    from benchmarks.report.tables import markdown_table

    argv = sys.argv[1:] if argv is None else argv
    print(markdown_table(scaling_frame(scalings(argv[0]))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
