"""Idempotency keys (Stripe-style): replay the first answer, refuse a different body.

A key is claimed in its own short transaction before the work starts, so a concurrent
repeat sees it and gets 409 with Retry-After; the answer is stored when the work is done
and replayed byte for byte for 24 hours (configurable).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from service.audit.chain import canonical_json
from service.db import Database, idempotency_keys, utcnow
from service.errors import IdempotencyConflict, ValidationFailed

MAX_KEY_LENGTH = 255
# A claim older than this was abandoned by a crashed request (waits are at most 60 s).
STALE_AFTER = timedelta(seconds=120)
REPLAYED_HEADERS = ("Location", "Content-Type")


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key: go ahead, replay, or resume an abandoned job."""

    replay: StoredResponse | None = None
    abandoned_job: uuid.UUID | None = None


def check_key(key: str) -> str:
    # A blank key would silently give no idempotency (e.g. `$(uuidgen)` with no uuidgen).
    if not key.strip() or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            "invalid Idempotency-Key",
            [
                {
                    "field": "Idempotency-Key",
                    "message": f"1-{MAX_KEY_LENGTH} printable characters, not all blank",
                }
            ],
        )
    return key


def fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests "the same": method, path and the parsed JSON body."""
    material = canonical_json({"method": method, "path": path, "body": body})
    return hashlib.sha256(material).hexdigest()


def _insert(db: Database) -> Any:
    return (sqlite.insert if db.is_sqlite else postgresql.insert)(idempotency_keys)


async def claim(db: Database, workspace_id: uuid.UUID, key: str, print_: str, ttl_s: int) -> Claim:
    """Claim `key` for a request with this fingerprint, or say why not."""
    now = utcnow()
    c = idempotency_keys.c
    async with db.begin() as conn:
        inserted = await conn.execute(
            _insert(db)
            .values(
                workspace_id=workspace_id,
                key=key,
                fingerprint=print_,
                state="in_progress",
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 1:
            return Claim()
        where = sa.and_(c.workspace_id == workspace_id, c.key == key)
        row = (
            (await conn.execute(db.for_update(sa.select(idempotency_keys).where(where))))
            .mappings()
            .one()
        )
        if row["expires_at"] <= now or (
            row["state"] == "in_progress"
            and row["job_id"] is None
            and row["created_at"] < now - STALE_AFTER
        ):
            # Expired, or abandoned before it created anything: start afresh.
            await conn.execute(
                idempotency_keys.update()
                .where(where)
                .values(
                    fingerprint=print_,
                    state="in_progress",
                    job_id=None,
                    response_status=None,
                    response_headers=None,
                    response_body=None,
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_s),
                )
            )
            return Claim()
        if row["fingerprint"] != print_:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request",
                {"idempotency_key": key},
            )
        if row["state"] == "done":
            return Claim(
                replay=StoredResponse(
                    row["response_status"], dict(row["response_headers"]), row["response_body"]
                )
            )
        if row["job_id"] is not None and row["created_at"] < now - STALE_AFTER:
            return Claim(abandoned_job=row["job_id"])
        raise IdempotencyConflict(
            "a request with this Idempotency-Key is still being handled",
            {"idempotency_key": key},
            headers={"Retry-After": "1"},
        )


async def record_job(conn: Any, workspace_id: uuid.UUID, key: str, job_id: uuid.UUID) -> None:
    """Note the job a claimed request created (in the job's own transaction)."""
    c = idempotency_keys.c
    await conn.execute(
        idempotency_keys.update()
        .where(c.workspace_id == workspace_id, c.key == key)
        .values(job_id=job_id)
    )


async def complete(
    db: Database, workspace_id: uuid.UUID, key: str, response: StoredResponse
) -> None:
    """Store the answer to replay."""
    c = idempotency_keys.c
    async with db.begin() as conn:
        await conn.execute(
            idempotency_keys.update()
            .where(c.workspace_id == workspace_id, c.key == key)
            .values(
                state="done",
                response_status=response.status,
                response_headers=response.headers,
                response_body=response.body,
            )
        )


async def release(db: Database, workspace_id: uuid.UUID, key: str) -> None:
    """Give a claim back after a failure that wrote nothing, so the client can retry."""
    c = idempotency_keys.c
    async with db.begin() as conn:
        await conn.execute(
            idempotency_keys.delete().where(
                c.workspace_id == workspace_id,
                c.key == key,
                c.state == "in_progress",
                c.job_id.is_(None),
            )
        )
