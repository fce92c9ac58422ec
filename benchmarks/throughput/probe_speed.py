"""The probe's speed-up: batched :func:`~benchmarks.probe.moments.gradient_moments` over the
naive loop (:func:`~benchmarks.probe.moments.gradient_moments_loop`), timed interleaved.

For each case of :data:`.bench_probe.ESTIMATORS` (linear VAE 784-200, batch 100), ``M``
estimates by each method in alternating blocks of one call (loop first on odd blocks); the
speed-up is the median over blocks of loop time / batched time, with a 95% bootstrap
interval (:func:`.summary.interleaved_ratio`). Targets (issue 18): at least 3x for reinforce
and rloo, 2x for the others. Writes ``probe_<device>.json`` and ``probe_<device>.md``::

    python -m benchmarks.throughput.probe_speed [--num-estimates 1000] [--blocks 5]
        [--estimators reinforce,rloo,...] [--out-dir results/throughput] [--note TEXT]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

#: Target speed-up per estimator (issue 18); the others need 2x.
TARGETS = {"reinforce": 3.0, "rloo": 3.0}
#: Cases whose bound is measured (:func:`kernels`): name -> (coefficient, samples per estimate).
BOUNDED = {
    "reinforce": ("score", 1), "rloo": ("score", 2), "disarm": ("disarm", 1),
    "reparam": ("reparam", 1),
}  # fmt: skip
COEFFICIENTS = ("score", "disarm", "reparam")


def kernels(
    model: Any, x: Any, num_estimates: int, num_samples: int, chunk: int,
    coefficient: str = "score",
) -> Any:  # fmt: skip
    """The arithmetic that any batched probe of an estimator of the linear VAE must do,
    ``chunk`` estimates at a time, as plain tensor calls (no autograd, no distributions): the
    samples per example and estimate, the decoder's logits, what the estimator needs of the
    likelihood, the per-example gradient ``delta`` with respect to the encoder's output, and
    the last layer's per-estimate gradients ``delta_m^T x`` formed
    :data:`~benchmarks.probe.moments.SQUARE_ROWS` rows at a time and summed with their
    squares. ``coefficient``:

    - ``score`` (Bernoulli; REINFORCE, RLOO): ``S`` independent samples, the likelihoods
      ``f = -BCE``, ``delta = (f - mean_S f)(z - p)`` (``f (z - p)`` at ``S = 1``);
    - ``disarm`` (Bernoulli): ``S`` antithetic pairs ``b = 1[u < p]``,
      ``b~ = 1[u > sigma(-logit)]`` from one uniform each, their likelihoods, and
      ``delta = 1/2 (f(b) - f(b~)) (-1)^b~ 1[b != b~] sigma(|logit|)``;
    - ``reparam`` (Gaussian, softplus scale): ``z = mu + sigma eps``, the likelihood's gradient
      ``g = (x - sigmoid(logits)) W`` in ``z`` (its value is not needed), and
      ``delta = (g - mu, (g eps + 1/sigma - sigma) sigmoid(h_sigma))``, the analytic KL's
      gradient included.

    The loop's time over this is the largest speed-up that a batched probe computing the same
    per-coordinate moments can reach (for the Bernoulli cases the analytic KL's gradient, a
    few ``[B, m, H]`` element-wise operations, is left out, which only makes the bound
    larger)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.probe.moments import SQUARE_ROWS

    if coefficient not in COEFFICIENTS:
        raise ValueError(f"coefficient={coefficient!r}; allowed: {', '.join(COEFFICIENTS)}")
    enc, dec = model.encoder[-1], model.decoder[-1]
    b, d = x.shape
    h = enc.weight.shape[0]

    def likelihood(z: Any, m: int) -> tuple[Any, Any]:
        logits = F.linear(z, dec.weight, dec.bias)  # [S, B, m, D]
        target = x[:, None].expand(b, m, d).contiguous().expand_as(logits)
        return logits, target

    def bernoulli_delta(out: Any, m: int) -> Any:
        probs = torch.sigmoid(out)  # [B, 1, H]
        u = torch.rand(num_samples, b, m, h)  # [S, B, m, H]
        if coefficient == "disarm":
            z = torch.cat([u < probs, u > torch.sigmoid(-out)]).float()  # [2S, B, m, H]
        else:
            z = (u < probs).float()
        lx, target = likelihood(z, m)
        f = -F.binary_cross_entropy_with_logits(lx, target, reduction="none").sum(-1)
        if coefficient == "disarm":
            pair, anti = z[:num_samples], z[num_samples:]
            df = 0.5 * (f[:num_samples] - f[num_samples:])[..., None]
            weight = (1 - 2 * anti) * (pair != anti) * torch.sigmoid(out.abs())
            return (df * weight).sum(0) / (num_samples * b)  # [B, m, H]
        centred = f - f.mean(0) if num_samples > 1 else f
        return (centred[..., None] * (z - probs)).sum(0) / b

    def gaussian_delta(out: Any, m: int) -> Any:
        loc, raw = out.chunk(2, dim=-1)  # [B, 1, L] each
        sigma = F.softplus(raw) + 1e-4
        eps = torch.empty(num_samples, b, m, loc.shape[-1]).normal_()  # [S, B, m, L]
        lx, target = likelihood(loc + sigma * eps, m)
        g = (target - torch.sigmoid(lx)) @ dec.weight  # [S, B, m, L]: d log p(x|z) / dz
        d_loc = (g.sum(0) / num_samples - loc) / b
        d_sigma = (g * eps).sum(0) / num_samples + 1 / sigma - sigma
        return torch.cat([d_loc, d_sigma * torch.sigmoid(raw) / b], -1)  # [B, m, 2L]

    def run() -> Any:
        with torch.no_grad():
            out = F.linear(x, enc.weight, enc.bias)[:, None]  # [B, 1, H]
            sums = x.new_zeros(h, d)
            squares = x.new_zeros(h, d)
            for done in range(0, num_estimates, chunk):
                m = min(chunk, num_estimates - done)
                if coefficient == "reparam":
                    delta = gaussian_delta(out, m)
                else:
                    delta = bernoulli_delta(out, m)
                per = delta.permute(2, 1, 0).contiguous()  # [H, m, B]
                for r in range(0, h, SQUARE_ROWS):
                    g = per[r : r + SQUARE_ROWS] @ x  # [rows, m, D]
                    sums[r : r + SQUARE_ROWS] += g.sum(1)
                    squares[r : r + SQUARE_ROWS] += g.square_().sum(1)
        return sums, squares

    return run


