"""``gradbench-probe RUN_DIR --estimators ...``: probe estimators at every model snapshot of one
training run (the cross-estimator variance-versus-progress curve), write
``RUN_DIR/probe_trajectory.parquet`` and print a ranking at the last snapshot. Every option
is checked before any work; the output is replaced only by a complete result.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import estimators
from benchmarks.probe.reference import reference_method
from benchmarks.probe.runner import ProbeRunner, build_estimator, eval_binarized_probe_batch
from benchmarks.probe.trajectory import TRAJECTORY_FILE, ranking_table, warm_up
from benchmarks.report.tables import markdown_table
from estimators.exact import MAX_CONFIGS, num_configurations


def parse_estimator_spec(spec: str) -> dict:
    """``name`` or ``name:key=value,key=value`` (values parsed as YAML scalars) as a dict."""
    import yaml

    name, _, rest = spec.partition(":")
    entry: dict = {"name": name}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--estimators entry {spec!r}: expected key=value, got {item!r}")
        try:
            entry[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            why = getattr(err, "problem", None) or err
            raise ValueError(
                f"--estimators entry {spec!r}: {item!r} is not a YAML value ({why})"
            ) from err
    return entry


#: The values ``--reference`` takes besides a registry name.
REFERENCE_KINDS = ("auto", "exact", "none")


def check_arguments(
    *,
    num_estimates: int,
    reference: str,
    reference_samples: int,
    reference_estimates: int,
    groups: int,
    chunk: int,
    device: str,
    seed: int = 0,
) -> torch.device:
    """Check the options of ``gradbench-probe`` before any work; return the device.

    Raises ``ValueError`` naming the option (as spelt on the command line) and the allowed
    values.
    """

    def require(ok: bool, option: str, value: object, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{option}={value} is invalid; allowed: {allowed}")

    require(groups >= 2, "--groups", groups, "an integer >= 2 (jackknife groups)")
    require(
        num_estimates >= 2 * groups, "--num-estimates", num_estimates,
        f"an integer >= 2 * --groups = {2 * groups}",
    )  # fmt: skip
    require(chunk >= 1, "--chunk", chunk, "an integer >= 1")
    require(seed >= 0, "--seed", seed, "an integer >= 0")
    refs = (*REFERENCE_KINDS, *estimators.available())
    require(reference in refs, "--reference", reference, ", ".join(refs))
    if reference not in ("exact", "none"):  # a Monte Carlo reference may be used
        require(reference_samples >= 1, "--reference-samples", reference_samples, ">= 1")
        require(
            reference_estimates >= 2 * groups, "--reference-estimates", reference_estimates,
            f"an integer >= 2 * --groups = {2 * groups}",
        )  # fmt: skip
    if reference not in REFERENCE_KINDS:
        check_reference_samples(reference, reference_samples)
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device={device} is invalid; allowed: cpu, cuda, cuda:N") from err
    if torch_device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device={device}: CUDA is not available here; allowed: cpu")
        if torch_device.index is not None and torch_device.index >= count:
            allowed = ", ".join(["cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
            raise ValueError(f"--device={device}: no such GPU; allowed: {allowed}")
    elif torch_device.type != "cpu":
        raise ValueError(f"--device={device} is invalid; allowed: cpu, cuda, cuda:N")
    return torch_device


def check_reference_samples(method: str, reference_samples: int) -> None:
    """``ValueError`` naming ``--reference-samples`` when the ``method`` reference estimator
    does not accept that many samples (e.g. rloo needs at least 2)."""
    try:
        estimators.get(method, num_samples=reference_samples)
    except ValueError as err:
        raise ValueError(
            f"--reference-samples={reference_samples} is invalid for the {method} reference "
            f"gradient: {err}"
        ) from err


def _load_run(run_dir: Path) -> tuple[dict, list[Path]]:
    """``run_dir``'s ``run.json`` fields and its model snapshots, oldest first."""
    from benchmarks.harness.train import SNAPSHOTS
    from benchmarks.records.runs import RunRecord

    record = RunRecord.load(run_dir / "run.json")
    if record is None or "config" not in record.data:
        raise FileNotFoundError(f"{run_dir / 'run.json'} not found or has no config")
    snapshots = sorted((run_dir / SNAPSHOTS).glob("step_*.pt"))
    if not snapshots:
        raise FileNotFoundError(
            f"no model snapshots in {run_dir / SNAPSHOTS}; train with snapshot_every=N"
        )
    return record.data, snapshots


def _build_run(run_dir: Path, data: dict, specs: Sequence[str], device: torch.device):
    """The run's ``(family, kl, seed)``, the ``(label, estimator)`` basket of ``specs``, the
    run's model and its probe batch, on ``device``; a config that is not a gradbench-train
    run's is a ``ValueError`` naming ``run.json``."""
    from benchmarks.harness.build import build_model, estimator_label, load_data

    try:  # a damaged or foreign run.json: a message naming it, not a traceback
        cfg = OmegaConf.create(data["config"])
        family, kl, run_seed = str(cfg.model.family), str(cfg.model.kl), int(cfg.seed)
        basket = []
        for i, spec in enumerate(specs):
            entry = parse_estimator_spec(spec)
            if entry["name"] in estimators.available():
                entry = {**estimators.options(entry["name"]), **entry}
            est = build_estimator(entry, family, f"--estimators[{i}]")
            basket.append((entry.get("label") or estimator_label(entry, None), est))
        dataset = load_data(cfg)
        model = build_model(cfg, dataset).to(device)
        batch = eval_binarized_probe_batch(cfg, dataset).to(device)
    except (OmegaConfBaseException, TypeError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{run_dir / 'run.json'}: its config is not that of a gradbench-train run ({why})"
        ) from err
    basket = [(label, est.to(device)) for label, est in basket]
    return (family, kl, run_seed), basket, model, batch


