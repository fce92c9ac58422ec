"""Tests of benchmarks.data (data sets, binarization, BatchStream, gradbench-data download).

Nothing here touches the network: file-based data sets are read from tiny files each test writes
itself, and downloads are served by a fake URL opener or ``file://`` URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data import datasets as data
from benchmarks.data import download
from benchmarks.data.datasets import BatchStream, load_dataset

# ----------------------------------------------------------------------------------------------
# Helpers


def _idx_bytes(images: np.ndarray) -> bytes:
    """IDX3 unsigned-byte encoding of uint8 images [N, H, W]."""
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", *images.shape)
    return header + images.astype(np.uint8).tobytes()


def _write_idx(path: Path, images: np.ndarray, compress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = _idx_bytes(images)
    if compress:
        path.write_bytes(gzip.compress(raw))
    else:
        path.with_suffix("").write_bytes(raw)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _row_set(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy()}


def _unique_binary_rows(n: int, bits: int) -> torch.Tensor:
    """Row i is the binary code of i, so a served row tells which example it is."""
    codes = torch.arange(n)[:, None] >> torch.arange(bits)[None, :]
    return (codes & 1).to(torch.float32)


def _decode(batch: torch.Tensor) -> list[int]:
    weights = 2 ** torch.arange(batch.shape[1])
    return (batch.long() * weights).sum(1).tolist()


# ----------------------------------------------------------------------------------------------
# Data sets


def test_mnist_subset_loads_offline_with_disjoint_deterministic_splits():
    first, second = load_dataset("mnist_subset"), load_dataset("mnist_subset")
    assert (first.train.shape, first.val.shape, first.test.shape) == (
        (4000, 784),
        (500, 784),
        (500, 784),
    )
    assert first.image_shape == (28, 28) and not first.full_size
    assert first.exact_log_likelihood is None
    for split in ("train", "val", "test"):
        x = getattr(first, split)
        assert x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert torch.equal(x, getattr(second, split))
    assert first.train.max() == 1.0  # scaled from 0..255, not left as grey levels / 256
    train, val, test = (_row_set(x) for x in (first.train, first.val, first.test))
    assert not (train & val) and not (train & test) and not (val & test)


def test_digits_loads_8x8_in_unit_interval():
    ds = load_dataset("digits")
    assert (ds.train.shape, ds.val.shape, ds.test.shape) == ((1297, 64), (250, 64), (250, 64))
    assert ds.image_shape == (8, 8) and not ds.full_size
    assert ds.train.min() == 0.0 and ds.train.max() == 1.0


@pytest.mark.parametrize(("name", "compress"), [("mnist", True), ("fashion_mnist", False)])
def test_idx_data_set_reads_files_and_splits_last_training_images_off(tmp_path, name, compress):
    train, test = _images(30, seed=1), _images(10, seed=2)
    files = data.IDX_FILES[name]
    _write_idx(tmp_path / name / files["train"], train, compress)
    _write_idx(tmp_path / name / files["test"], test, compress)
    ds = load_dataset(name, root=tmp_path)
    flat = torch.from_numpy(train.reshape(30, 784)).float() / 255
    # 30 < 6 * 10,000 images: the last sixth (5) is validation.
    assert torch.equal(ds.train, flat[:25]) and torch.equal(ds.val, flat[25:])
    assert torch.equal(ds.test, torch.from_numpy(test.reshape(10, 784)).float() / 255)
    assert ds.full_size and ds.image_shape == (28, 28)


def test_omniglot_reads_iwae_chardata_mat_in_fortran_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    train = _images(36, seed=3).astype(np.float64) / 255
    test = _images(8, seed=4).astype(np.float64) / 255

    def iwae_layout(images):  # [784, N], each image flattened column-major
        return images.transpose(0, 2, 1).reshape(len(images), 784).T

    (tmp_path / "omniglot").mkdir()
    scipy_io.savemat(
        tmp_path / "omniglot" / "chardata.mat",
        {"data": iwae_layout(train), "testdata": iwae_layout(test)},
    )
    ds = load_dataset("omniglot", root=tmp_path)
    flat = torch.from_numpy(train.reshape(36, 784)).float()
    assert torch.equal(ds.train, flat[:30]) and torch.equal(ds.val, flat[30:])
    assert torch.equal(ds.test, torch.from_numpy(test.reshape(8, 784)).float())


def test_omniglot_reads_npz_alternative(tmp_path):
    train, test = _images(24, seed=5), _images(6, seed=6)
    (tmp_path / "omniglot").mkdir()
    np.savez(tmp_path / "omniglot" / "omniglot.npz", train=train.reshape(24, 784), test=test)
    ds = load_dataset("omniglot", root=tmp_path)
    assert ds.train.shape == (20, 784) and ds.val.shape == (4, 784) and ds.test.shape == (6, 784)
    assert torch.equal(ds.test, torch.from_numpy(test.reshape(6, 784)).float() / 255)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("mnist", "mnist/train-images-idx3-ubyte.gz"),
        ("fashion_mnist", "fashion_mnist/train-images-idx3-ubyte.gz"),
        ("omniglot", "omniglot/chardata.mat"),
    ],
)
def test_missing_file_names_path_and_download_command(tmp_path, name, missing):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / missing) in str(err.value)
    assert f"gradbench-data download {name} --root {tmp_path}" in str(err.value)


def test_unknown_data_set_names_option_and_allowed_values():
    with pytest.raises(ValueError, match="data='cifar'") as err:
        load_dataset("cifar")
    for name in data.DATASETS:
        assert name in str(err.value)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADBENCH_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("GRADBENCH_DATA")
    assert data.default_root() == Path.home() / ".cache" / "gradbench"


def test_synthetic_exact_log_likelihood_matches_brute_force():
    ds = load_dataset("synthetic")
    assert (ds.train.shape, ds.val.shape, ds.test.shape) == ((2000, 64), (500, 64), (500, 64))
    assert set(ds.train.unique().tolist()) <= {0.0, 1.0}
    model = {k: v.numpy() for k, v in data.synthetic_model().items()}
    assert model["W"].shape == (64, 12)

    def log_sigmoid(a):
        return -np.logaddexp(0.0, -a)

    z = np.array(list(itertools.product((0, 1), repeat=12)), dtype=np.float64)  # [4096, 12]
    pl, a = model["prior_logits"], z @ model["W"].T + model["b"]  # [12], [4096, 64]
    log_pz = np.where(z == 1, log_sigmoid(pl), log_sigmoid(-pl)).sum(1)  # [4096]
    for i in range(5):
        x = ds.test[i].double().numpy()
        log_px_given_z = np.where(x == 1, log_sigmoid(a), log_sigmoid(-a)).sum(1)  # [4096]
        total = np.logaddexp.reduce(log_pz + log_px_given_z)
        assert ds.exact_log_likelihood["test"][i].item() == pytest.approx(total, rel=1e-10)
    for split in ("train", "val", "test"):
        ll = ds.exact_log_likelihood[split]
        assert ll.shape == (getattr(ds, split).shape[0],)
        assert math.isfinite(ll.mean().item()) and ll.mean() < 0
    assert torch.equal(ds.train, load_dataset("synthetic").train)


# ----------------------------------------------------------------------------------------------
# Binarization


def test_binarize_static_is_deterministic_in_seed_and_keeps_binary_values():
    x = torch.full((50, 40), 0.5)
    assert torch.equal(data.binarize_static(x, seed=3), data.binarize_static(x, seed=3))
    assert not torch.equal(data.binarize_static(x, seed=3), data.binarize_static(x, seed=4))
    assert set(data.binarize_static(x).unique().tolist()) == {0.0, 1.0}
    binary = _unique_binary_rows(50, 6)
    assert torch.equal(data.binarize_static(binary, seed=7), binary)


def test_eval_binarized_is_one_fixed_draw_in_both_modes():
    x = torch.rand(20, 30, generator=torch.Generator().manual_seed(0))
    dynamic, static = data.eval_binarized(x, "dynamic"), data.eval_binarized(x, "static")
    assert torch.equal(dynamic, static) and torch.equal(static, data.eval_binarized(x, "static"))
    with pytest.raises(ValueError, match="binarization"):
        data.eval_binarized(x, "threshold")


# ----------------------------------------------------------------------------------------------
# BatchStream


@pytest.mark.parametrize("binarization", data.BINARIZATIONS)
def test_stream_serves_binary_float_batches_of_fixed_shape(binarization):
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(0))
    stream = BatchStream(x, batch_size=16, binarization=binarization, seed=0)
    for _ in range(5):
        batch = stream.next()
        assert batch.shape == (16, 12) and batch.dtype == torch.float32
        assert batch.device == torch.device("cpu")
        assert set(batch.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("binarization", data.BINARIZATIONS)
def test_stream_serves_every_example_once_per_epoch_in_new_orders(binarization):
    stream = BatchStream(_unique_binary_rows(48, 6), 8, binarization, seed=1)
    orders = []
    for epoch in range(3):
        order = [i for _ in range(stream.batches_per_epoch) for i in _decode(stream.next())]
        assert stream.epoch == epoch
        assert sorted(order) == list(range(48))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_stream_drops_the_last_incomplete_batch():
    stream = BatchStream(_unique_binary_rows(50, 6), 8, "static", seed=2)
    assert stream.batches_per_epoch == 6
    served = [i for _ in range(6) for i in _decode(stream.next())]
    assert len(set(served)) == 48
    stream.next()
    assert stream.epoch == 1


def test_dynamic_binarization_redraws_each_time_static_does_not():
    grey = torch.full((1, 400), 0.3)
    dynamic = BatchStream(grey, 1, "dynamic", seed=0)
    draws = torch.cat([dynamic.next() for _ in range(25)])  # [25, 400], one epoch each
    assert all(not torch.equal(draws[0], draws[i]) for i in range(1, 25))
    # Mean of 10,000 Bernoulli(0.3) draws: within 5 standard errors of 0.3.
    assert abs(draws.mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / draws.numel())
    static = BatchStream(grey, 1, "static", seed=0)
    fixed = data.binarize_static(grey, seed=data.STATIC_TRAIN_SEED)
    assert all(torch.equal(static.next(), fixed) for _ in range(5))


def test_streams_are_deterministic_in_seed():
    x = torch.rand(30, 10, generator=torch.Generator().manual_seed(0))
    a, b, c = (BatchStream(x, 10, "dynamic", seed=s) for s in (5, 5, 6))
    first = [a.next() for _ in range(4)]
    assert all(torch.equal(u, b.next()) for u in first)
    assert not all(torch.equal(u, c.next()) for u in first)


def _check_resume(x, binarization, device, tmp_path):
    original = BatchStream(x, 16, binarization, seed=11, device=device)
    for _ in range(5):  # 2 batches per epoch: stop in the middle of epoch 2
        original.next()
    state = original.state_dict()
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values())
    torch.save(state, tmp_path / "stream.pt")
    loaded = torch.load(tmp_path / "stream.pt", weights_only=True)
    expected = [original.next() for _ in range(7)]
    # A different seed shows the state alone determines what follows.
    resumed = BatchStream(x, 16, binarization, seed=99, device=device)
    resumed.load_state_dict(loaded)
    assert all(torch.equal(e, resumed.next()) for e in expected)
    assert resumed.epoch == original.epoch


@pytest.mark.parametrize("binarization", data.BINARIZATIONS)
def test_resumed_stream_serves_bit_identical_batches(binarization, tmp_path):
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(0))
    _check_resume(x, binarization, "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_on_cuda_serves_device_batches_and_resumes(tmp_path):
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(0))
    assert BatchStream(x, 16, "dynamic", seed=0, device="cuda").next().is_cuda
    _check_resume(x, "dynamic", "cuda", tmp_path)


def test_stream_rejects_bad_arguments_and_mismatched_state():
    x = torch.rand(10, 4)
    with pytest.raises(ValueError, match="binarization"):
        BatchStream(x, 5, "threshold", seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, 11, "dynamic", seed=0)
    state = BatchStream(x, 5, "dynamic", seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, 2, "dynamic", seed=0).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Download (no network: fake opener or file:// URLs)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fetch_writes_verified_file_atomically(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"gradbench" * 1000)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "file.bin"
    got_md5, got_sha256 = download.fetch(source.as_uri(), dest, md5=md5)
    assert dest.read_bytes() == source.read_bytes()
    assert got_md5 == md5 and got_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert _listing(dest.parent) == ["file.bin"]  # no temporary file left


def test_fetch_with_bad_checksum_raises_and_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"corrupted")
    out = tmp_path / "out"
    with pytest.raises(download.ChecksumError, match="MD5"):
        download.fetch(source.as_uri(), out / "file.bin", md5="0" * 32)
    assert _listing(out) == []
    (out / "file.bin").write_bytes(b"old")  # an existing file is left as it was
    with pytest.raises(download.ChecksumError, match="SHA-256"):
        download.fetch(source.as_uri(), out / "file.bin", sha256="0" * 64)
    assert _listing(out) == ["file.bin"] and (out / "file.bin").read_bytes() == b"old"


@pytest.fixture
def fake_mnist(monkeypatch):
    """Serve tiny gzipped IDX files for the mnist URLs; any other URL fails."""
    payload = {
        "train-images-idx3-ubyte.gz": gzip.compress(_idx_bytes(_images(12, seed=7))),
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx_bytes(_images(4, seed=8))),
    }
    urls = {}
    remotes = []
    for remote in download.REMOTE_FILES["mnist"]:
        urls[remote.url] = payload[remote.filename]
        md5 = hashlib.md5(payload[remote.filename]).hexdigest()
        remotes.append(download.RemoteFile(remote.filename, remote.url, md5=md5))
    monkeypatch.setitem(download.REMOTE_FILES, "mnist", tuple(remotes))

    def opener(url, timeout):
        if url not in urls:
            raise OSError(f"no network in tests: {url}")
        return io.BytesIO(urls[url])

    monkeypatch.setattr(download, "_urlopen", opener)
    return payload


def test_download_command_fetches_files_that_load(tmp_path, fake_mnist, capsys):
    assert download.main(["download", "mnist", "--root", str(tmp_path)]) == 0
    assert _listing(tmp_path / "mnist") == sorted(fake_mnist)
    ds = load_dataset("mnist", root=tmp_path)
    assert (ds.train.shape, ds.val.shape, ds.test.shape) == ((10, 784), (2, 784), (4, 784))
    assert download.main(["download", "mnist", "--root", str(tmp_path)]) == 0
    assert "already present, checksum OK" in capsys.readouterr().out
    assert download.main(["list", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(data.DATASETS)
    assert any(line.split()[:2] == ["mnist", "present"] for line in lines)
    assert any(line.split()[:2] == ["omniglot", "missing"] for line in lines)
    assert any(line.split()[:2] == ["digits", "built-in"] for line in lines)


def test_download_command_with_bad_checksum_fails_and_leaves_nothing(
    tmp_path, fake_mnist, monkeypatch, capsys
):
    bad = tuple(
        download.RemoteFile(r.filename, r.url, md5="0" * 32)
        for r in download.REMOTE_FILES["mnist"]
    )
    monkeypatch.setitem(download.REMOTE_FILES, "mnist", bad)
    assert download.main(["download", "mnist", "--root", str(tmp_path)]) == 1
    assert "differs from the expected" in capsys.readouterr().err
    assert _listing(tmp_path / "mnist") == []


def test_download_without_known_checksum_records_sha256(tmp_path, monkeypatch, capsys):
    content = b"not really a mat file"
    monkeypatch.setattr(download, "_urlopen", lambda url, timeout: io.BytesIO(content))
    assert download.main(["download", "omniglot", "--root", str(tmp_path)]) == 0
    sha256 = hashlib.sha256(content).hexdigest()
    assert (tmp_path / "omniglot" / "chardata.mat").read_bytes() == content
    assert (tmp_path / "omniglot" / "chardata.mat.sha256").read_text().split()[0] == sha256
    assert sha256 in capsys.readouterr().out


@pytest.mark.parametrize("name", data.BUILTIN)
def test_download_of_built_in_data_set_is_a_no_op(tmp_path, name, capsys, monkeypatch):
    monkeypatch.setattr(download, "_urlopen", None)  # any fetch would fail
    assert download.main(["download", name, "--root", str(tmp_path)]) == 0
    assert "no download needed" in capsys.readouterr().out
    assert not (tmp_path / name).exists()


# ----------------------------------------------------------------------------------------------
# Corrupt and truncated files


def _mat_bytes(n_train: int = 36, n_test: int = 8) -> bytes:
    """A small chardata.mat in IWAE's layout."""
    scipy_io = pytest.importorskip("scipy.io")
    buf = io.BytesIO()
    train, test = _images(n_train, seed=3) / 255, _images(n_test, seed=4) / 255
    scipy_io.savemat(buf, {"data": train.reshape(n_train, 784).T,
                           "testdata": test.reshape(n_test, 784).T})  # fmt: skip
    return buf.getvalue()


