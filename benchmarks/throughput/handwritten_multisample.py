r"""Hand-written IWAE, STL, DReG and MVD steps on Gaussian latents: the yardstick of
``estimators/multisample.py`` and ``estimators/measure_valued.py``.

The same VAE as :mod:`.handwritten`, the estimators written inline from the papers
(pytorch/examples style: ``F.linear``, ``torch.randn``, no ``torch.distributions``), each
vectorized over the ``S`` samples (and MVD over the coordinates):

- ``iwae`` (Burda et al. 2016): ``log mean_s exp w_s`` of ``w = log p(x, z) - log q(z|x)``
  at ``z = loc + scale * eps``;
- ``stl`` (Roeder et al. 2017): the same bound with ``log q`` evaluated at *detached*
  ``loc, scale`` (the textbook way; the library adds the score back instead: same gradient);
- ``dreg`` (Tucker et al. 2019): STL's bound with a hook multiplying the gradient reaching
  ``z_s`` by ``w~_s``;
- ``mvd`` (Mohamed et al. 2020, sec. 6): ``f`` at the shared sample and, without gradient,
  at the ``3 L`` points per sample where one coordinate is moved by ``+-scale R``
  (Rayleigh ``R``) or set to ``loc + scale M`` (double-sided Maxwell ``M``).

The random draws are the library's (same calls, shapes and order), so from the same RNG
state loss and gradients equal the harness's (``tests/benchmarks/test_throughput.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from benchmarks.throughput import handwritten
from benchmarks.throughput.handwritten import HandwrittenStep

#: Estimator name -> latent families with a hand-written version.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "iwae": ("gaussian",),
    "stl": ("gaussian",),
    "dreg": ("gaussian",),
    "mvd": ("gaussian",),
}
#: Those whose objective is the multi-sample bound: they train with ``kl="sampled"`` only.
BOUNDS = ("iwae", "stl", "dreg")

handwritten.WRITTEN.update(SUPPORTED)
handwritten.OPTION_NOTES.append("iwae / stl / dreg: kl=sampled; mvd: option max_rows")


def supports(name: str, family: str, options: dict | None = None) -> bool:
    """Whether a hand-written version of estimator ``name`` with ``options`` exists."""
    keys = set(options or {}) - {"num_samples", "max_rows"}
    return family in SUPPORTED.get(name, ()) and not keys


class HandwrittenMultisampleStep(HandwrittenStep):
    """One VAE training step with hand-written ``iwae``, ``stl``, ``dreg`` or ``mvd``.

    Same constructor as :class:`.handwritten.HandwrittenStep`; ``kl`` must be ``sampled``
    for the bounds (their ``f`` are log weights) and may be either for ``mvd``.
    """

    supported = staticmethod(supports)

    def __init__(self, *args: Any, kl: str = "analytic", **kwargs: Any) -> None:
        estimator = args[4] if len(args) > 4 else kwargs["estimator"]
        if kl not in ("analytic", "sampled") or (estimator in BOUNDS and kl != "sampled"):
            raise ValueError(
                f"no hand-written {estimator} with kl={kl!r}; allowed: 'sampled' for "
                f"{', '.join(BOUNDS)}, 'analytic' or 'sampled' for mvd"
            )
        super().__init__(*args, kl="analytic", **kwargs)  # the base knows its own estimators
        self.kl_mode = kl

    def loss(self, x: Tensor) -> Tensor:
        """The training loss ``-(1/B) sum_b surrogate_b`` on batch ``x`` ``[B, D]``."""
        loc, scale = self.encode(x)  # [B, L] each
        if self.estimator == "mvd":
            surrogate = self.mvd(x, loc, scale)
        else:
            surrogate = self.bound(x, loc, scale)
        return -surrogate.sum() / x.shape[0]

    def bound(self, x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        """IWAE's, STL's or DReG's surrogate ``[B]``."""
        S = self.S
        z = loc + torch.randn(S, *loc.shape, dtype=loc.dtype, device=loc.device) * scale
        h = (loc, scale) if self.estimator == "iwae" else (loc.detach(), scale.detach())
        w = self.log_px(x, z) + self.log_prior(z) - self.log_q(h, z)  # [S, B]
        if self.estimator == "dreg" and z.requires_grad:
            weights = torch.softmax(w.detach(), 0)[..., None]  # [S, B, 1]
            z.register_hook(lambda grad: grad * weights)
        return torch.logsumexp(w, 0) - math.log(S)

    def mvd(self, x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        """MVD's surrogate ``[B]``: ``f`` at the shared samples plus the weak derivatives
        times ``loc - stop(loc)`` and ``scale - stop(scale)``."""
        S, (B, L) = self.S, loc.shape
        kl = self.kl((loc, scale)) if self.kl_mode == "analytic" else None
        ld, sd = loc.detach(), scale.detach()
        eps = torch.randn(S, B, L, dtype=loc.dtype, device=loc.device)
        z = ld + sd * eps
        fz = self.signal(x, z, kl, self.log_q((loc, scale), z))  # [S, B]
        rayleigh = torch.sqrt(-2.0 * torch.log1p(-torch.rand_like(eps)))
        extra = torch.randn(2, S, B, L, dtype=loc.dtype, device=loc.device)
        maxwell = torch.sign(eps) * torch.sqrt(eps**2 + (extra**2).sum(0))
        moved = ld + sd * torch.stack([rayleigh, -rayleigh, maxwell])  # [3, S, B, L]
        with torch.no_grad():
            eye = torch.eye(L, dtype=torch.bool, device=loc.device)[:, None, None]  # [L,1,1,L]
            # points[k, j, s, b] = z[s, b] with coordinate j set to moved[k, s, b, j].
            points = torch.where(eye, moved.movedim(-1, 1)[..., None], z)  # [3, L, S, B, L]
            points = points.reshape(3 * L * S, B, L)
            kl_d = None if kl is None else kl.detach()
            f_side = self.signal(x, points, kl_d, self.log_q((ld, sd), points))
            f_side = f_side.reshape(3, L, S, B).movedim(1, -1)  # [3, S, B, L]
        g_loc = ((f_side[0] - f_side[1]) / (sd * math.sqrt(2 * math.pi))).mean(0)  # [B, L]
        g_scale = ((f_side[2] - fz.detach()[..., None]) / sd).mean(0)
        weak = (g_loc * (loc - ld) + g_scale * (scale - sd)).sum(-1)
        return fz.mean(0) + weak
