"""Worker transactions at once (``worker_concurrency``): batches of one job, a redelivered
batch and a `give_up` running together finish the job exactly once, with exact counts and
an audit chain that verifies, the job's completion its last event.

Every worker transaction takes its locks in one order (items and contacts, the job row,
then the audit chain head), so on PostgreSQL none of them waits for another in a cycle: a
deadlock there would surface here as an error from `process` (it is not retried here).
On SQLite the one writer connection runs them in turn.
"""

from __future__ import annotations

import asyncio
import uuid

import sqlalchemy as sa

from service.audit.store import load_hash_key, stream_events, verify_workspace
from service.config import Settings
from service.db import Database, contacts, deletion_jobs, outbox, utcnow
from service.deletion.models import BulkDeleteRequest
from service.deletion.store import Requester, create_job
from service.deletion.worker import DeletionWorker
from service.events import TOPIC_CONTACT_DELETED, DeletionRequested
from service.keys import ensure_workspace
from service.metrics import Metrics
from tests.conftest import contact_row, make_settings

CONTACTS = 30


async def jobs_and_worker(
    db: Database,
    settings: Settings,
    workspace_id: uuid.UUID,
    ids: list[uuid.UUID],
    jobs: dict[uuid.UUID, list[uuid.UUID]],
) -> DeletionWorker:
    """The contacts `ids` and a contact-ids job per entry of `jobs` (its id: the contacts it
    asks for), written as the API writes them; a worker of the workspace's audit key."""
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(contacts.insert(), [contact_row(workspace_id, c, now) for c in ids])
        for job_id, asked in jobs.items():
            await create_job(
                conn,
                db,
                settings,
                Requester(workspace_id, None, None),
                BulkDeleteRequest(contact_ids=asked),
                job_id,
            )
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)
    return worker


async def test_overlapping_batches_redelivery_and_give_up_finish_a_job_exactly_once(
    db_url: str, db: Database
) -> None:
    settings = make_settings(db_url)
    workspace_id = await ensure_workspace(db, f"overlap-{uuid.uuid4().hex}")
    ids = [uuid.uuid4() for _ in range(CONTACTS)]
    job_id = uuid.uuid4()
    worker = await jobs_and_worker(db, settings, workspace_id, ids, {job_id: ids})
    commands = [
        DeletionRequested(job_id=job_id, workspace_id=workspace_id, ref=str(c), contact_id=c)
        for c in ids
    ]

    results = await asyncio.wait_for(
        asyncio.gather(
            worker.process(commands[:12]),
            worker.process(commands[12:24]),
            worker.process(commands[24:] + commands[:3]),  # a redelivered part of the first
            worker.give_up(commands[20], "given up while its batch ran"),
            worker.process(commands[:12]),  # the first batch again, whole
        ),
        timeout=60,
    )

    async with db.read() as conn:
        job = (
            (await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == job_id)))
            .mappings()
            .one()
        )
        left = (
            await conn.execute(sa.select(sa.func.count()).where(contacts.c.id.in_(ids)))
        ).scalar_one()
    failed = job["failed_count"]
    assert failed in (0, 1)  # the give_up won its item, or found it done
    assert (job["processed_count"], job["deleted_count"]) == (CONTACTS, CONTACTS - failed)
    assert job["completed_at"] is not None
    assert left == failed
    assert sum(r.deleted for r in results) == CONTACTS - failed
    assert sum(len(r.finished_jobs) for r in results) == 1

    verified = await verify_workspace(db, workspace_id)
    assert verified.ok, verified
    events = [e async for e in stream_events(db, workspace_id)]
    per_contact = [
        e["target"]["id"]
        for e in events
        if e["action"] in ("contact.deleted", "contact.deletion_failed")
    ]
    assert sorted(per_contact) == sorted(str(c) for c in ids)  # one event each
    assert [e["action"] for e in events].count("deletion.completed") == 1
    assert events[-1]["action"] == "deletion.completed"
    assert events[-1]["data"]["processed_count"] == CONTACTS


async def test_an_item_named_twice_in_one_batch_and_a_contact_two_jobs_ask_for_go_once(
    db_url: str, db: Database
) -> None:
    """One batch holding the same deletion request twice, and a contact that two jobs both
    ask to delete: each item is done once, the contact is deleted once (one audit event,
    one ``contact.deleted``), and the second job's item for it is ``not_found``."""
    settings = make_settings(db_url)
    workspace_id = await ensure_workspace(db, f"twice-{uuid.uuid4().hex}")
    shared, own = uuid.uuid4(), uuid.uuid4()
    first_job, second_job = uuid.uuid4(), uuid.uuid4()
    worker = await jobs_and_worker(
        db, settings, workspace_id, [shared, own], {first_job: [shared, own], second_job: [shared]}
    )

    def request(job_id: uuid.UUID, contact_id: uuid.UUID) -> DeletionRequested:
        return DeletionRequested(
            job_id=job_id, workspace_id=workspace_id, ref=str(contact_id), contact_id=contact_id
        )

    result = await worker.process(
        [
            request(first_job, shared),
            request(first_job, own),
            request(first_job, shared),  # the same item again, in the same batch
            request(second_job, shared),  # another job's item for the same contact
        ]
    )

    assert result.deleted == 2
    assert sorted(map(str, result.finished_jobs)) == sorted(map(str, (first_job, second_job)))
    async with db.read() as conn:
        jobs = {
            r.id: r
            for r in await conn.execute(
                sa.select(deletion_jobs).where(deletion_jobs.c.id.in_([first_job, second_job]))
            )
        }
        announced = (
            await conn.execute(
                sa.select(outbox.c.key).where(
                    outbox.c.topic == settings.topic(TOPIC_CONTACT_DELETED),
                    outbox.c.key.in_([str(shared), str(own)]),
                )
            )
        ).scalars()
        assert sorted(announced) == sorted(map(str, (shared, own)))
    first, second = jobs[first_job], jobs[second_job]
    assert (first.processed_count, first.deleted_count, first.not_found_count) == (2, 2, 0)
    assert (second.processed_count, second.deleted_count, second.not_found_count) == (1, 0, 1)
    events = [e async for e in stream_events(db, workspace_id)]
    deleted = [e["target"]["id"] for e in events if e["action"] == "contact.deleted"]
    assert sorted(deleted) == sorted(map(str, (shared, own)))
    verified = await verify_workspace(db, workspace_id)
    assert verified.ok, verified
