"""The harness's training step against its peers, Pyro and Storchastic, on the same model.

Linear Bernoulli VAE (784 pixels, 200 Bernoulli latents, ``nn.Linear`` encoder and decoder,
Bernoulli(1/2) prior), a fixed binary batch of 100, Adam (lr 1e-3), 1 thread, CPU. Each
framework trains with its own idiomatic score-function estimator:

- ``S = 1``: the harness's ``reinforce`` (no baseline, analytic KL); Pyro's
  ``TraceGraph_ELBO`` (score function for the non-reparameterizable ``z``, no baseline);
  Storchastic's ``ScoreFunction("z", n_samples=1)`` (analytic KL as a cost);
- ``S = 8``: the harness's ``rloo`` (leave-one-out); Pyro's ``TraceGraph_ELBO`` with 8
  vectorized particles; Storchastic's ``ScoreFunction`` with 8 samples and its
  ``batch_average`` baseline (the mean of the other samples: leave-one-out).

Each side also runs in its own compiled mode where it has one: the harness with
``compile=true`` (``torch.compile`` of the loss, :func:`~benchmarks.harness.step.
compiled_estimate_loss`) and Pyro with ``JitTraceGraph_ELBO`` (``torch.jit`` traces of the
model and guide); Storchastic has none. Every row is reported against both harness modes.

Pyro runs with validation off and Storchastic without its checks, as the harness builds its
distributions with ``validate_args=False``; the peers use ``torch.optim.Adam``'s default
implementation, the harness the fused Adam of ``make_optimizer`` (its default).

One run times the three steps in interleaved blocks (the order rotates from block to block)
and reports, per ``S`` and peer, the median over blocks of peer time / harness time with a
95% bootstrap interval (``scipy.stats.bootstrap``, :func:`.summary.bootstrap_median_ci`).
Writes ``peers_<device>.json`` (tidy rows, one per ``S`` and framework, and the machine) and
``peers_<device>.md``. Pyro and Storchastic are optional (``pip install -c constraints.txt
-e '.[peers]'``); without them the command says so and exits 2::

    python -m benchmarks.throughput.peers [--blocks 21] [--block-seconds 0.3]
        [--out-dir results/throughput] [--note TEXT]
    python -m benchmarks.throughput.peers --profile   # torch.profiler of the harness at S = 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DATA_DIM, LATENTS, BATCH, LR = 784, 200, 100, 1e-3
#: The peers' packages (import name -> PyPI name).
PEERS = {"pyro": "pyro-ppl", "storch": "storchastic"}
#: Target: the harness at least this many times faster than each peer (issue 18).
TARGET = 2.5
#: The frameworks compared with the harness (the other rows are the harness and its bound).
PEER_NAMES = ("pyro", "pyro_jit", "storchastic")
#: The harness's two modes: eager and ``compile=true``.
HARNESS_NAMES = ("harness", "harness_compiled")


def missing_peers() -> list[str]:
    """PyPI names of the peer packages that are not installed."""
    return [pypi for mod, pypi in PEERS.items() if importlib.util.find_spec(mod) is None]


def _batch(seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(BATCH, DATA_DIM, generator=gen) < 0.3).float()


def _networks(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(DATA_DIM, LATENTS), nn.Linear(LATENTS, DATA_DIM)


def harness_step(num_samples: int, compiled: bool = False) -> Callable[[], Tensor]:
    """The harness's step (:func:`.bench_throughput.harness_step`): reinforce at ``S = 1``,
    rloo otherwise; ``compiled``: with ``compile=true`` (the loss under ``torch.compile``,
    compiled by its first calls, which the warm-up makes)."""
    from benchmarks.throughput.bench_throughput import build, harness_step_compiled, make_case
    from benchmarks.throughput.bench_throughput import harness_step as step

    name = "reinforce" if num_samples == 1 else "rloo"
    setup = build(make_case(name, {}, "bernoulli", BATCH, num_samples))
    return harness_step_compiled(setup) if compiled else step(setup)


def harness_compiled_step(num_samples: int) -> Callable[[], Tensor]:
    """:func:`harness_step` with ``compile=true``."""
    return harness_step(num_samples, compiled=True)


def pyro_jit_step(num_samples: int) -> Callable[[], Tensor]:
    """:func:`pyro_step` with ``JitTraceGraph_ELBO`` (traced by its first call)."""
    return pyro_step(num_samples, jit=True)


def pyro_step(num_samples: int, jit: bool = False) -> Callable[[], Tensor]:
    """One ``SVI.step`` of ``TraceGraph_ELBO`` (``num_samples`` vectorized particles;
    ``jit``: ``JitTraceGraph_ELBO``)."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, JitTraceGraph_ELBO, TraceGraph_ELBO

    pyro.clear_param_store()  # a step re-registers its networks at every call
    # Both Pyro steps of a block share the param store: each registers its networks under
    # names of its own (a shared name would swap the other step's parameters in).
    prefix = "jit_" if jit else ""
    pyro.enable_validation(False)
    encoder, decoder = _networks()
    x = _batch()

    def model(x: Tensor) -> None:
        pyro.module(f"{prefix}decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Bernoulli(logits=x.new_zeros(x.shape[0], LATENTS)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module(f"{prefix}encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=encoder(x)).to_event(1))

    elbo = (JitTraceGraph_ELBO if jit else TraceGraph_ELBO)(
        num_particles=num_samples, vectorize_particles=num_samples > 1, max_plate_nesting=1
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), elbo)
    return lambda: svi.step(x)


