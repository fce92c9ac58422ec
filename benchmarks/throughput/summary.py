"""Harness overhead as a ratio: harness training step / hand-written training step.

Two modes::

    python -m benchmarks.throughput.summary results/throughput/cpu.json
    python -m benchmarks.throughput.summary --measure [--device cpu] [--out-dir results/throughput]

1. From a pytest-benchmark JSON of ``benchmarks/throughput/bench_throughput.py``: pairs every
   ``harness_step`` with the ``handwritten_step`` of the same case (estimator label, family,
   batch size, ``S``, architecture, device, threads) and prints a Markdown table of median
   times and their ratio. The two medians come from different moments of the run, so under a
   changing load the ratio drifts; use it as an overview.
2. ``--measure [--compile]``: for the acceptance cases (:data:`ACCEPTANCE`: every estimator
   with a hand-written version, with its default options, on the linear Bernoulli VAE at
   batch 100 and 1024, plus reparam on Gaussian latents for information) times the two steps
   *interleaved*: blocks of ``n`` steps (``n`` chosen so a block lasts about
   ``--block-seconds``), harness then hand-written on even blocks and the reverse on odd
   ones, ``--blocks`` pairs. The overhead is the median of
   the per-block ratios, with a 95% percentile-bootstrap interval over blocks; load changes
   slower than a block cancel in each ratio. Writes ``overhead_<device>.json`` and
   ``overhead_<device>.md`` (with the load average before and after, and ``--note``).
   ``--compile`` adds torch.compile'd / eager harness step ratios at batch 100.

A ratio of 1.00 means the harness costs nothing over the hand-written loop; 1.10 means a
harness step takes 10% longer than the same model and estimator written by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# --------------------------------------------------------------------- ratios from a JSON


def ratio_frame(path: str | Path) -> pd.DataFrame:
    """The ``harness_step`` rows of a pytest-benchmark JSON that have a ``handwritten_step``
    of the same case, with ``ratio`` = harness / hand-written median (the report's
    :func:`~benchmarks.report.records.with_reference`, so both divide the same way)."""
    from benchmarks.report.records import load_throughput, with_reference

    tp = with_reference(load_throughput([path]))
    rows = tp[(tp["kind"] == "harness_step") & tp["ratio"].notna()]
    order = ["device", "family", "label", "arch", "batch_size", "num_samples"]
    return rows.sort_values([k for k in order if k in rows]).reset_index(drop=True)


def ratio_table(rows: pd.DataFrame) -> str:
    """Markdown table of :func:`ratio_frame`: median times and their ratio per case."""
    from benchmarks.report.tables import markdown_table

    cells = pd.DataFrame({
        "estimator": rows["label"], "family": rows["family"], "arch": rows["arch"],
        "B": rows["batch_size"], "S": rows["num_samples"], "device": rows["device"],
        "threads": rows["threads"], "harness (ms)": (1e3 * rows["median_s"]).map("{:.2f}".format),
        "hand-written (ms)": (1e3 * rows["ref_s"]).map("{:.2f}".format),
        "harness / hand-written": rows["ratio"].map("{:.2f}".format),
    })  # fmt: skip
    return markdown_table(cells)


# ------------------------------------------------------------------ interleaved measurement


def bootstrap_median_ci(
    values: Sequence[float], n_boot: int = 4000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (``scipy.stats.bootstrap``,
    resampling the values; seeded, so the interval is reproducible)."""
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(values, dtype=float),), np.median, n_resamples=n_boot,
        confidence_level=level, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def interleaved_ratio(
    a: Callable[[], Any],
    b: Callable[[], Any],
    blocks: int = 21,
    block_seconds: float = 0.2,
    warmup: int = 5,
    min_steps: int = 3,
) -> dict[str, Any]:
    """Median over blocks of ``time(a) / time(b)``, timing ``a`` and ``b`` in alternating
    blocks of ``n`` calls each (``a`` first on even blocks, ``b`` first on odd ones).

    Returns ``ratio``, ``ci_low``/``ci_high`` (95% bootstrap over blocks), ``a_ms``/``b_ms``
    (median per-call times over blocks), ``steps_per_block``, ``blocks`` and the per-block
    ``ratios``.
    """
    for _ in range(warmup):
        a()
        b()
    t0 = time.perf_counter()
    for _ in range(min_steps):
        a()
    per_call = (time.perf_counter() - t0) / min_steps
    n = max(min_steps, round(block_seconds / per_call))

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    ta, tb = [], []
    for i in range(blocks):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    low, high = bootstrap_median_ci(ratios)
    return {
        "ratio": float(np.median(ratios)),
        "ci_low": low,
        "ci_high": high,
        "a_ms": 1e3 * float(np.median(ta)),
        "b_ms": 1e3 * float(np.median(tb)),
        "steps_per_block": n,
        "blocks": blocks,
        "ratios": ratios,
    }


