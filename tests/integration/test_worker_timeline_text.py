"""The preserved timeline of a contact.deleted audit event: each item's id and time as text,
read straight from what the driver returns, equal to the text of the values written.

Runs on SQLite and PostgreSQL: SQLite hands back its stored text (32 hex digits for an id,
``YYYY-MM-DD HH:MM:SS.ffffff`` for a time), asyncpg its own UUID and an aware datetime; a
time with no microseconds is written without a fraction, as ``datetime.isoformat`` does.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from service.audit.store import load_hash_key
from service.db import Database, activities, audit_events, contacts, notes, tasks, utcnow
from service.deletion.models import BulkDeleteRequest
from service.deletion.store import Requester, create_job
from service.deletion.worker import DeletionWorker
from service.events import DeletionRequested
from service.keys import ensure_workspace
from service.metrics import Metrics
from tests.conftest import contact_row, make_settings


def iso_z(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def test_preserved_timeline_ids_and_times_are_the_text_of_what_was_written(
    db_url: str, db: Database
) -> None:
    settings = make_settings(db_url)
    workspace_id = await ensure_workspace(db, f"timeline-{uuid.uuid4().hex}")
    now = utcnow()
    contact_id, neighbour_id, bystander_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    whole_second = datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
    with_micros = datetime(2001, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    # Two activities inserted out of id order: the event lists them in id order.
    first, second = sorted((uuid.uuid4(), uuid.uuid4()))
    note_id = uuid.uuid4()
    kept: dict[str, list[dict[str, str]]] = {
        "activities": [
            {"id": str(first), "kind": "activity", "at": iso_z(whole_second)},
            {"id": str(second), "kind": "activity", "at": iso_z(with_micros)},
        ],
        "notes": [{"id": str(note_id), "kind": "note", "at": iso_z(now)}],
        "tasks": [],
    }
    base = {"workspace_id": workspace_id, "created_at": now}
    async with db.begin() as conn:
        await conn.execute(
            contacts.insert(),
            [
                contact_row(workspace_id, cid, now)
                for cid in (contact_id, neighbour_id, bystander_id)
            ],
        )
        rows: list[dict[str, Any]]
        for table, rows in (
            (
                activities,
                [
                    {"id": second, "contact_id": contact_id, "occurred_at": with_micros},
                    {"id": first, "contact_id": contact_id, "occurred_at": whole_second},
                    {"id": uuid.uuid4(), "contact_id": neighbour_id, "occurred_at": now},
                ],
            ),
            (notes, [{"id": note_id, "contact_id": contact_id}]),
            (
                tasks,
                [
                    {"id": uuid.uuid4(), "contact_id": neighbour_id},
                    {"id": uuid.uuid4(), "contact_id": bystander_id},
                ],
            ),
        ):
            await conn.execute(table.insert(), [base | extra(table) | r for r in rows])
        job_id = uuid.uuid4()
        await create_job(
            conn,
            db,
            settings,
            Requester(workspace_id, None, None),
            BulkDeleteRequest(contact_ids=[contact_id, neighbour_id]),
            job_id,
        )
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)

    await worker.process(
        [
            DeletionRequested(
                job_id=job_id, workspace_id=workspace_id, ref=str(cid), contact_id=cid
            )
            for cid in (contact_id, neighbour_id)
        ]
    )

    async with db.read() as conn:
        events = (
            await conn.execute(
                sa.select(audit_events.c.target_id, audit_events.c.data).where(
                    audit_events.c.workspace_id == workspace_id,
                    audit_events.c.action == "contact.deleted",
                )
            )
        ).all()
    preserved = {e.target_id: json.loads(e.data)["preserved_timeline"] for e in events}
    assert preserved[str(contact_id)] == kept
    neighbour = preserved[str(neighbour_id)]
    assert [len(neighbour[k]) for k in ("activities", "notes", "tasks")] == [1, 0, 1]
    # The contacts are gone, their timelines stay without a back-reference; a contact the
    # batch did not name keeps its own (PostgreSQL does all this in one statement).
    async with db.read() as conn:
        left = (
            await conn.execute(
                sa.select(contacts.c.id).where(contacts.c.workspace_id == workspace_id)
            )
        ).scalars()
        assert set(left) == {bystander_id}
        for table, expected in ((activities, 3), (notes, 1), (tasks, 1)):
            orphans = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        table.c.workspace_id == workspace_id, table.c.contact_id.is_(None)
                    )
                )
            ).scalar_one()
            assert orphans == expected, table.name
        still = (
            await conn.execute(sa.select(tasks.c.contact_id).where(tasks.c.contact_id.isnot(None)))
        ).scalars()
        assert bystander_id in set(still)


def extra(table: sa.Table) -> dict[str, Any]:
    """The required columns of a timeline table beyond ids and times."""
    if table is activities:
        return {"type": "call", "subject": None, "body": None}
    if table is notes:
        return {"body": "hello"}
    return {"title": "follow up", "body": None, "status": "open", "due_at": None}
