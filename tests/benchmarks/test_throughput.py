"""The throughput suite's reference and bookkeeping: the hand-written step computes what the
harness computes (same loss, gradients and update from the same random draws), FLOPs are
counted as 2 m n k per matmul, the default subset covers every estimator, and the summary
pairs harness and hand-written timings of the same case."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import estimators
from benchmarks.harness.step import estimate_loss
from benchmarks.throughput import bench_throughput as bt
from benchmarks.throughput import handwritten, handwritten_steps
from benchmarks.throughput.summary import (
    acceptance_cases,
    bootstrap_median_ci,
    ratio_frame,
    ratio_table,
)
from tests.benchmarks.handwritten_pairs import assert_two_steps_update_alike, close, pair

#: (estimator, options, S) with a hand-written version; each runs on all its families.
HANDWRITTEN = [
    ("reinforce", {"baseline": "moving_average"}, 1),
    ("reinforce", {"baseline": "batch_mean"}, 2),
    ("reinforce", {}, 3),
    ("rloo", {}, 4),
    ("nvil", {}, 1),
    ("nvil", {"normalize": True, "hidden": 7}, 2),
    ("vimco", {}, 3),
    ("gumbel_softmax", {"temperature": 0.5}, 2),
    ("gumbel_softmax", {"temperature": 0.5, "straight_through": True}, 1),
    ("straight_through", {}, 2),
    ("gumbel_rao", {"temperature": 0.5, "num_rao_samples": 3}, 2),
    ("reparam", {}, 2),
    ("arm", {}, 2),
    ("disarm", {}, 2),
    ("rebar", {}, 2),  # benchmarks/handwritten_control_variate.py, through make_step
    ("relax", {"hidden": 8}, 1),
    ("iwae", {}, 3),  # benchmarks/handwritten_multisample.py, through make_step
    ("stl", {}, 3),
    ("dreg", {}, 3),
    ("mvd", {}, 1),
]


def _tag(name: str, options: dict) -> str:
    """A short test id part: the name and the options that tell cases apart."""
    tags = [options.get("baseline", ""), "ST" if options.get("straight_through") else ""]
    tags.append("normalize" if options.get("normalize") else "")
    return "-".join([name, *(t for t in tags if t)])


CASES = [
    pytest.param(
        bt.make_case(name, options, family, 16, s, arch),
        id=f"{_tag(name, options)}-{family}-S{s}-{arch}",
    )
    for name, options, s in HANDWRITTEN
    for family in ("gaussian", "bernoulli", "categorical")
    if handwritten_steps.supports(name, family, options)
    for arch in ("linear", "nonlinear")
]


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of ``loss``; None for a parameter it does not use (NVIL's scalar)."""
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _grads_close(grads: list, hand_grads: list, rtol: float = 1e-4) -> None:
    for i, (g, h) in enumerate(zip(grads, hand_grads, strict=True)):
        assert (g is None) == (h is None), f"parameter {i}: used by only one of the two"
        assert g is None or close(g, h, rtol=rtol), f"parameter {i}: gradients differ"


@pytest.mark.parametrize("case", CASES)
def test_handwritten_loss_and_gradients_equal_harness(case: bt.Case) -> None:
    """From the same parameters and RNG state, the hand-written loss and every parameter
    gradient equal the harness's (estimate_loss) up to float32 rounding."""
    setup, hand = pair(case)
    torch.manual_seed(1)
    loss, _ = estimate_loss(setup.model, setup.estimator, setup.x, setup.kl, case.num_samples)
    grads = _grads(loss, [*setup.model.parameters(), *setup.estimator.parameters()])
    torch.manual_seed(1)
    hand_loss = hand.loss(setup.x)
    hand_grads = _grads(hand_loss, [*hand.params, *hand.est_params])
    assert close(loss.detach(), hand_loss.detach())
    _grads_close(grads, hand_grads)


