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
- a payload that cannot be read: its key and headers may still say what it was for
  (service.deletion.giveup.unreadable_commands): ``deletion_job.expand``, its key is the
  job's id and that job fails as above; ``contact.deletion_requested`` with a ``job-id``
  header (written with every such row), its key is the contact's id and that job's pending
  item for it fails as above; otherwise (headers unreadable too, or a row written before the
  header existed) it names no job: the row is only set aside and logged.

A pass that fails permanently for any other reason (not an outage, not a refused record: a
stored row that crashes its reading, say) goes row by row (`Relay._isolate`): the rows that
fail alone are set aside the same way, with the error's value-free description, provided
another row went through alone; if none did, the fault is not shown to be the rows', and
the relay refuses to go on rather than set every row aside (``relay_refusing``, an error,
retried at the slowest pace; never logged as an outage).

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
from service.deletion.giveup import give_up, unreadable_commands
from service.deletion.notify import JobNotifier
from service.deletion.worker import BatchResult, _log_batch, parse_command
from service.deployment import deployment_id, stamp_of
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
from service.faults import UnreadableRecord, describe, is_transient, outage_cause
from service.kafka import OutMessage, Producer, send_isolating
from service.logs import get_logger
from service.metrics import Metrics

log = get_logger(__name__)


# The headers column read as its JSON text (cast in SQL, so neither SQLAlchemy nor asyncpg
# decodes JSON per row): the rows of a pass share a handful of distinct header lists
# (content type and event type), so each distinct text is parsed once and remembered.
_HEADERS_TEXT = sa.cast(outbox.c.headers, sa.Text).label("headers")
_ROW = (outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload, _HEADERS_TEXT)
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