def measure(
    num_estimates: int, blocks: int, chunk: int, device: str, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per case (of ``names``; all by default): median seconds of each method and the
    interleaved speed-up."""
    import torch

    from benchmarks.probe.moments import gradient_moments, gradient_moments_loop
    from benchmarks.throughput.bench_probe import ESTIMATORS, probe_case
    from benchmarks.throughput.bench_throughput import torch_threads
    from benchmarks.throughput.summary import interleaved_ratio

    rows = []
    with torch_threads(1):
        for name, options, family in ESTIMATORS:
            if names is not None and name not in names:
                continue
            model, x, est = probe_case(name, options, family, device)

            def loop(model=model, x=x, est=est):
                return gradient_moments_loop(model, x, est, num_estimates)

            def batched(model=model, x=x, est=est):
                return gradient_moments(model, x, est, num_estimates, chunk=chunk)

            load = os.getloadavg()[0]
            r = interleaved_ratio(loop, batched, blocks, block_seconds=0, warmup=1, min_steps=1)
            bound = None
            if name in BOUNDED:
                kind, samples = BOUNDED[name]
                arithmetic = kernels(model, x, num_estimates, samples, chunk, kind)
                bound = interleaved_ratio(loop, arithmetic, blocks, block_seconds=0, warmup=1,
                                          min_steps=1)  # fmt: skip
            target = TARGETS.get(name, 2.0)
            rows.append({
                "estimator": name, "family": family, "num_estimates": num_estimates,
                "batch_size": x.shape[0], "chunk": chunk, "threads": torch.get_num_threads(),
                "loop_s": r["a_ms"] / 1e3, "batched_s": r["b_ms"] / 1e3,
                "speedup": r["ratio"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "target": target, "meets_target": r["ratio"] >= target,
                "block_ratios": r["ratios"], "loadavg_1m_start": load,
                "kernels_s": None if bound is None else bound["b_ms"] / 1e3,
                "bound": None if bound is None else bound["ratio"],
                "bound_ci": None if bound is None else [bound["ci_low"], bound["ci_high"]],
            })  # fmt: skip
            times = f"loop {r['a_ms'] / 1e3:7.2f} s  batched {r['b_ms'] / 1e3:7.2f} s"
            print(f"{name:15s} {times}  x{r['ratio']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                  + ("" if bound is None else f"  bound x{bound['ratio']:.2f}"),
                  flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The speed-up table with the machine's load."""
    from benchmarks.report.tables import markdown_table

    cells = pd.DataFrame([
        [r["estimator"], r["family"], r["num_estimates"], r["batch_size"],
         f"{r['loop_s']:.2f}", f"{r['batched_s']:.2f}", f"{r['speedup']:.3f}",
         f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]", f">= {r['target']:g}",
         "yes" if r["meets_target"] else "no",
         "—" if r.get("bound") is None else
         f"{r['bound']:.2f} [{r['bound_ci'][0]:.2f}, {r['bound_ci'][1]:.2f}]"]
        for r in rows
    ], columns=["estimator", "family", "M", "B", "loop (s)", "batched (s)", "loop / batched",
                "95% CI", "target", "met", "loop / kernels (bound)"])  # fmt: skip
    return (
        f"# Probe speed-up on {machine['device']} (1 thread)\n\n"
        "Interleaved blocks of one call each: M gradient estimates of the encoder by the naive "
        "loop and by the batched probe (`benchmarks/probe/moments.py`); speed-up = median over "
        "blocks of loop / batched, 95% bootstrap interval. Linear VAE 784-200. For the "
        "bounded cases (score function, DisARM, reparameterization), `loop / kernels` times "
        "the loop against the arithmetic any batched probe of them must do (samples, decoder "
        "products, the likelihoods or, for reparam, their gradient in z, the last layer's "
        "per-estimate gradients and their squares, as plain tensor calls: "
        "`probe_speed.kernels`): the largest speed-up that computing the same moments "
        "allows. Speed-ups to 3 decimals: met means the median is at least the target.\n\n"
        f"- date: {machine['date']}; commit {machine.get('git_commit')} (dirty: "
        f"{machine.get('git_dirty')}); load average before: {machine['loadavg_before']}, "
        f"after: {machine['loadavg_after']}\n"
        + (f"- note: {machine['note']}\n" if machine.get("note") else "")
        + "\n"
        + markdown_table(cells)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write ``probe_<device>.json`` / ``.md``."""
    from benchmarks.throughput.measurement import machine_before, write_measurement

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-estimates", type=int, default=1000, help="M (default 1000)")
    parser.add_argument("--blocks", type=int, default=5, help="blocks per case (>= 3)")
    parser.add_argument("--chunk", type=int, default=50, help="estimates per batched chunk")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out-dir", default="results/throughput")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--estimators", default=None,
                        help="comma-separated cases to measure (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.blocks < 3:
        parser.error(f"--blocks={args.blocks} is invalid; allowed: an integer >= 3")
    if args.num_estimates < 40:
        parser.error(f"--num-estimates={args.num_estimates} is invalid; allowed: >= 40")
    if args.chunk < 1:
        parser.error(f"--chunk={args.chunk} is invalid; allowed: an integer >= 1")
    from benchmarks.throughput.bench_probe import ESTIMATORS

    names = None if args.estimators is None else args.estimators.split(",")
    known = [name for name, _, _ in ESTIMATORS]
    if names is not None and (not names or set(names) - set(known)):
        parser.error(f"--estimators={args.estimators} is invalid; allowed: a comma-separated "
                     f"subset of {', '.join(known)}")  # fmt: skip
    machine = machine_before(args.device, args.note)
    rows = measure(args.num_estimates, args.blocks, args.chunk, args.device, names)
    machine["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown(rows, machine)
    write_measurement(Path(args.out_dir) / f"probe_{args.device}", machine, rows, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
