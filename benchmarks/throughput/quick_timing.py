"""``python -m benchmarks.throughput.quick_timing``: the README's quick sweep timed side by side
with the same sweep at a baseline commit, alternating the two (ABBA), into temporary folders.

    python -m benchmarks.throughput.quick_timing --baseline 7ac4880 --repeats 2
    python -m benchmarks.throughput.quick_timing --baseline HEAD --repeats 1 steps=20 seed=0

The baseline's files come from ``git archive <baseline>`` into a temporary folder; both sweeps
run ``python -m benchmarks.train experiment=quick --multirun hydra/launcher=joblib`` (plus any
extra overrides, e.g. to time a tiny sweep) with this interpreter, each with its own tree first
on ``PYTHONPATH``, one after the other: repeat ``r`` runs baseline then current when ``r`` is
even, current then baseline when odd, so a drift of the machine's load weighs on both. Writes a
tidy record (one row per sweep: side, commit, repeat, order, wall seconds, children's CPU
seconds, load average before, exit code, completed runs) and a summary with the ratio
current / baseline of the median wall times, as JSON and Markdown. Time it on idle cores: the
load average before each sweep is recorded to show it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.timing import PHASES
from benchmarks.records.files import atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]
#: The README's quick sweep (``gradbench-train experiment=quick --multirun ...``).
SWEEP = ("experiment=quick", "--multirun", "hydra/launcher=joblib")
SIDES = ("baseline", "current")


def commit_of(rev: str, repo: Path = REPO) -> str:
    """The full commit hash of ``rev`` (a ``ValueError`` naming it if git does not know it)."""
    out = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise ValueError(f"--baseline {rev!r} is not a commit of {repo}: {out.stderr.strip()}")
    return out.stdout.strip()


def export_tree(commit: str, dest: Path, repo: Path = REPO) -> Path:
    """The files of ``commit`` (``git archive``) extracted into ``dest``; returns ``dest``."""
    data = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def plan(repeats: int) -> list[tuple[int, str]]:
    """``(repeat, side)`` in run order: ABBA (baseline first in even repeats)."""
    order = []
    for r in range(repeats):
        sides = SIDES if r % 2 == 0 else SIDES[::-1]
        order += [(r, side) for side in sides]
    return order


def count_completed(sweep_dir: Path) -> int:
    """Runs under ``sweep_dir`` whose ``run.json`` says ``completed``."""
    n = 0
    for path in sweep_dir.rglob("run.json"):
        try:
            n += json.loads(path.read_text()).get("status") == "completed"
        except (OSError, ValueError, AttributeError):
            continue
    return n


def phase_totals(sweep_dir: Path) -> dict[str, Any]:
    """From the runs' ``run.json`` ``timing`` (commits that record it): each phase's seconds
    summed over the runs, and the largest and median start-up of one run; empty without."""
    timings = []
    for path in sweep_dir.rglob("run.json"):
        try:
            timing = json.loads(path.read_text()).get("timing")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(timing, dict) and timing:
            timings.append(timing)
    if not timings:
        return {}
    totals = {k: sum(t.get(k, 0.0) for t in timings) for k in timings[0]}
    startups = [t.get("startup_s", 0.0) for t in timings]
    return {"phase_seconds": totals, "startup_max_s": max(startups),
            "startup_median_s": statistics.median(startups)}  # fmt: skip


def time_sweep(tree: Path, sweep_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Run the quick sweep of ``tree`` into ``sweep_dir``; its wall and CPU seconds."""
    cmd = [sys.executable, "-m", "benchmarks.train", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *overrides], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
    return {
        "seconds": seconds,
        "cpu_user_s": after.ru_utime - before.ru_utime,
        "cpu_sys_s": after.ru_stime - before.ru_stime,
        "loadavg_before": load,
        "returncode": proc.returncode,
        "completed_runs": count_completed(sweep_dir),
        **phase_totals(sweep_dir),
    }


