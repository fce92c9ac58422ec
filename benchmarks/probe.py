"""Gradient variance probe: many gradient estimates of every estimator at the same parameters.

At fixed model parameters and a fixed batch ``x``, draws ``M`` independent estimates of the
gradient of the batch-mean objective ``(1/B) sum_b E_q[f_b]`` with respect to the *encoder*
parameters, for each estimator of a basket, and reports per parameter tensor and overall
(``param = "all"``):

- ``grad_var``: mean over coordinates of the per-coordinate variance; ``grad_var_total``: its
  sum (trace of the covariance); ``grad_var_per_feval``: ``grad_var x f_evals`` (variance at
  an equal budget of f-evaluations);
- ``grad_snr``: mean over coordinates of ``|mean| / std`` (Rainforth et al. 2018);
- ``grad_bias2``: mean over coordinates of the squared bias against a reference gradient,
  debiased for the noise of both means (``(mu - r)^2 - var/M - se_r^2``; can be slightly
  negative for unbiased estimators); ``grad_mse = grad_var + grad_bias2``; ``grad_cos``: cosine
  between the mean estimate and the reference.

Every metric has a standard error (``<metric>_se`` rows) from a delete-one-group jackknife over
``K`` groups of the ``M`` estimates (paired with the reference's groups when the reference is
itself a Monte Carlo estimate, so its noise is carried into the bias and cosine).

The reference is the exact gradient by enumeration (:mod:`estimators.exact`) when the latent
space is small enough, else the mean of many estimates of a high-sample unbiased estimator.

Batched computation: the encoder runs once; its output is replicated ``M`` times along a second
batch dimension (examples stay on the first, as estimators expect), one backward pass gives
every replicate's gradient with respect to that output, and one batched vector-Jacobian product
(``autograd.grad(..., is_grads_batched=True)``) turns them into per-replicate encoder
gradients, whose first and second moments are accumulated per group without keeping the
``M x P`` matrix.
"""

from __future__ import annotations

import copy
import io
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

import estimators
from estimators.exact import MAX_CONFIGS, num_configurations

METRICS = (
    "grad_var",
    "grad_var_total",
    "grad_var_per_feval",
    "grad_snr",
    "grad_bias2",
    "grad_mse",
    "grad_cos",
)

#: ``auto`` references enumerate at most this many configurations per example (cost ~ C x B).
AUTO_EXACT_CONFIGS = 2**12
#: Decoder rows (configurations x examples) evaluated at once by the exact reference.
EXACT_ROWS = 2**16

#: The gradient that is probed: of the batch-mean objective (1/B) sum_b E_q[f_b].
NORMALIZATION = "batch_mean"


@dataclass
class GroupedMoments:
    """Per-group sums of ``M`` gradient estimates of the encoder parameters.

    ``sums[k]`` and ``sumsqs[k]`` are ``[P]`` sums of estimates and of their squares over the
    estimates of group ``k``; ``counts[k]`` is the group's size. Coordinates are the encoder
    parameters flattened in ``names`` order, with ``sizes`` elements each.
    """

    names: list[str]
    sizes: list[int]
    sums: Tensor  # [K, P]
    sumsqs: Tensor  # [K, P]
    counts: Tensor  # [K]
    f_evals: int
    #: ``[P]`` constant subtracted from every estimate before summing (variance is
    #: shift-invariant; a shift near the mean avoids cancellation in sum(g^2) - n mean^2).
    shift: Tensor | None = None

    def leave_one_out(self) -> tuple[Tensor, Tensor, Tensor]:
        """Means, unbiased variances and counts for the full set (row 0) and each deletion
        of one group (rows 1..K): ``[K+1, P]``, ``[K+1, P]``, ``[K+1, 1]``."""
        total_s, total_q, total_n = self.sums.sum(0), self.sumsqs.sum(0), self.counts.sum()
        s = torch.cat([total_s[None], total_s - self.sums])
        q = torch.cat([total_q[None], total_q - self.sumsqs])
        n = torch.cat([total_n[None], total_n - self.counts])[:, None]
        mean = s / n
        var = (q - n * mean**2).clamp_min(0) / (n - 1)
        if self.shift is not None:
            mean = mean + self.shift
        return mean, var, n


