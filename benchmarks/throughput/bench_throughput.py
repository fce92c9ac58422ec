"""Throughput suite: the harness's training step against a hand-written PyTorch step.

For each case (estimator x family x batch size x ``S`` x architecture x device x threads) on
the VAE of :mod:`benchmarks.harness.vae` (784 pixels; 200 Bernoulli or Gaussian latents, or 20
categorical variables of 10 classes; hidden width 200 for ``nonlinear``) it times these
functions (``kind``), one pytest-benchmark test each, ``test_throughput[<kind>-<case>]``
(the benchmark ``group`` is the kind); a case's kinds run one after the other, the harness
step right before its hand-written reference:

- ``harness_step``: a full training step of the harness, ``estimate_loss`` + ``optimizer_step``
  from :mod:`benchmarks.train`, with the Adam of ``make_optimizer`` (fused where supported);
- ``estimate``: one gradient estimate (``estimate_loss`` + ``backward``, no optimizer);
- ``probe``: ``M = 100`` gradient estimates of the variance probe
  (:func:`benchmarks.probe.gradient_moments`, chunk 100, fewer when ``100 x B x S`` rows
  would not fit; by default one family per estimator);
- ``harness_step_compiled`` (opt-in, ``GRADBENCH_BENCH_COMPILE=1``): ``harness_step`` with
  ``estimate_loss`` under ``torch.compile``, for representative cases with a hand-written
  step (whether compiling pays off depends on the device and the case, hence a benchmark);
- ``handwritten_step``: the same training step written by hand
  (:class:`.handwritten.HandwrittenStep`; only estimators it implements), marked
  ``reference`` so that reports show ``harness_step / handwritten_step`` as the overhead.

Run::

    pytest benchmarks/throughput/bench_throughput.py --benchmark-enable \\
        --benchmark-json results/throughput/cpu.json
    GRADBENCH_BENCH_FULL=1 pytest benchmarks/throughput/bench_throughput.py --benchmark-enable ...
    GRADBENCH_BENCH_THREADS=1,2 pytest benchmarks/throughput/bench_throughput.py \
        --benchmark-enable ...

By default a representative subset runs (:func:`default_cases`): every estimator and family
at batch 100, ``S = 1`` (``S = 8`` for rloo, at least the estimator's minimum), linear; plus a
batch {32, 100, 1024} x ``S`` {1, 8} x {linear, nonlinear} sweep of reinforce, rloo and
gumbel_softmax on Bernoulli latents (without batch 1024 x nonlinear x ``S = 8``).
``GRADBENCH_BENCH_FULL=1`` runs the full cross product. CUDA cases are marked ``gpu`` and
skipped without CUDA; torch runs on 1 thread unless ``GRADBENCH_BENCH_THREADS`` says otherwise
(with 2 threads on 2 busy cores, OpenMP waits stall small ops for milliseconds).

Each benchmark's ``extra_info`` (when benchmarks are enabled) records the case, ``kind``,
``threads``, versions, the load average, memory and FLOP/s:

- ``flops``: matmul FLOPs of one call (2 m n k per matrix product, forward and backward, as
  :class:`torch.utils.flop_counter.FlopCounterMode` counts them from the shapes; the
  optimizer and elementwise work are not counted); ``flops_per_s = flops / median``;
  ``flops_fraction_of_matmul_peak``: that over the FLOP/s of a 2048 x 2048 matmul measured once
  per session on the same device and threads (``matmul_peak_flops_per_s``);
- CPU memory: ``step_peak_bytes`` is the peak of bytes allocated by torch during one call
  above the level at its start (from the profiler's allocation events; frees of blocks
  allocated before the call are not seen, so it is an upper bound); ``rss_peak_bytes`` is the
  *process's* resident high-water mark (``ru_maxrss``) after the benchmark, and
  ``rss_peak_delta_bytes`` how much this benchmark raised it (0 when below an earlier peak);
- CUDA memory: ``step_peak_bytes`` from ``torch.cuda.max_memory_allocated`` (reset before one
  call, minus what was allocated before it) and ``cuda_max_allocated_bytes``.

The ratios from separate pytest-benchmark tests drift with the machine's load; for the
acceptance ratios ``python -m benchmarks.throughput.summary --measure`` times harness and
hand-written steps interleaved.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

import estimators
from benchmarks.harness.build import estimator_label, make_optimizer
from benchmarks.harness.step import (
    backward_inputs,
    compiled_estimate_loss,
    estimate_loss,
    optimizer_step,
)
from benchmarks.harness.vae import VAE
from benchmarks.probe.moments import gradient_moments
from benchmarks.throughput import handwritten_steps

DATA_DIM = 784
HIDDEN_DIM = 200
#: family -> (latent_dim, n_categories)
LATENTS: dict[str, tuple[int, int]] = {
    "bernoulli": (200, 1),
    "gaussian": (200, 1),
    "categorical": (20, 10),
}
BATCH_SIZES = (32, 100, 1024)
NUM_SAMPLES = (1, 8)
ARCHS = ("linear", "nonlinear")
DEVICES = ("cpu", "cuda")
KL = "analytic"
PROBE_ESTIMATES = 100
#: The probe evaluates at most this many decoder rows (replicates x B x S) at once.
PROBE_MAX_ROWS = 100 * 100 * 8
#: Options per estimator (one case each); estimators not listed use their defaults.
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "reinforce": [{"baseline": "moving_average"}, {"baseline": "batch_mean"}],
    "gumbel_softmax": [{"temperature": 0.5}, {"temperature": 0.5, "straight_through": True}],
}
#: Estimators swept over batch size, S and architecture by default (Bernoulli latents).
SWEPT = ("reinforce", "rloo", "gumbel_softmax")
#: Adam as ``conf/optim/adam.yaml`` configures it.
OPTIM = OmegaConf.create({"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "fused": None})


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    estimator: str
    options: tuple[tuple[str, Any], ...]
    family: str
    batch_size: int
    num_samples: int
    arch: str
    device: str = "cpu"
    threads: int = 1

    @property
    def opts(self) -> dict[str, Any]:
        """The estimator's options as a dict (without ``num_samples``)."""
        return dict(self.options)

    @property
    def label(self) -> str:
        """The harness's label, e.g. ``rloo (S=8)`` or ``gumbel_softmax (ST, τ=0.5)``."""
        config = {"name": self.estimator, **self.opts, "num_samples": self.num_samples}
        return estimator_label(config, None)

    @property
    def id(self) -> str:
        """A pytest id: ``reinforce[baseline=moving_average]-bernoulli-B100-S1-linear-cpu-t1``."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        name = f"{self.estimator}[{opts}]" if opts else self.estimator
        return (
            f"{name}-{self.family}-B{self.batch_size}-S{self.num_samples}-{self.arch}"
            f"-{self.device}-t{self.threads}"
        )

    @property
    def has_handwritten(self) -> bool:
        """Whether :mod:`.handwritten` implements this estimator and family."""
        return handwritten_steps.supports(self.estimator, self.family, self.opts)


def make_case(
    name: str,
    options: dict[str, Any],
    family: str,
    batch_size: int = 100,
    num_samples: int = 1,
    arch: str = "linear",
    device: str = "cpu",
    threads: int = 1,
) -> Case:
    """A :class:`Case`, with ``num_samples`` raised to the estimator's minimum."""
    s = max(num_samples, estimators.get(name, **options).min_samples)
    opts = tuple(sorted(options.items()))
    return Case(name, opts, family, batch_size, s, arch, device, threads)