@pytest.mark.parametrize(
    "case", [c for c in CASES if "linear" in c.id and "nonlinear" not in c.id]
)
def test_handwritten_step_updates_like_harness(case: bt.Case) -> None:
    """Two full training steps (loss, backward, the same Adam) leave the hand-written
    parameters equal to the harness's, and the losses match at each step.

    In float64: Adam moves each entry by about ``lr * g / (|g| + eps)``, so in float32 a
    gradient entry at rounding level (a sum of terms ~0.1 that cancel to ~1e-8) would turn
    the two implementations' rounding differences into a difference of up to ``lr``."""
    assert_two_steps_update_alike(*pair(case, torch.float64))


def test_moving_average_state_matches_harness() -> None:
    """The hand-written moving average follows the harness baseline's buffers over steps."""
    case = bt.make_case("reinforce", {"baseline": "moving_average"}, "bernoulli", 16, 2)
    setup, hand = pair(case)
    for step in range(4):
        torch.manual_seed(step)
        estimate_loss(setup.model, setup.estimator, setup.x, setup.kl, case.num_samples)
        torch.manual_seed(step)
        hand.loss(setup.x)
    baseline = setup.estimator.baseline
    assert int(baseline.count) == hand.count == 4
    assert math.isclose(float(baseline.average), float(hand.average), rel_tol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_nvil_state_matches_harness(normalize: bool) -> None:
    """NVIL's running mean and variance of ``f - b(x)`` follow the harness's buffers over
    steps, and the fourth step's loss and gradients (centered, with ``normalize`` scaled,
    by them) still agree. The bias correction is float32 in the harness and float64 here."""
    case = bt.make_case("nvil", {"normalize": normalize, "decay": 0.5}, "bernoulli", 16, 2)
    setup, hand = pair(case)
    for step in range(3):
        torch.manual_seed(step)
        estimate_loss(setup.model, setup.estimator, setup.x, setup.kl, case.num_samples)
        torch.manual_seed(step)
        hand.loss(setup.x)
    est = setup.estimator
    assert int(est.count) == hand.count == 3
    assert math.isclose(float(est.mean), float(hand.average), rel_tol=1e-5)
    if normalize:  # the variance is tracked (only then), and the scale active: sqrt(v) > 1
        assert math.isclose(float(est.var), float(hand.variance), rel_tol=1e-5)
        assert float(est.var / (1 - est.decay ** float(est.count))) > 4
    torch.manual_seed(3)
    loss, _ = estimate_loss(setup.model, est, setup.x, setup.kl, case.num_samples)
    grads = _grads(loss, [*setup.model.parameters(), *est.parameters()])
    torch.manual_seed(3)
    hand_loss = hand.loss(setup.x)
    hand_grads = _grads(hand_loss, [*hand.params, *hand.est_params])
    assert close(loss.detach(), hand_loss.detach())
    _grads_close(grads, hand_grads)


def test_handwritten_refuses_what_it_does_not_implement() -> None:
    """Estimators, baselines and families without a hand-written version raise ValueError."""
    assert not handwritten_steps.supports("reinforce", "bernoulli", {"baseline": "learned"})
    assert not handwritten_steps.supports("disarm", "gaussian")
    assert not handwritten_steps.supports("straight_through", "gaussian")
    assert not handwritten_steps.supports("gumbel_rao", "gaussian")
    assert not handwritten_steps.supports("no_such_estimator", "bernoulli")
    with pytest.raises(ValueError, match="no hand-written"):
        handwritten.HandwrittenStep([torch.zeros(2, 2)] * 4, "categorical", 2, 2, "arm")


def test_matmul_flops_count_two_mnk_forward_and_backward() -> None:
    """A linear reinforce step costs 4 B D L (1 + S) matmul FLOPs: encoder forward and weight
    gradient (x needs no gradient), decoder forward and weight gradient on S samples (z is
    sampled, no gradient); Adam adds none."""
    case = bt.make_case("reinforce", {}, "bernoulli", 8, 3)
    step = bt.harness_step(bt.build(case))
    b, d, latent = 8, bt.DATA_DIM, bt.LATENTS["bernoulli"][0]
    assert bt.matmul_flops(step) == 4 * b * d * latent * (1 + 3)


def test_default_subset_covers_every_estimator_and_family() -> None:
    """Every registered estimator and family has a batch-100 linear CPU case, rloo at S = 8,
    the sweep omits batch 1024 x nonlinear x S = 8, and the full set contains the default."""
    default = bt.default_cases(("cpu",))
    covered = {(c.estimator, c.family) for c in default if bt.is_representative(c)}
    for name in estimators.available():
        for family in estimators.families(name):
            assert (name, family) in covered
    assert all(c.num_samples == 8 for c in default if c.estimator == "rloo" and c.arch == "linear"
               and c.batch_size == 100 and c.family != "bernoulli")  # fmt: skip
    assert not [
        c for c in default if (c.batch_size, c.arch, c.num_samples) == (1024, "nonlinear", 8)
    ]
    assert set(default) <= set(bt.full_cases(("cpu",)))
    assert len(default) == len(set(default))


def test_acceptance_cases_cover_every_bernoulli_estimator() -> None:
    """The acceptance cases have every estimator of the library that supports Bernoulli
    latents, all with a hand-written version, at batch 100 (target 1.10) and 1024 (1.05; rloo
    1.10), each with options that the default throughput suite also times."""
    cases = acceptance_cases()
    # Issue 16 asks hand-written steps of its Gaussian estimators only; unordered_set has none.
    expected = set(estimators.supporting("bernoulli")) - {"unordered_set"}
    for batch in (100, 1024):
        bernoulli = [(c, t) for c, t in cases if c.batch_size == batch and c.family == "bernoulli"]
        assert {c.estimator for c, _ in bernoulli} == expected
        for c, target in bernoulli:
            assert c.has_handwritten and c.arch == "linear"
            assert target == (1.10 if batch == 100 or c.estimator == "rloo" else 1.05)
    baselines = {c.opts.get("baseline") for c, _ in cases if c.estimator == "reinforce"}
    assert baselines == {"moving_average", "batch_mean"}
    # The throughput suite times each of them (harness and hand-written) too.
    suite = {(c.estimator, c.options) for c in bt.default_cases(("cpu",)) if c.has_handwritten}
    assert {(c.estimator, c.options) for c, _ in cases} <= suite


def test_cuda_cases_carry_the_gpu_marker() -> None:
    """CUDA parameters are marked ``gpu`` and skip themselves without CUDA."""
    params = bt._params([bt.make_case("reparam", {}, "gaussian", device="cuda")])
    for param in params:
        names = [m.name for m in param.marks]
        assert "gpu" in names and "skipif" in names


def test_each_case_times_harness_then_handwritten() -> None:
    """Every case times the harness step first, its hand-written reference (where one
    exists) right after, then the single estimate; one family per estimator is probed (but
    mvd, whose M=100 probe at 200 latents takes minutes: S (3 D + 1) f-evaluations each)."""
    for case in bt.default_cases(("cpu",)):
        kinds = bt.case_kinds(case)
        expected = (
            ["harness_step", "handwritten_step"] if case.has_handwritten else ["harness_step"]
        )
        assert kinds[: len(expected) + 1] == [*expected, "estimate"]
    probed = {c.estimator for c in bt.default_cases(("cpu",)) if "probe" in bt.case_kinds(c)}
    assert probed == set(estimators.available()) - {"mvd"}


def _bench(kind: str, label: str, median: float, reference: bool = False) -> dict:
    info = {"kind": kind, "label": label, "family": "bernoulli", "batch_size": 100,
            "num_samples": 1, "arch": "linear", "device": "cpu", "threads": 1,
            "reference": reference}  # fmt: skip
    return {"name": f"test_{kind}[{label}]", "group": kind, "extra_info": info,
            "stats": {"median": median, "q1": median, "q3": median, "rounds": 5}}  # fmt: skip


def test_summary_pairs_harness_and_handwritten_of_the_same_case(tmp_path) -> None:
    """ratio_frame divides each harness step by the hand-written step of the same label and
    case, and leaves out estimators without a hand-written step."""
    path = tmp_path / "bench.json"
    benches = [
        _bench("harness_step", "rloo (S=8)", 0.011),
        _bench("handwritten_step", "rloo (S=8)", 0.010, reference=True),
        _bench("harness_step", "reinforce", 0.006),
        _bench("handwritten_step", "reinforce", 0.004, reference=True),
        _bench("harness_step", "nvil", 0.009),
        _bench("estimate", "rloo (S=8)", 0.005),
    ]
    for b in benches:
        b["extra_info"]["estimator_label"] = b["extra_info"]["label"]
    path.write_text(json.dumps({"benchmarks": benches}))
    frame = ratio_frame(path)
    rows = frame.set_index("label")["ratio"]
    assert set(rows.index) == {"rloo (S=8)", "reinforce"}
    assert math.isclose(rows["rloo (S=8)"], 1.1)
    assert math.isclose(rows["reinforce"], 1.5)
    table = ratio_table(frame)
    assert re.search(r"\| rloo \(S=8\) +\| bernoulli .*\| 11\.00 +\| 10\.00 +\| 1\.10 +\|", table)


def test_report_ratio_matches_by_estimator(tmp_path) -> None:
    """The report's reference column pairs a harness step with the same estimator's
    hand-written step (not the median over estimators)."""
    from benchmarks.report.records import load_throughput, with_reference

    path = tmp_path / "bench.json"
    benches = [
        _bench("harness_step", "rloo (S=8)", 0.011),
        _bench("handwritten_step", "rloo (S=8)", 0.010, reference=True),
        _bench("harness_step", "reinforce", 0.006),
        _bench("handwritten_step", "reinforce", 0.004, reference=True),
        _bench("harness_step", "nvil", 0.009),
    ]
    for b in benches:
        b["extra_info"]["estimator_label"] = b["extra_info"]["label"]
    path.write_text(json.dumps({"benchmarks": benches}))
    tp = with_reference(load_throughput([path])).set_index(["kind", "label"])["ratio"]
    assert math.isclose(tp["harness_step", "rloo (S=8)"], 1.1)
    assert math.isclose(tp["harness_step", "reinforce"], 1.5)
    assert math.isnan(tp["harness_step", "nvil"])


def test_bootstrap_interval_brackets_the_median() -> None:
    """The bootstrap interval of a median contains the sample median and collapses for
    constant data."""
    values = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.3]
    low, high = bootstrap_median_ci(values)
    assert low <= sorted(values)[3] <= high
    assert bootstrap_median_ci([2.0] * 5) == (2.0, 2.0)


