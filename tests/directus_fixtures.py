"""pytest fixtures for a real Directus. Use from tests/conftest.py:

from tests.directus_fixtures import directus  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

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