def _encoder_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(f"encoder.{n}", p) for n, p in model.encoder.named_parameters()]


def gradient_moments(
    model: nn.Module,
    x: Tensor,
    estimator: nn.Module,
    num_estimates: int,
    *,
    kl: str = "analytic",
    num_samples: int | None = None,
    groups: int = 20,
    chunk: int = 100,
) -> GroupedMoments:
    """``M = num_estimates`` independent gradient estimates of the batch-mean objective with
    respect to ``model.encoder``'s parameters, as grouped first and second moments.

    ``model`` provides ``encoder`` (``[B, D] -> head``), ``distribution(head)`` and
    ``learning_signal(x, q, kl)`` (see :class:`benchmarks.vae.VAE`). The estimator is used in
    eval mode on a copy, so its state (moving averages) is neither updated nor disturbed.
    Estimates are computed ``chunk`` at a time.
    """
    if num_estimates < 2 * groups:
        raise ValueError(
            f"probe.num_estimates={num_estimates} is too small; allowed: >= {2 * groups} "
            f"(two estimates per jackknife group, probe.groups={groups})"
        )
    est = copy.deepcopy(estimator).eval()
    named = _encoder_params(model)
    params = [p for _, p in named]
    b = x.shape[0]
    head = model.encoder(x)  # [B, H], graph kept for the batched VJPs
    sums = torch.zeros(groups, sum(p.numel() for p in params), dtype=torch.float64)
    sumsqs = torch.zeros_like(sums)
    counts = torch.zeros(groups, dtype=torch.float64)
    f_evals = 0
    done = 0
    shift = None
    while done < num_estimates:
        m = min(chunk, num_estimates - done)
        head_rep = head.detach()[:, None].expand(b, m, head.shape[-1]).clone().requires_grad_()
        q = model.distribution(head_rep)  # batch [B, m]
        f = model.learning_signal(x[:, None], q, kl)
        context = x[:, None].expand(b, m, *x.shape[1:])
        out = est(q, f, num_samples=num_samples, context=context)
        (delta,) = torch.autograd.grad(out.surrogate.sum() / b, head_rep)  # [B, m, H]
        grads = torch.autograd.grad(
            head,
            params,
            grad_outputs=delta.movedim(1, 0),
            is_grads_batched=True,
            retain_graph=True,
        )  # each [m, *shape]
        flat = torch.cat([g.reshape(m, -1) for g in grads], 1)  # [m, P]
        if shift is None:
            shift = flat.mean(0)
        dev = flat - shift
        # Groups are contiguous blocks of estimates: sum each block of this chunk in the
        # estimates' dtype (a few terms, centred), then accumulate the block sums in float64.
        ids = torch.arange(done, done + m) * groups // num_estimates  # [m]
        first, n_blocks = int(ids[0]), int(ids[-1] - ids[0]) + 1
        local = (ids - first).to(flat.device)
        part_s = flat.new_zeros(n_blocks, flat.shape[1]).index_add_(0, local, dev)
        part_q = flat.new_zeros(n_blocks, flat.shape[1]).index_add_(0, local, dev * dev)
        sums[first : first + n_blocks] += part_s.double().cpu()
        sumsqs[first : first + n_blocks] += part_q.double().cpu()
        counts.index_add_(0, ids, torch.ones(m, dtype=torch.float64))
        f_evals = out.f_evals
        done += m
    assert shift is not None
    return GroupedMoments(
        [n for n, _ in named], [p.numel() for p in params], sums, sumsqs, counts, f_evals,
        shift.double().cpu(),
    )  # fmt: skip


