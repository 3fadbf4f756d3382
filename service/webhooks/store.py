"""Webhook endpoints and deliveries in the database, with their audit events."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.store import AuditRecord, append_events
from service.db import (
    Database,
    new_id,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.errors import NotFound
from service.timefmt import iso
from service.webhooks.models import DeliveryStatus, EndpointCreate, EndpointPatch, EndpointStatus
from service.webhooks.signing import generate_secret

E = webhook_endpoints.c
D = webhook_deliveries.c


def endpoint_json(row: Mapping[Any, Any], *, secret: str | None = None) -> dict[str, Any]:
    out = {
        "id": str(row["id"]),
        "url": row["url"],
        "description": row["description"],
        "event_types": list(row["event_types"]),
        "rate_limit_per_s": row["rate_limit_per_s"],
        "status": row["status"],
        "disabled_reason": row["disabled_reason"],
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
        "next_attempt_at": iso(row["next_attempt_at"]),
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


def endpoint_audit(
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    action: str,
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
        "secret": secret,
        "status": EndpointStatus.ENABLED.value,
        "disabled_reason": None,
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
                    {"url": body.url, "event_types": values["event_types"]},
                    rid,
                )
            ],
        )
    return endpoint_json(values, secret=secret)


async def get_endpoint(
    db: Database, workspace_id: uuid.UUID, endpoint_id: uuid.UUID
) -> dict[str, Any]:
    async with db.read() as conn:
        return endpoint_json(await _endpoint_row(conn, workspace_id, endpoint_id))


async def list_endpoints(db: Database, workspace_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(webhook_endpoints)
                .where(E.workspace_id == workspace_id)
                .order_by(E.created_at, E.id)
            )
        ).mappings()
        return [endpoint_json(r) for r in rows]


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
        await conn.execute(webhook_endpoints.delete().where(E.id == endpoint_id))
        await conn.execute(
            webhook_deliveries.update()
            .where(D.endpoint_id == endpoint_id, D.status == DeliveryStatus.PENDING)
            .values(status=DeliveryStatus.CANCELLED, completed_at=utcnow())
        )
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
    now = utcnow()
    secret = generate_secret()
    async with db.begin() as conn:
        row = await _endpoint_row(conn, workspace_id, endpoint_id)
        await conn.execute(
            webhook_endpoints.update()
            .where(E.id == endpoint_id)
            .values(
                secret=secret,
                previous_secret=row["secret"],
                previous_secret_expires_at=now + timedelta(seconds=overlap_s),
                updated_at=now,
            )
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
    return endpoint_json(updated, secret=secret)


async def enable_endpoint(
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    actor: Mapping[str, str],
    rid: str,
) -> dict[str, Any]:
    async with db.begin() as conn:
        row = await _endpoint_row(conn, workspace_id, endpoint_id)
        if row["status"] != EndpointStatus.ENABLED:
            await conn.execute(
                webhook_endpoints.update()
                .where(E.id == endpoint_id)
                .values(
                    status=EndpointStatus.ENABLED,
                    disabled_reason=None,
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
        return endpoint_json(await _endpoint_row(conn, workspace_id, endpoint_id))


async def disable_endpoint(
    conn: AsyncConnection,
    db: Database,
    workspace_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    reason: str,
) -> None:
    """Disable an endpoint (410 Gone, or failing for too long), with its audit event."""
    updated = await conn.execute(
        webhook_endpoints.update()
        .where(E.id == endpoint_id, E.status == EndpointStatus.ENABLED)
        .values(status=EndpointStatus.DISABLED, disabled_reason=reason, updated_at=utcnow())
    )
    if updated.rowcount:
        await append_events(
            conn,
            db,
            [
                endpoint_audit(
                    workspace_id,
                    endpoint_id,
                    "webhook.endpoint.disabled",
                    {"type": "system", "id": "dispatcher"},
                    {"reason": reason},
                )
            ],
        )


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
    if not endpoint_ids:
        return 0
    now = utcnow()
    ins: Any = (sqlite.insert if db.is_sqlite else postgresql.insert)(webhook_deliveries)
    rows = [
        {
            "id": new_id(),
            "workspace_id": workspace_id,
            "endpoint_id": endpoint_id,
            "event_id": event_id,
            "event_type": event_type,
            "payload": payload,
            "status": DeliveryStatus.PENDING.value,
            "attempt_count": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for endpoint_id in endpoint_ids
    ]
    # RETURNING counts what was inserted on both backends; an executemany's rowcount is
    # -1 on asyncpg.
    result = await conn.execute(
        ins.values(rows)
        .on_conflict_do_nothing(index_elements=["event_id", "endpoint_id"])
        .returning(D.id)
    )
    return len(result.all())


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
        stmt = (
            sa.select(webhook_deliveries)
            .where(D.endpoint_id == endpoint_id, D.workspace_id == workspace_id)
            .order_by(D.created_at.desc(), D.id.desc())
            .limit(limit + 1)
        )
        if status is not None:
            stmt = stmt.where(D.status == status)
        if before is not None:
            at, last = before
            stmt = stmt.where(sa.or_(D.created_at < at, sa.and_(D.created_at == at, D.id < last)))
        rows = (await conn.execute(stmt)).mappings().all()
    nxt = rows[limit - 1] if len(rows) > limit else None
    return [delivery_json(r) for r in rows[:limit]], (
        (nxt["created_at"], nxt["id"]) if nxt is not None else None
    )


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
    """Send a delivery again now, whatever its state."""
    async with db.begin() as conn:
        updated = await conn.execute(
            webhook_deliveries.update()
            .where(D.id == delivery_id, D.workspace_id == workspace_id)
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=utcnow(),
                completed_at=None,
                claimed_until=None,
            )
        )
        if not updated.rowcount:
            raise NotFound("no such delivery")
    return await get_delivery(db, workspace_id, delivery_id)


async def recover(
    db: Database, workspace_id: uuid.UUID, endpoint_id: uuid.UUID, since: datetime
) -> int:
    """Re-queue every failed delivery of an endpoint created since `since`."""
    async with db.begin() as conn:
        await _endpoint_row(conn, workspace_id, endpoint_id)
        updated = await conn.execute(
            webhook_deliveries.update()
            .where(
                D.endpoint_id == endpoint_id,
                D.status == DeliveryStatus.FAILED,
                D.created_at >= since,
            )
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=utcnow(),
                completed_at=None,
                claimed_until=None,
            )
        )
    return int(updated.rowcount or 0)
