"""The outbox relay: publishes committed outbox rows to Kafka and marks them published.

On PostgreSQL a batch is claimed with `FOR UPDATE SKIP LOCKED`, so any number of relays
share the work. A crash between publishing and marking republishes that batch once
more; every consumer is idempotent, so that costs a duplicate, never a loss. Within one
relay, rows go out in id order, so events of one key keep their order.

A row the broker will never accept (service.faults.record_refused: too large, invalid
topic, corrupt) or that cannot be read back (its headers, key or payload do not decode) must
not hold back the rows behind it. When a batch is refused for such a reason it is split in
halves, each published in id order (the first before the second, so the rows that go out
keep their per-key order), down to the refused rows alone (service.kafka.send_isolating,
which the dead-letter producers share); those are set aside
(``failed_at`` and ``error``, never retried), logged ``outbox_row_rejected`` and counted in
``outbox_rejected_total``, and the relay goes on at full speed. What a refused row means:

- ``contact.deletion_requested``: its job item fails with ``FAILED_DELETE_CONTACT`` and a
  ``contact.deletion_failed`` audit event, and the job's counts include it, so the job
  completes (the worker's own ``give_up`` for a command that failed permanently);
- ``deletion_job.expand``: the job fails (the same ``give_up``);
- ``contact.deleted`` / ``deletion_job.completed``: the deletion or job stands (deleted and
  audited); its webhooks are not sent, which the log line and the metric say
  (``effect="webhooks_not_sent"``);
- a payload that cannot be read: if its headers say ``deletion_job.expand``, its key is the
  job's id and that job fails as above; otherwise it names no job (a deletion request's key
  is its contact's id, which may have pending items in several jobs): the row is only set
  aside and logged.

The consequence is recorded before the row is marked: a crash in between only repeats it
(``give_up`` changes nothing twice), never loses it. A refused batch may have been written
on its other partitions before the split resends those rows: repeats, as after a crash,
which consumers ignore; the first copies keep the id order of each key.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from service.aio import Backoff, Sleep, sleep_unless_stopped, wait_any
from service.config import Settings
from service.db import Database, any_of, outbox, utcnow
from service.deletion.notify import JobNotifier
from service.deletion.worker import DeletionWorker, expansion_by_key, parse_command
from service.errors import PoisonMessage
from service.events import (
    TYPE_CONTACT_DELETED,
    TYPE_DELETION_REQUESTED,
    TYPE_JOB_COMPLETED,
    TYPE_JOB_EXPAND,
    CloudEvent,
    DeletionRequested,
    JobExpand,
)
from service.failpoints import crash_if
from service.faults import UnreadableRecord, describe, is_transient
from service.kafka import OutMessage, Producer, send_isolating
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
    """The Kafka record of an outbox row; :class:`UnreadableRecord` if it cannot be read."""
    try:
        key = row.key.encode() if row.key is not None else None
        return OutMessage(
            topic=row.topic, key=key, value=bytes(row.payload), headers=_headers(row.headers)
        )
    except (ValueError, TypeError, AttributeError) as exc:
        # A JSON or Unicode error, headers of another shape, a payload of another type.
        raise UnreadableRecord(f"unreadable outbox row ({type(exc).__name__})") from exc


@dataclass
class _Pass:
    """What one pass did with its rows: published, or refused with the reason."""

    published: list[int] = field(default_factory=list)
    refused: list[tuple[Any, str]] = field(default_factory=list)


class Relay:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        producer: Producer,
        metrics: Metrics,
        wakeup: asyncio.Event | None = None,
        sleep: Sleep = sleep_unless_stopped,
        notifier: JobNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.producer = producer
        self.metrics = metrics
        self.wakeup = wakeup or asyncio.Event()
        self.sleep = sleep
        # Records a refused row's job item or job as failed, exactly as the worker does
        # for a command that failed permanently (its `give_up`); the job-finished line and
        # the `Prefer: wait` notice follow as after a worker's batch.
        self.jobs = DeletionWorker(settings, db, metrics, notifier, self.wakeup)
        # Rows set aside since it started.
        self.rejected = 0
        # The relay's own figures: rows published and passes made since it started, and
        # `idle`, set while it waits with nothing signalled (cleared when a pass starts).
        self.published = 0
        self.passes = 0
        self.idle = asyncio.Event()

    def _pending(self) -> sa.Select[Any]:
        stmt = (
            sa.select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload, _HEADERS_TEXT)
            .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self.settings.relay_batch_size)
        )
        return self.db.for_update(stmt, skip_locked=True)

    async def publish_once(self) -> int:
        """Publish one batch; returns how many rows it took care of (published or set
        aside: a full batch means more may be waiting)."""
        if self.db.is_sqlite:
            # SQLite has one writer: read, publish, then mark in a short write transaction,
            # rather than holding the write lock across a broker round trip.
            async with self.db.read() as conn:
                rows = (await conn.execute(self._pending())).all()
            if not rows:
                return 0
            done = await self._publish(rows)
            crash_if(self.settings.failpoint, "relay_after_publish")
            await self._refuse(done.refused)
            async with self.db.begin() as conn:
                await self._mark(conn, done)
        else:
            async with self.db.begin() as conn:
                rows = (await conn.execute(self._pending())).all()
                if not rows:
                    return 0
                done = await self._publish(rows)
                crash_if(self.settings.failpoint, "relay_after_publish")
                await self._refuse(done.refused)
                await self._mark(conn, done)
        self.metrics.outbox_published.inc(len(done.published))
        self.published += len(done.published)
        self.rejected += len(done.refused)
        return len(rows)

    async def _publish(self, rows: Sequence[Any]) -> _Pass:
        """Publish ``rows`` in id order; the rows refused for good are set apart.

        Transient errors propagate (the pass is retried as a whole, nothing is marked).
        """
        done = _Pass()
        records: list[tuple[Any, OutMessage]] = []
        for row in rows:
            try:
                records.append((row, _message(row)))
            except UnreadableRecord as exc:
                done.refused.append((row, str(exc)))
        refused = dict(await send_isolating(self.producer, [m for _, m in records]))
        for n, (row, _) in enumerate(records):
            if n in refused:
                done.refused.append((row, f"the broker refused the record ({refused[n]})"))
            else:
                done.published.append(row.id)
        return done

    async def _refuse(self, refused: list[tuple[Any, str]]) -> None:
        """Record what each refused row means for its job, and log it (see the module)."""
        for row, reason in refused:
            event_type, effect, job_id = "unknown", "none", None
            payload = bytes(row.payload)
            try:
                command = parse_command(payload)  # the worker's own reading of it
            except PoisonMessage:
                command = None
            if command is not None:
                expand = isinstance(command, JobExpand)
                event_type = TYPE_JOB_EXPAND if expand else TYPE_DELETION_REQUESTED
                effect = "job_failed" if expand else "item_failed"
                job_id = str(command.job_id)
                await self._give_up(command, reason)
            else:
                # Not a command: an event for the webhooks, or one that cannot be read (its
                # type and job, if it says, are for the log line only).
                try:
                    event = CloudEvent.model_validate_json(payload)
                except ValueError:
                    event = None
                if event is not None:
                    event_type = event.type
                    if event.type in (TYPE_CONTACT_DELETED, TYPE_JOB_COMPLETED):
                        effect = "webhooks_not_sent"
                        job_id = _job_of(event.data)
                elif (expansion := await self._expansion_by_key(row)) is not None:
                    event_type, effect, job_id = (
                        TYPE_JOB_EXPAND,
                        "job_failed",
                        str(expansion.job_id),
                    )
                    await self._give_up(expansion, reason)
            log.error(
                "outbox_row_rejected",
                topic=row.topic,
                row_id=row.id,
                event_type=event_type,
                reason=reason,
                effect=effect,
                job_id=job_id,
            )
            self.metrics.outbox_rejected.labels(event_type, effect).inc()

    async def _expansion_by_key(self, row: Any) -> JobExpand | None:
        """The expansion command of a row whose payload cannot be read, from its key and
        ``ce_type`` header (the worker's `expansion_by_key`), or None."""
        try:
            event_type = dict(_headers(row.headers)).get("ce_type", b"").decode()
        except (ValueError, TypeError):
            return None
        return await expansion_by_key(self.db, row.key, event_type)

    async def _give_up(self, command: DeletionRequested | JobExpand, reason: str) -> None:
        """The worker's `give_up` for the command of a refused row. A transient error
        propagates (the pass is retried); a permanent one is logged and the row still set
        aside, so that it cannot wedge the relay either."""
        try:
            result = await self.jobs.give_up(command, reason)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("outbox_row_job_not_updated", job_id=str(command.job_id), error=describe(exc))
            return
        self.jobs.after_commit(result)

    async def _mark(self, conn: Any, done: _Pass) -> None:
        now = utcnow()
        if done.published:
            # The ids bound as one parameter (`any_of`): an IN list bound up to
            # relay_batch_size parameters, each through SQLAlchemy's bind processing.
            await conn.execute(
                outbox.update().where(any_of(outbox.c.id, done.published)).values(published_at=now)
            )
        for row, reason in done.refused:
            await conn.execute(
                outbox.update()
                .where(outbox.c.id == row.id)
                .values(failed_at=now, error=reason[:500])
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop`; wait for a wake-up (or the poll interval) when idle.

        The wake-up (`wakeup`, set by whoever commits outbox rows in this process) is
        cleared before a pass reads, never after: a row committed while a batch is read or
        published sets it again, and the next pass starts at once instead of after
        ``relay_poll_interval_s`` (the poll only catches rows that other processes wrote).

        Never exits on an error: an outage of the database or broker is waited out with
        capped, jittered back-off; a row the broker refuses for good is set aside inside
        the pass (see the module), so it holds back nothing; anything else is logged as an
        error and retried at the slowest pace (the rows stay unpublished, nothing is lost).
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


def _job_of(data: Any) -> str | None:
    """The job id an event's data names, if it names one (ids only, for the log)."""
    job_id = data.get("job_id") if isinstance(data, dict) else None
    try:
        return str(uuid.UUID(str(job_id))) if job_id is not None else None
    except ValueError:
        return None
