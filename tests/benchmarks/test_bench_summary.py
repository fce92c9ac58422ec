"""The micro-benchmark summary pairs each estimator's calls and derives the ratios."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.throughput import bench_summary


def _bench(estimator: str, kind: str, s: int, median: float) -> dict:
    info = {"estimator": estimator, "kind": kind, "num_samples": s}
    return {"extra_info": info, "stats": {"median": median}}


def test_ratios_of_the_call_the_loop_and_f_alone(tmp_path, capsys) -> None:
    """S=8/S=1, vectorized/looped, f share and f's own S=8/S=1 ratio from the medians."""
    benches = [
        _bench("rloo-bernoulli", "vectorized", 2, 0.004),
        _bench("rloo-bernoulli", "vectorized", 8, 0.012),
        _bench("rloo-bernoulli", "looped", 8, 0.016),
        _bench("rloo-bernoulli", "f_alone", 2, 0.003),
        _bench("rloo-bernoulli", "f_alone", 8, 0.009),
        _bench("reparam-gaussian", "vectorized", 1, 0.002),  # an older file: no looped / f
        _bench("reparam-gaussian", "vectorized", 8, 0.010),
    ]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": benches}))
    rows = {r.estimator: r for r in bench_summary.scalings(str(path))}
    rloo = rows["rloo-bernoulli"]
    assert (rloo.s_small, rloo.s_large) == (2, 8)
    assert rloo.ratio == pytest.approx(3.0)
    assert rloo.vs_looped == pytest.approx(0.75)
    assert rloo.f_share == pytest.approx(0.75)
    assert rloo.f_ratio == pytest.approx(3.0)
    reparam = rows["reparam-gaussian"]
    assert reparam.ratio == pytest.approx(5.0)
    assert reparam.vs_looped is None and reparam.f_ratio is None
    bench_summary.main([str(path)])
    out = re.sub(" +", " ", capsys.readouterr().out)  # the table pads its columns
    assert "| rloo-bernoulli | 2 | 4.00 | 8 | 12.00 | 3.00x | 16.00 | 0.75 | 75% | 3.00x |" in out
    assert "| reparam-gaussian | 1 | 2.00 | 8 | 10.00 | 5.00x | — | — | — | — |" in out
