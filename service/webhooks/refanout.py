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
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from service.db import Database, outbox, webhook_endpoints
from service.events import CloudEvent
from service.kafka import LostRecords
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