def _message(row: Any, stamp: tuple[tuple[str, bytes], ...] = ()) -> OutMessage:
    """The Kafka record of an outbox row, with the ``stamp`` headers after its own
    (service.deployment); :class:`UnreadableRecord` if it cannot be read."""
    try:
        key = row.key.encode() if row.key is not None else None
        return OutMessage(row.topic, key, bytes(row.payload), _headers(row.headers) + stamp)
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
        # A refused row's job item or job fails as the worker's do (giveup.give_up); the
        # job-finished line and the `Prefer: wait` notice follow as after a worker's batch.
        self.notifier = notifier
        # Rows that could be neither published nor set aside (`_set_aside`): skipped until
        # the process restarts, never marked.
        self.stuck: set[int] = set()
        # Rows set aside since it started.
        self.rejected = 0
        # The relay's own figures: rows published and passes made since it started, and
        # `idle`, set while it waits with nothing signalled (cleared when a pass starts).
        self.published = 0
        self.passes = 0
        self.idle = asyncio.Event()
        # This deployment's header on every record (service.deployment), read at the first pass.
        self.stamp: tuple[tuple[str, bytes], ...] | None = None

    def _pending(self, only: int | None = None) -> sa.Select[Any]:
        stmt = self._waiting(*_ROW)
        if only is not None:
            stmt = stmt.where(outbox.c.id == only)
        return self.db.for_update(stmt, skip_locked=True)

    def _waiting(self, *columns: sa.ColumnElement[Any]) -> sa.Select[Any]:
        """The next batch of rows to publish (not the stuck ones), in id order."""
        stmt = (
            sa.select(*columns)
            .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self.settings.relay_batch)
        )
        if self.stuck:
            stmt = stmt.where(outbox.c.id.not_in(sorted(self.stuck)))
        return stmt

    async def publish_once(self, only: int | None = None) -> int:
        """Publish one batch (``only``: that row alone); returns how many rows it took care
        of (published or set aside: a full batch means more may be waiting)."""
        if self.stamp is None:
            self.stamp = stamp_of(await deployment_id(self.db))
        if self.db.is_sqlite:
            # SQLite has one writer: read, publish, then mark in a short write transaction,
            # rather than holding the write lock across a broker round trip.
            async with self.db.read() as conn:
                rows = (await conn.execute(self._pending(only))).all()
            if not rows:
                return 0
            done = await self._publish(rows)
            crash_if(self.settings.failpoint, "relay_after_publish")
            await self._refuse(done.refused)
            async with self.db.begin() as conn:
                await self._mark(conn, done)
        else:
            async with self.db.begin() as conn:
                rows = (await conn.execute(self._pending(only))).all()
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
                records.append((row, _message(row, self.stamp or ())))
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
        """Record what each refused row means for its job, and log it (see the module).

        A transient error propagates (the pass is retried); a permanent one while working
        out or recording the consequence is logged (``outbox_row_job_not_updated``) and the
        row is still set aside, so that it cannot wedge the relay either."""
        for row, reason in refused:
            try:
                event_type, effect, job_id = await self._consequence(row, reason)
            except Exception as exc:
                if is_transient(exc):
                    raise
                event_type, effect, job_id = "unknown", "none", None
                log.error("outbox_row_job_not_updated", row_id=row.id, error=describe(exc))
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

    async def _consequence(self, row: Any, reason: str) -> tuple[str, str, str | None]:
        """Fail what a refused row was for; its event type, the effect and its job id."""
        payload = bytes(row.payload)
        try:
            commands: list[DeletionRequested | JobExpand] = [parse_command(payload)]
        except PoisonMessage:
            # Not a command, or one that cannot be read: its key and headers may still say
            # which job it was for (giveup.unreadable_commands).
            commands = await unreadable_commands(self.db, row.key, self._stored_headers(row))
        if commands:
            expand = isinstance(commands[0], JobExpand)
            for command in commands:
                await self._give_up(command, reason)
            return (
                TYPE_JOB_EXPAND if expand else TYPE_DELETION_REQUESTED,
                "job_failed" if expand else "item_failed",
                str(commands[0].job_id),
            )
        # An event for the webhooks, or one that cannot be read (its type and job, if it
        # says, are for the log line only).
        try:
            event = CloudEvent.model_validate_json(payload)
        except ValueError:
            return "unknown", "none", None
        if event.type in (TYPE_CONTACT_DELETED, TYPE_JOB_COMPLETED):
            return event.type, "webhooks_not_sent", _job_of(event.data)
        return event.type, "none", None

    @staticmethod
    def _stored_headers(row: Any) -> tuple[tuple[str, bytes], ...]:
        """A row's headers, or none if they cannot be read."""
        try:
            return _headers(row.headers)
        except (ValueError, TypeError):
            return ()

    async def _give_up(self, command: DeletionRequested | JobExpand, reason: str) -> None:
        """`giveup.give_up` for the command of a refused row. A transient error
        propagates (the pass is retried); a permanent one is logged and the row still set
        aside, so that it cannot wedge the relay either."""
        result = BatchResult()
        try:
            await give_up(self.db, self.settings, command, reason, result)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("outbox_row_job_not_updated", job_id=str(command.job_id), error=describe(exc))
            return
        _log_batch(result)
        self.wakeup.set()  # a finished job's completion row is in the outbox
        if self.notifier is not None:
            for job_id in result.finished_jobs:
                self.notifier.notify(job_id)

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
        the pass (see the module), so it holds back nothing; any other permanent error
        makes the batch go row by row (`_isolate`), and the rows that fail alone are set
        aside with it. Only when no row goes through alone (not a row's fault: going on
        would set aside every row) does the relay refuse to go on: an error line
        ``relay_refusing``, not an outage's warning, and another try at the slowest pace.
        """
        backoff = Backoff(cap_s=self.settings.retry_max_backoff_s, sleep=self.sleep)
        while not stop.is_set():
            self.wakeup.clear()
            self.idle.clear()
            self.passes += 1
            try:
                try:
                    sent = await self.publish_once()
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    log.error("relay_batch_failed", error=describe(exc), isolating=True)
                    sent = await self._isolate()
                backoff.reset()
            except _Refusing as exc:
                backoff.attempt = 32
                delay = backoff.next_delay()
                log.error("relay_refusing", error=str(exc), transient=False, backoff_s=delay)
                await self.sleep(delay, stop)
                continue
            except Exception as exc:
                if is_transient(exc):
                    delay = backoff.next_delay()
                    log.warning(
                        "relay_retrying",
                        cause=outage_cause(exc),
                        error=repr(exc)[:500],
                        backoff_s=delay,
                    )
                else:  # a bug in the isolation itself: said as such, and tried again later
                    backoff.attempt = 32
                    delay = backoff.next_delay()
                    log.error("relay_refusing", error=describe(exc), transient=False)
                await self.sleep(delay, stop)
                continue
            if sent < self.settings.relay_batch and not self.wakeup.is_set():
                self.idle.set()
                await wait_any(self.settings.relay_poll_interval_s, stop, self.wakeup)

    async def _isolate(self) -> int:
        """After a pass failed permanently (neither an outage nor a record the broker
        refused: a stored row that crashes its reading, say), each row of the batch in a
        pass of its own, in id order (so what goes out keeps each key's order). Rows that
        fail alone are taken for the culprits only if another row went through alone;
        then they are set aside (`_set_aside`) with their error. Returns the rows taken
        care of; raises `_Refusing` when none went through (nothing is set aside: the
        fault is not shown to be the rows'), and a transient error as is.
        """
        async with self.db.read() as conn:
            ids = list((await conn.execute(self._waiting(outbox.c.id))).scalars())
        failed: list[tuple[int, str]] = []
        went = 0
        for row_id in ids:
            try:
                went += await self.publish_once(only=row_id)
            except Exception as exc:
                if is_transient(exc):
                    raise
                failed.append((row_id, describe(exc)))
        if failed and not went:
            raise _Refusing(f"{len(failed)} rows failed alone too, the first: {failed[0][1]}")
        for row_id, reason in failed:
            await self._set_aside(row_id, reason)
        return went + len(failed)

    async def _set_aside(self, row_id: int, reason: str) -> None:
        """Set aside a row whose own pass failed permanently, with its consequence for its
        job (`_refuse`). If even marking it fails permanently, it is skipped until this
        process restarts (``outbox_row_stuck``): kept in the outbox, unpublished."""
        try:
            async with self.db.read() as conn:
                stmt = sa.select(*_ROW).where(outbox.c.id == row_id)
                row = (await conn.execute(stmt)).one()
            await self._refuse([(row, reason)])
        except Exception as exc:
            if is_transient(exc):
                raise
            # The row cannot even be read: only its id is known.
            log.error("outbox_row_rejected", row_id=row_id, reason=reason, effect="unknown")
            log.error("outbox_row_job_not_updated", row_id=row_id, error=describe(exc))
            self.metrics.outbox_rejected.labels("unknown", "unknown").inc()
        try:
            async with self.db.begin() as conn:
                await conn.execute(
                    outbox.update()
                    .where(outbox.c.id == row_id)
                    .values(failed_at=utcnow(), error=reason[:500])
                )
        except Exception as exc:
            if is_transient(exc):
                raise
            self.stuck.add(row_id)
            log.error("outbox_row_stuck", row_id=row_id, reason=reason, error=describe(exc))
            return
        self.rejected += 1


class _Refusing(Exception):
    """Not an outage: the relay will not go on, since going on would set aside every row."""


def _job_of(data: Any) -> str | None:
    """The job id an event's data names, if it names one (ids only, for the log)."""
    job_id = data.get("job_id") if isinstance(data, dict) else None
    try:
        return str(uuid.UUID(str(job_id))) if job_id is not None else None
    except ValueError:
        return None
