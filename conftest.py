"""Pytest setup for the whole repository (tests/ and the benchmarks/ suites).

- ``@pytest.mark.slow`` tests run only with ``--runslow``.
- ``@pytest.mark.gpu`` tests run only where CUDA is available.
- torch runs one thread per test process (``GRADBENCH_TEST_THREADS`` overrides): the tests
  are dominated by tiny tensors, and on busy cores extra threads stall (see FIELD-NOTES).
- glibc keeps freed memory in the process (``benchmarks.harness.allocator``), as training runs do.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from benchmarks import MOVED

    for arg in config.args:  # the suites' old paths name their new place
        module = "benchmarks." + arg.split("::")[0].removeprefix("benchmarks/").removesuffix(".py")
        if arg.startswith("benchmarks/") and module in MOVED:
            new = MOVED[module].split(" ")[0].replace(".", "/") + ".py"
            raise pytest.UsageError(f"{arg} has moved: use {new}")
    import torch

    from benchmarks.harness.allocator import retain_freed_memory

    torch.set_num_threads(int(os.environ.get("GRADBENCH_TEST_THREADS", "1")))
    retain_freed_memory()  # as in training runs: freed CPU memory is reused, not page-faulted


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Record the torch threads and the CPU allocator settings in benchmark JSONs."""
    import torch

    from benchmarks.harness.allocator import retain_freed_memory

    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_malloc"] = retain_freed_memory()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite tests/benchmarks/golden/records.csv from the current harness",
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


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests and benchmarks may pin torch's thread count; restore it after each one."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