def _damage(name: str, how: str, folder: Path) -> Path:
    """Write data set ``name``'s files into ``folder``, one of them damaged; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "omniglot":
        mat = _mat_bytes()
        bad = folder / "chardata.mat"
        bad.write_bytes(mat[: len(mat) // 2] if how == "truncated" else b"not a mat file" * 20)
        return bad
    files = data.IDX_FILES[name]
    _write_idx(folder / files["test"], _images(4, seed=2), compress=True)
    raw = gzip.compress(_idx_bytes(_images(12, seed=1)))
    bad = folder / files["train"]
    bad.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"\x1f\x8bjunk" * 20)
    return bad


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("mnist", "truncated"),
        ("fashion_mnist", "garbage"),
        ("omniglot", "truncated"),
        ("omniglot", "garbage"),
    ],
)
def test_corrupt_or_truncated_file_names_it_and_the_command_that_fetches_it_again(
    tmp_path, make_config, name, how
):
    """A damaged data file (EOFError, BadGzipFile, truncated or unknown mat file) is a
    DataFileError naming the file and the download command; gradbench-train reports it as a
    ConfigError before training."""
    from benchmarks.harness.build import load_data
    from benchmarks.harness.validate import ConfigError

    bad = _damage(name, how, tmp_path / name)
    with pytest.raises(ValueError) as err:
        load_dataset(name, root=tmp_path)
    assert type(err.value).__name__ == "DataFileError"
    message = str(err.value)
    assert str(bad) in message and "corrupt" in message, message
    assert f"gradbench-data download {name} --root {tmp_path} --force" in message
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_data(make_config(f"data={name}", f"data.root={tmp_path}"))


def _serve(monkeypatch, content: bytes) -> list[str]:
    """Serve ``content`` for every URL; return the list of URLs fetched."""
    fetched: list[str] = []

    def opener(url, timeout):
        fetched.append(url)
        return io.BytesIO(content)

    monkeypatch.setattr(download, "_urlopen", opener)
    return fetched


def test_download_checks_the_recorded_sha256_of_a_present_file(tmp_path, monkeypatch, capsys):
    """A file without a published checksum is verified against the SHA-256 recorded at its
    download: a truncated copy is downloaded again, an intact one is kept."""
    content = _mat_bytes()
    fetched = _serve(monkeypatch, content)
    argv = ["download", "omniglot", "--root", str(tmp_path)]
    assert download.main(argv) == 0 and len(fetched) == 1
    mat = tmp_path / "omniglot" / "chardata.mat"
    mat.write_bytes(content[:100])  # truncated after the download (a copy cut short)
    capsys.readouterr()
    assert download.main(argv) == 0
    assert "differs from the SHA-256 recorded" in capsys.readouterr().out
    assert len(fetched) == 2 and mat.read_bytes() == content
    assert load_dataset("omniglot", root=tmp_path).test.shape == (8, 784)
    assert download.main(argv) == 0 and len(fetched) == 2  # intact: kept
    assert "matches the one recorded" in capsys.readouterr().out


def test_download_refuses_a_new_file_that_differs_from_the_recorded_sha256(
    tmp_path, monkeypatch, capsys
):
    """If the file served now differs from the recorded SHA-256, the download is refused with
    a message naming the record and --force, and --force accepts and records it."""
    old, new = _mat_bytes(), _mat_bytes(n_train=30)
    _serve(monkeypatch, old)
    argv = ["download", "omniglot", "--root", str(tmp_path)]
    assert download.main(argv) == 0
    mat = tmp_path / "omniglot" / "chardata.mat"
    mat.write_bytes(old[:100])
    _serve(monkeypatch, new)
    capsys.readouterr()
    assert download.main(argv) == 1
    err = capsys.readouterr().err
    assert "chardata.mat.sha256" in err and "--force" in err, err
    assert mat.read_bytes() == old[:100]  # left as it was
    assert download.main([*argv, "--force"]) == 0 and mat.read_bytes() == new
    assert download.recorded_sha256(mat) == hashlib.sha256(new).hexdigest()


def test_download_replaces_a_present_file_without_checksum_that_does_not_load(
    tmp_path, monkeypatch, capsys
):
    """A present file with neither a published nor a recorded checksum is kept only if it
    loads; an unreadable one is downloaded again."""
    content = _mat_bytes()
    fetched = _serve(monkeypatch, content)
    bad = _damage("omniglot", "garbage", tmp_path / "omniglot")
    assert download.main(["download", "omniglot", "--root", str(tmp_path)]) == 0
    assert "cannot be read" in capsys.readouterr().out
    assert len(fetched) == 1 and bad.read_bytes() == content