def storch_step(num_samples: int) -> Callable[[], Tensor]:
    """One Storchastic step: ``ScoreFunction`` (``batch_average`` leave-one-out baseline
    when ``num_samples > 1``), analytic KL and the Bernoulli likelihood as costs."""
    import storch
    from storch.method import ScoreFunction
    from torch.distributions import Bernoulli, kl_divergence

    encoder, decoder = _networks()
    x = _batch()
    baseline = "batch_average" if num_samples > 1 else "none"
    method = ScoreFunction("z", n_samples=num_samples, baseline_factory=baseline)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)

    def step() -> Tensor:
        optimizer.zero_grad()
        storch.reset()
        data = storch.denote_independent(x, 0, "data")
        q = Bernoulli(logits=encoder(data), validate_args=False)
        prior = Bernoulli(logits=torch.zeros_like(q.logits), validate_args=False)
        storch.add_cost(kl_divergence(q, prior).sum(-1), "kl")
        z = method(q)
        p = Bernoulli(logits=decoder(z), validate_args=False)
        storch.add_cost(-p.log_prob(data).sum(-1), "reconstruction")
        cost = storch.backward()
        optimizer.step()
        return cost

    return step


def kernels_step(num_samples: int) -> Callable[[], Tensor]:
    """The arithmetic every implementation of the step must do, and nothing else: the
    encoder's and decoder's matrix products forward, the decoder's and encoder's weight
    gradients, ``S x B`` Bernoulli draws, the likelihood ``-BCE`` of the ``[S, B, 784]``
    logits and its gradient ``x - sigmoid(l)``, and the fused Adam update; plain tensor
    calls, no autograd, no distributions. Its time bounds what any framework built on
    torch's kernels can reach on this model: a peer time over it is the largest speed-up
    that the same arithmetic allows."""
    import torch.nn.functional as F

    encoder, decoder = _networks()
    x = _batch()
    params = [*encoder.parameters(), *decoder.parameters()]
    grads = [torch.zeros_like(p) for p in params]
    optimizer = torch.optim.Adam(params, lr=LR, fused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def step() -> Tensor:
        with torch.no_grad():
            probs = torch.sigmoid(F.linear(x, encoder.weight, encoder.bias))  # [B, L]
            z = (torch.rand(num_samples, *probs.shape) < probs).float()  # [S, B, L]
            logits = F.linear(z, decoder.weight, decoder.bias)  # [S, B, D]
            target = x.expand_as(logits)
            ll = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
            delta = (target - torch.sigmoid(logits)).reshape(-1, DATA_DIM)  # d ll / d logits
            torch.mm(delta.T, z.reshape(-1, LATENTS), out=grads[2])  # decoder weight
            torch.sum(delta, 0, out=grads[3])
            score = (ll - ll.mean(0))[..., None] * (z - probs)  # [S, B, L]
            torch.mm(score.sum(0).T, x, out=grads[0])  # encoder weight
            torch.sum(score, (0, 1), out=grads[1])
        optimizer.step()
        return ll

    return step


#: Framework -> step factory, in the order of the first block (``kernels``: the bound).
STEPS: dict[str, Callable[[int], Callable[[], Any]]] = {
    "harness": harness_step,
    "harness_compiled": harness_compiled_step,
    "pyro": pyro_step,
    "pyro_jit": pyro_jit_step,
    "storchastic": storch_step,
    "kernels": kernels_step,
}


def interleaved_times(
    steps: dict[str, Callable[[], Any]], blocks: int, block_seconds: float, warmup: int = 5
) -> dict[str, list[float]]:
    """Seconds per call of each step in each of ``blocks`` blocks; a block times ``n`` calls
    of every step one after the other (``n`` from the slowest step, so a block of it lasts
    about ``block_seconds``), the order rotating from block to block."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    slowest = 0.0
    for fn in steps.values():
        start = time.perf_counter()
        for _ in range(3):
            fn()
        slowest = max(slowest, (time.perf_counter() - start) / 3)
    n = max(3, round(block_seconds / slowest))
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(blocks):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, start = steps[name], time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return times


def measure(blocks: int, block_seconds: float, sizes: Sequence[int] = (1, 8)) -> list[dict]:
    """Tidy rows ``{num_samples, framework, estimator, ms, ratio, ci_low, ci_high, ...}``:
    ``ratio`` = framework time / eager harness time (median over blocks), and
    ``ratio_compiled`` with its interval the same against the harness with ``compile=true``;
    ``meets_target`` / ``meets_target_compiled`` for the peers."""
    from benchmarks.throughput.summary import bootstrap_median_ci

    estimator = {
        1: {"harness": "reinforce", "harness_compiled": "reinforce, compile=true",
            "pyro": "TraceGraph_ELBO", "pyro_jit": "JitTraceGraph_ELBO",
            "storchastic": "ScoreFunction", "kernels": "its kernels alone"},
        8: {"harness": "rloo", "harness_compiled": "rloo, compile=true",
            "pyro": "TraceGraph_ELBO (vectorized particles)",
            "pyro_jit": "JitTraceGraph_ELBO (vectorized particles)",
            "storchastic": "ScoreFunction (batch_average)", "kernels": "its kernels alone"},
    }  # fmt: skip
    rows = []
    for s in sizes:
        load = os.getloadavg()[0]
        times = interleaved_times({k: f(s) for k, f in STEPS.items()}, blocks, block_seconds)
        for name, t in times.items():
            row = {
                "num_samples": s, "framework": name, "estimator": estimator[min(s, 8)][name],
                "batch_size": BATCH, "threads": torch.get_num_threads(),
                "ms": 1e3 * float(np.median(t)), "blocks": blocks,
                "target": TARGET if name in PEER_NAMES else None,
                "bound": (float(np.median(np.asarray(t) / np.asarray(times["kernels"])))
                          if name in PEER_NAMES else None),
                "loadavg_1m_start": load, "block_ms": [1e3 * v for v in t],
            }  # fmt: skip
            for base, suffix in zip(HARNESS_NAMES, ("", "_compiled"), strict=True):
                ratios = np.asarray(t) / np.asarray(times[base])
                low, high = bootstrap_median_ci(ratios)
                ratio = float(np.median(ratios))
                row.update({
                    f"ratio{suffix}": ratio, f"ci_low{suffix}": low, f"ci_high{suffix}": high,
                    f"meets_target{suffix}": ratio >= TARGET if name in PEER_NAMES else None,
                })  # fmt: skip
            rows.append(row)
            print(f"S={s} {name:16s} {row['ms']:8.2f} ms  x{row['ratio']:.2f} "
                  f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]  compiled "
                  f"x{row['ratio_compiled']:.2f}", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict], machine: dict[str, Any]) -> str:
    """The table of :func:`measure`'s rows, with the machine's load."""
    import pandas as pd

    from benchmarks.report.tables import markdown_table

    def met(value: bool | None) -> str:
        return "—" if value is None else ("yes" if value else "no")

    cells = pd.DataFrame([
        [r["num_samples"], r["framework"], r["estimator"], f"{r['ms']:.2f}",
         f"{r['ratio']:.2f}", f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
         met(r["meets_target"]),
         f"{r['ratio_compiled']:.2f}",
         f"[{r['ci_low_compiled']:.2f}, {r['ci_high_compiled']:.2f}]",
         met(r["meets_target_compiled"]),
         "—" if r.get("bound") is None else f"{r['bound']:.2f}"]
        for r in rows
    ], columns=["S", "framework", "estimator", "ms / step", "time / harness", "95% CI",
                f"met (>= {TARGET:g})", "time / harness compiled", "95% CI (compiled)",
                f"met compiled (>= {TARGET:g})", "time / kernels"])  # fmt: skip
    lines = [
        f"# The harness against Pyro and Storchastic on {machine['device']} (1 thread)",
        "",
        "One training step of the linear Bernoulli VAE (784-200, batch 100, Adam), timed in "
        "interleaved blocks; time / harness = median over blocks of the framework's time over "
        "the eager harness's in the same block, time / harness compiled the same against the "
        "harness with `compile=true`, 95% bootstrap intervals (`benchmarks/throughput/"
        "peers.py`). Like for like: eager against `harness` and `pyro`, compiled against "
        "`harness_compiled` and `pyro_jit` (Pyro's `torch.jit` mode); Storchastic has no "
        "compiled mode. `kernels` times the arithmetic any implementation must do (matrix "
        "products, sampling, the likelihood and its gradient, the Adam update) with plain "
        "eager tensor calls; a peer's time / kernels is the largest speed-up over it that this "
        "arithmetic on torch's eager kernels allows (compiled code fuses kernels and can go "
        "below it).",
        "",
        f"- date: {machine['date']}; commit {machine.get('git_commit')} (dirty: "
        f"{machine.get('git_dirty')}); versions: {machine['versions']}",
        f"- load average before: {machine['loadavg_before']}; after: {machine['loadavg_after']}",
    ]
    if machine.get("note"):
        lines.append(f"- note: {machine['note']}")
    return "\n".join([*lines, "", markdown_table(cells).rstrip()]) + "\n"


def profile_harness(num_samples: int = 8, steps: int = 20, rows: int = 15) -> str:
    """The ``torch.profiler`` table (self CPU time, by operator and input shape) of ``steps``
    harness steps at ``num_samples``: where the step's time goes."""
    from torch.profiler import profile

    step = harness_step(num_samples)
    for _ in range(5):
        step()
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45
    )
    return f"harness step, S={num_samples}, {steps} steps, 1 thread:\n{table}"


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and write ``peers_cpu.json`` / ``.md``; exit 2 when a peer is missing."""
    import sys
    from importlib.metadata import version

    from benchmarks.harness.allocator import retain_freed_memory
    from benchmarks.throughput.bench_throughput import torch_threads
    from benchmarks.throughput.measurement import machine_before, write_measurement

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=21, help="blocks per S (>= 3)")
    parser.add_argument("--block-seconds", type=float, default=0.3, help="seconds per block")
    parser.add_argument("--out-dir", default="results/throughput")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument(
        "--profile", action="store_true", help="print the harness's S=8 step profile and stop"
    )
    args = parser.parse_args(argv)
    if args.blocks < 3:
        parser.error(f"--blocks={args.blocks} is invalid; allowed: an integer >= 3")
    if not args.block_seconds > 0:
        parser.error(f"--block-seconds={args.block_seconds} is invalid; allowed: a number > 0")
    if args.profile:
        retain_freed_memory()
        with torch_threads(1):
            print(profile_harness())
        return 0
    if missing := missing_peers():
        print(f"peers: {', '.join(missing)} not installed; install them with "
              "pip install -c constraints.txt -e '.[peers]'", file=sys.stderr)  # fmt: skip
        return 2
    machine = machine_before(
        "cpu", args.note, versions={p: version(p) for p in ("torch", *PEERS.values())}
    )
    with torch_threads(1):
        rows = measure(args.blocks, args.block_seconds)
    machine["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown(rows, machine)
    write_measurement(Path(args.out_dir) / "peers_cpu", machine, rows, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
