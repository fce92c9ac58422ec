"""A shared check for the measurement commands' refusal of bad options."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def assert_refused_before_any_work(
    main: Callable[[Sequence[str]], int], argv: list[str], needle: str, capsys, out_dir: Path
) -> None:
    """``main(argv)`` exits 2 with one last line naming ``needle`` (the option and its bad
    value) and the allowed values, and writes nothing into ``out_dir``."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out-dir", str(out_dir)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in err and "allowed" in err
    assert not list(out_dir.iterdir())