def _configs() -> Iterator[tuple[str, dict[str, Any], str]]:
    for name in estimators.available():
        for options in OPTIONS.get(name, [{}]):
            for family in sorted(estimators.families(name)):
                yield name, options, family


def default_cases(
    devices: tuple[str, ...] = DEVICES, threads: tuple[int, ...] = (1,)
) -> list[Case]:
    """The representative subset (see the module docstring), without duplicates."""
    cases: list[Case] = []
    for dev in devices:
        for t in threads:
            for name, options, family in _configs():
                s = 8 if name == "rloo" else 1
                cases.append(make_case(name, options, family, 100, s, "linear", dev, t))
            for name in SWEPT:
                options = OPTIONS.get(name, [{}])[0]
                for b in BATCH_SIZES:
                    for s in NUM_SAMPLES:
                        for arch in ARCHS:
                            if (b, s, arch) != (1024, 8, "nonlinear"):
                                cases.append(
                                    make_case(name, options, "bernoulli", b, s, arch, dev, t)
                                )
    return list(dict.fromkeys(cases))


def full_cases(devices: tuple[str, ...] = DEVICES, threads: tuple[int, ...] = (1,)) -> list[Case]:
    """The full cross product estimator x options x family x batch x S x arch x device."""
    cases = [
        make_case(name, options, family, b, s, arch, dev, t)
        for dev in devices
        for t in threads
        for name, options, family in _configs()
        for b in BATCH_SIZES
        for s in NUM_SAMPLES
        for arch in ARCHS
    ]
    return list(dict.fromkeys(cases))


