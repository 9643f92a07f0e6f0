"""pytest fixtures for a real Directus. Use from tests/conftest.py:

from tests.directus_fixtures import directus  # noqa: F401
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.directus_harness import DirectusServer


@pytest.fixture(scope="session")
def directus() -> Iterator[DirectusServer]:
    """A started Directus (SQLite in a temp dir, 127.0.0.1), shared by the session and stopped at its end."""
    server = DirectusServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def wait_for(check: Callable[[], object], timeout: float = 60) -> object:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"condition not met in {timeout}s")
