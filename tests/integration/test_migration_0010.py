"""Migration 0010 (SQLite and PostgreSQL): the timeline back-reference indexes hold only
rows still linked to a contact, and audit_events has no unique index on its id. Every
event, hash and timeline row is kept (the chain verifies after the upgrade, and after a
downgrade and upgrade again), and the worker's timeline reads and updates still go
through the (now partial) index."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from service.audit.store import AuditRecord, append_events, verify_workspace
from service.contacts.store import TIMELINE_TABLES
from service.db import Database, any_of, notes
from service.migrate import alembic_config, upgrade_sync
from tests.integration.test_migration_0002 import _execute, _rows, fresh_url  # noqa: F401

EVENTS = 5


async def _append(url: str, workspace_id: uuid.UUID) -> None:
    db = Database(url)
    try:
        async with db.begin() as conn:
            await append_events(
                conn,
                db,
                [
                    AuditRecord(
                        workspace_id=workspace_id,
                        actor={"type": "system", "id": "test"},
                        action="contact.deleted",
                        target={"type": "contact", "id": str(uuid.uuid4())},
                        data={"n": n},
                    )
                    for n in range(EVENTS)
                ],
            )
    finally:
        await db.dispose()


async def _verify(url: str, workspace_id: uuid.UUID) -> tuple[bool, int]:
    db = Database(url)
    try:
        result = await verify_workspace(db, workspace_id)
    finally:
        await db.dispose()
    return result.ok, result.events_checked


def _index_sql(url: str, name: str) -> str:
    if url.startswith("sqlite"):
        query = f"SELECT sql AS definition FROM sqlite_master WHERE name = '{name}'"
    else:
        query = f"SELECT indexdef AS definition FROM pg_indexes WHERE indexname = '{name}'"
    rows = asyncio.run(_rows(url, query))
    return str(rows[0]["definition"]) if rows else ""


def _unique_on_id(url: str) -> bool:
    if url.startswith("sqlite"):
        found = asyncio.run(_rows(url, "SELECT sql FROM sqlite_master WHERE name = 'audit_events'"))
        return "UNIQUE (id)" in str(found[0]["sql"])
    found = asyncio.run(
        _rows(url, "SELECT indexname FROM pg_indexes WHERE indexname = 'uq_audit_events_id'")
    )
    return bool(found)


def test_0010_keeps_every_event_and_timeline_row_and_both_ways_work(fresh_url: str) -> None:  # noqa: F811
    upgrade_sync(fresh_url, "0009")
    sqlite = fresh_url.startswith("sqlite")
    workspace = uuid.uuid4()
    asyncio.run(_append(fresh_url, workspace))
    now = datetime.now(UTC).replace(tzinfo=None) if sqlite else datetime.now(UTC)
    linked = uuid.uuid4()
    for contact in (linked, None):
        asyncio.run(
            _execute(
                fresh_url,
                "INSERT INTO notes (id, workspace_id, contact_id, body, created_at) "
                "VALUES (:id, :ws, :contact, 'b', :now)",
                {
                    "id": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                    "ws": workspace.hex if sqlite else workspace,
                    "contact": (contact.hex if sqlite else contact) if contact else None,
                    "now": now,
                },
            )
        )
    assert _unique_on_id(fresh_url)

    upgrade_sync(fresh_url, "head")
    assert asyncio.run(_verify(fresh_url, workspace)) == (True, EVENTS)
    assert not _unique_on_id(fresh_url)
    for table in ("activities", "notes", "tasks"):
        assert "WHERE" in _index_sql(fresh_url, f"ix_{table}_contact_id").upper(), table
    notes_left = asyncio.run(_rows(fresh_url, "SELECT contact_id FROM notes"))
    assert len(notes_left) == 2

    command.downgrade(alembic_config(fresh_url), "0009")
    assert _unique_on_id(fresh_url)
    assert "WHERE" not in _index_sql(fresh_url, "ix_notes_contact_id").upper()
    upgrade_sync(fresh_url, "head")
    assert asyncio.run(_verify(fresh_url, workspace)) == (True, EVENTS)
    asyncio.run(_append(fresh_url, workspace))  # the chain goes on after the round trip
    assert asyncio.run(_verify(fresh_url, workspace)) == (True, 2 * EVENTS)


async def test_the_workers_timeline_statements_use_the_partial_index(db: Database) -> None:
    """The reads and the nulling update of a deletion (`any_of` on contact_id) imply
    ``contact_id IS NOT NULL``, so the planner takes the partial index: SQLite's plan
    searches it; PostgreSQL's generic plan (sequential scans off) scans it."""
    ids = [uuid.uuid4(), uuid.uuid4()]
    statements: list[tuple[sa.Table, sa.ClauseElement]] = [
        (table, sa.select(table.c.id).where(any_of(table.c.contact_id, ids)))
        for table in TIMELINE_TABLES.values()
    ]
    nulling = notes.update().where(any_of(notes.c.contact_id, ids)).values(contact_id=sa.null())
    statements.append((notes, nulling))
    async with db.begin() as conn:
        if not db.is_sqlite:
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        for n, (table, stmt) in enumerate(statements):
            if db.is_sqlite:
                literal = stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
                rows = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {literal}")).all()
                plan = " ".join(str(r[-1]) for r in rows)
            else:
                compiled = stmt.compile(dialect=conn.dialect)
                await conn.exec_driver_sql(f"PREPARE timeline_plan_{n} AS {compiled}")
                array = "{" + ",".join(map(str, ids)) + "}"
                rows = (
                    await conn.exec_driver_sql(f"EXPLAIN EXECUTE timeline_plan_{n}('{array}')")
                ).all()
                plan = " ".join(str(r[0]) for r in rows)
            assert f"ix_{table.name}_contact_id" in plan, plan
