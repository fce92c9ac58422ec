"""Probing during training: the basket of estimators, the statistics of their estimates at the
same parameters on a fixed batch (:class:`ProbeRunner`), and the moving-average variance of
the run's own training gradient (:class:`GradientEMA`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import estimators
from benchmarks.probe.moments import GroupedMoments, gradient_moments
from benchmarks.probe.reference import Reference, reference_gradient
from benchmarks.probe.trajectory import warm_up

METRICS = (
    "grad_var",
    "grad_var_total",
    "grad_var_per_feval",
    "grad_snr",
    "grad_bias2",
    "grad_mse",
    "grad_cos",
)

#: The gradient that is probed: of the batch-mean objective (1/B) sum_b E_q[f_b].
NORMALIZATION = "batch_mean"


def summarize(
    moments: GroupedMoments, reference: Reference | None, total: str = "all"
) -> list[dict[str, float | str]]:
    """Rows ``{param, metric, value}`` for each parameter tensor and ``total`` (every one
    together); each metric with a ``<metric>_se`` jackknife row. Bias, MSE and cosine need a
    ``reference``.

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
    slices = {total: slice(0, mean.shape[1])}
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
    decoder: bool = False,
) -> list[dict[str, float | str]]:
    """Probe every ``(label, estimator)`` of ``basket`` at the same parameters and batch.

    Returns rows ``{probe_estimator, param, metric, value, f_evals}``; the reference's kind is
    in ``reference`` rows' ``probe_estimator`` as ``reference:<kind>`` (its per-coordinate SE,
    averaged, as metric ``ref_se``). With ``decoder``, a second set of ``num_estimates``
    estimates gives the decoder's rows (``param`` ``decoder.<name>`` and ``decoder``; no
    reference: bias, MSE and cosine are left out).
    """
    rows: list[dict[str, float | str]] = []
    for label, est in basket:
        moments = gradient_moments(model, x, est, num_estimates, kl=kl, groups=groups, chunk=chunk)
        use_ref = reference if getattr(est, "objective_kind", "mean") == "mean" else None
        parts = [(moments, use_ref, "all")]
        if decoder:
            dec = gradient_moments(
                model, x, est, num_estimates, kl=kl, groups=groups, chunk=chunk, part="decoder"
            )
            parts.append((dec, None, "decoder"))
        for part, ref, total in parts:
            for row in summarize(part, ref, total):
                rows.append({"probe_estimator": label, "f_evals": part.f_evals, **row})
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
      decoder: also probe the decoder's gradients (``param`` ``decoder.*`` and ``decoder``).

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
        decoder: bool = False,
    ) -> None:
        self.basket = list(basket)
        self.batch = batch
        self.num_estimates, self.groups, self.chunk = num_estimates, groups, chunk
        self.reference, self.kl = reference, kl
        self.reference_samples, self.reference_estimates = reference_samples, reference_estimates
        self.warmup_calls = warmup_calls
        self.decoder = decoder

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
                reference=ref, groups=self.groups, chunk=self.chunk, decoder=self.decoder,
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


def eval_binarized_probe_batch(cfg, data) -> Tensor:
    """The run's fixed probe batch: the first ``optim.batch_size`` training examples,
    binarized once (the same batch the in-training probe uses)."""
    from benchmarks.data.datasets import eval_binarized

    return eval_binarized(data.train[: cfg.optim.batch_size], cfg.data.binarization, seed=2)