#: ``(estimator, options, family, S)`` of the acceptance cases on the linear Bernoulli VAE:
#: each estimator with the defaults of ``conf/estimator/<name>.yaml`` (``{}`` where they are
#: the registry's too), reinforce also with the batch-mean baseline, rloo at ``S = 8`` and
#: the Gumbel-softmax pair at ``tau = 0.5`` (as in the throughput suite); plus reparam on
#: Gaussian latents for information. :func:`acceptance_cases` leaves out those without a
#: hand-written version (:func:`.handwritten_steps.supports`): rebar and relax join once
#: theirs is there.
ACCEPTANCE: list[tuple[str, dict[str, Any], str, int]] = [
    ("reinforce", {"baseline": "moving_average"}, "bernoulli", 1),
    ("reinforce", {"baseline": "batch_mean"}, "bernoulli", 1),
    ("rloo", {}, "bernoulli", 8),
    ("nvil", {}, "bernoulli", 1),
    ("vimco", {}, "bernoulli", 2),
    ("gumbel_softmax", {"temperature": 0.5}, "bernoulli", 1),
    ("gumbel_softmax", {"temperature": 0.5, "straight_through": True}, "bernoulli", 1),
    ("straight_through", {}, "bernoulli", 1),
    ("gumbel_rao", {}, "bernoulli", 1),
    ("arm", {}, "bernoulli", 1),
    ("disarm", {}, "bernoulli", 1),
    ("rebar", {}, "bernoulli", 1),
    ("relax", {}, "bernoulli", 1),
    ("reparam", {}, "gaussian", 1),
    ("iwae", {}, "gaussian", 5),
    ("stl", {}, "gaussian", 5),
    ("dreg", {}, "gaussian", 5),
    ("mvd", {}, "gaussian", 1),
]
#: Gaussian acceptance cases held to the same targets as the Bernoulli ones.
GAUSSIAN_TARGETED = ("iwae", "stl", "dreg", "mvd")


def acceptance_cases(device: str = "cpu", threads: int = 1) -> list[tuple[Any, float | None]]:
    """``(case, target ratio)`` of the acceptance criteria: every estimator of
    :data:`ACCEPTANCE` with a hand-written version, on the linear Bernoulli VAE at batch 100
    (<= 1.10) and 1024 (<= 1.05), rloo with ``S = 8`` (<= 1.10 at both sizes); the Gaussian
    multi-sample and measure-valued ones (iwae, stl, dreg at ``S = 5``, mvd) with the same
    targets; reparam (Gaussian) without a target."""
    from benchmarks.throughput import handwritten_steps
    from benchmarks.throughput.bench_throughput import make_case

    out = []
    for batch, target in ((100, 1.10), (1024, 1.05)):
        for name, options, family, s in ACCEPTANCE:
            if not handwritten_steps.supports(name, family, options):
                continue
            case = make_case(name, options, family, batch, s, "linear", device, threads)
            targeted = family == "bernoulli" or name in GAUSSIAN_TARGETED
            limit = None if not targeted else (1.10 if name == "rloo" else target)
            out.append((case, limit))
    return out


