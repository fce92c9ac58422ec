"""gradbench-demo: each row's truth is what the estimator declares; bad arguments are refused.

The statistical check allows z from a Bonferroni bound over the coordinates of the rows
checked, family-wise false-failure rate ALPHA = 1e-3. Seeds are fixed and were not tuned.
"""

from __future__ import annotations

import math

import pytest

import estimators
from benchmarks.cli.demo import EVENT, compare, main
from tests.estimators.problems import z_critical

ALPHA = 1e-3
REPLICATES = 20_000
#: (estimator, options, family) rows whose truth is not grad E_q[f].
ROWS = [
    *(("vimco", {}, family) for family in ("bernoulli", "categorical", "gaussian")),
    *(("nvil", {"normalize": True}, family) for family in ("bernoulli", "categorical")),
]


def _coords(family: str) -> int:
    return 2 * math.prod(EVENT[family])  # q's parameters and f's weights


@pytest.mark.parametrize(("name", "options", "family"), ROWS, ids=lambda v: str(v))
def test_vimco_and_normalized_nvil_rows_name_their_truth_and_match_it(name, options, family):
    """VIMCO's row compares with the gradient of the S-sample bound (exact for discrete
    latents, a Monte Carlo reference for Gaussians) and NVIL-normalize's with the direction of
    grad E_q[f]; with M = 20000 replicates both are within z standard errors."""
    row = compare(name, options, family, REPLICATES, seed=0)
    expected = "grad IWAE_2" if name == "vimco" else "direction of grad E_q[f]"
    assert row["truth"].startswith(expected)
    assert row["declared"] == ("unbiased" if name == "vimco" else "unbiased up to scale")
    z = z_critical(ALPHA / len(ROWS), _coords(family))
    assert row["max |z|"] <= z, row


def test_biased_rows_say_so() -> None:
    """Every estimator declaring unbiased_for="none" is labelled biased against grad E_q[f]."""
    for name in estimators.available():
        if estimators.get(name).unbiased_for == "none":
            row = compare(name, {}, sorted(estimators.families(name))[0], 50, seed=0)
            assert (row["declared"], row["truth"]) == ("biased", "grad E_q[f]")


@pytest.mark.parametrize(
    ("args", "option", "allowed"),
    [
        (["--replicates", "0"], "--replicates", ">= 2"),
        (["--replicates", "-5"], "--replicates", ">= 2"),
        (["--replicates", "1"], "--replicates", ">= 2"),
        (["--replicates", "many"], "--replicates", ">= 2"),
        (["--seed", "-1"], "--seed", ">= 0"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_error_line_naming_the_option(
    capsys, args: list[str], option: str, allowed: str
) -> None:
    """An invalid --replicates / --seed exits with status 2 before any work, printing the
    usage and one error line that names the option and the allowed values, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert (
        len(errors) == 1 and option in errors[0] and f"allowed: an integer {allowed}" in errors[0]
    )
    assert "Traceback" not in captured.err
