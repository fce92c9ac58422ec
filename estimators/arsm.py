r"""ARSM: augment-REINFORCE-swap-merge for categorical latents (Yin, Yue & Zhou 2019).

For ``K`` independent categorical variables with logits ``phi_k`` (``C`` classes each), draw
``pi_k ~ Dirichlet(1_C)`` and write :math:`z_k = \arg\min_i (\log\pi_{ki} - \phi_{ki})`, an
exact sample of ``q``. The *pseudo action* :math:`z^{c\rightleftharpoons j}` swaps the
``c``-th and ``j``-th coordinates of every ``pi_k`` before the argmin; it is symmetric in
``(c, j)`` and equals ``z`` for ``c = j``, so one draw has at most ``C (C - 1) / 2 + 1``
distinct pseudo actions, and far fewer when ``C`` is small or ``q`` is peaked. ``f`` is
evaluated once per *distinct* pseudo action of each example (the paper's cost).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import Estimate, EstimatorBase, Objective, base_of, reinterpreted_ndims
from estimators.registry import register
from estimators.relaxed import perturb


def swap_tables(c: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The swaps of ``C`` coordinates: ``perm [P, C]`` (row 0 the identity, then one row per
    pair ``m < j``: the permutation exchanging ``m`` and ``j``) and ``pair [C, C]``, the row
    of ``perm`` for the swap ``(m, j)`` (symmetric, 0 on the diagonal)."""
    pairs = list(itertools.combinations(range(c), 2))
    perm = torch.arange(c, device=device).repeat(len(pairs) + 1, 1)
    pair = torch.zeros(c, c, dtype=torch.long, device=device)
    for row, (m, j) in enumerate(pairs, start=1):
        perm[row, m], perm[row, j] = j, m
        pair[m, j] = pair[j, m] = row
    return perm, pair


def row_keys(codes: Tensor, base: int) -> Tensor:
    """Integer keys ``[N, B, W]`` of class codes ``[N, B, K]`` in ``0..base-1``: the digits
    packed most significant first into ``W`` int64 words, so equal keys are equal rows and
    lexicographic order of keys is that of rows."""
    per_word = max(1, int(62 * math.log(2) / math.log(base)))  # base^per_word < 2^62
    k = codes.shape[-1]
    pad = -k % per_word
    digits = F.pad(codes, (pad, 0)).reshape(*codes.shape[:-1], -1, per_word)
    powers = base ** torch.arange(per_word - 1, -1, -1, device=codes.device)
    return (digits * powers).sum(-1)


