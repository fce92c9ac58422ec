"""Per-estimate encoder gradients of many estimates at once and their first and second
moments, accumulated per jackknife group without materializing the ``M x P`` matrix.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from estimators import Estimate


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


#: Rows of the last layer's per-estimate weight gradients formed at once when their squares
#: are summed (``[rows, estimates, D_in]`` stays in cache instead of an ``M x P`` matrix).
SQUARE_ROWS = 16


def _split_last_linear(encoder: nn.Module) -> tuple[nn.Module | None, nn.Linear] | None:
    """``(front, last)`` when the encoder ends in an ``nn.Linear`` whose parameters are the
    last ones of ``named_parameters`` (``front`` is ``None`` for a bare linear map), else
    ``None``."""
    if isinstance(encoder, nn.Linear):
        return None, encoder
    if isinstance(encoder, nn.Sequential) and isinstance(encoder[-1], nn.Linear):
        return (encoder[:-1] if len(encoder) > 1 else None), encoder[-1]
    return None


class _Accumulator:
    """Per-group float64 sums of estimates and of their squares (``[K, P]``), fed per chunk
    with the float sums of each contiguous block of estimates that belongs to one group."""

    def __init__(self, groups: int, size: int, num_estimates: int) -> None:
        self.groups, self.num_estimates = groups, num_estimates
        self.sums = torch.zeros(groups, size, dtype=torch.float64)
        self.sumsqs = torch.zeros_like(self.sums)
        self.counts = torch.zeros(groups, dtype=torch.float64)

    def blocks(self, done: int, m: int) -> list[tuple[int, int, int]]:
        """``(group, start, stop)`` of the chunk's estimates ``done .. done + m - 1``."""
        ids = torch.arange(done, done + m) * self.groups // self.num_estimates  # [m]
        self.counts.index_add_(0, ids, torch.ones(m, dtype=torch.float64))
        out, start = [], 0
        for k, n in zip(*torch.unique_consecutive(ids, return_counts=True), strict=True):
            out.append((int(k), start, start + int(n)))
            start += int(n)
        return out

    def add(self, group: int, cols: slice, total: Tensor, squares: Tensor) -> None:
        self.sums[group, cols] += total.double().cpu()
        self.sumsqs[group, cols] += squares.double().cpu()


def _last_layer_grads(delta: Tensor, h_in: Tensor, bias: bool) -> Iterator[Tensor]:
    """The last linear layer's per-estimate gradients ``G_m = delta_m^T h_in`` (weight) and
    ``sum_b delta_m`` (bias), from ``delta [B, g, H]`` and the layer's input ``h_in
    [B, D_in]``: :data:`SQUARE_ROWS` weight rows at a time (``[rows, g, D_in]``), then the
    bias (``[1, g, H]``), never the whole ``g x P_last`` matrix. Flattened in order, the
    pieces are the layer's coordinates."""
    per = delta.permute(2, 1, 0).contiguous()  # [H, g, B]
    for r in range(0, per.shape[0], SQUARE_ROWS):
        yield per[r : r + SQUARE_ROWS] @ h_in  # [rows, g, D_in]
    if bias:
        yield delta.sum(0)[None]  # [1, g, H]


def _last_layer_shift(delta: Tensor, h_in: Tensor, bias: bool) -> Tensor:
    """``[P_last]``: the mean over the chunk's estimates of the last layer's gradients."""
    return torch.cat([g.mean(1).reshape(-1) for g in _last_layer_grads(delta, h_in, bias)])


