"""``gradbench-data``: download the file-based data sets and list what is present.

    gradbench-data download mnist [--root DIR] [--force]
    gradbench-data list [--root DIR]

Files go to ``<root>/<name>/`` (``root`` defaults to ``$GRADBENCH_DATA`` or
``~/.cache/gradbench``), which is where :func:`.datasets.load_dataset` reads them. Downloads
use urllib only, are written atomically (by :func:`benchmarks.records.files.atomic_write`: a
temporary file in the destination directory, then ``os.replace``) and are checked against the
published MD5 where one is known (the table below, as listed by torchvision). For a file
without a published checksum (Omniglot's ``chardata.mat``) the SHA-256 is printed and recorded
in ``<file>.sha256`` instead. A file already present is checked again on every ``download``:
against its published checksum, else its recorded SHA-256 (a later download must match the
record; ``--force`` accepts and records a new one), else by loading it; a file that fails is
downloaded again.
``mnist_subset``, ``digits`` and ``synthetic`` ship with installed packages or are generated:
they need no download.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.data.datasets import (
    BUILTIN,
    DATASETS,
    IDX_FILES,
    OMNIGLOT_MAT,
    OMNIGLOT_NPZ,
    default_root,
    download_command,
    load_dataset,
)
from benchmarks.records.files import atomic_write, atomic_write_bytes

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its name under ``<root>/<data set>/``, URL and known checksums."""

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None


REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            MNIST_URL + "train-images-idx3-ubyte.gz",
            md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            MNIST_URL + "t10k-images-idx3-ubyte.gz",
            md5="9fb629c4189551a2d022fa330f9573f3",
        ),
    ),
    "fashion_mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            FASHION_MNIST_URL + "train-images-idx3-ubyte.gz",
            md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz",
            md5="bef4ecab320f06d8554ea6380940ec79",
        ),
    ),
    # No published checksum: the SHA-256 is recorded next to the file instead of verified.
    "omniglot": (RemoteFile(OMNIGLOT_MAT, OMNIGLOT_URL + OMNIGLOT_MAT),),
}

# The URL opener; tests replace it to serve bytes without a network.
_urlopen: Callable[..., object] = urllib.request.urlopen


class ChecksumError(RuntimeError):
    """A downloaded file's checksum differs from the published one (nothing was written)."""


def file_digests(path: Path) -> tuple[str, str]:
    """Return the hex ``(md5, sha256)`` digests of the file at ``path``."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def fetch(
    url: str, dest: Path, md5: str | None = None, sha256: str | None = None
) -> tuple[str, str]:
    """Download ``url`` to ``dest`` atomically, verifying the checksums that are given.

    The bytes go to a temporary file in ``dest``'s directory, which replaces ``dest`` only once
    complete and verified; on any failure the temporary file is removed and ``dest`` is left as
    it was. Returns the hex ``(md5, sha256)`` of the downloaded bytes.

    Raises:
        ChecksumError: the MD5 or SHA-256 differs from the expected one.
        urllib.error.URLError, OSError: the download or the write failed.
    """
    dest = Path(dest)
    h_md5, h_sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()

    def copy(response, out) -> None:
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            h_md5.update(chunk)
            h_sha256.update(chunk)

    def verify() -> None:  # before the move: a bad download never replaces dest
        for kind, expected, got in (("MD5", md5, h_md5), ("SHA-256", sha256, h_sha256)):
            if expected is not None and got.hexdigest() != expected.lower():
                raise ChecksumError(
                    f"{url}: {kind} {got.hexdigest()} differs from the expected {expected}; "
                    f"{dest} was not written"
                )

    # Opened first, so that an unreachable URL raises its own error, not the writer's.
    with _urlopen(url, timeout=TIMEOUT_S) as response:
        atomic_write(dest, lambda out: copy(response, out), before_replace=verify)
    return h_md5.hexdigest(), h_sha256.hexdigest()


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded for ``path`` in ``<path>.sha256`` at its download; None if there
    is no record or it does not hold a SHA-256."""
    record = path.with_name(path.name + ".sha256")
    try:
        words = record.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    digest = words[0].lower() if words else ""
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def _present_file_is_good(name: str, root: Path, dest: Path, remote: RemoteFile) -> bool:
    """Whether ``dest`` (present) can be kept, checking it against the published checksum,
    else the SHA-256 recorded at its download, else by reading it; prints what was found."""
    if remote.md5 is not None or remote.sha256 is not None:
        got_md5, got_sha256 = file_digests(dest)
        if got_md5 == remote.md5 or got_sha256 == remote.sha256:
            print(f"{name}: {dest} already present, checksum OK")
            return True
        print(f"{name}: {dest} has a wrong checksum (corrupt or truncated); downloading it again")
        return False
    recorded = recorded_sha256(dest)
    if recorded is not None:
        if file_digests(dest)[1] == recorded:
            print(f"{name}: {dest} already present, SHA-256 matches the one recorded")
            return True
        print(
            f"{name}: {dest} differs from the SHA-256 recorded at its download in "
            f"{dest.name}.sha256 (corrupt or truncated); downloading it again"
        )
        return False
    try:  # neither published nor recorded: the file must at least load
        load_dataset(name, root)
    except ValueError as err:  # DataFileError, or images outside [0, 1]
        print(f"{name}: {dest} cannot be read ({err}); downloading it again")
        return False
    print(f"{name}: {dest} already present and readable (no recorded checksum to verify)")
    return True