def test_only_estimators_without_double_backward_are_compiled() -> None:
    """REBAR and RELAX (a gradient of a gradient) are never given to torch.compile."""
    compiled = set()
    for name in estimators.available():
        family = "bernoulli" if "bernoulli" in estimators.families(name) else "gaussian"
        if bt.compiles(bt.make_case(name, {}, family, 4, 2)):
            compiled.add(name)
    assert compiled == set(estimators.available()) - {"rebar", "relax"}


def test_measure_keeps_the_eager_table_when_the_compile_part_fails(tmp_path, monkeypatch) -> None:
    """--measure --compile writes overhead_<device>.{json,md} before compiling, so a failure
    of the compile measurement loses nothing already measured."""
    from benchmarks.throughput import summary as ts

    report = {
        "machine": {"device": "cpu", "threads": 1, "date": "d", "versions": {}, "cpu_count": 2,
                    "loadavg_before": [0.0] * 3, "loadavg_after": [0.0] * 3},
        "results": [],
    }  # fmt: skip

    def fail(*args: object) -> None:
        raise RuntimeError("compile failed")

    monkeypatch.setattr(ts, "measure", lambda *args: report)
    monkeypatch.setattr(ts, "measure_compile", fail)
    with pytest.raises(RuntimeError, match="compile failed"):
        ts.main(["--measure", "--compile", "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "overhead_cpu.json").read_text()) == report
    assert (tmp_path / "overhead_cpu.md").read_text().startswith("# Harness overhead on cpu")
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--blocks", "0"], r"--blocks=0 is invalid; allowed: an integer >= 3"),
     (["--block-seconds", "0"], r"--block-seconds=0.0 is invalid; allowed: a number > 0")],
)  # fmt: skip
def test_measure_options_out_of_range_are_refused_before_any_work(
    args: list[str], message: str, tmp_path, capsys
) -> None:
    """Exit 2 naming the option, its value and the allowed values; nothing written."""
    from benchmarks.throughput import summary as ts

    with pytest.raises(SystemExit) as exit_info:
        ts.main(["--measure", "--out-dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())