def _last_layer_moments(
    delta: Tensor, h_in: Tensor, bias: bool, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Sums over the estimates of ``G_m - shift`` and of its square, ``[P_last]`` each (see
    :func:`_last_layer_grads`; each piece is centred and squared while it is in cache)."""
    totals, squares, start = [], [], 0
    for g in _last_layer_grads(delta, h_in, bias):
        size = g.shape[0] * g.shape[2]
        dev = g.sub_(shift[start : start + size].view(g.shape[0], 1, g.shape[2]))  # fresh g
        totals.append(dev.sum(1).reshape(-1))
        squares.append(dev.square_().sum(1).reshape(-1))
        start += size
    return torch.cat(totals), torch.cat(squares)


#: What :func:`gradient_moments` can probe: the encoder's or the decoder's parameters.
PARTS = ("encoder", "decoder")


def _decoder_per_estimate(
    model: nn.Module, call: Callable[[], Estimate], m: int
) -> tuple[Tensor, Estimate]:
    """``[m, P]`` gradients of the batch-mean surrogate of ``call()`` (batch ``[B, m]``) w.r.t.
    the decoder's parameters, one row per estimate ``j`` along the second batch dimension,
    and the estimate itself.

    The decoder is made of ``nn.Linear`` layers (and parameter-free activations); forward hooks
    keep each layer's input and output, and the gradient of a layer's weight for estimate
    ``j`` is ``sum go[..., j, :]^T gi[..., j, :]`` over every other dimension (samples,
    examples), its bias ``sum go[..., j, :]``: one backward pass for all ``m`` estimates.
    """
    layers = [mod for mod in model.decoder if isinstance(mod, nn.Linear)]
    if sum(p.numel() for p in model.decoder.parameters()) != sum(
        p.numel() for layer in layers for p in layer.parameters()
    ):
        raise ValueError("decoder probing needs a decoder of nn.Linear layers only")
    calls: list[tuple[int, Tensor, Tensor]] = []

    def keeper(index: int):
        def keep(module, inputs, output) -> None:
            if output.requires_grad:
                calls.append((index, inputs[0].detach(), output))

        return keep

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    try:
        out = call()
    finally:
        for handle in handles:
            handle.remove()
    loss = out.surrogate.sum() / out.surrogate.shape[0]
    outs = torch.autograd.grad(loss, [c[2] for c in calls])
    grads = [[torch.zeros(m, *p.shape, device=p.device, dtype=p.dtype) for p in layer.parameters()]
             for layer in layers]  # fmt: skip
    for (index, inp, _), go in zip(calls, outs, strict=True):
        go, gi = go.reshape(-1, m, go.shape[-1]), inp.expand(*go.shape[:-1], -1)
        gi = gi.reshape(-1, m, gi.shape[-1])  # [rows, m, in]
        grads[index][0] += torch.einsum("rmo,rmi->moi", go, gi)
        grads[index][1] += go.sum(0)
    return torch.cat([g.reshape(m, -1) for layer in grads for g in layer], 1), out


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
    part: str = "encoder",
) -> GroupedMoments:
    """``M = num_estimates`` independent gradient estimates of the batch-mean objective with
    respect to ``model.encoder``'s parameters (``part="decoder"``: ``model.decoder``'s, see
    :func:`_decoder_per_estimate`), as grouped first and second moments.

    ``model`` provides ``encoder`` (``[B, D] -> head``), ``distribution(head)`` and
    ``learning_signal(x, q, kl)`` (see :class:`benchmarks.vae.VAE`). The estimator is used in
    eval mode on a copy, so its state (moving averages) is neither updated nor disturbed.
    Estimates are computed ``chunk`` at a time.

    Every estimate is the chain rule through the encoder of ``delta_m``, the gradient of
    estimate ``m``'s surrogate with respect to the (replicated) encoder output. When the
    encoder ends in a linear layer, that layer's moments are summed from ``delta`` and the
    layer's input a few rows at a time (:func:`_last_layer_moments`); the layers before it
    (if any) get one batched vector-Jacobian product per chunk. Estimates are centred on the
    mean of the first chunk before squares are summed. The estimator's copy is told that its
    objective is not read (``objective_wanted``), so it may skip work done for it alone.
    """
    if num_estimates < 2 * groups:
        raise ValueError(
            f"probe.num_estimates={num_estimates} is too small; allowed: >= {2 * groups} "
            f"(two estimates per jackknife group, probe.groups={groups})"
        )
    est = copy.deepcopy(estimator).eval()
    est.objective_wanted = False  # only the surrogate's gradient is used
    if part == "decoder":
        return _decoder_moments(model, x, est, num_estimates, kl, num_samples, groups, chunk)
    named = _encoder_params(model)
    params = [p for _, p in named]
    split = _split_last_linear(model.encoder)
    if split is None:  # any encoder: the batched VJP of its output for every parameter
        last, h_in, head = None, x, model.encoder(x)
    else:
        front, last = split
        h_in = x if front is None else front(x)  # [B, D_in], graph kept for the VJPs
        head = last(h_in)  # [B, H]
    n_last = 0 if last is None else len(list(last.parameters()))
    early = params[: len(params) - n_last]
    p_early = sum(p.numel() for p in early)
    bias = last is not None and last.bias is not None
    acc = _Accumulator(groups, sum(p.numel() for p in params), num_estimates)
    f_evals, done, shift = 0, 0, None
    while done < num_estimates:
        m = min(chunk, num_estimates - done)
        delta, f_evals = _output_gradients(model, x, est, head, m, kl, num_samples)  # [B, m, H]
        flat = _early_grads(delta, head, h_in, last, early) if early else None  # [m, P_e]
        if shift is None:
            parts = [] if flat is None else [flat.mean(0)]
            if last is not None:
                parts.append(_last_layer_shift(delta, h_in.detach(), bias))
            shift = torch.cat(parts)  # [P]
        for k, lo, hi in acc.blocks(done, m):
            if flat is not None:
                dev = flat[lo:hi] - shift[:p_early]
                acc.add(k, slice(0, p_early), dev.sum(0), (dev * dev).sum(0))
            if last is not None:
                moments = _last_layer_moments(delta[:, lo:hi], h_in.detach(), bias,
                                              shift[p_early:])  # fmt: skip
                acc.add(k, slice(p_early, None), *moments)
        done += m
    assert shift is not None
    return GroupedMoments(
        [n for n, _ in named], [p.numel() for p in params], acc.sums, acc.sumsqs, acc.counts,
        f_evals, shift.double().cpu(),
    )  # fmt: skip


def _decoder_moments(
    model: nn.Module, x: Tensor, est: nn.Module, num_estimates: int, kl: str,
    num_samples: int | None, groups: int, chunk: int,
) -> GroupedMoments:  # fmt: skip
    """:func:`gradient_moments` of the decoder's parameters: each chunk's ``[m, P]``
    per-estimate gradients from one backward pass (:func:`_decoder_per_estimate`), centred on
    the first chunk's mean and summed per jackknife group."""
    named = [(f"decoder.{n}", p) for n, p in model.decoder.named_parameters()]
    b = x.shape[0]
    head = model.encoder(x).detach()
    acc = _Accumulator(groups, sum(p.numel() for _, p in named), num_estimates)
    f_evals, done, shift = 0, 0, None
    while done < num_estimates:
        m = min(chunk, num_estimates - done)
        head_rep = head[:, None].expand(b, m, head.shape[-1]).clone().requires_grad_()
        q = model.distribution(head_rep)  # batch [B, m]
        x_rep = x[:, None].expand(b, m, *x.shape[1:]).contiguous()
        f = model.learning_signal(x_rep, q, kl)
        call = functools.partial(est, q, f, num_samples=num_samples, context=x_rep)
        flat, out = _decoder_per_estimate(model, call, m)  # [m, P]
        f_evals = out.f_evals
        if shift is None:
            shift = flat.mean(0)
        for k, lo, hi in acc.blocks(done, m):
            dev = flat[lo:hi] - shift
            acc.add(k, slice(None), dev.sum(0), (dev * dev).sum(0))
        done += m
    assert shift is not None
    return GroupedMoments(
        [n for n, _ in named], [p.numel() for _, p in named], acc.sums, acc.sumsqs, acc.counts,
        f_evals, shift.double().cpu(),
    )  # fmt: skip


