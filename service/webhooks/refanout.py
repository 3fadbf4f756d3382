"""The deliveries of events the fan-out will never read, made again from the outbox.

The fan-out (service.webhooks.dispatcher) turns each event of the ``contact.deleted`` and
``job.completed`` topics into one delivery per subscribed endpoint. Records it will never
read (a gap in the log: retention, DeleteRecords, the topic created again; a batch it cannot
decode, dead-lettered: service.kafka.Consumer, ``LostRecords``) would leave their events'
webhooks unsent forever, with nothing to retry them. The relay keeps every row it published
in the outbox (``published_at`` set) for ``OUTBOX_RETENTION_S`` (7 days, Kafka's default
retention: service.retention), so what the lost records can have held is known: the
published rows of that topic whose key maps to that partition (Kafka's default partitioner,
as the relay's producer picks it), written since the last record read before them.

One loss shows no gap: a topic deleted and created again (the broker drops the group's
committed offsets with it, so the new log is read from its start as a new group's would
be). :class:`LostEvents` is the fan-out's backstop for it, as
service.deletion.backstop is the worker's: see there.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from service.config import Settings
from service.db import Database, outbox, utcnow, webhook_deliveries, webhook_endpoints
from service.events import CloudEvent
from service.faults import describe, is_transient
from service.kafka import Consumer, LostRecords
from service.logs import get_logger
from service.webhooks.models import EndpointStatus
from service.webhooks.payloads import webhook_body
from service.webhooks.store import NewDeliveries, enqueue_many

log = get_logger(__name__)

PAGE = 2000
"""Outbox rows read (and their deliveries written, in one transaction) at a time."""

CLOCK_SKEW = timedelta(minutes=5)
"""How much earlier than ``LostRecords.since`` a lost record may have been published: the
record's timestamp is its producer's clock, ``published_at`` the relay's (several relays,
several hosts). Rows in that margin were read already; their deliveries exist (nothing
is added twice)."""


async def recover_events(db: Database, wakeup: asyncio.Event | None, lost: LostRecords) -> int:
    """Write the deliveries the events of ``lost`` would have had; returns how many are new.

    The rows examined: the outbox rows of ``lost.topic`` that were published, whose key
    maps to ``lost.partition`` (``LostRecords.holds``: under the partition count now or
    at the last commit; a row without a key may be on any partition), published
    since ``lost.since`` (less :data:`CLOCK_SKEW`; from the first row when not known) and
    not before the oldest endpoint was created. Each is routed as the fan-out routes it
    (the endpoints of its workspace that take its type; a disabled one's delivery is
    written ``failed``, for recover after enable), to the endpoints
    created before it was published (the fan-out, which runs after the publication, would
    have found them; a later one never gets an earlier event), and queued with
    ``enqueue_many``: one delivery per (event, endpoint), so those the fan-out did write
    are left as they are, and a repeat adds nothing. A row whose event cannot be read is
    skipped (the fan-out dead-lettered it, or would have). ``wakeup`` is set when anything
    new was written, so the sender reads its queues.

    One log line ``webhook_lost_events_recovered`` (topic, partition, rows examined,
    deliveries created). A cold path, for a rare event: the rows are read ``PAGE`` at a
    time by id, and each page's deliveries written in one short transaction.
    """

    e = webhook_endpoints.c
    async with db.read() as conn:
        endpoints = (
            await conn.execute(
                sa.select(e.id, e.workspace_id, e.event_types, e.created_at, e.status)
            )
        ).all()
    by_workspace: dict[uuid.UUID, list[Any]] = {}
    for endpoint in endpoints:
        by_workspace.setdefault(endpoint.workspace_id, []).append(endpoint)
    examined = created = 0
    if endpoints:
        floor = min(endpoint.created_at for endpoint in endpoints)
        if lost.since is not None:
            floor = max(floor, lost.since - CLOCK_SKEW)
        o = outbox.c
        after = 0
        while True:
            async with db.read() as conn:
                rows = (
                    await conn.execute(
                        sa.select(o.id, o.key, o.payload, o.published_at)
                        .where(
                            o.id > after,
                            o.topic == lost.topic,
                            o.published_at.is_not(None),
                            o.published_at >= floor,
                        )
                        .order_by(o.id)
                        .limit(PAGE)
                    )
                ).all()
            if not rows:
                break
            after = rows[-1].id
            mine = [r for r in rows if lost.holds(None if r.key is None else r.key.encode())]
            examined += len(mine)
            batch = _routed(mine, by_workspace)
            if batch:
                async with db.begin() as conn:
                    created += len(await enqueue_many(conn, db, batch))
            if len(rows) < PAGE:
                break
    log.warning(
        "webhook_lost_events_recovered",
        topic=lost.topic,
        partition=lost.partition,
        reason=lost.reason,
        first_offset=lost.first,
        end_offset=lost.end,
        events_examined=examined,
        deliveries=created,
    )
    if created and wakeup is not None:
        wakeup.set()
    return created


def _routed(rows: Sequence[Any], by_workspace: dict[uuid.UUID, list[Any]]) -> list[NewDeliveries]:
    """The deliveries of these outbox rows, routed as the fan-out routes them, to the
    endpoints that existed when each was published."""
    batch = []
    for row in rows:
        try:
            event = CloudEvent.model_validate_json(bytes(row.payload))
            workspace = uuid.UUID(str(event.data["workspace_id"]))
        except (ValidationError, KeyError, ValueError):
            continue
        published: datetime = row.published_at
        routed = [
            endpoint
            for endpoint in by_workspace.get(workspace, ())
            if (not endpoint.event_types or event.type in endpoint.event_types)
            and endpoint.created_at <= published
        ]
        targets = [endpoint.id for endpoint in routed]
        disabled = frozenset(
            endpoint.id for endpoint in routed if endpoint.status != EndpointStatus.ENABLED
        )
        if not targets:
            continue
        try:
            body = webhook_body(event.type, event.time, event.data)
        except (ValidationError, ValueError):
            continue
        batch.append(NewDeliveries(workspace, targets, event.id, event.type, body, {}, disabled))
    return batch


PAGES_PER_CALL = 5
"""Pages a check reads at one idle moment (the rest at the next ones)."""

LOOKBACK = timedelta(hours=24)
"""How far back the first check of a process looks (later ones: since the last check),
capped by ``WEBHOOK_DELIVERY_RETENTION_S`` (a delivery pruned after its retention must not
be made again)."""


@dataclass
class _Scan:
    """One topic's part of a check: its rows published in [floor, until), read newest
    first by id from ``before`` (None: the newest)."""

    topic: str
    losts: list[LostRecords]
    floor: datetime
    until: datetime
    before: int | None = None
    examined: int = 0
    created: int = 0


class LostEvents:
    """The fan-out's backstop for events lost unseen; `check` when the fan-out is idle.

    A ``contact.deleted`` (or ``deletion_job.completed``) topic deleted and created again
    shows no gap to the fan-out, yet the events it held were never read: their webhooks
    would never be sent, and nothing would say so. Whatever the cause, such an event shows
    in the database: when the fan-out is idle and caught up (each partition it owns read
    to its log's end, every batch it fetched written), every event the relay published
    (``published_at`` set: the broker had it) before that moment has been read, so an
    outbox row published before it, on one of those partitions, with no delivery for an
    endpoint that took its type when it was published, was lost. Its deliveries are made
    as :func:`recover_events` makes them (routed as the fan-out routes them, to the
    endpoints created before its publication, a disabled one's written ``failed``), and
    only the missing (event, endpoint) pairs are written, through ``enqueue_many`` (one
    delivery per pair, whatever else writes it meanwhile).

    Bounded, and off the busy path: it runs only after a fetch returned nothing. A check
    starts at most every ``WEBHOOK_LOST_EVENTS_CHECK_S`` (0: never; the first an interval
    after the first idle moment) and covers the rows of the consumed topics published
    since the last completed check (less :data:`CLOCK_SKEW`; the first: :data:`LOOKBACK`),
    newest first by id, ``PAGE`` at a time, stopping at a page published wholly before
    that. Each idle moment reads at most :data:`PAGES_PER_CALL` pages; a check that needs
    more goes on at the next idle moment (a fetch with records runs first). Per page it
    reads the existing deliveries of the events whose workspace has an endpoint that
    takes them, and writes only when some are missing. A line
    ``webhook_lost_events_resent`` (topic, partitions, rows examined, deliveries made)
    only when it made some. A row published long after it was written (a set-aside row
    queued again by hand) may fall outside the pages read: its events are lost only if
    the topic is recreated in that same interval.
    """

    def __init__(self, db: Database, settings: Settings, wakeup: asyncio.Event | None) -> None:
        self.db = db
        self.settings = settings
        self.wakeup = wakeup
        self.clock: Callable[[], float] = time.monotonic
        self._next = 0.0
        self._since: datetime | None = None
        self._scans: list[_Scan] = []  # the check under way, if any
        self.page = PAGE
        self.pages_per_call = PAGES_PER_CALL
        self._until: datetime | None = None

    async def check(self, consumer: Consumer) -> int:
        """Make the deliveries of events lost while the fan-out was caught up (see the
        class); returns how many this call made. Transient errors propagate (the check
        goes on from its last page at the next call); a permanent one is logged
        (``webhook_lost_events_check_failed``) and the check is dropped."""
        every = self.settings.webhook_lost_events_check_s
        now = self.clock()
        if not self._next:  # the first one an interval after the first idle moment
            self._next = now + every
        if not self._scans:
            if every <= 0 or now < self._next:
                return 0
            self._next = now + every
        try:
            if not self._scans and not await self._start(consumer):
                return 0
            return await self._pages()
        except Exception as exc:
            if is_transient(exc):
                raise
            self._scans = []
            log.error("webhook_lost_events_check_failed", error=describe(exc))
            return 0

    async def _start(self, consumer: Consumer) -> bool:
        """Begin a check if the fan-out is caught up; False if there is nothing to do."""
        moment = utcnow()
        partitions = await consumer.caught_up()
        if not partitions:
            return False
        retention = timedelta(seconds=self.settings.webhook_delivery_retention_s)
        floor = moment - min(LOOKBACK, retention - CLOCK_SKEW)
        if self._since is not None:
            floor = max(floor, self._since - CLOCK_SKEW)
        by_topic: dict[str, list[LostRecords]] = {}
        for lost in partitions:
            by_topic.setdefault(lost.topic, []).append(lost)
        self._scans = [_Scan(t, losts, floor, moment) for t, losts in sorted(by_topic.items())]
        self._until = moment
        return True

    async def _pages(self) -> int:
        """Up to ``pages_per_call`` pages of the check under way; the deliveries made."""
        e = webhook_endpoints.c
        async with self.db.read() as conn:  # afresh: one deleted meanwhile gets nothing
            endpoints = (
                await conn.execute(
                    sa.select(e.id, e.workspace_id, e.event_types, e.created_at, e.status)
                )
            ).all()
        by_workspace: dict[uuid.UUID, list[Any]] = {}
        for endpoint in endpoints:
            by_workspace.setdefault(endpoint.workspace_id, []).append(endpoint)
        oldest = min((endpoint.created_at for endpoint in endpoints), default=None)
        created = 0
        for _ in range(self.pages_per_call):
            if not self._scans:
                break
            scan = self._scans[0]
            before = scan.created
            if oldest is None or await self._page(scan, max(scan.floor, oldest), by_workspace):
                self._scans.pop(0)
                if scan.created:
                    log.warning(
                        "webhook_lost_events_resent",
                        topic=scan.topic,
                        partitions=sorted(lost.partition for lost in scan.losts),
                        events_examined=scan.examined,
                        deliveries=scan.created,
                    )
            created += scan.created - before
        if not self._scans:
            self._since = self._until
        if created and self.wakeup is not None:
            self.wakeup.set()
        return created

    async def _page(
        self, scan: _Scan, floor: datetime, by_workspace: dict[uuid.UUID, list[Any]]
    ) -> bool:
        """The next page of ``scan`` (its rows published in [floor, scan.until)); True
        when it was the last."""
        o = outbox.c
        query = sa.select(o.id, o.key, o.payload, o.published_at).where(o.topic == scan.topic)
        if scan.before is not None:
            query = query.where(o.id < scan.before)
        async with self.db.read() as conn:
            rows = (await conn.execute(query.order_by(o.id.desc()).limit(self.page))).all()
        if not rows:
            return True
        mine = [
            r
            for r in rows
            if r.published_at is not None
            and floor <= r.published_at < scan.until
            and any(lost.holds(None if r.key is None else r.key.encode()) for lost in scan.losts)
        ]
        scan.examined += len(mine)
        batch = await self._missing(_routed(mine, by_workspace))
        if batch:
            async with self.db.begin() as conn:
                scan.created += len(await enqueue_many(conn, self.db, batch))
        scan.before = rows[-1].id
        published = [r.published_at for r in rows if r.published_at is not None]
        return len(rows) < self.page or bool(published and max(published) < floor - CLOCK_SKEW)

    async def _missing(self, batch: list[NewDeliveries]) -> list[NewDeliveries]:
        """``batch`` less the (event, endpoint) pairs that have a delivery already (read,
        so that a check that finds nothing lost writes nothing)."""
        if not batch:
            return batch
        d = webhook_deliveries.c
        async with self.db.read() as conn:
            have = {
                (r.event_id, r.endpoint_id)
                for r in await conn.execute(
                    sa.select(d.event_id, d.endpoint_id).where(
                        d.event_id.in_({n.event_id for n in batch})
                    )
                )
            }
        missing = []
        for n in batch:
            endpoint_ids = [eid for eid in n.endpoint_ids if (n.event_id, eid) not in have]
            if endpoint_ids:
                missing.append(
                    NewDeliveries(
                        n.workspace_id,
                        endpoint_ids,
                        n.event_id,
                        n.event_type,
                        n.payload,
                        {},
                        n.disabled,
                    )
                )
        return missing
