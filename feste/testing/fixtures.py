"""pytest fixtures for the feste.testing server.

Design: enable with ``pytest_plugins = ["feste.testing.fixtures"]`` in a
conftest. Fixtures are function-scoped thread-mode servers, which start in
milliseconds, so every test gets fresh statistics and knobs without paying
for a subprocess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._run import TestServer

__all__ = ["llm_server", "llm_server_factory"]


@pytest.fixture
def llm_server() -> Iterator[TestServer]:
    """A running thread-mode ``TestServer`` with default knobs."""
    with TestServer() as server:
        yield server


@pytest.fixture
def llm_server_factory() -> Iterator[Callable[..., TestServer]]:
    """``make(**knobs) -> TestServer``: starts servers, all stopped at teardown."""
    servers: list[TestServer] = []

    def make(**knobs: Any) -> TestServer:
        server = TestServer(**knobs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()