def gradient_moments_loop(
    model: nn.Module,
    x: Tensor,
    estimator: nn.Module,
    num_estimates: int,
    *,
    kl: str = "analytic",
    num_samples: int | None = None,
    groups: int = 20,
) -> GroupedMoments:
    """The naive reference for :func:`gradient_moments`: one full forward and backward pass
    per estimate (used to test and benchmark the batched computation)."""
    est = copy.deepcopy(estimator).eval()
    named = _encoder_params(model)
    params = [p for _, p in named]
    p_total = sum(p.numel() for p in params)
    sums = torch.zeros(groups, p_total, dtype=torch.float64)
    sumsqs = torch.zeros_like(sums)
    counts = torch.zeros(groups, dtype=torch.float64)
    f_evals = 0
    for i in range(num_estimates):
        q = model.distribution(model.encoder(x))
        out = est(q, model.learning_signal(x, q, kl), num_samples=num_samples, context=x)
        grads = torch.autograd.grad(out.surrogate.sum() / x.shape[0], params)
        flat = torch.cat([g.reshape(-1) for g in grads]).double().cpu()
        sums[i % groups] += flat
        sumsqs[i % groups] += flat**2
        counts[i % groups] += 1
        f_evals = out.f_evals
    return GroupedMoments(
        [n for n, _ in named], [p.numel() for p in params], sums, sumsqs, counts, f_evals
    )


@dataclass
class Reference:
    """Reference gradient ``[P]`` with per-coordinate standard errors (0 when exact) and, for a
    Monte Carlo reference, its grouped moments (for the paired jackknife)."""

    mean: Tensor
    se: Tensor
    kind: str
    moments: GroupedMoments | None = None

    def __post_init__(self) -> None:
        # Leave-one-group-out means and variances of the mean, [K+1, P] (MC references only).
        if self.moments is not None:
            mean, var, n = self.moments.leave_one_out()
            self.loo_mean, self.loo_var_of_mean = mean, var / n