def _check_reference(
    reference: str, reference_samples: int, model, batch: torch.Tensor, family: str
) -> None:
    """The reference that depends on the model: ``auto``'s Monte Carlo estimator must accept
    ``--reference-samples``; ``exact`` needs a latent space small enough to enumerate."""
    if reference == "auto":  # which Monte Carlo reference, if any, depends on the model
        method = reference_method(model, batch[:1])
        if method != "exact":
            check_reference_samples(method, reference_samples)
    if reference == "exact":
        with torch.no_grad():
            q = model.distribution(model.encoder(batch[:1]))
        n = num_configurations(q) if family in ("bernoulli", "categorical") else None
        if n is None or n > MAX_CONFIGS:
            size = "continuous" if n is None else f"more than {MAX_CONFIGS} configurations"
            raise ValueError(
                f"--reference=exact cannot enumerate this run's latent space ({family}, "
                f"{size}); allowed here: auto, none or a registry name"
            )


def probe_trajectory(
    run_dir: Path,
    specs: Sequence[str],
    *,
    num_estimates: int = 100,
    reference: str = "auto",
    reference_samples: int = 20,
    reference_estimates: int = 100,
    groups: int = 20,
    chunk: int = 100,
    device: str = "cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """Probe the estimators ``specs`` at every model snapshot of ``run_dir``.

    The cross-estimator variance-versus-progress curve: every estimator is measured at the
    same parameters (the snapshots of one shared training trajectory) on the same fixed probe
    batch (the run's own probe batch). At each snapshot every estimator's running state
    (moving averages) is first warmed up there by 200 estimates drawn from a stream seeded
    by (``seed``, step) (:func:`~benchmarks.harness.evaluate.eval_seed`), apart from the
    probe's, so the same command gives the same rows. Returns tidy rows with the metrics columns.
    """
    from benchmarks.harness import checkpoint
    from benchmarks.harness.evaluate import eval_seed
    from benchmarks.records.runs import COLUMNS

    torch_device = check_arguments(
        num_estimates=num_estimates, reference=reference, reference_samples=reference_samples,
        reference_estimates=reference_estimates, groups=groups, chunk=chunk, device=device,
        seed=seed,
    )  # fmt: skip
    data, snapshots = _load_run(run_dir)
    (family, kl, run_seed), basket, model, batch = _build_run(run_dir, data, specs, torch_device)
    _check_reference(reference, reference_samples, model, batch, family)
    runner = ProbeRunner(
        basket[1:], batch, num_estimates=num_estimates, groups=groups, chunk=chunk,
        reference=reference, reference_samples=reference_samples,
        reference_estimates=reference_estimates, kl=kl,
    )  # fmt: skip
    keys = ("run_id", "estimator", "estimator_label", "family", "dataset", "model")
    identity = {k: data.get(k) for k in keys}
    rows = []
    devices = [batch.device] if batch.device.type == "cuda" else []
    for path in snapshots:
        state = checkpoint.load(path)
        model.load_state_dict(state["model"])
        with torch.random.fork_rng(devices=devices):  # seeded: the same command, same rows
            # Apart from the probe's stream (seed * 1_000_003 + step), whose samples the
            # warmed-up baselines must not have seen.
            torch.manual_seed(eval_seed(seed, int(state["step"])) + 3)
            for _, est in basket:
                warm_up(est, model, batch, kl)
        for r in runner(model, basket[0], seed * 1_000_003 + int(state["step"])):
            rows.append({**identity, "seed": run_seed, "step": int(state["step"]),
                         "wall_time": float("nan"), "f_evals": int(state["f_evals"]),
                         "split": "probe", **r})  # fmt: skip
    df = pd.DataFrame(rows)
    df["f_evals"] = df["f_evals"].astype("int64")
    return df[list(COLUMNS)]


def main(argv: list[str] | None = None) -> int:
    """``gradbench-probe RUN_DIR --estimators NAME[:k=v,...] ...``: probe a trajectory."""
    import argparse

    from benchmarks.harness.checkpoint import CheckpointError
    from benchmarks.records.files import atomic_write_bytes

    parser = argparse.ArgumentParser(
        prog="gradbench-probe",
        description="Probe estimators at the model snapshots of one training run "
        "(train it with snapshot_every=N); writes RUN_DIR/probe_trajectory.parquet and "
        "prints a ranking table at the last snapshot.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--estimators",
        nargs="+",
        required=True,
        help="registry names, or name:key=value,... (e.g. rloo:num_samples=8)",
    )
    parser.add_argument("--num-estimates", type=int, default=100)
    parser.add_argument("--reference", default="auto",
                        help="auto | exact | none | <registry name>")  # fmt: skip
    parser.add_argument("--reference-samples", type=int, default=20)
    parser.add_argument("--reference-estimates", type=int, default=100)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: RUN_DIR/" + TRAJECTORY_FILE
    )
    args = parser.parse_args(argv)
    try:
        df = probe_trajectory(
            args.run_dir, args.estimators, num_estimates=args.num_estimates,
            reference=args.reference, reference_samples=args.reference_samples,
            reference_estimates=args.reference_estimates, groups=args.groups, chunk=args.chunk,
            device=args.device, seed=args.seed,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"gradbench-probe: error: {err}", file=sys.stderr)
        return 2
    # The output is replaced only by a complete result: the ranking is built (and the rows
    # serialized) before the file is written, atomically.
    ranking = markdown_table(ranking_table(df), floatfmt="g")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    out = args.out or args.run_dir / TRAJECTORY_FILE
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as err:
        print(f"gradbench-probe: error: --out {out}: {err}", file=sys.stderr)
        return 1
    print(ranking)
    print(f"\n{len(df)} rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
