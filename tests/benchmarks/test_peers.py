"""The peer comparison (``benchmarks/throughput/peers.py``): its steps train the same model in
every framework, blocks interleave, and a missing peer is one clear line (no timing asserts)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.throughput import peers
from tests.benchmarks.cli_checks import assert_refused_before_any_work


def test_interleaved_times_rotates_and_times_every_step_in_every_block() -> None:
    """Every step gets one time per block, and the block order rotates (each step leads a
    block in turn)."""
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = peers.interleaved_times(steps, blocks=3, block_seconds=0.0, warmup=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    timed = calls[9:]  # after 3 calls of each to size the blocks
    n = len(timed) // 9  # calls per step per block
    leaders = [timed[i * 3 * n] for i in range(3)]
    assert leaders == ["a", "b", "c"]


def test_missing_peers_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path) -> None:
    """Without Pyro or Storchastic the command names the missing packages and how to install
    them, writes nothing and exits 2."""
    monkeypatch.setattr(peers, "missing_peers", lambda: ["pyro-ppl"])
    assert peers.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pyro-ppl" in err and ".[peers]" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--block-seconds", "0"], "--block-seconds=0.0"), (["--blocks", "2"], "--blocks=2")],
)
def test_bad_options_are_one_line_and_exit_2(argv, needle, capsys, tmp_path) -> None:
    """Blocks of no time (or too few blocks): one line naming the option and the allowed
    values, exit 2, before any step is built or anything written."""
    assert_refused_before_any_work(peers.main, argv, needle, capsys, tmp_path)


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize("framework", ["pyro", "pyro_jit", "storchastic", "harness_compiled"])
def test_peer_steps_train_the_linear_bernoulli_vae(framework: str, num_samples: int) -> None:
    """A peer's step (eager or compiled, and the harness's compiled step) runs on the
    benchmark's model and batch and returns a finite loss whose per-example value is that of
    the harness's model at the same initialization (about 540 nats: the same networks, data
    and prior), so the comparison times the same model."""
    if missing := peers.missing_peers():  # found without importing them
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[peers]')")
    # In a child process: importing storch patches torch functions for the whole process
    # (LazyLinear.to then fails), which would leak into every later test.
    code = (
        "import torch\n"
        "from benchmarks.throughput import peers\n"
        "with torch.random.fork_rng():\n"
        f"    step = peers.STEPS[{framework!r}]({num_samples})\n"
        "    loss = float(torch.as_tensor(step()).detach())\n"
        f"print(loss, float(peers.harness_step({num_samples})().detach()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loss, harness = map(float, out.stdout.split()[-2:])
    per_example = loss / peers.BATCH if framework.startswith("pyro") else loss  # Pyro: a sum
    assert math.isfinite(per_example)
    assert per_example == pytest.approx(harness, rel=0.02)


@pytest.mark.parametrize("num_samples", [1, 8])
def test_the_kernels_bound_computes_the_steps_likelihood_and_decoder_gradient(
    num_samples: int,
) -> None:
    """The bound (``kernels``) does the step's arithmetic, not less: its per-example
    likelihood is the harness model's at the same initialization (about 540 nats), and the
    decoder's weight gradient it feeds Adam equals autograd's gradient of the summed
    log-likelihood at its samples."""
    import torch
    import torch.nn.functional as F

    with torch.random.fork_rng():
        step = peers.kernels_step(num_samples)
        opt = next(c.cell_contents for c in step.__closure__
                   if isinstance(c.cell_contents, torch.optim.Optimizer))  # fmt: skip
        enc_w, enc_b, dec_w, dec_b = (p.detach().clone() for p in opt.param_groups[0]["params"])
        state = torch.get_rng_state()
        ll = step()
        grad = opt.param_groups[0]["params"][2].grad.clone()
        torch.set_rng_state(state)
        x = peers._batch()
        probs = torch.sigmoid(F.linear(x, enc_w, enc_b))
        z = (torch.rand(num_samples, *probs.shape) < probs).float()
    w = dec_w.requires_grad_()
    logits = F.linear(z, w, dec_b)
    target = x.expand_as(logits)
    (-F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum()).backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-4)
    assert ll.shape == (num_samples, peers.BATCH)
    harness = float(peers.harness_step(1)().detach())
    assert float(-ll.mean()) == pytest.approx(harness, rel=0.02)
