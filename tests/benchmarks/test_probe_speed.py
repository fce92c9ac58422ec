"""The probe-speed measurement's bound (``probe_speed.kernels``): it computes the per-estimate
score-function, DisARM and reparameterization gradients of the last layer and their squares,
not less (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.throughput import probe_speed
from benchmarks.throughput.bench_probe import probe_case
from tests.benchmarks.cli_checks import assert_refused_before_any_work


@pytest.mark.parametrize("num_samples", [1, 2])
def test_the_kernels_bound_sums_the_score_function_gradients_and_their_squares(
    num_samples: int,
) -> None:
    """For 5 estimates in chunks of 2, the bound's sums and sums of squares equal those of
    the per-estimate gradients ``(1/B) sum_b c_b (z_b - p_b) x_b^T`` with ``c = f`` (one
    sample) or ``f - mean_S f`` (several), rebuilt by autograd of the score-function
    surrogate from the same draws."""
    model, x, _ = probe_case("reinforce", {}, "bernoulli")
    run = probe_speed.kernels(model, x, num_estimates=5, num_samples=num_samples, chunk=2)
    torch.manual_seed(3)
    sums, squares = run()
    torch.manual_seed(3)
    enc, dec = model.encoder[-1], model.decoder[-1]
    grads = []
    for m in (2, 2, 1):  # the chunks' draws, in order
        probs = torch.sigmoid(F.linear(x, enc.weight, enc.bias)).detach()
        z = (torch.rand(num_samples, x.shape[0], m, probs.shape[1]) < probs[:, None]).float()
        for j in range(m):
            w = enc.weight.detach().clone().requires_grad_()
            logits = F.linear(x, w, enc.bias.detach())
            zj = z[:, :, j]  # [S, B, H]
            with torch.no_grad():
                out = F.linear(zj, dec.weight, dec.bias)
                f = -F.binary_cross_entropy_with_logits(
                    out, x.expand_as(out), reduction="none"
                ).sum(-1)  # [S, B]
                c = f - f.mean(0) if num_samples > 1 else f
            log_q = -F.binary_cross_entropy_with_logits(
                logits.expand_as(zj), zj, reduction="none"
            ).sum(-1)  # [S, B]
            ((c * log_q).sum() / x.shape[0]).backward()
            grads.append(w.grad)
    g = torch.stack(grads)  # [M, H, D]
    torch.testing.assert_close(sums, g.sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(squares, (g * g).sum(0), rtol=1e-4, atol=1e-3)


#: Where each bounded estimator takes its noise from (patched to replay the bound's draws).
NOISE = {"disarm": (torch, "rand"), "reparam": (torch.distributions.normal, "_standard_normal")}


@pytest.mark.parametrize(("name", "family"), [("disarm", "bernoulli"), ("reparam", "gaussian")])
def test_the_bound_sums_the_estimators_own_gradients_and_their_squares(
    name, family, monkeypatch
) -> None:
    """For 5 estimates in chunks of 2, the DisARM and reparameterization bounds' sums and sums
    of squares equal those of the last layer's gradients that the estimator itself gives
    (autograd of its surrogate; ``f`` the model's likelihood for DisARM, whose analytic KL the
    bound leaves out, and the model's learning signal for reparam) from the same uniform or
    normal draws."""
    import estimators

    model, x, _ = probe_case(name, {}, family)
    run = probe_speed.kernels(model, x, 5, num_samples=1, chunk=2, coefficient=name)
    torch.manual_seed(3)
    sums, squares = run()
    torch.manual_seed(3)
    enc = model.encoder[-1]
    width = enc.weight.shape[0] // (2 if family == "gaussian" else 1)  # latents
    draws = [torch.rand(1, x.shape[0], m, width) if name == "disarm"
             else torch.empty(1, x.shape[0], m, width).normal_() for m in (2, 2, 1)]  # fmt: skip
    est, grads = estimators.get(name), []
    for draw in draws:
        for j in range(draw.shape[2]):
            monkeypatch.setattr(*NOISE[name], lambda *a, e=draw[:, :, j], **k: e.clone())
            w = enc.weight.detach().clone().requires_grad_()
            q = model.distribution(F.linear(x, w, enc.bias.detach()))
            if name == "disarm":
                out = est(q, lambda z: model.log_likelihood(x, z).detach())
            else:
                out = est(q, model.learning_signal(x, q, "analytic"))
            grads.append(torch.autograd.grad(out.surrogate.sum() / x.shape[0], w)[0])
            monkeypatch.undo()
    g = torch.stack(grads)  # [M, H, D]
    assert g.abs().sum() > 0
    torch.testing.assert_close(sums, g.sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(squares, (g * g).sum(0), rtol=1e-4, atol=1e-3)


def test_an_unknown_bound_coefficient_is_refused() -> None:
    model, x, _ = probe_case("disarm", {}, "bernoulli")
    with pytest.raises(ValueError, match="allowed: score, disarm, reparam"):
        probe_speed.kernels(model, x, 5, num_samples=1, chunk=2, coefficient="arm")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--chunk", "0"], "--chunk=0"), (["--blocks", "2"], "--blocks=2"),
     (["--num-estimates", "10"], "--num-estimates=10"),
     (["--estimators", "reinforce,arm"], "--estimators=reinforce,arm"),
     (["--estimators", ""], "--estimators=")],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_2_before_any_work(
    argv, needle, capsys, tmp_path
) -> None:
    """A chunk below 1 (which would never advance), too few blocks or estimates: one line
    naming the option and the allowed values, exit 2, nothing measured or written."""
    assert_refused_before_any_work(probe_speed.main, argv, needle, capsys, tmp_path)
