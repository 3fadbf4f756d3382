"""A filter orders text by code point whatever the database's collation.

`$gt` and `$lt` on a name compared under the PostgreSQL database's default collation: under
a linguistic one (ICU ``en-US`` here, as ``en_US.UTF-8`` is on many servers) ``"apple"``
sorts before ``"B"``, under SQLite's BINARY (code point order) after, so one filter selected
different contacts, and a bulk delete deleted different ones, on the two databases. The
PostgreSQL side runs on a database created with that collation; SQLite on its own file.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.contacts.filters import compile_filter, parse_filter
from service.contacts.store import contact_row
from service.db import Database, contacts, workspaces
from service.migrate import upgrade_sync

NAMES = ["apple", "Banana", "B", "b", "Ärger", "zebra", "Zebra", "_x"]


@pytest.fixture
def linguistic_db_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A migrated database: on PostgreSQL one whose default collation is ICU ``en-US``."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'collation.db'}"
        upgrade_sync(url)
        yield url
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"icu_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(
            host=server.host, port=server.port, user=server.username, database=server.database
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(
        admin(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
            " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    )
    try:
        url = server.set(database=name).render_as_string(hide_password=False)
        upgrade_sync(url)
        yield url
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def test_gt_and_lt_order_names_by_code_point(linguistic_db_url: str) -> None:
    db = Database(linguistic_db_url)
    workspace_id = uuid.uuid4()
    now = datetime.now(UTC)
    wrong = []
    try:
        async with db.begin() as conn:
            await conn.execute(
                workspaces.insert().values(id=workspace_id, name="collation", created_at=now)
            )
            await conn.execute(
                contacts.insert(),
                [
                    contact_row(
                        uuid.uuid4(), workspace_id, f"c{i}@example.com", last_name=n, at=now
                    )
                    for i, n in enumerate(NAMES)
                ],
            )
        async with db.read() as conn:
            for op in ("$gt", "$lt"):
                for value in ("B", "b", "Z", "a", "Ä", "_"):
                    tree = parse_filter({"last_name": {op: value}})
                    stmt = sa.select(contacts.c.last_name).where(
                        contacts.c.workspace_id == workspace_id, compile_filter(tree, contacts)
                    )
                    selected = set((await conn.execute(stmt)).scalars())
                    meant = {n for n in NAMES if (n > value if op == "$gt" else n < value)}
                    if selected != meant:
                        wrong.append((op, value, sorted(selected), sorted(meant)))
    finally:
        await db.dispose()
    assert wrong == []
