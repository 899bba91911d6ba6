"""Fixtures for langchain_mplus tests: the shared embedded model, and async tests run whatever the ini says.

The tests may run from this package's directory (its pyproject sets `asyncio_mode = "auto"`) or together with
the core suite from the repository root (strict mode), so coroutine tests are marked here explicitly; the
standard langchain-tests suites do not mark theirs. Torch runs on one thread, as in the core suite: on a
shared 2-core machine a second spinning thread slows decoding down several times over.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import pytest
import torch

from langchain_mplus import default_llm

torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Generator[None, Any, None]:
    """Mark coroutine tests before pytest-asyncio (whose wrapper is outside this one) decides what they are."""
    outcome = yield
    if not inspect.iscoroutinefunction(obj):
        return
    result = outcome.get_result()
    for node in result if isinstance(result, list) else [result]:
        if isinstance(node, pytest.Function) and node.get_closest_marker("asyncio") is None:
            node.add_marker(pytest.mark.asyncio)


@pytest.fixture(scope="session")
def llm():  # type: ignore[no-untyped-def]
    """The process-wide embedded model (the one `ChatMPlus()` uses)."""
    torch.manual_seed(0)
    return default_llm()
