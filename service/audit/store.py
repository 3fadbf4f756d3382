"""Appending to and reading the audit trail (SQLAlchemy Core).

Appends happen inside the caller's transaction, so an event commits or rolls back with
the change it describes. The per-workspace head row is locked for the append, which
keeps `seq` gap-free and the chain unforked with any number of concurrent writers.
There is no function here that updates or deletes an event.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.chain import GENESIS_HASH, canonical_json, event_hash, format_time
from service.db import Database, audit_events, audit_heads, new_id, server_secrets, utcnow


@dataclass(frozen=True)
class AuditRecord:
    """What happened, before it gets its place (seq) and hash in the chain."""

    workspace_id: uuid.UUID
    actor: Mapping[str, str]
    action: str
    target: Mapping[str, str] | None = None
    job_id: str | None = None
    request_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    email_hmac: str | None = None
    occurred_at: datetime | None = None


async def _lock_head(
    conn: AsyncConnection, db: Database, workspace_id: uuid.UUID
) -> tuple[int, str]:
    ins: Any = (postgresql.insert if not db.is_sqlite else sqlite.insert)(audit_heads)
    await conn.execute(
        ins.values(workspace_id=workspace_id, seq=0, hash=GENESIS_HASH).on_conflict_do_nothing()
    )
    stmt = sa.select(audit_heads.c.seq, audit_heads.c.hash).where(
        audit_heads.c.workspace_id == workspace_id
    )
    row = (await conn.execute(db.for_update(stmt))).one()
    return int(row.seq), str(row.hash)


async def append_events(
    conn: AsyncConnection, db: Database, records: Sequence[AuditRecord]
) -> list[dict[str, Any]]:
    """Append records to their workspaces' chains in this transaction; returns the events."""
    by_workspace: dict[uuid.UUID, list[AuditRecord]] = {}
    for record in records:
        by_workspace.setdefault(record.workspace_id, []).append(record)
    sealed: list[dict[str, Any]] = []
    # Lock heads in a fixed order so two writers over several workspaces cannot deadlock.
    for workspace_id in sorted(by_workspace, key=str):
        seq, prev_hash = await _lock_head(conn, db, workspace_id)
        rows: list[dict[str, Any]] = []
        for record in by_workspace[workspace_id]:
            seq += 1
            event = {
                "seq": seq,
                "id": str(new_id()),
                "workspace_id": str(workspace_id),
                "occurred_at": format_time(record.occurred_at or utcnow()),
                "actor": dict(record.actor),
                "action": record.action,
                "target": dict(record.target) if record.target is not None else None,
                "job_id": record.job_id,
                "request_id": record.request_id,
                "data": json.loads(canonical_json(dict(record.data))),
            }
            event["prev_hash"] = prev_hash
            event["hash"] = prev_hash = event_hash(prev_hash, event)
            sealed.append(event)
            rows.append(_to_row(event, record.email_hmac))
        await conn.execute(audit_events.insert(), rows)
        await conn.execute(
            audit_heads.update()
            .where(audit_heads.c.workspace_id == workspace_id)
            .values(seq=seq, hash=prev_hash)
        )
    return sealed


def _to_row(event: Mapping[str, Any], email_hmac: str | None) -> dict[str, Any]:
    target = event["target"]
    return {
        "workspace_id": uuid.UUID(event["workspace_id"]),
        "seq": event["seq"],
        "id": uuid.UUID(event["id"]),
        "occurred_at": event["occurred_at"],
        "actor_type": event["actor"]["type"],
        "actor_id": event["actor"]["id"],
        "action": event["action"],
        "target_type": target["type"] if target else None,
        "target_id": target["id"] if target else None,
        "job_id": event["job_id"],
        "request_id": event["request_id"],
        "data": canonical_json(event["data"]).decode("utf-8"),
        "email_hmac": email_hmac,
        "prev_hash": event["prev_hash"],
        "hash": event["hash"],
    }


def row_to_event(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An audit row as the event that was hashed (plus its prev_hash and hash)."""
    target = (
        {"type": row["target_type"], "id": row["target_id"]}
        if row["target_type"] is not None
        else None
    )
    return {
        "seq": int(row["seq"]),
        "id": str(row["id"]),
        "workspace_id": str(row["workspace_id"]),
        "occurred_at": row["occurred_at"],
        "actor": {"type": row["actor_type"], "id": row["actor_id"]},
        "action": row["action"],
        "target": target,
        "job_id": row["job_id"],
        "request_id": row["request_id"],
        "data": json.loads(row["data"]),
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


async def stream_events(
    db: Database, workspace_id: uuid.UUID, *, since_seq: int = 1, page: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every event of a workspace from `since_seq`, in seq order, a page at a time."""
    next_seq = since_seq
    while True:
        stmt = (
            sa.select(audit_events)
            .where(audit_events.c.workspace_id == workspace_id, audit_events.c.seq >= next_seq)
            .order_by(audit_events.c.seq)
            .limit(page)
        )
        async with db.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        for row in rows:
            yield row_to_event(row)
        if len(rows) < page:
            return
        next_seq = int(rows[-1]["seq"]) + 1


async def load_hash_key(db: Database, configured: str | None) -> bytes:
    """The key of the email HMACs: AUDIT_HASH_KEY, or one generated and kept on first start."""
    if configured:
        return configured.encode("utf-8")
    ins: Any = (postgresql.insert if not db.is_sqlite else sqlite.insert)(server_secrets)
    async with db.begin() as conn:
        await conn.execute(
            ins.values(
                name="audit_hash_key", value=secrets.token_hex(32), created_at=utcnow()
            ).on_conflict_do_nothing()
        )
        value = (
            await conn.execute(
                sa.select(server_secrets.c.value).where(server_secrets.c.name == "audit_hash_key")
            )
        ).scalar_one()
    return str(value).encode("utf-8")
