"""Fixtures shared by the tests: composing gradbench configs. (The ``slow``/``gpu`` marker
handling lives in the repository's root ``conftest.py``, so it also covers ``benchmarks/``.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture
def make_config() -> Callable[..., object]:
    """``make_config(*overrides, return_hydra_config=False)``: compose ``conf/config.yaml``."""
    from hydra import compose, initialize_config_dir

    import benchmarks.harness.config  # noqa: F401  (registers the schemas)

    def _make(*overrides: str, return_hydra_config: bool = False) -> object:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "config", overrides=list(overrides), return_hydra_config=return_hydra_config
            )

    return _make