def distinct_rows(codes: Tensor, given: Tensor, base: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per example, the distinct rows of ``codes [N, B, K]`` (class codes in ``0..base-1``)
    that are not among the ``given`` rows (a boolean mask ``[N]`` of rows whose ``f`` is
    known).

    Returns ``(todo [U, B, K], slot [N, B], known [N, B])``: ``todo[u, b]`` is the ``u``-th
    distinct unknown row of example ``b`` (padded with that example's first row where it has
    fewer than ``U``); row ``n`` of example ``b`` is ``todo[slot[n, b], b]`` when
    ``known[n, b]`` is False, and equals a given row otherwise (``slot`` then indexes
    ``given``'s rows: the first given row with the same codes).
    """
    n, b, _ = codes.shape
    device = codes.device
    example = torch.arange(b, device=device).expand(n, b)
    keys = torch.cat([example[..., None], row_keys(codes, base)], -1).reshape(n * b, -1)
    # Lexicographic sort by stable sorts from the last key column to the first (cheap: W + 1
    # sorts of N B integers), then a new group wherever a key differs from the previous one.
    order = torch.arange(n * b, device=device)
    for col in range(keys.shape[1] - 1, -1, -1):
        order = order[torch.argsort(keys[order, col], stable=True)]
    ordered = keys[order]
    new = torch.ones(n * b, dtype=torch.bool, device=device)
    new[1:] = (ordered[1:] != ordered[:-1]).any(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(new, 0) - 1
    inverse = inverse.reshape(n, b)  # row -> its distinct row (sorted by example first)
    first = order[new]  # one row of each distinct row
    owner_all = first % b
    # A distinct row is known when a given row maps to it; remember which given row (first).
    none = n * b  # above every row index: "no given row"
    source = torch.full((first.numel(),), none, dtype=torch.long, device=device)
    given_rows = torch.nonzero(given).squeeze(-1)  # [G]
    given_ids = given_rows[:, None].expand(-1, b)
    source.scatter_reduce_(0, inverse[given_rows].flatten(), given_ids.flatten(), "amin")
    is_known = source < none
    todo_ids = torch.nonzero(~is_known).squeeze(-1)  # [T], sorted by example
    owner = owner_all[todo_ids]
    counts = torch.bincount(owner, minlength=b)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.full_like(source, -1)
    rank[todo_ids] = torch.arange(todo_ids.numel(), device=device) - start[owner]
    width = int(counts.max()) if todo_ids.numel() else 0
    todo = codes[0].expand(width, b, codes.shape[-1]).clone()
    flat = codes.reshape(n * b, -1)
    todo[rank[todo_ids], owner] = flat[first[todo_ids]]
    known = is_known[inverse]
    slot = torch.where(known, source[inverse], rank[inverse])
    return todo, slot, known


@register("arsm")
class ARSM(EstimatorBase):
    r"""Augment-REINFORCE-swap-merge: an unbiased, REINFORCE-free estimator for categoricals.

    .. math::
        \hat g_{\phi_{kc}} = \sum_{j=1}^{C}\Big(f(z^{c\rightleftharpoons j})
        - \frac1C\sum_{m=1}^{C} f(z^{m\rightleftharpoons j})\Big)
        \Big(\frac1C - \pi_{kj}\Big),\qquad \pi_k\sim\mathrm{Dir}(\mathbf 1_C),

    averaged over ``S`` independent draws of ``(pi_1..pi_K)``, plus
    :math:`\frac1S\sum_s\nabla f(z_s)` for ``f``'s own parameters (and, with a sampled KL,
    the ``log q`` term of ``f``). The gradient is with respect to the (normalized) logits.

    Requirements: categorical family; ``f`` need not be differentiable in ``z``. Unbiased.

    Args:
      num_samples: default number of Dirichlet draws ``S`` (>= 1).

    Returns:
      :class:`Estimate` with shapes ``batch_shape``; ``f_evals = S + U``: ``f`` at the ``S``
      true samples (with gradient), then once at each distinct pseudo action of each example
      that is not a true sample, padded to ``U``, the largest such count in the batch (the
      paper counts distinct pseudo actions per example; at most ``S C (C - 1) / 2``).

    Example:
      >>> out = estimators.get("arsm")(Independent(OneHotCategorical(logits=phi), 1), f)

    References: Yin, Yue & Zhou (2019), "ARSM: Augment-REINFORCE-swap-merge estimator for
    gradient backpropagation through categorical variables".
    """

    name = "arsm"
    families = frozenset({"categorical"})

    def estimate(
        self,
        dist: Distribution,
        f: Objective,
        num_samples: int,
        family: str,
        context: Tensor | None,
    ) -> Estimate:
        logits = base_of(dist).logits  # [*B, *K, C], normalized
        theta = logits.detach()
        batch, event = dist.batch_shape, dist.event_shape
        b, c = math.prod(batch), theta.shape[-1]
        s = num_samples
        phi = theta.reshape(b, -1, c)  # [B', K', C]
        # Gumbel noise g = -log(-log u): log pi = -g - logsumexp(-g), pi ~ Dir(1).
        g = perturb(torch.zeros_like(phi), "categorical", (s,))  # [S, B', K', C]
        perm, pair = swap_tables(c, theta.device)
        swapped = g[..., perm] + phi[:, :, None]  # [S, B', K', P, C]
        actions = swapped.argmax(-1)  # [S, B', K', P]; argmin(log pi - phi) = argmax(phi + g)
        p = perm.shape[0]
        codes = actions.permute(0, 3, 1, 2).reshape(s * p, b, -1)  # [S P, B', K']
        given = torch.zeros(s * p, dtype=torch.bool, device=theta.device)
        given[::p] = True  # row 0 of each draw: the identity swap, the true sample
        todo, slot, known = distinct_rows(codes, given, c)

        def one_hot(x: Tensor) -> Tensor:  # [N, B', K'] -> [N, *B, *E]
            return F.one_hot(x, c).to(theta.dtype).reshape(x.shape[0], *batch, *event)

        f_true = f(one_hot(codes[::p]))  # [S, *B], carries grad f
        values = f_true.detach().reshape(s, b)
        if todo.shape[0]:
            with torch.no_grad():  # the pseudo actions' values are weights only
                f_todo = f(one_hot(todo)).reshape(todo.shape[0], b)
            unknown = f_todo.gather(0, slot.clamp(max=todo.shape[0] - 1))
        else:
            unknown = values[:1].expand(s * p, b)
        known_values = values.gather(0, torch.div(slot, p, rounding_mode="floor").clamp(0, s - 1))
        f_all = torch.where(known, known_values, unknown).reshape(s, p, b)  # [S, P, B']
        f_pair = f_all[:, pair].permute(0, 3, 1, 2)  # [S, B', C(c), C(j)]
        centered = f_pair - f_pair.mean(-2, keepdim=True)  # f(z^{c<>j}) - mean_m f(z^{m<>j})
        pi = torch.softmax(-g, -1)  # [S, B', K', C]
        grad = torch.einsum("sbcj,sbkj->bkc", centered, 1.0 / c - pi) / s  # [B', K', C]
        n_event = reinterpreted_ndims(dist) + 1
        linear = (grad.reshape(theta.shape) * (logits - theta)).sum(tuple(range(-n_event, 0)))
        surrogate = f_true.mean(0) + linear
        return Estimate(f_true.detach().mean(0), surrogate, None, s + todo.shape[0])
