"""The outbox relay: publishes committed outbox rows to Kafka and marks them published.

On PostgreSQL a batch is claimed with `FOR UPDATE SKIP LOCKED`, so any number of relays
share the work. A crash between publishing and marking republishes that batch once
more; every consumer is idempotent, so that costs a duplicate, never a loss. Within one
relay, rows go out in id order, so events of one key keep their order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import sqlalchemy as sa

from service.aio import Backoff, Sleep, sleep_unless_stopped, wait_any
from service.config import Settings
from service.db import Database, outbox, utcnow
from service.failpoints import crash_if
from service.faults import describe, is_transient
from service.kafka import OutMessage, Producer
from service.logs import get_logger
from service.metrics import Metrics

log = get_logger(__name__)


# The headers column read as its JSON text (cast in SQL, so neither SQLAlchemy nor asyncpg
# decodes JSON per row): the rows of a pass share a handful of distinct header lists
# (content type and event type), so each distinct text is parsed once and remembered.
_HEADERS_TEXT = sa.cast(outbox.c.headers, sa.Text).label("headers")
_HEADERS_CACHE_MAX = 1024
_headers_cache: dict[str, tuple[tuple[str, bytes], ...]] = {}


def _headers(text: str) -> tuple[tuple[str, bytes], ...]:
    """Kafka headers from the stored ``[[name, value], ...]`` (its JSON text, as read)."""
    headers = _headers_cache.get(text)
    if headers is None:
        headers = tuple((str(k), str(v).encode()) for k, v in json.loads(text))
        if len(_headers_cache) >= _HEADERS_CACHE_MAX:
            _headers_cache.clear()
        _headers_cache[text] = headers
    return headers


def _message(row: Any) -> OutMessage:
    key = row.key.encode() if row.key is not None else None
    return OutMessage(
        topic=row.topic, key=key, value=bytes(row.payload), headers=_headers(row.headers)
    )


class Relay:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        producer: Producer,
        metrics: Metrics,
        wakeup: asyncio.Event | None = None,
        sleep: Sleep = sleep_unless_stopped,
    ) -> None:
        self.settings = settings
        self.db = db
        self.producer = producer
        self.metrics = metrics
        self.wakeup = wakeup or asyncio.Event()
        self.sleep = sleep
        # The relay's own figures: rows published and passes made since it started, and
        # `idle`, set while it waits with nothing signalled (cleared when a pass starts).
        self.published = 0
        self.passes = 0
        self.idle = asyncio.Event()

    def _pending(self) -> sa.Select[Any]:
        stmt = (
            sa.select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload, _HEADERS_TEXT)
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self.settings.relay_batch_size)
        )
        return self.db.for_update(stmt, skip_locked=True)

    async def publish_once(self) -> int:
        """Publish one batch; returns how many rows went out."""
        if self.db.is_sqlite:
            # SQLite has one writer: read, publish, then mark in a short write transaction,
            # rather than holding the write lock across a broker round trip.
            async with self.db.read() as conn:
                rows = (await conn.execute(self._pending())).all()
            if not rows:
                return 0
            await self.producer.send_many([_message(r) for r in rows])
            crash_if(self.settings.failpoint, "relay_after_publish")
            async with self.db.begin() as conn:
                await self._mark(conn, [r.id for r in rows])
        else:
            async with self.db.begin() as conn:
                rows = (await conn.execute(self._pending())).all()
                if not rows:
                    return 0
                await self.producer.send_many([_message(r) for r in rows])
                crash_if(self.settings.failpoint, "relay_after_publish")
                await self._mark(conn, [r.id for r in rows])
        self.metrics.outbox_published.inc(len(rows))
        self.published += len(rows)
        return len(rows)

    async def _mark(self, conn: Any, ids: list[int]) -> None:
        await conn.execute(
            outbox.update().where(outbox.c.id.in_(ids)).values(published_at=utcnow())
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop`; wait for a wake-up (or the poll interval) when idle.

        The wake-up (`wakeup`, set by whoever commits outbox rows in this process) is
        cleared before a pass reads, never after: a row committed while a batch is read or
        published sets it again, and the next pass starts at once instead of after
        ``relay_poll_interval_s`` (the poll only catches rows that other processes wrote).

        Never exits on an error: an outage of the database or broker is waited out with
        capped, jittered back-off; anything else is logged as an error and retried at the
        slowest pace (the rows stay unpublished, nothing is lost).
        """
        backoff = Backoff(cap_s=self.settings.retry_max_backoff_s, sleep=self.sleep)
        while not stop.is_set():
            self.wakeup.clear()
            self.idle.clear()
            self.passes += 1
            try:
                sent = await self.publish_once()
                backoff.reset()
            except Exception as exc:
                if is_transient(exc):
                    delay = backoff.next_delay()
                    log.warning("relay_retrying", error=repr(exc)[:500], backoff_s=delay)
                else:
                    backoff.attempt = 32
                    delay = backoff.next_delay()
                    log.error("relay_batch_failed", error=describe(exc), backoff_s=delay)
                await self.sleep(delay, stop)
                continue
            if sent < self.settings.relay_batch_size and not self.wakeup.is_set():
                self.idle.set()
                await wait_any(self.settings.relay_poll_interval_s, stop, self.wakeup)
