"""The outbox relay against a real broker: every row goes out, in id order, and is marked.

On SQLite a batch's mark runs while the next batch is published (service.relay); a mark
that fails must leave its rows to be published again, never lost.
"""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from service.config import Settings, sqlite_file
from service.db import Database, outbox, utcnow
from service.kafka import Producer, ensure_topics, read_topics
from service.metrics import Metrics
from service.relay import Relay
from tests.conftest import make_settings

ROWS = 25
BATCH = 10


async def _publish_all(relay: Relay) -> None:
    while await relay.publish_once():
        pass
    await relay.settle()


async def _unpublished(db: Database, topic: str) -> int:
    stmt = sa.select(sa.func.count()).where(
        outbox.c.topic == topic, outbox.c.published_at.is_(None)
    )
    async with db.read() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def test_every_row_goes_out_in_order_and_a_failed_mark_loses_nothing(
    db_url: str, kafka_bootstrap: str
) -> None:
    settings: Settings = make_settings(
        db_url, kafka_bootstrap_servers=kafka_bootstrap, relay_batch_size=BATCH
    )
    topic = settings.topic("relay-test")
    await ensure_topics(kafka_bootstrap, [topic], partitions=1)
    # A short busy timeout: a mark that finds the write lock taken fails quickly.
    db = Database(db_url, busy_timeout_ms=200)
    producer = Producer(kafka_bootstrap)
    await producer.start()
    relay = Relay(settings, db, producer, Metrics())
    try:
        await _publish_all(relay)  # whatever earlier tests left unpublished
        async with db.begin() as conn:
            await conn.execute(
                outbox.insert(),
                [
                    {
                        "topic": topic,
                        "key": "k",
                        "payload": str(n).encode(),
                        "headers": [["n", str(n)]],
                        "created_at": utcnow(),
                    }
                    for n in range(ROWS)
                ],
            )
        path = sqlite_file(db_url)
        if path is not None:
            # Another process holds SQLite's write lock: the first batch is published but
            # its mark fails, after the second batch went out behind it.
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                assert await relay.publish_once() == BATCH
                with pytest.raises(sa.exc.OperationalError, match="locked"):
                    await relay.publish_once()
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert await _unpublished(db, topic) == ROWS
        await _publish_all(relay)
        assert await _unpublished(db, topic) == 0
    finally:
        await relay.settle()
        await producer.stop()
        await db.dispose()

    values = [int(m.value) for m in [m async for m in read_topics(kafka_bootstrap, [topic])]]
    expected = list(range(ROWS))
    if path is None:
        assert values == expected
    else:
        # The two batches whose mark failed went out twice; each pass is in id order.
        assert values == expected[: 2 * BATCH] + expected
