"""pytest plugin: a throwaway PostgreSQL cluster for the whole session (``postgres_url``).

``TEST_DATABASE_URL`` points the tests at an existing database; otherwise a
:class:`service.localpg.LocalPostgres` cluster (Debian's server binaries, from
``make postgres``) is started in a temporary directory on a free port and removed at the
end. A cluster that cannot start fails the tests; it never skips them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from service.localpg import LocalPostgres

DATABASE = "contact_deletion_test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (asyncpg) of an empty database, shared by the session."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    with LocalPostgres(DATABASE) as cluster:
        yield cluster.url