def measure(
    device: str = "cpu",
    threads: int = 1,
    blocks: int = 21,
    block_seconds: float = 0.2,
    note: str = "",
) -> dict[str, Any]:
    """Interleaved harness / hand-written ratios of :func:`acceptance_cases`, with provenance."""
    import torch

    from benchmarks.harness.allocator import retain_freed_memory
    from benchmarks.records.runs import git_state, versions
    from benchmarks.throughput.bench_throughput import (
        build,
        handwritten_step,
        harness_step,
        torch_threads,
    )

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": device,
        "cpu_malloc": retain_freed_memory(),
        "versions": versions(),
        **git_state(),
        "loadavg_before": list(os.getloadavg()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": note,
    }
    results = []
    with torch_threads(threads):
        for case, target in acceptance_cases(device, threads):
            setup = build(case)
            load = os.getloadavg()[0]
            r = interleaved_ratio(
                harness_step(setup), handwritten_step(setup), blocks, block_seconds
            )
            row = {
                "label": case.label,
                "estimator": case.estimator,
                "family": case.family,
                "arch": case.arch,
                "batch_size": case.batch_size,
                "num_samples": case.num_samples,
                "device": device,
                "threads": torch.get_num_threads(),
                "fused_adam": setup.fused,
                "harness_ms": r["a_ms"],
                "handwritten_ms": r["b_ms"],
                "ratio": r["ratio"],
                "ci_low": r["ci_low"],
                "ci_high": r["ci_high"],
                "target": target,
                "meets_target": None if target is None else r["ratio"] <= target,
                "steps_per_block": r["steps_per_block"],
                "blocks": r["blocks"],
                "block_ratios": r["ratios"],
                "loadavg_1m_start": load,
            }
            results.append(row)
            print(
                f"{case.label:38s} B={case.batch_size:<5d} S={case.num_samples} "
                f"{row['harness_ms']:8.2f} ms / {row['handwritten_ms']:8.2f} ms = "
                f"{row['ratio']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
                flush=True,
            )
    machine["loadavg_after"] = list(os.getloadavg())
    return {"machine": machine, "results": results}


