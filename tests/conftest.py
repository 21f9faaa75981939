"""Fixtures shared by every test: environment variables restored and process groups torn down.

Tests marked ``@pytest.mark.slow`` (long multi-process runs, exhaustive sweeps) are skipped unless
``--run-slow`` is given or ``LP_RUN_SLOW=1`` is set, so the default suite (what CI runs) stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("LP_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or LP_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _restoring_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Tests (and Lightning) set MASTER_PORT, LOCAL_RANK, ...: put the environment back after each test."""
    yield from _restoring_environment()


@pytest.fixture(autouse=True, scope="module")
def _restore_environment_per_module() -> Iterator[None]:
    """Module-scoped fixtures that run a Trainer leave the same variables behind: restore after each module."""
    yield from _restoring_environment()


@pytest.fixture(autouse=True)
def _teardown_process_group() -> Iterator[None]:
    """A test that initialised a process group in this process must not leak it into the next test."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _deterministic_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
