"""Migration 0011 (SQLite and PostgreSQL): kept Idempotency-Key answers learn the contact
they show; one that shows a contact already deleted is erased, expired keys go, and the
rest are kept as they were (both ways)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import sqlalchemy as sa
from alembic import command

from service.contacts.store import contact_row
from service.db import Database, contacts, idempotency_keys, utcnow
from service.idempotency import ERASED_BODY, ERASED_STATUS
from service.keys import ensure_workspace
from service.migrate import alembic_config, upgrade_sync
from tests.integration.test_migration_0002 import fresh_url  # noqa: F401


def _answer(contact_id: uuid.UUID, email: str) -> bytes:
    return json.dumps({"data": {"id": str(contact_id), "email": email}}).encode()


async def _seed(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A live contact and a deleted one, each with a kept answer; an expired key."""
    db = Database(url)
    try:
        workspace = await ensure_workspace(db, f"mig11-{uuid.uuid4().hex[:6]}")
        live, gone = uuid.uuid4(), uuid.uuid4()
        now = utcnow()
        async with db.begin() as conn:
            await conn.execute(
                contacts.insert(), [contact_row(live, workspace, "live@example.com", at=now)]
            )
            base = {"workspace_id": workspace, "fingerprint": "f" * 64, "state": "done"}
            for key, subject, email, expires in (
                ("live", live, "live@example.com", now + timedelta(hours=1)),
                ("gone", gone, "gone@example.com", now + timedelta(hours=1)),
                ("expired", live, "live@example.com", now - timedelta(hours=2)),
            ):
                await conn.execute(
                    sa.insert(idempotency_keys).values(
                        **base,
                        key=key,
                        response_status=201,
                        response_headers={"Content-Type": "application/json"},
                        response_body=_answer(subject, email),
                        created_at=now,
                        expires_at=expires,
                    )
                )
        return live, workspace
    finally:
        await db.dispose()


async def _keys(url: str) -> dict[str, tuple[int, bytes, uuid.UUID | None]]:
    db = Database(url)
    try:
        c = idempotency_keys.c
        async with db.read() as conn:
            rows = await conn.execute(
                sa.select(c.key, c.response_status, c.response_body, c.contact_id)
            )
            return {r.key: (r.response_status, bytes(r.response_body), r.contact_id) for r in rows}
    finally:
        await db.dispose()


def test_0011_links_live_answers_erases_deleted_ones_and_prunes_expired(fresh_url: str) -> None:  # noqa: F811
    upgrade_sync(fresh_url, "0010")
    live, _ = asyncio.run(_seed(fresh_url))

    upgrade_sync(fresh_url, "head")
    keys = asyncio.run(_keys(fresh_url))
    assert set(keys) == {"live", "gone"}  # the expired one is gone
    assert keys["live"] == (201, _answer(live, "live@example.com"), live)
    assert keys["gone"] == (ERASED_STATUS, ERASED_BODY, None)

    command.downgrade(alembic_config(fresh_url), "0010")
    upgrade_sync(fresh_url, "head")
    assert asyncio.run(_keys(fresh_url))["live"][2] == live
