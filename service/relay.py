"""The outbox relay: publishes committed outbox rows to Kafka and marks them published.

On PostgreSQL a batch is claimed with `FOR UPDATE SKIP LOCKED`, so any number of relays
share the work. A crash between publishing and marking republishes that batch once
more; every consumer is idempotent, so that costs a duplicate, never a loss. Within one
relay, rows go out in id order, so events of one key keep their order.

On SQLite the mark is a write transaction, which waits for the one writer (a worker's
batch, an API request). So that the relay does not wait with it, a batch's mark runs in
the background while the next batch is read (after the last id sent) and published; one
mark at a time. If a mark fails, the relay reads again from the first unpublished row:
what it sent since is sent again (a duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
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


def _message(row: Any) -> OutMessage:
    headers = tuple((str(k), str(v).encode()) for k, v in row.headers)
    key = row.key.encode() if row.key is not None else None
    return OutMessage(topic=row.topic, key=key, value=bytes(row.payload), headers=headers)


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
        # SQLite: the background mark of the last batch sent, and the last id it covers.
        self._marking: asyncio.Task[None] | None = None
        self._sent_up_to: int | None = None

    def _pending(self, after: int | None = None) -> sa.Select[Any]:
        stmt = (
            sa.select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload, outbox.c.headers)
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self.settings.relay_batch_size)
        )
        if after is not None:
            stmt = stmt.where(outbox.c.id > after)
        return self.db.for_update(stmt, skip_locked=True)

    async def publish_once(self) -> int:
        """Publish one batch; returns how many rows went out (on SQLite, their mark may
        still be under way: see `settle`)."""
        if self.db.is_sqlite:
            # SQLite has one writer: read, publish, then mark in a short write transaction,
            # rather than holding the write lock across a broker round trip. The mark of
            # the previous batch may still be waiting for the writer: read after what it
            # covers. Once no mark is pending, read from the first unpublished row again.
            if self._marking is None or self._marking.done():
                await self.settle()
            async with self.db.read() as conn:
                rows = (await conn.execute(self._pending(self._sent_up_to))).all()
            if not rows:
                await self.settle()
                return 0
            await self.producer.send_many([_message(r) for r in rows])
            crash_if(self.settings.failpoint, "relay_after_publish")
            await self.settle()  # one mark at a time
            self._sent_up_to = rows[-1].id
            self._marking = asyncio.create_task(self._mark_alone([r.id for r in rows]))
        else:
            async with self.db.begin() as conn:
                rows = (await conn.execute(self._pending())).all()
                if not rows:
                    return 0
                await self.producer.send_many([_message(r) for r in rows])
                crash_if(self.settings.failpoint, "relay_after_publish")
                await self._mark(conn, [r.id for r in rows])
        self.metrics.outbox_published.inc(len(rows))
        return len(rows)

    async def _mark(self, conn: Any, ids: list[int]) -> None:
        await conn.execute(
            outbox.update().where(outbox.c.id.in_(ids)).values(published_at=utcnow())
        )

    async def _mark_alone(self, ids: list[int]) -> None:
        async with self.db.begin() as conn:
            await self._mark(conn, ids)

    async def settle(self) -> None:
        """Wait for the mark under way (SQLite), if any; raise what it raised.

        After it, reads start from the first unpublished row again, so a batch whose mark
        failed is read, and published, once more.
        """
        marking, self._marking = self._marking, None
        self._sent_up_to = None
        if marking is not None:
            await marking

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop`; wait for a wake-up (or the poll interval) when idle.

        Never exits on an error: an outage of the database or broker is waited out with
        capped, jittered back-off; anything else is logged as an error and retried at the
        slowest pace (the rows stay unpublished, nothing is lost).
        """
        backoff = Backoff(cap_s=self.settings.retry_max_backoff_s, sleep=self.sleep)
        try:
            await self._publish_until(stop, backoff)
        finally:
            # The last mark, if it can: a mark lost here only means a duplicate later.
            try:
                await self.settle()
            except Exception as exc:
                log.warning("relay_mark_abandoned", error=describe(exc))

    async def _publish_until(self, stop: asyncio.Event, backoff: Backoff) -> None:
        while not stop.is_set():
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
            if sent < self.settings.relay_batch_size:
                self.wakeup.clear()
                await wait_any(self.settings.relay_poll_interval_s, stop, self.wakeup)
