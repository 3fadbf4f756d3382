"""A batch prepared before its write transaction (SQLite: `DeletionWorker._prepare`) is
written only if what it read still holds when the transaction runs: an item done, a
contact deleted or a timeline row added in between makes the batch go the usual way, so
the outcome is the one the state at the write gives, never the one of the earlier read.

On PostgreSQL nothing is prepared: the same change made before the batch gives the same
outcome, which is what each case checks.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from service.audit.store import load_hash_key, stream_events, verify_workspace
from service.db import Database, contacts, deletion_jobs, new_id, notes, utcnow
from service.deletion.models import BulkDeleteRequest
from service.deletion.store import Requester, create_job
from service.deletion.worker import DeletionWorker
from service.events import DeletionRequested
from service.keys import ensure_workspace
from service.metrics import Metrics
from tests.conftest import contact_row, make_settings

CONTACTS = 6
BILLED = 5  # a contact with a billing subscription: kept, its item failed


async def _add_note(db: Database, worker: DeletionWorker, job: _Job) -> None:
    async with db.begin() as conn:
        await conn.execute(
            notes.insert().values(
                id=new_id(),
                workspace_id=job.workspace_id,
                contact_id=job.ids[0],
                body="added between the read and the write",
                created_at=utcnow(),
            )
        )


async def _delete_contact(db: Database, worker: DeletionWorker, job: _Job) -> None:
    async with db.begin() as conn:
        await conn.execute(contacts.delete().where(contacts.c.id == job.ids[1]))


async def _delete_kept_contact(db: Database, worker: DeletionWorker, job: _Job) -> None:
    async with db.begin() as conn:
        await conn.execute(contacts.delete().where(contacts.c.id == job.ids[BILLED]))


async def _give_up_item(db: Database, worker: DeletionWorker, job: _Job) -> None:
    await worker.give_up(job.commands[2], "given up between the read and the write")


@dataclass
class _Job:
    workspace_id: uuid.UUID
    ids: list[uuid.UUID]
    commands: list[DeletionRequested]


Change = Callable[[Database, DeletionWorker, _Job], Awaitable[None]]


@pytest.mark.parametrize(
    ("change", "deleted", "not_found", "failed"),
    [
        pytest.param(_add_note, CONTACTS - 1, 0, 1, id="timeline-row-added"),
        pytest.param(_delete_contact, CONTACTS - 2, 1, 1, id="contact-deleted"),
        pytest.param(_delete_kept_contact, CONTACTS - 1, 1, 0, id="kept-contact-deleted"),
        pytest.param(_give_up_item, CONTACTS - 2, 0, 2, id="item-given-up"),
    ],
)
async def test_a_batch_changed_after_its_reads_is_written_as_the_state_at_the_write(
    db_url: str, db: Database, change: Change, deleted: int, not_found: int, failed: int
) -> None:
    settings = make_settings(db_url, worker_prepare_sqlite=True)
    workspace_id = await ensure_workspace(db, f"prepared-{uuid.uuid4().hex}")
    now = utcnow()
    ids = [uuid.uuid4() for _ in range(CONTACTS)]
    job_id = uuid.uuid4()
    async with db.begin() as conn:
        await conn.execute(
            contacts.insert(),
            [
                contact_row(workspace_id, c, now) | {"has_billing_subscription": i == BILLED}
                for i, c in enumerate(ids)
            ],
        )
        await conn.execute(
            notes.insert(),
            [
                {
                    "id": new_id(),
                    "workspace_id": workspace_id,
                    "contact_id": c,
                    "body": "there from the start",
                    "created_at": now,
                }
                for c in ids
            ],
        )
        await create_job(
            conn,
            db,
            settings,
            Requester(workspace_id, None, None),
            BulkDeleteRequest(contact_ids=ids),
            job_id,
        )
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)
    commands = [
        DeletionRequested(job_id=job_id, workspace_id=workspace_id, ref=str(c), contact_id=c)
        for c in ids
    ]
    job = _Job(workspace_id, ids, commands)
    prepared: list[Any] = []
    if db.is_sqlite:
        prepare = worker._prepare

        async def prepare_then_change(batch: Any) -> Any:
            found = await prepare(batch)
            prepared.append(found)
            await change(db, worker, job)
            return found

        worker._prepare = prepare_then_change  # type: ignore[method-assign,assignment]
    else:
        await change(db, worker, job)

    result = await worker.process(commands)

    if db.is_sqlite:
        assert prepared and prepared[0] is not None  # the change did come after the reads
    async with db.read() as conn:
        row = (
            (await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == job_id)))
            .mappings()
            .one()
        )
        left = (
            await conn.execute(sa.select(sa.func.count()).where(contacts.c.id.in_(ids)))
        ).scalar_one()
        orphaned = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    notes.c.workspace_id == workspace_id, notes.c.contact_id.is_not(None)
                )
            )
        ).scalar_one()
    assert (row["deleted_count"], row["not_found_count"], row["failed_count"]) == (
        deleted,
        not_found,
        failed,
    )
    assert row["processed_count"] == CONTACTS and row["completed_at"] is not None
    assert result.deleted == deleted
    assert left == CONTACTS - deleted - not_found
    # The notes of the contacts the worker did not delete keep their back-reference.
    assert orphaned == CONTACTS - deleted

    assert (await verify_workspace(db, workspace_id)).ok
    events = [e async for e in stream_events(db, workspace_id)]
    per_contact = [
        e["target"]["id"]
        for e in events
        if e["action"] in ("contact.deleted", "contact.deletion_failed")
    ]
    gones: dict[Change, uuid.UUID] = {_delete_contact: ids[1], _delete_kept_contact: ids[BILLED]}
    gone = gones.get(change)
    assert sorted(per_contact) == sorted(str(c) for c in ids if c != gone)
    first = next(
        e for e in events if e["action"] == "contact.deleted" and e["target"]["id"] == str(ids[0])
    )
    kept = first["data"]["preserved_timeline"]["notes"]
    assert len(kept) == (2 if change is _add_note else 1)