def exact_reference(
    model: nn.Module, x: Tensor, kl: str = "analytic", max_configs: int = MAX_CONFIGS
) -> Reference:
    """The exact gradient of the batch-mean objective by enumerating the latent space."""
    params = [p for _, p in _encoder_params(model)]
    q = model.distribution(model.encoder(x))
    f = model.learning_signal(x, q, kl)
    chunk = max(1, EXACT_ROWS // x.shape[0])  # bounds memory: chunk x B decoder rows at once
    value = estimators.exact.expectation(q, f, max_configs, chunk_size=chunk).sum() / x.shape[0]
    grads = torch.autograd.grad(value, params)
    flat = torch.cat([g.reshape(-1) for g in grads]).double().cpu()
    return Reference(flat, torch.zeros_like(flat), "exact")


def reference_method(
    model: nn.Module, x: Tensor, method: str = "auto", max_configs: int = AUTO_EXACT_CONFIGS
) -> str:
    """What ``method`` means for ``model``: ``auto`` becomes ``exact`` when the latent space has
    at most ``max_configs`` configurations per example, else ``rloo`` for discrete and
    ``reparam`` for Gaussian latents; any other method is returned as it is."""
    if method != "auto":
        return method
    family = getattr(model, "family", None)
    enumerable = (
        family in ("bernoulli", "categorical")
        and num_configurations(model.distribution(model.encoder(x[:1]))) <= max_configs
    )
    return "exact" if enumerable else ("reparam" if family == "gaussian" else "rloo")


def reference_gradient(
    model: nn.Module,
    x: Tensor,
    *,
    kl: str = "analytic",
    method: str = "auto",
    num_samples: int = 100,
    num_estimates: int = 200,
    groups: int = 20,
    chunk: int = 50,
    max_configs: int = AUTO_EXACT_CONFIGS,
) -> Reference:
    """Reference gradient: ``exact`` (enumeration), a registry name (the mean of
    ``num_estimates`` estimates with ``num_samples`` samples each), or ``auto`` (exact when
    the latent space has at most ``max_configs`` configurations per example, else ``rloo``
    for discrete and ``reparam`` for Gaussian latents)."""
    method = reference_method(model, x, method, max_configs)
    if method == "exact":
        return exact_reference(model, x, kl, max(max_configs, MAX_CONFIGS))
    est = estimators.get(method, num_samples=num_samples)
    moments = gradient_moments(model, x, est, num_estimates, kl=kl, groups=groups, chunk=chunk)
    ref = Reference(torch.empty(0), torch.empty(0), f"{method}(S={num_samples})", moments)
    ref.mean, ref.se = ref.loo_mean[0], ref.loo_var_of_mean[0].sqrt()
    return ref


def summarize(
    moments: GroupedMoments, reference: Reference | None
) -> list[dict[str, float | str]]:
    """Rows ``{param, metric, value}`` for each parameter tensor and ``all``; each metric with
    a ``<metric>_se`` jackknife row. Bias, MSE and cosine need a ``reference``.

    Per-coordinate terms are computed once for the full set and every group deletion
    (``[K+1, P]``); each metric is then a reduction over a parameter's coordinates.
    """
    mean, var, n = moments.leave_one_out()  # [K+1, P]
    k = moments.counts.numel()
    if reference is None:
        ref, ref_var = torch.zeros_like(mean), torch.zeros_like(mean)
    elif reference.moments is not None:  # paired jackknife: delete the same group in both
        ref, ref_var = reference.loo_mean, reference.loo_var_of_mean
    else:
        ref, ref_var = reference.mean.expand_as(mean), torch.zeros_like(mean)
    std = var.sqrt()
    snr_c = torch.where(std > 0, mean.abs() / std.clamp_min(1e-300), torch.nan)
    bias_c = (mean - ref) ** 2 - var / n - ref_var
    dot_c, mm_c, rr_c = mean * ref, mean**2, ref**2
    slices = {"all": slice(0, mean.shape[1])}
    start = 0
    for name, size in zip(moments.names, moments.sizes, strict=True):
        slices[name] = slice(start, start + size)
        start += size
    rows: list[dict[str, float | str]] = []
    for param, sl in slices.items():
        grad_var = var[:, sl].mean(1)
        bias2 = bias_c[:, sl].mean(1)
        norms = (mm_c[:, sl].sum(1) * rr_c[:, sl].sum(1)).sqrt().clamp_min(1e-300)
        table = {
            "grad_var": grad_var,
            "grad_var_total": var[:, sl].sum(1),
            "grad_var_per_feval": grad_var * moments.f_evals,
            "grad_snr": snr_c[:, sl].nanmean(1),
            "grad_bias2": bias2,
            "grad_mse": grad_var + bias2,
            "grad_cos": dot_c[:, sl].sum(1) / norms,
        }
        for metric, values in table.items():
            if reference is None and metric in ("grad_bias2", "grad_mse", "grad_cos"):
                continue
            full, deletions = float(values[0]), values[1:]
            se = math.sqrt((k - 1) / k * float(((deletions - deletions.mean()) ** 2).sum()))
            rows.append({"param": param, "metric": metric, "value": full})
            rows.append({"param": param, "metric": f"{metric}_se", "value": se})
    return rows


def probe_basket(
    model: nn.Module,
    x: Tensor,
    basket: Sequence[tuple[str, nn.Module]],
    *,
    num_estimates: int = 100,
    kl: str = "analytic",
    reference: Reference | None = None,
    groups: int = 20,
    chunk: int = 100,
) -> list[dict[str, float | str]]:
    """Probe every ``(label, estimator)`` of ``basket`` at the same parameters and batch.

    Returns rows ``{probe_estimator, param, metric, value, f_evals}``; the reference's kind is
    in ``reference`` rows' ``probe_estimator`` as ``reference:<kind>`` (its per-coordinate SE,
    averaged, as metric ``ref_se``).
    """
    rows: list[dict[str, float | str]] = []
    for label, est in basket:
        moments = gradient_moments(model, x, est, num_estimates, kl=kl, groups=groups, chunk=chunk)
        use_ref = reference if getattr(est, "objective_kind", "mean") == "mean" else None
        for row in summarize(moments, use_ref):
            rows.append({"probe_estimator": label, "f_evals": moments.f_evals, **row})
    if reference is not None:
        rows.append(
            {
                "probe_estimator": f"reference:{reference.kind}",
                "f_evals": 0,
                "param": "all",
                "metric": "ref_se",
                "value": float(reference.se.mean()),
            }
        )
    return rows


# ------------------------------------------------------------------- probing during training


def basket_entry(entry: object) -> dict:
    """A basket entry (a registry name or a mapping with ``name`` and options) as a dict."""
    if isinstance(entry, str):
        return {"name": entry}
    if isinstance(entry, Mapping) and "name" in entry:
        return dict(entry)
    raise ValueError(
        f"probe.basket entry {entry!r} is invalid; allowed: a registry name "
        f"({', '.join(estimators.available())}) or a mapping with 'name' and options"
    )


def build_estimator(entry: dict, family: str, where: str) -> nn.Module:
    """``estimators.get`` for a basket entry, checking that it supports ``family``."""
    options = {k: v for k, v in entry.items() if k not in ("name", "label")}
    est = estimators.get(entry["name"], **options)
    if family not in est.families:
        raise ValueError(
            f"{where}={entry['name']!r} does not support model.family={family!r}; allowed: "
            f"{', '.join(estimators.supporting(family))}"
        )
    return est


class ProbeRunner:
    """Probes a run's estimator and a basket of others on one fixed batch, during training.

    Args:
      basket: ``[(label, estimator)]`` probed beside the run's own estimator (built and
        validated before training starts).
      batch: the fixed probe batch ``[B, D]`` (binarized once), on the run's device.
      num_estimates, groups, chunk: see :func:`gradient_moments`.
      reference: ``auto`` | ``exact`` | ``none`` | a registry name (see
        :func:`reference_gradient`), with ``reference_samples`` / ``reference_estimates``.
      kl: the model's learning signal (``analytic`` | ``sampled``).
      warmup_calls: estimates on the probe batch that bring a basket estimator's running
        state (moving averages) to the current parameters before it is probed.

    Probing draws its randomness from its own stream, seeded by (run seed, step), and
    restores the global RNG state afterwards: it never changes the training trajectory.
    """

    def __init__(
        self,
        basket: Sequence[tuple[str, nn.Module]],
        batch: Tensor,
        *,
        num_estimates: int,
        groups: int,
        chunk: int,
        reference: str,
        reference_samples: int,
        reference_estimates: int,
        kl: str,
        warmup_calls: int = 50,
    ) -> None:
        self.basket = list(basket)
        self.batch = batch
        self.num_estimates, self.groups, self.chunk = num_estimates, groups, chunk
        self.reference, self.kl = reference, kl
        self.reference_samples, self.reference_estimates = reference_samples, reference_estimates
        self.warmup_calls = warmup_calls

    def __call__(
        self, model: nn.Module, own: tuple[str, nn.Module], seed: int
    ) -> list[dict[str, float | str]]:
        """Rows ``{probe_estimator, param, metric, value, f_evals}`` at the current params."""
        device = self.batch.device
        devices = [device] if device.type == "cuda" else []
        basket = [own, *(b for b in self.basket if b[0] != own[0])]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _, est in basket[1:]:  # the own estimator's state comes from training
                warm_up(est, model, self.batch, self.kl, calls=self.warmup_calls)
            ref = None
            if self.reference != "none":
                ref = reference_gradient(
                    model, self.batch, kl=self.kl, method=self.reference,
                    num_samples=self.reference_samples, num_estimates=self.reference_estimates,
                    groups=self.groups, chunk=max(1, self.chunk // self.reference_samples),
                )  # fmt: skip
            return probe_basket(
                model, self.batch, basket, num_estimates=self.num_estimates, kl=self.kl,
                reference=ref, groups=self.groups, chunk=self.chunk,
            )  # fmt: skip


class GradientEMA:
    r"""Moving-average variance of the training gradient along the run's own trajectory.

    With :math:`m_t = d\,m_{t-1} + (1-d) g_t` and :math:`v_t = d\,v_{t-1} + (1-d) g_t^2`
    (bias-corrected by :math:`1-d^t`), reports the mean over coordinates of
    :math:`v_t - m_t^2`, as in the REBAR and DisARM papers. It mixes the drift of the mean
    gradient along the trajectory into the "variance"; the probe's ``grad_var`` does not.
    """

    def __init__(self, params: Sequence[Tensor], decay: float = 0.999) -> None:
        self.params = list(params)
        self.decay = decay
        size = sum(p.numel() for p in self.params)
        like = self.params[0]
        self.mean = torch.zeros(size, device=like.device, dtype=like.dtype)
        self.sq = torch.zeros_like(self.mean)
        self.count = 0

    def update(self) -> None:
        """Fold in the current ``.grad`` of the parameters (no host sync)."""
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        self.mean.mul_(self.decay).add_(g, alpha=1 - self.decay)
        self.sq.mul_(self.decay).addcmul_(g, g, value=1 - self.decay)
        self.count += 1

    def value(self) -> float:
        """Mean over coordinates of the bias-corrected moving variance (a host sync)."""
        correction = 1 - self.decay**self.count
        mean, sq = self.mean / correction, self.sq / correction
        return float((sq - mean**2).clamp_min(0).mean())

    def state_dict(self) -> dict[str, Tensor | int]:
        """The moving moments, for checkpoints (so a resumed run logs the same values)."""
        return {"mean": self.mean.cpu().clone(), "sq": self.sq.cpu().clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.mean.copy_(state["mean"])
        self.sq.copy_(state["sq"])
        self.count = int(state["count"])


# ------------------------------------------------------------ the trajectory probe (CLI)

#: File of a run directory holding the rows of ``gradbench-probe`` (same columns as metrics).
TRAJECTORY_FILE = "probe_trajectory.parquet"


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
    batch (the run's own probe batch). Returns tidy rows with the metrics columns.
    """
    from benchmarks import checkpoint
    from benchmarks.records import COLUMNS, RunRecord
    from benchmarks.train import SNAPSHOTS, build_model, estimator_label, load_data

    torch_device = check_arguments(
        num_estimates=num_estimates, reference=reference, reference_samples=reference_samples,
        reference_estimates=reference_estimates, groups=groups, chunk=chunk, device=device,
    )  # fmt: skip
    record = RunRecord.load(run_dir / "run.json")
    if record is None or "config" not in record.data:
        raise FileNotFoundError(f"{run_dir / 'run.json'} not found or has no config")
    snapshots = sorted((run_dir / SNAPSHOTS).glob("step_*.pt"))
    if not snapshots:
        raise FileNotFoundError(
            f"no model snapshots in {run_dir / SNAPSHOTS}; train with snapshot_every=N"
        )
    try:  # a damaged or foreign run.json: a message naming it, not a traceback
        cfg = OmegaConf.create(record.data["config"])
        family, kl, run_seed = str(cfg.model.family), str(cfg.model.kl), int(cfg.seed)
        basket = []
        for i, spec in enumerate(specs):
            entry = parse_estimator_spec(spec)
            if entry["name"] in estimators.available():
                entry = {**estimators.options(entry["name"]), **entry}
            est = build_estimator(entry, family, f"--estimators[{i}]")
            basket.append((entry.get("label") or estimator_label(entry, None), est))
        data = load_data(cfg)
        model = build_model(cfg, data).to(torch_device)
        batch = eval_binarized_probe_batch(cfg, data).to(torch_device)
    except (OmegaConfBaseException, TypeError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{run_dir / 'run.json'}: its config is not that of a gradbench-train run ({why})"
        ) from err
    basket = [(label, est.to(torch_device)) for label, est in basket]
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
    runner = ProbeRunner(
        basket[1:], batch, num_estimates=num_estimates, groups=groups, chunk=chunk,
        reference=reference, reference_samples=reference_samples,
        reference_estimates=reference_estimates, kl=kl,
    )  # fmt: skip
    keys = ("run_id", "estimator", "estimator_label", "family", "dataset", "model")
    identity = {k: record.data.get(k) for k in keys}
    rows = []
    for path in snapshots:
        state = checkpoint.load(path)
        model.load_state_dict(state["model"])
        for _, est in basket:
            warm_up(est, model, batch, kl)
        for r in runner(model, basket[0], seed * 1_000_003 + int(state["step"])):
            rows.append({**identity, "seed": run_seed, "step": int(state["step"]),
                         "wall_time": float("nan"), "f_evals": int(state["f_evals"]),
                         "split": "probe", **r})  # fmt: skip
    df = pd.DataFrame(rows)
    df["f_evals"] = df["f_evals"].astype("int64")
    return df[list(COLUMNS)]


def warm_up(est: nn.Module, model: nn.Module, x: Tensor, kl: str, calls: int = 200) -> None:
    """Bring an estimator's running state (e.g. a moving-average baseline) to its value at
    these parameters, by ``calls`` estimates on ``x`` in training mode. Only estimators with
    buffers and no trainable parameters are warmed up (learned baselines would need their own
    optimization); their state is otherwise that of a fresh estimator."""
    if not list(est.buffers()) or list(est.parameters()):
        return
    est.train()
    with torch.no_grad():
        for _ in range(calls):
            q = model.encode(x)
            est(q, model.learning_signal(x, q, kl), context=x)


def eval_binarized_probe_batch(cfg, data) -> Tensor:
    """The run's fixed probe batch: the first ``optim.batch_size`` training examples,
    binarized once (the same batch the in-training probe uses)."""
    from benchmarks.data import eval_binarized

    return eval_binarized(data.train[: cfg.optim.batch_size], cfg.data.binarization, seed=2)


def ranking_table(df: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """Per probed estimator at ``step`` (default: the last): grad_var and grad_var_per_feval
    with 95% intervals (value +- 1.96 SE), and each one's ratio to the smallest, with a
    delta-method 95% interval. Sorted by variance per f-evaluation."""
    rows = df[(df["split"] == "probe") & (df["param"] == "all")]
    rows = rows[~rows["probe_estimator"].str.startswith("reference:")]
    step = int(rows["step"].max()) if step is None else step
    wide = rows[rows["step"] == step].pivot_table(
        index="probe_estimator", columns="metric", values="value"
    )
    out = pd.DataFrame(index=wide.index)
    for metric in ("grad_var", "grad_var_per_feval"):
        v, se = wide[metric], wide[f"{metric}_se"]
        out[metric] = v
        out[f"{metric} 95% CI"] = [f"[{a:.4g}, {b:.4g}]" for a, b in
                                   zip(v - 1.96 * se, v + 1.96 * se, strict=True)]  # fmt: skip
        best = v.idxmin()
        ratio = v / v[best]
        rel = ((se / v) ** 2 + (se[best] / v[best]) ** 2) ** 0.5
        out[f"{metric} / best"] = [
            f"{r:.3g} [{r * (1 - 1.96 * e):.3g}, {r * (1 + 1.96 * e):.3g}]" if k != best else "1"
            for k, r, e in zip(v.index, ratio, rel, strict=True)
        ]
    out.insert(0, "step", step)
    return out.sort_values("grad_var_per_feval").reset_index()


def main(argv: list[str] | None = None) -> int:
    """``gradbench-probe RUN_DIR --estimators NAME[:k=v,...] ...``: probe a trajectory."""
    import argparse

    from benchmarks.checkpoint import CheckpointError
    from benchmarks.records import atomic_write_bytes

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
    ranking = ranking_table(df).to_markdown(index=False)
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
