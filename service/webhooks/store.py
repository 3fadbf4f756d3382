"""Webhook endpoints and deliveries in the database, with their audit events."""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from service.audit.models import AuditAction
from service.audit.store import AuditRecord, append_events
from service.db import (
    Database,
    new_id,
    new_time_ids,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.errors import EndpointDeleted, EndpointDisabled, NotFound
from service.logs import get_logger
from service.pagination import newest_first, split_page
from service.timefmt import iso
from service.webhooks.models import (
    SENDABLE,
    DeliveryStatus,
    DisabledReason,
    EndpointCreate,
    EndpointPatch,
    EndpointStatus,
)
from service.webhooks.signing import generate_secret

log = get_logger(__name__)

E = webhook_endpoints.c
D = webhook_deliveries.c

MAX_LIVE_SECRETS = 5
"""At most this many secrets sign at once: the current one and the four most recently
rotated out. Each rotated-out secret signs until it is WEBHOOK_SECRET_OVERLAP_S old; a
fifth rotation inside one overlap window retires the oldest one early."""


def live_retired(retired: Any, now: datetime) -> list[dict[str, str]]:
    """The rotated-out secrets still inside their overlap, newest first.

    An entry that cannot be read (not ``{"secret": str, "expires_at": ISO-8601 with an
    offset}``: only a damaged row holds one) signs nothing and is left out, so that one
    endpoint's damaged row never stops the passes that claim every endpoint's deliveries.
    """
    live = []
    for entry in retired if isinstance(retired, list) else []:
        try:
            secret, expires = entry["secret"], datetime.fromisoformat(entry["expires_at"])
            if isinstance(secret, str) and expires > now:
                live.append(entry)
        except (TypeError, KeyError, ValueError):
            continue
    return live


def live_secrets(row: Mapping[Any, Any], now: datetime) -> list[str]:
    """Every secret that signs a delivery now: the current one first, then retired ones."""
    return [row["secret"], *(r["secret"] for r in live_retired(row["retired_secrets"], now))]


def _disabled_message(endpoint_id: uuid.UUID) -> str:
    return (
        f"webhook endpoint {endpoint_id} is disabled; enable it first "
        f"(POST /v1/webhooks/endpoints/{endpoint_id}/enable), then try again"
    )


def ensure_enabled(row: Mapping[Any, Any]) -> None:
    """Refuse (409 endpoint_disabled) to queue a send to a disabled endpoint: the sender
    would mark it failed at once, so the caller would be told "queued" for nothing."""
    if row["status"] != EndpointStatus.ENABLED:
        raise EndpointDisabled(
            _disabled_message(row["id"]),
            {"endpoint_id": str(row["id"]), "disabled_reason": row["disabled_reason"]},
        )


def endpoint_json(row: Mapping[Any, Any], *, secret: str | None = None) -> dict[str, Any]:
    out = {
        "id": str(row["id"]),
        "url": row["url"],
        "description": row["description"],
        "event_types": list(row["event_types"]),
        "rate_limit_per_s": row["rate_limit_per_s"],
        "max_in_flight": row["max_in_flight"],
        "status": row["status"],
        "disabled_reason": row["disabled_reason"],
        "disabled_at": iso(row["disabled_at"]),
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
    if secret is not None:
        out["secret"] = secret
    return out


def delivery_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "endpoint_id": str(row["endpoint_id"]),
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "status": row["status"],
        "attempt_count": row["attempt_count"],
        # Only a delivery still to be sent has a next attempt (the column keeps the last
        # planned time once it is over: not an answer to give).
        "next_attempt_at": iso(row["next_attempt_at"]) if row["status"] in SENDABLE else None,
        "last_attempt_at": iso(row["last_attempt_at"]),
        "created_at": iso(row["created_at"]),
        "completed_at": iso(row["completed_at"]),
    }


def attempt_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "attempted_at": iso(row["attempted_at"]),
        "status_code": row["status_code"],
        "latency_ms": round(row["latency_ms"], 3),
        "error": row["error"],
        "response_body": row["response_body"],
    }