def is_representative(case: Case) -> bool:
    """Batch 100, linear, ``S = 1`` (8 for rloo; the minimum where higher)."""
    s = max(8 if case.estimator == "rloo" else 1, estimators.get(case.estimator).min_samples)
    return (case.batch_size, case.arch, case.num_samples) == (100, "linear", s)


def probed_by_default(case: Case) -> bool:
    """A representative case of the estimator's first family in the order bernoulli,
    categorical, gaussian (the probe costs ~1-3 s per call: one family per estimator)."""
    order = [
        f
        for f in ("bernoulli", "categorical", "gaussian")
        if f in estimators.families(case.estimator)
    ]
    # mvd: M estimates x (3 D + 1) f-evaluations per example take minutes at 200 latents.
    return is_representative(case) and case.family == order[0] and case.estimator != "mvd"


def selected_cases() -> list[Case]:
    """The cases of this session: default or (``GRADBENCH_BENCH_FULL=1``) full, per thread
    count of ``GRADBENCH_BENCH_THREADS`` (comma-separated, default 1)."""
    threads = tuple(int(t) for t in os.environ.get("GRADBENCH_BENCH_THREADS", "1").split(","))
    full = os.environ.get("GRADBENCH_BENCH_FULL", "") not in ("", "0")
    return (full_cases if full else default_cases)(DEVICES, threads)


# -------------------------------------------------------------------------- the timed work


@dataclass
class Setup:
    """A model, its estimator, optimizer and a fixed binary batch, for one case."""

    case: Case
    model: VAE
    estimator: estimators.EstimatorBase
    optimizer: torch.optim.Optimizer
    fused: bool
    x: Tensor
    kl: str = "analytic"  # the model's KL mode (``sampled`` for VIMCO, as training requires)
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        self.device = self.x.device


def build(case: Case, seed: int = 0) -> Setup:
    """Model, estimator (train mode), Adam from ``make_optimizer`` and a batch, seeded."""
    device = torch.device(case.device)
    torch.manual_seed(seed)
    latent_dim, n_categories = LATENTS[case.family]
    model = VAE(DATA_DIM, case.family, case.arch, latent_dim, n_categories, HIDDEN_DIM)
    model.to(device)
    est = estimators.get(case.estimator, num_samples=case.num_samples, **case.opts)
    est.to(device).train()
    x = torch.rand(case.batch_size, DATA_DIM, generator=torch.Generator().manual_seed(seed)) < 0.3
    x = x.float().to(device)
    kl = "sampled" if est.objective_kind == "iwae" else KL  # VIMCO trains only with sampled
    if any(torch.nn.parameter.is_lazy(p) for p in est.parameters()):
        from benchmarks.harness.build import materialize_lazy

        materialize_lazy(est, model, x, kl)
    optimizer, fused = make_optimizer([*model.parameters(), *est.parameters()], OPTIM)
    return Setup(case, model, est, optimizer, fused, x, kl)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def harness_step(s: Setup, loss_fn: Callable[..., Any] = estimate_loss) -> Callable[[], Tensor]:
    """One training step through the harness: ``loss_fn`` (``estimate_loss``) +
    ``optimizer_step``."""
    model, est, opt, x, n, sync = (
        s.model, s.estimator, s.optimizer, s.x, s.case.num_samples, _sync(s.device)
    )  # fmt: skip
    kl, inputs = s.kl, backward_inputs(opt, est)

    def step() -> Tensor:
        loss, _ = loss_fn(model, est, x, kl, n)
        optimizer_step(opt, loss, inputs)
        sync()
        return loss

    return step


