"""Qualitative records: what the latent space looks like, written by the run at each evaluation
step when ``eval.qualitative=true`` (the report draws them without torch).

For a fixed set of ``N`` test digits (the first test example of each label 0..9 where the data
set has labels, else the first ten) the model's decoder mean images ``sigmoid(logits(z))`` are
recorded for: reconstructions from one posterior sample and from the posterior mode (the mean,
for Gaussian codes and the autoencoder); ``P`` samples from the prior (the autoencoder has none:
a Gaussian fitted to the codes of the test split stands in); and ``K`` interpolations of ``T``
points between fixed pairs of those digits: linear between the posterior means for Gaussian and
autoencoder codes, and between the posterior probabilities for discrete codes, decoded at those
probabilities (``interp``) and at one sample of them (``interp_sample``). With two Gaussian or
autoencoder latents also the decoded ``G x G`` grid over the latent plane (Gaussian: the
prior's quantiles ``Phi^{-1}((i + 1/2) / G)``; autoencoder: evenly over the range of the test
codes) and the codes (posterior means) of the whole test split with their labels.

Continuity of each interpolation ``m_0 .. m_{T-1}`` (decoded means, in [0, 1]^D):

- ``jump = max_t |m_{t+1} - m_t|_1 / sum_t |m_{t+1} - m_t|_1``: 1/(T-1) for a path that changes
  evenly, 1 for one that changes all at once (a cliff in the latent space);
- ``off_data``: over the interior points, the mean root-mean-square pixel distance to the
  nearest reconstruction (at the posterior mode) of a test digit: how far the path leaves the
  images the model makes of real data.

Each is averaged over the pairs into a metric row (``qualitative/interp_jump``,
``qualitative/interp_off_data``), so the report can give intervals over seeds.

Files: ``qualitative/step_<step:08d>.npz`` (a zip of ``.npy`` arrays with fixed timestamps, so
identical runs write identical bytes), each written atomically, then its SHA-256 in
``qualitative/index.json`` (``{"files": {name: {"step": s, "sha256": h}}}``). Arrays (images are
``uint8``: probabilities times 255, rounded; ``D = H * W``):

============== ================ ==========================================================
name           shape            content
============== ================ ==========================================================
image_shape    [2]              ``(H, W)``
family         []               the model family (a string)
digits         [N, D] uint8     the binarized test digits
labels         [N] int64        their labels (-1 where the data set has none)
recon_sample   [N, D] uint8     decoded at one posterior sample
recon_mode     [N, D] uint8     decoded at the posterior mode
prior_samples  [P, D] uint8     decoded at prior samples
pairs          [K, 2] int64     indices into ``digits`` of each interpolation's ends
t              [T] float32      interpolation weights, 0 .. 1
interp         [K, T, D] uint8  decoded along each interpolation (at the mean)
interp_sample  [K, T, D] uint8  discrete families only: decoded at one sample per point
jump           [K] float32      continuity: largest step over total change
off_data       [K] float32      continuity: mean distance to the nearest reconstruction
grid           [G, G, D] uint8  two Gaussian / autoencoder latents only: ``grid[i, j]``
                                decoded at ``(grid_z1[j], grid_z2[i])``
grid_z1        [G] float32      the grid's first coordinates
grid_z2        [G] float32      the grid's second coordinates
codes          [M, 2] float32   posterior means of the ``M`` test digits
code_labels    [M] int64        their labels (-1 where none)
============== ================ ==========================================================
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, MultivariateNormal, Normal, OneHotCategorical

from benchmarks.harness.vae import VAE
from benchmarks.records.files import (
    atomic_write,
    file_sha256,
    read_json,
    remove_stale_temp_files,
    write_json,
)

#: Folder of a run directory holding the qualitative records, and its checksum index.
FOLDER = "qualitative"
INDEX = "index.json"
N_DIGITS = 10  # fixed test digits
PAIRS: tuple[tuple[int, int], ...] = ((0, 5), (1, 6), (2, 7), (3, 8), (4, 9))  # interpolations
POINTS = 11  # points per interpolation, ends included
PRIOR_SAMPLES = 16
GRID = 15  # points per side of the 2-D latent grid
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: identical arrays, identical bytes


def step_file(step: int) -> str:
    """The file name of the records at ``step``."""
    return f"step_{step:08d}.npz"


@dataclass
class Qualitative:
    """The fixed test digits and what is recorded of them (see the module docstring).

    Args:
      test: ``[M, D]`` the binarized test split (as evaluated).
      labels: ``[M]`` its labels, or None.
      image_shape: ``(H, W)``.
    """

    test: Tensor
    labels: Tensor | None
    image_shape: tuple[int, int]
    #: Whether this process has removed the temporary files a killed writer left in the folder.
    cleaned: bool = field(default=False, init=False)

    def chosen(self) -> Tensor:
        """Indices into the test split of the ``N`` fixed digits."""
        if self.labels is not None:
            firsts = [torch.nonzero(self.labels == c)[:1, 0] for c in range(N_DIGITS)]
            if all(len(f) for f in firsts):
                return torch.cat(firsts)
        return torch.arange(min(N_DIGITS, len(self.test)))

    @torch.no_grad()
    def record(
        self, model: VAE, step: int, seed: int, run_dir: Path
    ) -> dict[tuple[str, str], float]:
        """Write the records of ``step`` under ``run_dir`` and return the continuity rows.

        Samples come from a generator seeded ``seed`` inside ``fork_rng``: the training RNG
        stream is untouched, and a resumed run writes the same arrays.
        """
        device = self.test.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            arrays = self.arrays(model)
        folder = Path(run_dir) / FOLDER
        if not self.cleaned:  # a run killed while writing a record left its temporary file
            remove_stale_temp_files(folder)
            self.cleaned = True
        write_records(folder, step, arrays)
        return {
            ("qualitative", "interp_jump"): float(arrays["jump"].mean()),
            ("qualitative", "interp_off_data"): float(arrays["off_data"].mean()),
        }

    def arrays(self, model: VAE) -> dict[str, np.ndarray]:
        """Every array of one record (see the module docstring)."""
        idx = self.chosen()
        x = self.test[idx]
        labels = self.labels[idx] if self.labels is not None else torch.full((len(idx),), -1)
        q_all = model.encode(self.test)
        means, modes = q_all.mean, posterior_mode(model.family, q_all)  # [M, L(, C)]
        q = model.encode(x)
        ends = torch.tensor(PAIRS, dtype=torch.long)
        ends = ends[(ends < len(idx)).all(1)]
        t = torch.linspace(0, 1, POINTS, device=x.device)
        a, b = means[idx][ends[:, 0]], means[idx][ends[:, 1]]  # [K, L(, C)]
        w = t.view(1, -1, *([1] * (a.dim() - 1)))
        path = (1 - w) * a.unsqueeze(1) + w * b.unsqueeze(1)  # [K, T, L(, C)]
        interp = decoded(model, path)
        reconstructions = decoded(model, modes)  # [M, D]: the model's images of real data
        out = {
            "image_shape": np.array(self.image_shape, dtype=np.int64),
            "family": np.array(model.family),
            "digits": to_uint8(x),
            "labels": labels.cpu().numpy().astype(np.int64),
            "recon_sample": to_uint8(decoded(model, q.sample())),
            "recon_mode": to_uint8(reconstructions[idx]),
            "prior_samples": to_uint8(decoded(model, prior_sample(model, means))),
            "pairs": ends.numpy().astype(np.int64),
            "t": t.cpu().numpy().astype(np.float32),
            "interp": to_uint8(interp),
            "jump": jump(interp).cpu().numpy().astype(np.float32),
            "off_data": off_data(interp, reconstructions).cpu().numpy().astype(np.float32),
        }
        if model.family in ("bernoulli", "categorical"):
            out["interp_sample"] = to_uint8(decoded(model, sample_probs(model.family, path)))
        if model.family in ("gaussian", "deterministic") and model.latent_dim == 2:
            out |= plane(model, means, self.labels)
        return out


def posterior_mode(family: str, q: torch.distributions.Distribution) -> Tensor:
    """The mode of ``q``: the mean of Gaussian and point-mass codes, ``probs > 1/2`` for
    Bernoulli, the one-hot argmax for categorical."""
    if family == "bernoulli":
        return (q.mean > 0.5).to(q.mean.dtype)
    if family == "categorical":
        probs = q.mean
        return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
    return q.mean


def decoded(model: VAE, z: Tensor) -> Tensor:
    """Decoder mean images ``sigmoid(logits(z))`` ``[*S, D]`` (``z`` may be relaxed)."""
    return torch.sigmoid(model.decode(z))


def prior_sample(model: VAE, codes: Tensor) -> Tensor:
    """``PRIOR_SAMPLES`` draws of ``p(z)``; for the autoencoder, of the Gaussian fitted to the
    test ``codes`` (mean and covariance; it has no prior)."""
    if model.family != "deterministic":
        return model.prior().sample((PRIOR_SAMPLES,))
    centre = codes.mean(0)
    cov = torch.atleast_2d(torch.cov(codes.T)) + 1e-6 * torch.eye(
        codes.shape[1], device=codes.device
    )
    return MultivariateNormal(centre, cov).sample((PRIOR_SAMPLES,))


def sample_probs(family: str, probs: Tensor) -> Tensor:
    """One sample of the discrete code with probabilities ``probs`` (each point of a path)."""
    if family == "bernoulli":
        return Bernoulli(probs=probs.clamp(0, 1)).sample()
    return OneHotCategorical(probs=probs).sample()


def jump(paths: Tensor) -> Tensor:
    """``[K]``: the largest L1 step between consecutive images over the summed steps."""
    steps = (paths[:, 1:] - paths[:, :-1]).abs().sum(-1)  # [K, T-1]
    return steps.max(1).values / steps.sum(1).clamp_min(1e-12)


def off_data(paths: Tensor, reconstructions: Tensor) -> Tensor:
    """``[K]``: mean over each path's interior of the RMS pixel distance to the nearest
    reconstruction of a test digit."""
    interior = paths[:, 1:-1]  # [K, T-2, D]
    dist = torch.cdist(interior, reconstructions.expand(len(paths), -1, -1))  # [K, T-2, M]
    return dist.min(-1).values.mean(-1) / math.sqrt(paths.shape[-1])


def plane(model: VAE, codes: Tensor, labels: Tensor | None) -> dict[str, np.ndarray]:
    """The decoded grid over a 2-D latent plane and the test codes (see the module)."""
    if model.family == "gaussian":  # the prior's quantiles, the same on both axes
        u = (torch.arange(GRID, dtype=codes.dtype) + 0.5) / GRID
        z1 = z2 = Normal(0.0, 1.0).icdf(u)
    else:  # the autoencoder: the range of its codes
        lo, hi = codes.min(0).values, codes.max(0).values
        z1, z2 = (torch.linspace(float(lo[d]), float(hi[d]), GRID) for d in range(2))
    zz = torch.stack(torch.meshgrid(z2, z1, indexing="ij")[::-1], -1)  # [G, G, 2]: (z1[j], z2[i])
    code_labels = labels if labels is not None else torch.full((len(codes),), -1)
    return {
        "grid": to_uint8(decoded(model, zz.to(codes.device))),
        "grid_z1": z1.numpy().astype(np.float32),
        "grid_z2": z2.numpy().astype(np.float32),
        "codes": codes.cpu().numpy().astype(np.float32),
        "code_labels": code_labels.cpu().numpy().astype(np.int64),
    }


def to_uint8(images: Tensor) -> np.ndarray:
    """Probabilities in [0, 1] as ``uint8`` (times 255, rounded)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as an ``.npz`` (readable by ``np.load``) with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
    return buf.getvalue()


def write_records(folder: Path, step: int, arrays: dict[str, np.ndarray]) -> Path:
    """Write the records of ``step`` atomically, then their checksum into the index."""
    path = folder / step_file(step)
    data = npz_bytes(arrays)
    atomic_write(path, lambda fh: fh.write(data))
    index = read_json(folder / INDEX) or {"files": {}}
    index["files"][path.name] = {"step": step, "sha256": file_sha256(path)}
    index["files"] = dict(sorted(index["files"].items()))
    write_json(folder / INDEX, index)
    return path