def url_for_the_trail(url: str) -> dict[str, str]:
    """What the append-only audit trail keeps of an endpoint's URL: its origin (scheme,
    host, port) and the SHA-256 of the whole URL, never its path or query, where receivers
    often carry a token (a Slack-style /services/T0/B0/<token>, ?token=…) that the trail
    would keep for good.
    The hash answers "was it this URL?" for whoever has the URL."""
    return {
        "url_origin": str(URL(url).origin()),
        "url_sha256": hashlib.sha256(url.encode()).hexdigest(),
    }


def endpoint_audit(
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    action: AuditAction,
    actor: Mapping[str, str],
    data: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> AuditRecord:
    return AuditRecord(
        workspace_id=workspace_id,
        actor=actor,
        action=action,
        target={"type": "webhook_endpoint", "id": str(endpoint_id)},
        request_id=request_id,
        data=dict(data or {}),
    )


async def _endpoint_row(
    conn: AsyncConnection, workspace_id: uuid.UUID, endpoint_id: uuid.UUID
) -> Mapping[Any, Any]:
    row = (
        (
            await conn.execute(
                sa.select(webhook_endpoints).where(
                    E.id == endpoint_id, E.workspace_id == workspace_id
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound("no such webhook endpoint")
    return row


async def create_endpoint(
    db: Database, workspace_id: uuid.UUID, body: EndpointCreate, actor: Mapping[str, str], rid: str
) -> dict[str, Any]:
    now = utcnow()
    secret = generate_secret()
    endpoint_id = new_id()
    values: dict[str, Any] = {
        "id": endpoint_id,
        "workspace_id": workspace_id,
        "url": body.url,
        "description": body.description,
        "event_types": list(dict.fromkeys(body.event_types)),
        "rate_limit_per_s": body.rate_limit_per_s,
        "max_in_flight": body.max_in_flight,
        "secret": secret,
        "retired_secrets": [],
        "status": EndpointStatus.ENABLED.value,
        "disabled_reason": None,
        "disabled_at": None,
        "created_at": now,
        "updated_at": now,
    }
    async with db.begin() as conn:
        await conn.execute(webhook_endpoints.insert().values(**values))
        await append_events(
            conn,
            db,
            [
                endpoint_audit(
                    workspace_id,
                    endpoint_id,
                    "webhook.endpoint.created",
                    actor,
                    {**url_for_the_trail(body.url), "event_types": values["event_types"]},
                    rid,
                )
            ],
        )
    return endpoint_json(values, secret=secret)


async def get_enabled_endpoint(
    db: Database, workspace_id: uuid.UUID, endpoint_id: uuid.UUID
) -> dict[str, Any]:
    """The endpoint, or 404, or 409 endpoint_disabled."""
    async with db.read() as conn:
        row = await _endpoint_row(conn, workspace_id, endpoint_id)
    ensure_enabled(row)
    return endpoint_json(row)


async def get_endpoint(
    db: Database, workspace_id: uuid.UUID, endpoint_id: uuid.UUID
) -> dict[str, Any]:
    async with db.read() as conn:
        return endpoint_json(await _endpoint_row(conn, workspace_id, endpoint_id))


async def list_endpoints(
    db: Database,
    workspace_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    """A page of a workspace's endpoints, newest first, and the position after it (or None).

    ``before`` is the (created_at, id) of the last endpoint of the previous page.
    """
    stmt = newest_first(
        sa.select(webhook_endpoints).where(E.workspace_id == workspace_id),
        webhook_endpoints,
        limit,
        before,
    )
    async with db.read() as conn:
        rows = (await conn.execute(stmt)).mappings().all()
    page, nxt = split_page(rows, limit)
    return [endpoint_json(r) for r in page], nxt


async def update_endpoint(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    body: EndpointPatch,
    actor: Mapping[str, str],
    rid: str,
) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    if "event_types" in changes and changes["event_types"] is not None:
        changes["event_types"] = list(dict.fromkeys(changes["event_types"]))
    async with db.begin() as conn:
        await _endpoint_row(conn, workspace_id, endpoint_id)
        if changes:
            await conn.execute(
                webhook_endpoints.update()
                .where(E.id == endpoint_id)
                .values(**changes, updated_at=utcnow())
            )
            await append_events(
                conn,
                db,
                [
                    endpoint_audit(
                        workspace_id,
                        endpoint_id,
                        "webhook.endpoint.updated",
                        actor,
                        {"changed": sorted(changes)},
                        rid,
                    )
                ],
            )
        return endpoint_json(await _endpoint_row(conn, workspace_id, endpoint_id))


async def delete_endpoint(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    actor: Mapping[str, str],
    rid: str,
) -> None:
    async with db.begin() as conn:
        await _endpoint_row(conn, workspace_id, endpoint_id)
        # Deliveries first, then the endpoint: the order the dispatcher's recording takes
        # their locks in (its deliveries, then the endpoint's failing streak). The other
        # order deadlocked against it on PostgreSQL (seen once by sqlite-drain's full run:
        # a DELETE answered 503 from DeadlockDetectedError).
        await conn.execute(
            webhook_deliveries.update()
            .where(D.endpoint_id == endpoint_id, D.status.in_(SENDABLE))
            .values(status=DeliveryStatus.FAILED, completed_at=utcnow())
        )
        await conn.execute(webhook_endpoints.delete().where(E.id == endpoint_id))
        await append_events(
            conn,
            db,
            [
                endpoint_audit(
                    workspace_id, endpoint_id, "webhook.endpoint.deleted", actor, None, rid
                )
            ],
        )


async def rotate_secret(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    overlap_s: int,
    actor: Mapping[str, str],
    rid: str,
) -> dict[str, Any]:
    """A new current secret; the rotated-out ones keep signing for `overlap_s` seconds
    each, at most MAX_LIVE_SECRETS in all (the oldest retire early beyond that)."""
    now = utcnow()
    secret = generate_secret()
    async with db.begin() as conn:
        row = await _endpoint_row(conn, workspace_id, endpoint_id)
        retired = [
            {"secret": row["secret"], "expires_at": iso(now + timedelta(seconds=overlap_s))},
            *live_retired(row["retired_secrets"], now),
        ]
        if overlap_s <= 0:
            retired = []
        retired = retired[: MAX_LIVE_SECRETS - 1]
        await conn.execute(
            webhook_endpoints.update()
            .where(E.id == endpoint_id)
            .values(secret=secret, retired_secrets=retired, updated_at=now)
        )
        await append_events(
            conn,
            db,
            [
                endpoint_audit(
                    workspace_id,
                    endpoint_id,
                    "webhook.endpoint.secret_rotated",
                    actor,
                    {"previous_valid_until": iso(now + timedelta(seconds=overlap_s))},
                    rid,
                )
            ],
        )
        updated = await _endpoint_row(conn, workspace_id, endpoint_id)
    log.info(
        "webhook_secret_rotated",
        endpoint_id=str(endpoint_id),
        live_secrets=len(retired) + 1,
        overlap_s=overlap_s,
    )
    return endpoint_json(updated, secret=secret)


async def enable_endpoint(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    actor: Mapping[str, str],
    rid: str,
) -> dict[str, Any]:
    """Enable a disabled endpoint (its failed deliveries stay failed until `recover`)."""
    enabled = False
    async with db.begin() as conn:
        row = await _endpoint_row(conn, workspace_id, endpoint_id)
        if row["status"] != EndpointStatus.ENABLED:
            enabled = True
            await conn.execute(
                webhook_endpoints.update()
                .where(E.id == endpoint_id)
                .values(
                    status=EndpointStatus.ENABLED,
                    disabled_reason=None,
                    disabled_at=None,
                    failing_since=None,
                    updated_at=utcnow(),
                )
            )
            await append_events(
                conn,
                db,
                [
                    endpoint_audit(
                        workspace_id, endpoint_id, "webhook.endpoint.enabled", actor, None, rid
                    )
                ],
            )
        found = endpoint_json(await _endpoint_row(conn, workspace_id, endpoint_id))
    if enabled:
        log.info(
            "webhook_endpoint_enabled",
            endpoint_id=str(endpoint_id),
            previous_reason=row["disabled_reason"],
        )
    return found


async def disable_endpoint(
    conn: AsyncConnection,
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    reason: DisabledReason,
    detail: str,
) -> bool:
    """Disable an endpoint (410 Gone, or failing for too long), with its audit event.

    True when this call disabled it (the caller logs it once its transaction commits).
    """
    now = utcnow()
    updated = await conn.execute(
        webhook_endpoints.update()
        .where(E.id == endpoint_id, E.status == EndpointStatus.ENABLED)
        .values(
            status=EndpointStatus.DISABLED,
            disabled_reason=reason.value,
            disabled_at=now,
            updated_at=now,
        )
    )
    if not updated.rowcount:
        return False
    # Its unsent deliveries are failed (DESIGN.md), not left `failing` with a retry time
    # that never comes; `recover` after `enable` sends them. One in flight is recorded by
    # its sender as it ends.
    await conn.execute(
        webhook_deliveries.update()
        .where(
            D.endpoint_id == endpoint_id,
            D.status.in_(SENDABLE),
            sa.or_(D.claimed_until.is_(None), D.claimed_until <= now),
        )
        .values(status=DeliveryStatus.FAILED, completed_at=now, claimed_until=None)
    )
    await append_events(
        conn,
        db,
        [
            endpoint_audit(
                workspace_id,
                endpoint_id,
                "webhook.endpoint.disabled",
                {"type": "system", "id": "dispatcher"},
                {"reason": reason.value, "detail": detail},
            )
        ],
    )
    return True


@dataclass(frozen=True)
class NewDeliveries:
    """One event to queue for these endpoints of its workspace.

    `leases`: endpoints whose new delivery is claimed at once (`claimed_until` set to the
    given time), by the dispatcher that owns the endpoint and sends it from memory.
    `disabled`: endpoints that are disabled: their delivery is written ``failed`` (not
    sent; `recover` after `enable` sends it), so an event that came while an endpoint was
    disabled is not lost to it (DESIGN.md: ``failed`` covers "endpoint disabled").
    """

    workspace_id: uuid.UUID
    endpoint_ids: Sequence[uuid.UUID]
    event_id: str
    event_type: str
    payload: bytes
    leases: Mapping[uuid.UUID, datetime] = field(default_factory=dict)
    disabled: frozenset[uuid.UUID] = frozenset()


async def enqueue(
    conn: AsyncConnection,
    db: Database,
    *,
    workspace_id: uuid.UUID,
    endpoint_ids: list[uuid.UUID],
    event_id: str,
    event_type: str,
    payload: bytes,
) -> int:
    """One delivery per (event, endpoint); a repeated event adds nothing. Returns how many."""
    new = await enqueue_many(
        conn, db, [NewDeliveries(workspace_id, endpoint_ids, event_id, event_type, payload)]
    )
    return len(new)


async def enqueue_many(
    conn: AsyncConnection, db: Database, events: Sequence[NewDeliveries]
) -> list[dict[str, Any]]:
    """`enqueue` for many events in few statements: multi-row INSERTs through the driver.

    Returns the rows that were new (column name -> value, as inserted), in the order of
    `events`; a repeated (event, endpoint) is left out (``ON CONFLICT DO NOTHING``), and
    RETURNING tells them apart on both backends.

    One statement per `ENQUEUE_CHUNK` rows: on PostgreSQL ``INSERT ... SELECT FROM
    unnest(arrays)``, on SQLite one ``VALUES`` list; values are converted only where the
    column's type needs it, by that type's own bind processor, so a fan-out batch costs
    no SQLAlchemy parameter processing per value (issue 8: a third of the fan-out's time).
    """
    now = utcnow()
    pending = DeliveryStatus.PENDING.value
    failed = DeliveryStatus.FAILED.value
    # Time-ordered: the deliveries are claimed, sent and updated about in the order they
    # were made, and their attempts are indexed by them (`new_time_ids`).
    ids = new_time_ids(sum(len(e.endpoint_ids) for e in events))
    rows = []
    for next_id, (e, endpoint_id) in zip(
        ids, ((each, eid) for each in events for eid in each.endpoint_ids), strict=True
    ):
        if endpoint_id in e.disabled:  # written failed, never claimed (see NewDeliveries)
            status, due, lease, completed = failed, None, None, now
        else:
            status, due, lease, completed = pending, now, e.leases.get(endpoint_id), None
        rows.append(
            _DeliveryRow(
                next_id,
                e.workspace_id,
                endpoint_id,
                e.event_id,
                e.event_type,
                e.payload,
                status,
                0,
                due,
                now,
                lease,
                completed,
            )
        )
    if not rows:
        return []
    dialect = conn.dialect
    values = _converted(rows, _delivery_processors(dialect))
    new: set[str] = set()
    for start in range(0, len(values), ENQUEUE_CHUNK):
        chunk = values[start : start + ENQUEUE_CHUNK]
        if dialect.name == "postgresql":
            params: tuple[Any, ...] = tuple(map(list, zip(*chunk, strict=True)))
        else:
            params = tuple(v for row in chunk for v in row)
        result = await conn.exec_driver_sql(_enqueue_sql(dialect, len(chunk)), params)
        new.update(str(i) for i in result.scalars())
    return [r._asdict() for r, v in zip(rows, values, strict=True) if str(v[0]) in new]


ENQUEUE_CHUNK = 1000
"""Rows per INSERT of `enqueue_many`: 12 values each, under SQLite's 32,766 variables."""


class _DeliveryRow(NamedTuple):
    """A new delivery as `enqueue_many` inserts it: the field names are the columns."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: str
    event_type: str
    payload: bytes
    status: str
    attempt_count: int
    next_attempt_at: datetime | None
    created_at: datetime
    claimed_until: datetime | None
    completed_at: datetime | None


_Processors = list[tuple[int, Callable[[Any], Any]]]


@functools.cache
def _delivery_processors(dialect: sa.Dialect) -> _Processors:
    """(position, bind processor) of the `_DeliveryRow` columns whose type converts."""
    return [
        (i, p)
        for i, name in enumerate(_DeliveryRow._fields)
        if (p := webhook_deliveries.c[name].type._cached_bind_processor(dialect)) is not None
    ]


def _converted(rows: Sequence[tuple[Any, ...]], processors: _Processors) -> list[tuple[Any, ...]]:
    """The rows' values as the driver takes them. Every column but the id (always new)
    repeats across a batch (its time, workspaces, endpoints, leases; an event's payload
    for each of its endpoints): each distinct value is converted once (issue 8: the
    conversions were a fifth of the fan-out's time on SQLite)."""
    done: dict[tuple[int, Any], Any] = {}
    out = []
    for row in rows:
        values = list(row)
        for i, process in processors:
            value = values[i]
            if value is None:
                continue
            if i == 0:
                values[i] = process(value)
                continue
            key = (i, value)
            converted = done.get(key, _UNSEEN)
            if converted is _UNSEEN:
                converted = done[key] = process(value)
            values[i] = converted
        out.append(tuple(values))
    return out


_UNSEEN = object()


@functools.lru_cache(maxsize=64)
def _enqueue_sql(dialect: sa.Dialect, count: int) -> str:
    """The INSERT of `count` deliveries that skips repeated (event, endpoint) pairs and
    returns the new ids; on PostgreSQL one array per column (any count)."""
    preparer = dialect.identifier_preparer
    names = ", ".join(preparer.quote(name) for name in _DeliveryRow._fields)
    if dialect.name == "postgresql":
        arrays = ", ".join(
            f"${i}::{webhook_deliveries.c[name].type.compile(dialect=dialect)}[]"
            for i, name in enumerate(_DeliveryRow._fields, start=1)
        )
        source = f"SELECT * FROM unnest({arrays})"
    else:
        one = "(" + ", ".join("?" * len(_DeliveryRow._fields)) + ")"
        source = "VALUES " + ", ".join([one] * count)
    return (
        f"INSERT INTO {preparer.format_table(webhook_deliveries)} ({names}) {source} "
        "ON CONFLICT (event_id, endpoint_id) DO NOTHING RETURNING id"
    )


async def list_deliveries(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    status: DeliveryStatus | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    async with db.read() as conn:
        await _endpoint_row(conn, workspace_id, endpoint_id)
        stmt = sa.select(webhook_deliveries).where(
            D.endpoint_id == endpoint_id, D.workspace_id == workspace_id
        )
        if status is not None:
            stmt = stmt.where(D.status == status)
        rows = (
            (await conn.execute(newest_first(stmt, webhook_deliveries, limit, before)))
            .mappings()
            .all()
        )
    page, nxt = split_page(rows, limit)
    return [delivery_json(r) for r in page], nxt


async def get_delivery(
    db: Database, workspace_id: uuid.UUID, delivery_id: uuid.UUID
) -> dict[str, Any]:
    async with db.read() as conn:
        row = (
            (
                await conn.execute(
                    sa.select(webhook_deliveries).where(
                        D.id == delivery_id, D.workspace_id == workspace_id
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound("no such delivery")
        attempts = (
            await conn.execute(
                sa.select(webhook_attempts)
                .where(webhook_attempts.c.delivery_id == delivery_id)
                .order_by(webhook_attempts.c.attempted_at)
            )
        ).mappings()
        return delivery_json(row) | {"attempts": [attempt_json(a) for a in attempts]}


async def retry_delivery(
    db: Database, workspace_id: uuid.UUID, delivery_id: uuid.UUID
) -> dict[str, Any]:
    """Send a delivery again now, whatever its state: 409 endpoint_disabled while its
    endpoint is disabled, 409 endpoint_deleted once the endpoint is gone (its unsent
    deliveries failed with it).

    A delivery in flight (its claim has not lapsed) is never sent a second time at once:
    it is only marked `retry_requested`, and the dispatcher makes it due again when it
    records the attempt under way. The one statement decides on the row as it stands when
    it is written (PostgreSQL re-reads a row it waited for; SQLite has one writer).
    """
    async with db.begin() as conn:
        endpoint_id = (
            await conn.execute(
                sa.select(D.endpoint_id).where(D.id == delivery_id, D.workspace_id == workspace_id)
            )
        ).scalar_one_or_none()
        if endpoint_id is None:
            raise NotFound("no such delivery")
        endpoint = (
            (await conn.execute(sa.select(webhook_endpoints).where(E.id == endpoint_id)))
            .mappings()
            .first()
        )
        if endpoint is None:
            raise EndpointDeleted(
                "this delivery's webhook endpoint was deleted: its unsent deliveries failed "
                "with it and are not sent again",
                {"delivery_id": str(delivery_id), "endpoint_id": str(endpoint_id)},
            )
        ensure_enabled(endpoint)
        now = utcnow()
        in_flight = sa.and_(D.claimed_until.is_not(None), D.claimed_until > now)

        def unless_in_flight(value: Any, column: Any) -> Any:
            # Bound with the column's own type (UTCDateTime stores its own way on SQLite).
            return sa.case((in_flight, column), else_=sa.literal(value, column.type))

        updated = await conn.execute(
            webhook_deliveries.update()
            .where(D.id == delivery_id, D.workspace_id == workspace_id)
            .values(
                retry_requested=sa.case((in_flight, sa.true()), else_=sa.false()),
                status=unless_in_flight(DeliveryStatus.PENDING.value, D.status),
                next_attempt_at=unless_in_flight(now, D.next_attempt_at),
                completed_at=unless_in_flight(None, D.completed_at),
            )
        )
        if not updated.rowcount:
            raise NotFound("no such delivery")
    return await get_delivery(db, workspace_id, delivery_id)


async def recover(
    db: Database, workspace_id: uuid.UUID, endpoint_id: uuid.UUID, since: datetime
) -> int:
    """Send now every delivery of an endpoint created since `since` that an outage left
    unsent: each ``failed`` one is queued again (``pending``), and each ``failing`` one
    waiting for its scheduled retry (up to hours away) is made due now. A ``failing``
    delivery in flight (its claim has not lapsed) is left to its attempt. The answer
    counts both.

    Raises EndpointDisabled (409) while the endpoint is disabled: enable it first.
    """
    async with db.begin() as conn:
        ensure_enabled(await _endpoint_row(conn, workspace_id, endpoint_id))
        now = utcnow()
        failed = await conn.execute(
            webhook_deliveries.update()
            .where(
                D.endpoint_id == endpoint_id,
                D.status == DeliveryStatus.FAILED,
                D.created_at >= since,
            )
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
                completed_at=None,
                claimed_until=None,
            )
        )
        waiting = await conn.execute(
            webhook_deliveries.update()
            .where(
                D.endpoint_id == endpoint_id,
                D.status == DeliveryStatus.FAILING,
                D.created_at >= since,
                D.next_attempt_at > now,
                sa.or_(D.claimed_until.is_(None), D.claimed_until <= now),
            )
            .values(next_attempt_at=now)
        )
    count = int(failed.rowcount or 0) + int(waiting.rowcount or 0)
    log.info("webhook_deliveries_recovered", endpoint_id=str(endpoint_id), requeued=count)
    return count