def download(name: str, root: str | Path | None = None, force: bool = False) -> list[Path]:
    """Fetch the files of data set ``name`` into ``<root>/<name>/``; return their paths.

    A file already present is kept (unless ``force``) when it matches its published checksum,
    or, without one, the SHA-256 recorded in ``<file>.sha256`` when it was downloaded, or,
    without either, when it loads; otherwise it is downloaded again. A download replacing a
    file with a recorded SHA-256 must match that record (``force`` accepts and records a new
    one). Built-in data sets need no download: a message says so and nothing is fetched.

    Raises:
        ChecksumError: a download differs from the published or recorded checksum (the file
            on disk is left as it was).
    """
    if name not in DATASETS:
        raise ValueError(f"data={name!r} is not a known data set; allowed: {', '.join(DATASETS)}")
    if name in BUILTIN:
        print(f"{name}: built in (installed package or generated); no download needed")
        return []
    root = default_root() if root is None else Path(root).expanduser()
    paths = []
    for remote in REMOTE_FILES[name]:
        dest = root / name / remote.filename
        paths.append(dest)
        if dest.is_file() and not force and _present_file_is_good(name, root, dest, remote):
            continue
        published = remote.md5 is not None or remote.sha256 is not None
        recorded = None if force or published else recorded_sha256(dest)
        print(f"{name}: downloading {remote.url} -> {dest}")
        try:
            _, got_sha256 = fetch(
                remote.url, dest, md5=remote.md5, sha256=remote.sha256 or recorded
            )
        except ChecksumError as err:
            if recorded is None:
                raise
            raise ChecksumError(
                f"{err}. The expected SHA-256 is the one recorded in {dest.name}.sha256 at the "
                f"first download; if the file changed upstream, accept the new one with: "
                f"{download_command(name, root)} --force"
            ) from err
        if recorded is not None:
            print(f"{name}: SHA-256 matches the one recorded at the first download")
        elif not published:
            atomic_write_bytes(
                dest.with_name(dest.name + ".sha256"), f"{got_sha256}  {dest.name}\n".encode()
            )
            print(f"{name}: no published checksum; SHA-256 {got_sha256} (recorded, not verified)")
        else:
            print(f"{name}: checksum OK")
    return paths


def dataset_location(name: str, root: str | Path | None = None) -> tuple[str, Path]:
    """Return ``(status, path)`` of data set ``name``: status is built-in, present or missing.

    ``path`` is the directory ``<root>/<name>`` for file-based sets (for built-in sets, the
    directory they would use; nothing is read from it).
    """
    root = default_root() if root is None else Path(root).expanduser()
    folder = root / name
    if name in BUILTIN:
        return "built-in", folder
    if name == "omniglot":
        present = (folder / OMNIGLOT_MAT).is_file() or (folder / OMNIGLOT_NPZ).is_file()
    else:
        present = all(
            (folder / f).is_file() or (folder / f.removesuffix(".gz")).is_file()
            for f in IDX_FILES[name].values()
        )
    return ("present" if present else "missing"), folder


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradbench-data`` with arguments ``argv`` (default: the command line)."""
    parser = argparse.ArgumentParser(
        prog="gradbench-data", description="Download and list gradbench data sets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    root_help = f"data root (default: $GRADBENCH_DATA or ~/.cache/gradbench; now {default_root()})"
    get = sub.add_parser("download", help="download one data set")
    get.add_argument("name", choices=DATASETS)
    get.add_argument("--root", type=Path, default=None, help=root_help)
    get.add_argument(
        "--force",
        action="store_true",
        help="download even if already present and good; accept (and record) a new SHA-256 "
        "for a file without a published checksum",
    )
    show = sub.add_parser("list", help="list data sets and whether they are present")
    show.add_argument("--root", type=Path, default=None, help=root_help)
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in DATASETS:
            status, folder = dataset_location(name, args.root)
            where = "" if status == "built-in" else f"  {folder}"
            print(f"{name:<14} {status:<8}{where}")
        return 0
    try:
        download(args.name, args.root, force=args.force)
    except (ChecksumError, OSError) as err:  # URLError is an OSError
        print(f"gradbench-data: error: could not download {args.name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