def measure(
    trees: dict[str, Path], commits: dict[str, str], repeats: int, work: Path,
    overrides: Sequence[str], timer: Callable[..., dict[str, Any]] = time_sweep,
) -> list[dict[str, Any]]:  # fmt: skip
    """The tidy record: one row per sweep of :func:`plan`, timed by ``timer``."""
    rows = []
    for order, (r, side) in enumerate(plan(repeats)):
        result = timer(trees[side], work / f"{side}-{r}", overrides)
        rows.append({"side": side, "commit": commits[side], "repeat": r, "order": order,
                     **result})  # fmt: skip
        print(f"{side} (repeat {r}): {result['seconds']:.1f} s", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall seconds per side, the ratio current / baseline of the medians and of each
    repeat's pair, and whether every sweep exited 0 with the same number of completed runs."""
    by = {s: [r for r in rows if r["side"] == s] for s in SIDES}
    median = {s: statistics.median(r["seconds"] for r in by[s]) for s in SIDES}
    pairs = {}
    for r in rows:
        pairs.setdefault(r["repeat"], {})[r["side"]] = r["seconds"]
    per_repeat = [p["current"] / p["baseline"] for _, p in sorted(pairs.items()) if len(p) == 2]
    completed = {r["completed_runs"] for r in rows}
    train = [r["phase_seconds"]["train_s"] for r in by["current"] if r.get("phase_seconds")]
    workers = os.cpu_count() or 1  # the joblib launcher's default: one job per core
    # Training alone, spread over the workers: no sweep of these runs can take less.
    floor = statistics.median(train) / workers if train else None
    return {
        "median_seconds": median,
        "training_floor_s": floor,
        "training_floor_ratio": floor / median["baseline"] if floor else None,
        "workers": workers,
        "ratio": median["current"] / median["baseline"],
        "ratio_per_repeat": per_repeat,
        "all_ok": all(r["returncode"] == 0 for r in rows) and len(completed) == 1,
        "max_loadavg_before": max(r["loadavg_before"] for r in rows),
    }


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], command: str) -> str:
    """The record and summary as a Markdown note."""
    lines = [
        "# Quick sweep: current vs baseline", "", f"Command: `{command}`", "",
        "| order | side | repeat | commit | wall s | CPU user s | load before | exit | done |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['order']} | {r['side']} | {r['repeat']} | {r['commit'][:7]} | "
            f"{r['seconds']:.1f} | {r['cpu_user_s']:.1f} | {r['loadavg_before']:.2f} | "
            f"{r['returncode']} | {r['completed_runs']} |"
        )
    m = summary["median_seconds"]
    per = ", ".join(f"{x:.3f}" for x in summary["ratio_per_repeat"])
    lines += [
        "", f"Median wall time: baseline {m['baseline']:.1f} s, current {m['current']:.1f} s; "
        f"ratio current / baseline {summary['ratio']:.3f} (per repeat: {per}); every sweep "
        f"ok: {summary['all_ok']}; highest load average before a sweep: "
        f"{summary['max_loadavg_before']:.2f}.", "",
    ]  # fmt: skip
    current = [r for r in rows if r["side"] == "current" and r.get("phase_seconds")]
    if current:
        lines += ["Current side, seconds per phase summed over each sweep's runs (`run.json` "
                  "`timing`) and start-up per run:", "",
                  "| repeat | " + " | ".join(PHASES) + " | start-up max | start-up median |",
                  "|---" * (len(PHASES) + 3) + "|"]  # fmt: skip
        for r in current:
            p = r["phase_seconds"]
            lines.append(
                f"| {r['repeat']} | " + " | ".join(f"{p.get(k + '_s', 0.0):.1f}" for k in PHASES)
                + f" | {r['startup_max_s']:.2f} | {r['startup_median_s']:.2f} |"
            )  # fmt: skip
        lines += [
            "",
            f"Training alone spread over {summary['workers']} workers: "
            f"{summary['training_floor_s']:.1f} s, {summary['training_floor_ratio']:.3f} "
            "of the baseline's median sweep (no sweep of these runs can be faster).",
            "",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (extra arguments are Hydra overrides appended to both sweeps)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="7ac4880", help="commit to compare with (git rev)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of sweeps (>= 1)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "throughput" / "quick_timing")
    p.add_argument("--work", type=Path, default=None, help="folder for trees and sweeps")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both sweeps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Time both sweeps; write ``<out>.json`` (record and summary) and ``<out>.md``."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print(f"error: --repeats={args.repeats} is invalid; allowed: >= 1", file=sys.stderr)
        return 1
    try:
        commits = {"baseline": commit_of(args.baseline), "current": commit_of("HEAD")}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        trees = {"baseline": export_tree(commits["baseline"], work / "baseline-tree"),
                 "current": REPO}  # fmt: skip
        rows = measure(trees, commits, args.repeats, work, args.overrides)
    summary = summarize(rows)
    command = " ".join(["python -m benchmarks.throughput.quick_timing", *(argv or sys.argv[1:])])
    data = {"command": command, "sweep": list(SWEEP), "overrides": args.overrides,
            "records": rows, "summary": summary}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out.with_suffix(".json"), json.dumps(data, indent=2).encode())
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(rows, summary, command).encode())
    print(markdown(rows, summary, command))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
