"""Retention (service.retention), SQLite and PostgreSQL: published outbox rows and finished
webhook deliveries older than their settings are deleted, in chunks; nothing the pipeline
still owes (unpublished or refused rows, pending or failing deliveries) and nothing recent
is touched. Before, nothing was ever removed (~4.7 KB kept per deleted contact)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import retention
from service.db import Database, outbox, utcnow, webhook_attempts, webhook_deliveries
from service.migrate import upgrade
from tests.components import components
from tests.conftest import make_settings
from tests.integration.test_migration_0002 import fresh_url  # noqa: F401

DAY = timedelta(days=1)


@pytest.fixture
async def db(fresh_url: str) -> AsyncIterator[Database]:  # noqa: F811
    await upgrade(fresh_url)
    database = Database(fresh_url)
    try:
        yield database
    finally:
        await database.dispose()


async def _outbox_rows(db: Database, rows: Sequence[tuple[str, datetime | None, bool]]) -> None:
    """(topic, published_at, refused) each."""
    async with db.begin() as conn:
        for topic, published, refused in rows:
            await conn.execute(
                outbox.insert().values(
                    topic=topic,
                    key="k",
                    payload=b"{}",
                    headers=[],
                    created_at=(published or utcnow()) - timedelta(seconds=1),
                    published_at=published,
                    failed_at=utcnow() - 9 * DAY if refused else None,
                    error="refused" if refused else None,
                )
            )


async def _topics(db: Database) -> list[str]:
    async with db.read() as conn:
        return sorted((await conn.execute(sa.select(outbox.c.topic))).scalars())


async def test_published_outbox_rows_older_than_the_retention_go_in_chunks(
    db: Database,
) -> None:
    old = utcnow() - 8 * DAY
    await _outbox_rows(
        db,
        [(f"old-{i}", old, False) for i in range(7)]
        + [("recent", utcnow() - DAY, False), ("unpublished", None, False)]
        + [("refused", None, True)],
    )
    assert await retention.prune_outbox(db, 7 * DAY, chunk=3) == 7  # 3 transactions
    assert await _topics(db) == ["recent", "refused", "unpublished"]
    assert await retention.prune_outbox(db, 7 * DAY) == 0


async def test_finished_deliveries_older_than_the_retention_go_with_their_attempts(
    db: Database,
) -> None:
    old, recent = utcnow() - 31 * DAY, utcnow() - DAY
    cases = {
        "old-succeeded": ("succeeded", old),
        "old-failed": ("failed", old),
        "old-failing": ("failing", None),
        "old-pending": ("pending", None),
        "recent-succeeded": ("succeeded", recent),
    }
    ids = {name: uuid.uuid4() for name in cases}
    async with db.begin() as conn:
        for name, (status, completed) in cases.items():
            await conn.execute(
                webhook_deliveries.insert().values(
                    id=ids[name],
                    workspace_id=uuid.uuid4(),
                    endpoint_id=uuid.uuid4(),
                    event_id=name,
                    event_type="contact.deleted",
                    payload=b"{}",
                    status=status,
                    attempt_count=1,
                    next_attempt_at=None if completed else old,
                    created_at=old,
                    completed_at=completed,
                )
            )
            await conn.execute(
                webhook_attempts.insert().values(
                    id=uuid.uuid4(),
                    delivery_id=ids[name],
                    attempted_at=old,
                    status_code=500,
                    latency_ms=1.0,
                    error=None,
                    response_body=None,
                )
            )
    assert await retention.prune_deliveries(db, 30 * DAY) == 2
    async with db.read() as conn:
        left = set((await conn.execute(sa.select(webhook_deliveries.c.event_id))).scalars())
        attempts = set((await conn.execute(sa.select(webhook_attempts.c.delivery_id))).scalars())
    assert left == {"old-failing", "old-pending", "recent-succeeded"}
    assert attempts == {ids[name] for name in left}


async def test_the_relay_process_prunes(
    fresh_url: str,  # noqa: F811
    db: Database,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    """Wired into the relay: a relay process started with a 1 h retention removes a row
    published 2 h ago and logs it; a row published now stays."""
    await _outbox_rows(db, [("old", utcnow() - timedelta(hours=2), False)])
    await _outbox_rows(db, [("now", utcnow(), False)])
    settings = make_settings(
        fresh_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_topic_prefix=f"retention-{uuid.uuid4().hex[:8]}.",
    )
    with components(settings, tmp_path, {"OUTBOX_RETENTION_S": "3600"}) as group:
        relay = group.start("relay")
        deadline = time.monotonic() + 60
        while await _topics(db) != ["now"]:
            assert relay.exited() is None, relay.exited()
            assert time.monotonic() < deadline, relay.tail()
            await asyncio.sleep(0.2)
        while '"retention_pruned"' not in relay.log_path.read_text():
            assert time.monotonic() < deadline, relay.tail()
            await asyncio.sleep(0.2)
    assert '"table": "outbox", "rows": 1' in relay.log_path.read_text()
