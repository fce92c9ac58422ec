"""Shared pytest setup: the ``slow`` and ``gpu`` markers, and composing gradbench configs.

- ``@pytest.mark.slow`` tests run only with ``--runslow``.
- ``@pytest.mark.gpu`` tests run only where CUDA is available.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow")
    has_gpu: bool | None = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords:
            if has_gpu is None:
                import torch

                has_gpu = torch.cuda.is_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="gpu: CUDA is not available"))


@pytest.fixture
def make_config() -> Callable[..., object]:
    """``make_config(*overrides, return_hydra_config=False)``: compose ``conf/config.yaml``."""
    from hydra import compose, initialize_config_dir

    import benchmarks.config  # noqa: F401  (registers the schemas)

    def _make(*overrides: str, return_hydra_config: bool = False) -> object:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "config", overrides=list(overrides), return_hydra_config=return_hydra_config
            )

    return _make