def harness_step_compiled(s: Setup) -> Callable[[], Tensor]:
    """:func:`harness_step` with ``estimate_loss`` under ``torch.compile`` with eager random
    streams (compiled by the first calls, which the warm-up makes; opt-in:
    ``GRADBENCH_BENCH_COMPILE=1``)."""
    return harness_step(s, compiled_estimate_loss())


def gradient_estimate(s: Setup) -> Callable[[], Tensor]:
    """One gradient estimate: ``estimate_loss`` and ``backward`` (gradients reset first)."""
    model, est, x, n, sync = s.model, s.estimator, s.x, s.case.num_samples, _sync(s.device)
    params = [*model.parameters(), *est.parameters()]

    def estimate() -> Tensor:
        for p in params:
            p.grad = None
        loss, _ = estimate_loss(model, est, x, s.kl, n)
        loss.backward()
        sync()
        return loss

    return estimate


def probe_chunk(case: Case) -> int:
    """Replicates per chunk of the probe: 100, fewer when ``chunk x B x S`` is too large."""
    return max(1, min(PROBE_ESTIMATES, PROBE_MAX_ROWS // (case.batch_size * case.num_samples)))


def probe(s: Setup) -> Callable[[], Tensor]:
    """``M = 100`` estimates of the encoder gradient (the variance probe's core)."""
    model, est, x, sync, chunk = s.model, s.estimator, s.x, _sync(s.device), probe_chunk(s.case)

    def run() -> Tensor:
        moments = gradient_moments(model, x, est, PROBE_ESTIMATES, kl=s.kl, chunk=chunk)
        sync()
        return moments.sums.sum()

    return run


def handwritten_step(s: Setup) -> Callable[[], Tensor]:
    """The hand-written training step of the same model (a copy of its parameters)."""
    case = s.case
    latent_dim, n_categories = LATENTS[case.family]
    step = handwritten_steps.make_step(
        [p.detach().clone() for p in s.model.parameters()],
        case.family,
        latent_dim,
        n_categories,
        case.estimator,
        options=case.opts,
        num_samples=case.num_samples,
        kl=s.kl,
        lr=OPTIM.lr,
        betas=tuple(OPTIM.betas),
        eps=OPTIM.eps,
        fused=s.fused,
        estimator_params=[p.detach().clone() for p in s.estimator.parameters()],
    )
    x, sync = s.x, _sync(s.device)

    def run() -> Tensor:
        loss = step(x)
        sync()
        return loss

    return run


KINDS: dict[str, Callable[[Setup], Callable[[], Tensor]]] = {
    "harness_step": harness_step,
    "harness_step_compiled": harness_step_compiled,
    "estimate": gradient_estimate,
    "probe": probe,
    "handwritten_step": handwritten_step,
}


# ------------------------------------------------------------------ FLOPs and memory


def matmul_flops(fn: Callable[[], Any]) -> int:
    """Matmul FLOPs of one call of ``fn``: 2 m n k per product, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


_PEAKS: dict[tuple[str, int], float] = {}


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` float32 matmul on ``device`` (median of ``repeats``), once per
    (device, thread count) per session."""
    key = (str(device), torch.get_num_threads())
    if key not in _PEAKS:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        sync = _sync(device)
        a @ b
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        _PEAKS[key] = 2 * n**3 / statistics.median(times)
    return _PEAKS[key]


def step_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call, above the level at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def rss_peak_bytes() -> int:
    """The process's resident-set high-water mark (``ru_maxrss``; KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------------------ the tests


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: CUDA cases: the project's ``gpu`` marker (skipped by the root ``conftest.py`` without CUDA),
#: and a skip of their own, so that they also skip where that conftest is not loaded.
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu: CUDA is not available"),
]


CASES = selected_cases()
BY_ID = {c.id: c for c in CASES}
_FULL = os.environ.get("GRADBENCH_BENCH_FULL", "") not in ("", "0")
#: torch.compile of the harness step (compiling each case takes a while): representative cases
#: with a hand-written version, only with ``GRADBENCH_BENCH_COMPILE=1``.
COMPILE = os.environ.get("GRADBENCH_BENCH_COMPILE", "") not in ("", "0")


def compiles(case: Case) -> bool:
    """Whether ``torch.compile`` can trace the case's estimator (not REBAR / RELAX, whose
    estimate needs a double backward)."""
    return not estimators.get(case.estimator, **case.opts).double_backward


def case_kinds(case: Case) -> list[str]:
    """The kinds timed for ``case``, in the order they run: the harness step and its
    hand-written reference back to back (so the load changes little between them), then the
    single estimate, the compiled step (opt-in) and the probe."""
    kinds = ["harness_step"]
    if case.has_handwritten:
        kinds.append("handwritten_step")
    kinds.append("estimate")
    if COMPILE and case.has_handwritten and is_representative(case) and compiles(case):
        kinds.append("harness_step_compiled")
    if _FULL or probed_by_default(case):
        kinds.append("probe")
    return kinds


def _params(cases: list[Case]) -> list[Any]:
    """``(case id, kind)`` parameters, case by case (plain strings in the JSON's ``params``);
    CUDA ones carry :data:`GPU_MARKS`."""
    return [
        pytest.param(
            c.id, kind, id=f"{kind}-{c.id}", marks=GPU_MARKS if c.device == "cuda" else []
        )
        for c in cases
        for kind in case_kinds(c)
    ]


def _run(benchmark: Any, case_id: str, kind: str) -> None:
    """Build the case ``case_id``, time ``KINDS[kind]`` and record ``extra_info``."""
    case = BY_ID[case_id]
    with torch_threads(case.threads):
        setup = build(case)
        fn = KINDS[kind](setup)
        benchmark.group = kind
        if benchmark.disabled:  # a plain test run: one call, checked
            assert torch.isfinite(benchmark(fn)).all()
            return
        load_before = os.getloadavg()
        rss_before = rss_peak_bytes()
        for _ in range(3):  # warm-up: optimizer state, allocator caches
            fn()
        flops = matmul_flops(fn)
        peak_mem = step_peak_bytes(fn, setup.device)
        matmul = matmul_peak(setup.device)
        result = benchmark(fn)
        assert torch.isfinite(result).all()
        median = benchmark.stats.stats.median
        info = {
            "kind": kind,
            "estimator": case.estimator,
            "estimator_label": case.label,
            "label": case.label,
            "options": ",".join(f"{k}={v}" for k, v in case.options),
            "family": case.family,
            "batch_size": case.batch_size,
            "num_samples": case.num_samples,
            "arch": case.arch,
            "latent_dim": LATENTS[case.family][0],
            "n_categories": LATENTS[case.family][1],
            "device": case.device,
            "threads": torch.get_num_threads(),
            "fused_adam": setup.fused,
            "reference": kind == "handwritten_step",
            "torch": torch.__version__,
            "flops": flops,
            "flops_per_s": flops / median,
            "matmul_peak_flops_per_s": matmul,
            "flops_fraction_of_matmul_peak": flops / median / matmul,
            "step_peak_bytes": peak_mem,
            "loadavg_1m_before": load_before[0],
            "loadavg_1m_after": os.getloadavg()[0],
        }
        if kind == "probe":
            info.update(probe_estimates=PROBE_ESTIMATES, probe_chunk=probe_chunk(case))
        if setup.device.type == "cuda":
            info["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(setup.device))
        else:
            rss = rss_peak_bytes()
            info.update(rss_peak_bytes=rss, rss_peak_delta_bytes=rss - rss_before)
        benchmark.extra_info.update(info)


@pytest.mark.parametrize(("case_id", "kind"), _params(CASES))
def test_throughput(benchmark: Any, case_id: str, kind: str) -> None:
    """Time one call of ``KINDS[kind]`` for the case (see the module docstring); its result
    (loss or probe moments) is finite."""
    _run(benchmark, case_id, kind)