def measure_compile(
    device: str = "cpu", threads: int = 1, blocks: int = 21, block_seconds: float = 0.2
) -> list[dict[str, Any]]:
    """Interleaved ratios torch.compile'd harness step / eager harness step for the batch-100
    acceptance cases (``estimate_loss`` compiled; the optimizer step stays eager), with the
    compile time (the first two calls). REBAR and RELAX, which need a double backward, do
    not compile and are left out."""
    import torch

    from benchmarks.throughput.bench_throughput import (
        build,
        compiles,
        harness_step,
        harness_step_compiled,
        torch_threads,
    )

    rows = []
    with torch_threads(threads):
        for case, _ in acceptance_cases(device, threads):
            if case.batch_size != 100 or not compiles(case):
                continue
            compiled = harness_step_compiled(build(case))
            start = time.perf_counter()
            compiled()
            compiled()
            compile_s = time.perf_counter() - start
            r = interleaved_ratio(compiled, harness_step(build(case)), blocks, block_seconds)
            rows.append({
                "label": case.label, "family": case.family, "batch_size": case.batch_size,
                "num_samples": case.num_samples, "compiled_ms": r["a_ms"], "eager_ms": r["b_ms"],
                "ratio": r["ratio"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "compile_s": compile_s,
            })  # fmt: skip
            print(f"compiled / eager {case.label:30s} {r['ratio']:.3f}", flush=True)
            torch._dynamo.reset()
    return rows


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _compile_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The cells of :func:`measure_compile`'s table."""
    return pd.DataFrame(
        [
            [r["label"], r["family"], r["batch_size"], r["num_samples"],
             f"{r['compiled_ms']:.2f}", f"{r['eager_ms']:.2f}", f"{r['ratio']:.3f}",
             f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", f"{r['compile_s']:.1f}"]
            for r in rows
        ],
        columns=["estimator", "family", "B", "S", "compiled (ms)", "eager (ms)",
                 "compiled / eager", "95% CI", "compile (s)"],
    )  # fmt: skip


def overhead_markdown(report: dict[str, Any]) -> str:
    """Markdown table of :func:`measure`'s result, with the machine's load."""
    from benchmarks.report.tables import markdown_table, overhead_frame

    m = report["machine"]
    lines = [
        f"# Harness overhead on {m['device']} ({m['threads']} thread(s))",
        "",
        "Interleaved blocks of training steps, harness (`estimate_loss` + `optimizer_step`) "
        "against the hand-written step (`benchmarks/throughput/handwritten.py`) of the same "
        "model; ratio = median over blocks of harness time / hand-written time, 95% bootstrap "
        "interval over blocks. Linear VAE, 784 pixels, 200 latents, Adam (fused: "
        f"{report['results'][0]['fused_adam'] if report['results'] else '?'}).",
        "",
        f"- date: {m['date']}; torch {m['versions'].get('torch')}; commit "
        f"{m.get('git_commit')} (dirty: {m.get('git_dirty')}); {m['cpu_count']} CPUs",
        f"- load average (1, 5, 15 min) before: {_loads(m['loadavg_before'])}; after: "
        f"{_loads(m['loadavg_after'])}",
    ]
    malloc = m.get("cpu_malloc")
    lines.append(
        "- CPU allocator: "
        + (
            f"{malloc['malloc']}, mmap threshold {malloc['mmap_threshold'] >> 20} MiB, trim "
            f"threshold {malloc['trim_threshold'] >> 20} MiB (`benchmarks/harness/allocator.py`)"
            if malloc
            else "system defaults"
        )
    )
    if m.get("note"):
        lines.append(f"- note: {m['note']}")
    lines += ["", markdown_table(overhead_frame(pd.DataFrame(report["results"]))).rstrip()]
    if report.get("compile"):
        lines += [
            "",
            "torch.compile of `estimate_loss` (optimizer step eager), interleaved against the "
            "eager harness step (REBAR and RELAX need a double backward, which torch.compile "
            "does not support; `compile=true` refuses them):",
            "",
            markdown_table(_compile_frame(report["compile"])).rstrip(),
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Print the ratio table of JSON files, or ``--measure`` and write the overhead files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files")
    parser.add_argument("--measure", action="store_true", help="interleaved measurement")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--blocks", type=int, default=21, help="blocks per case (>= 15)")
    parser.add_argument("--block-seconds", type=float, default=0.2, help="seconds per block")
    parser.add_argument("--out-dir", default="results/throughput", help="for --measure")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument(
        "--compile", action="store_true", help="with --measure: also torch.compile / eager"
    )
    args = parser.parse_args(argv)
    if args.blocks < 3:
        parser.error(f"--blocks={args.blocks} is invalid; allowed: an integer >= 3 (15+ advised)")
    if not args.block_seconds > 0:
        parser.error(f"--block-seconds={args.block_seconds} is invalid; allowed: a number > 0")
    if not args.measure and not args.json:
        parser.error("give pytest-benchmark JSON files, or --measure")
    for path in args.json:
        print(f"## {path}\n")
        print(ratio_table(ratio_frame(path)))
    if args.measure:
        stem = Path(args.out_dir) / f"overhead_{args.device}"
        report = measure(args.device, args.threads, args.blocks, args.block_seconds, args.note)
        write_overhead(stem, report)  # kept even if the compile measurement fails
        if args.compile:
            report["compile"] = measure_compile(
                args.device, args.threads, args.blocks, args.block_seconds
            )
            report["machine"]["loadavg_after"] = list(os.getloadavg())
            write_overhead(stem, report)
        print(overhead_markdown(report))
    return 0


def write_overhead(stem: Path, report: dict[str, Any]) -> None:
    """``report`` as ``<stem>.json`` and its table as ``<stem>.md``, each replaced atomically."""
    from benchmarks.records.files import atomic_write_bytes, write_json

    write_json(stem.with_suffix(".json"), report)
    atomic_write_bytes(stem.with_suffix(".md"), overhead_markdown(report).encode())


if __name__ == "__main__":
    raise SystemExit(main())
