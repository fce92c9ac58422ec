"""Per-estimate encoder gradients of many estimates at once and their first and second
moments, accumulated per jackknife group without materializing the ``M x P`` matrix.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
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
    """
    if num_estimates < 2 * groups:
        raise ValueError(
            f"probe.num_estimates={num_estimates} is too small; allowed: >= {2 * groups} "
            f"(two estimates per jackknife group, probe.groups={groups})"
        )
    est = copy.deepcopy(estimator).eval()
    if part == "decoder":
        named = [(f"decoder.{n}", p) for n, p in model.decoder.named_parameters()]
    else:
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
        if part == "decoder":
            call = functools.partial(est, q, f, num_samples=num_samples, context=context)
            flat, out = _decoder_per_estimate(model, call, m)  # [m, P]
        else:
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