def _output_gradients(
    model: nn.Module,
    x: Tensor,
    est: nn.Module,
    head: Tensor,
    m: int,
    kl: str,
    num_samples: int | None,
) -> tuple[Tensor, int]:
    """``delta [B, m, H]``: for ``m`` independent estimates, the gradient of each one's
    surrogate (of the batch-mean objective) with respect to the encoder output ``head``
    (replicated along a second batch dimension), and the estimator's ``f_evals``. Only the
    encoder output is differentiated, so autograd skips the decoder's parameter gradients
    (and, for estimators that use only ``f``'s values, the whole decoder backward)."""
    b = x.shape[0]
    head_rep = head.detach()[:, None].expand(b, m, head.shape[-1]).clone().requires_grad_()
    q = model.distribution(head_rep)  # batch [B, m]
    # A contiguous replicate of x: the per-pixel likelihood then broadcasts over the leading
    # sample dimension only (a broadcast over the middle one is slower).
    x_rep = x[:, None].expand(b, m, *x.shape[1:]).contiguous()
    out = est(q, model.learning_signal(x_rep, q, kl), num_samples=num_samples, context=x_rep)
    (delta,) = torch.autograd.grad(out.surrogate.sum() / b, head_rep)
    return delta, out.f_evals


def _early_grads(
    delta: Tensor, head: Tensor, h_in: Tensor, last: nn.Linear | None, early: list[Tensor]
) -> Tensor:
    """Per-estimate gradients ``[m, P_early]`` of the ``early`` parameters (all of them
    when there is no ``last`` layer) from ``delta [B, m, H]``, by one batched
    vector-Jacobian product through the layers before ``last``."""
    m = delta.shape[1]
    if last is None:
        out, grad_out = head, delta
    else:
        out, grad_out = h_in, delta @ last.weight.detach()  # [B, m, D_in]
    grads = torch.autograd.grad(
        out, early, grad_outputs=grad_out.movedim(1, 0), is_grads_batched=True,
        retain_graph=True,
    )  # fmt: skip  # each [m, *shape]
    return torch.cat([g.reshape(m, -1) for g in grads], 1)


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
