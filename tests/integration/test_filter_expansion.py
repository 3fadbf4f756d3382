"""A filter job's expansion: a bounded number of items ahead of its deletions, and every
match turned into exactly one item, whatever crashes in between.

Runs on SQLite and PostgreSQL. The first test drives the worker's unit of work directly,
playing the broker's part, so that it can look at the job between any two transactions;
the second runs the relay and workers as real processes against the real broker and
kills a worker between its database commit and its offset commit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.audit.chain import verify_events
from service.audit.store import load_hash_key, stream_events
from service.config import Settings
from service.contacts.store import contact_row
from service.db import (
    Database,
    audit_events,
    contacts,
    deletion_job_items,
    deletion_jobs,
    outbox,
    utcnow,
)
from service.deletion.models import BulkDeleteRequest, ItemStatus
from service.deletion.store import (
    ANALYZE_FROM_ITEMS,
    EXPAND_WINDOWS_PER_PAGE,
    Requester,
    create_job,
    outcome_list,
    pending_items_statement,
)
from service.deletion.worker import DeletionWorker
from service.events import (
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
    DeletionRequested,
    JobExpand,
)
from service.keys import ensure_workspace
from service.metrics import Metrics
from tests.components import Components, Process, components
from tests.conftest import make_settings

PAGE = 3
AHEAD = 5


async def seed(
    db: Database, count: int, last_name: str, *, others: int = 1, last: bool = False
) -> tuple[uuid.UUID, set[uuid.UUID]]:
    """A new workspace with ``count`` contacts of this last name and ``others`` not (with
    ``last``, the matches come after all of the others in id order)."""
    workspace_id = await ensure_workspace(db, f"expansion-{uuid.uuid4().hex}")
    now = utcnow()
    ids = {uuid.UUID("ffff" + uuid.uuid4().hex[4:]) if last else uuid.uuid4() for _ in range(count)}
    rows: list[dict[str, Any]] = [
        contact_row(
            contact_id, workspace_id, f"{contact_id.hex}@example.com", last_name=name, at=now
        )
        for contact_id, name in [(i, last_name) for i in ids]
        + [(uuid.uuid4(), "Bystander") for _ in range(others)]
    ]
    async with db.begin() as conn:
        await conn.execute(contacts.insert(), rows)
    return workspace_id, ids


async def filter_job(
    db: Database, settings: Settings, workspace_id: uuid.UUID, last_name: str
) -> uuid.UUID:
    """A filter job accepted as the API accepts it (its first expansion message queued)."""
    job_id = uuid.uuid4()
    request = BulkDeleteRequest(filter={"last_name": last_name})
    async with db.begin() as conn:
        await create_job(conn, db, settings, Requester(workspace_id, None, None), request, job_id)
    return job_id


async def job_row(db: Database, job_id: uuid.UUID) -> Any:
    async with db.read() as conn:
        return (
            await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == job_id))
        ).one()


async def pending_items(db: Database, job_id: uuid.UUID) -> list[Any]:
    c = deletion_job_items.c
    async with db.read() as conn:
        stmt = (
            sa.select(c.ref, c.contact_id)
            .where(c.job_id == job_id, c.status == "pending")
            .order_by(c.position)
        )
        return list((await conn.execute(stmt)).all())


async def drain(
    worker: DeletionWorker,
    db: Database,
    job_id: uuid.UUID,
    workspace_id: uuid.UUID,
    *,
    per_batch: int,
    bound: int,
) -> int:
    """Delete the job's waiting items ``per_batch`` per transaction, as a worker's batches
    would, checking after each that at most ``bound`` items wait; the most that waited."""
    most_waiting = 0
    delivered: set[int] = set()
    for _ in range(200):
        for message in await expansion_messages(worker.settings, db, job_id):
            if message.id not in delivered:
                delivered.add(message.id)
                data = json.loads(message.payload)["data"]
                await worker.process([JobExpand.model_validate(data)])
        waiting = await pending_items(db, job_id)
        if not waiting:
            if (await job_row(db, job_id)).completed_at is not None:
                break
            continue
        batch = [
            DeletionRequested(
                job_id=job_id, workspace_id=workspace_id, ref=w.ref, contact_id=w.contact_id
            )
            for w in waiting[:per_batch]
        ]
        await worker.process(batch)
        job = await job_row(db, job_id)
        most_waiting = max(most_waiting, job.total_requested - job.processed_count)
        assert job.total_requested - job.processed_count <= bound, job
    return most_waiting


async def expansion_messages(settings: Settings, db: Database, job_id: uuid.UUID) -> list[Any]:
    """The job's expansion messages in the outbox (keyed by job id on the work topic)."""
    async with db.read() as conn:
        stmt = (
            sa.select(outbox.c.id, outbox.c.payload)
            .where(
                outbox.c.key == str(job_id),
                outbox.c.topic == settings.topic(TOPIC_DELETION_REQUESTED),
            )
            .order_by(outbox.c.id)
        )
        return list((await conn.execute(stmt)).all())


async def job_items(db: Database, job_id: uuid.UUID) -> list[uuid.UUID]:
    c = deletion_job_items.c
    async with db.read() as conn:
        stmt = sa.select(c.contact_id).where(c.job_id == job_id)
        return sorted((await conn.execute(stmt)).scalars(), key=str)


async def test_expansion_stays_a_bounded_number_of_items_ahead_of_the_deletions(
    db_url: str, db: Database
) -> None:
    """At most ``expand_ahead_max + expand_page_size - 1`` items wait at any time; the next
    page comes with the deletions that drain them (no chain of expansion messages), and
    the job still ends with every match exactly once."""
    settings = make_settings(db_url, expand_page_size=PAGE, expand_ahead_max=AHEAD)
    workspace_id, matches = await seed(db, 20, "Expando")
    job_id = await filter_job(db, settings, workspace_id, "Expando")
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)

    await worker.process([JobExpand(job_id=job_id, workspace_id=workspace_id)])
    job = await job_row(db, job_id)
    assert (job.total_requested, job.processed_count, job.expanded) == (PAGE, 0, False)

    most_waiting = await drain(
        worker, db, job_id, workspace_id, per_batch=2, bound=AHEAD + PAGE - 1
    )
    job = await job_row(db, job_id)
    assert job.status == "completed" and job.expanded, job
    assert (job.total_requested, job.deleted_count) == (20, 20)
    assert most_waiting >= AHEAD  # it did expand ahead, up to the bound
    assert await job_items(db, job_id) == sorted(matches, key=str)
    # Only the message create_job queued: every later page came with the deletions.
    assert len(await expansion_messages(settings, db, job_id)) == 1


async def test_a_filter_job_never_deletes_a_contact_created_after_it_was_accepted(
    db_url: str, db: Database
) -> None:
    """Matching contacts created while the job runs stay (trial 6: 6 of 97 created during a
    12,000-contact job were deleted, those whose random ids fell after the cursor); every
    page, from an expansion message or expanded ahead with the deletions, looks only at
    contacts created by the job's acceptance."""
    settings = make_settings(db_url, expand_page_size=PAGE, expand_ahead_max=AHEAD)
    workspace_id, matches = await seed(db, 20, "Latecomer")
    job_id = await filter_job(db, settings, workspace_id, "Latecomer")
    accepted_at = (await job_row(db, job_id)).created_at
    late = [uuid.uuid4() for _ in range(10)]
    async with db.begin() as conn:
        await conn.execute(
            contacts.insert(),
            [
                contact_row(
                    i,
                    workspace_id,
                    f"{i.hex}@example.com",
                    last_name="Latecomer",
                    at=accepted_at + timedelta(milliseconds=1 + n),
                )
                for n, i in enumerate(late)
            ],
        )
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)

    await drain(worker, db, job_id, workspace_id, per_batch=2, bound=AHEAD + PAGE - 1)
    job = await job_row(db, job_id)
    assert job.status == "completed" and job.expanded, job
    assert (job.total_requested, job.deleted_count) == (20, 20)
    assert await job_items(db, job_id) == sorted(matches, key=str)
    async with db.read() as conn:
        left = (await conn.execute(sa.select(contacts.c.id).where(contacts.c.id.in_(late)))).all()
    assert len(left) == len(late)


async def test_a_sparse_filter_finds_every_match_however_far_apart(
    db_url: str, db: Database
) -> None:
    """A page looks through a bounded part of the workspace; one that found nothing hands
    over to an expansion message, and matches far beyond it are all found, once."""
    settings = make_settings(db_url, expand_page_size=2, expand_ahead_max=2)
    workspace_id, matches = await seed(db, 7, "Needle", others=150, last=True)
    job_id = await filter_job(db, settings, workspace_id, "Needle")
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)

    await drain(worker, db, job_id, workspace_id, per_batch=1, bound=3)

    job = await job_row(db, job_id)
    assert job.status == "completed" and job.expanded, job
    assert (job.total_requested, job.deleted_count) == (7, 7)
    assert await job_items(db, job_id) == sorted(matches, key=str)
    # Each page that read only others found nothing and queued the next by message.
    per_page = EXPAND_WINDOWS_PER_PAGE * 2
    assert len(await expansion_messages(settings, db, job_id)) == 1 + 150 // per_page


# --- across a worker crash, with the real broker ----------------------------------------------

CRASH_CONTACTS = 1200
CRASH_PAGE = 100
CRASH_AHEAD = 300
DEADLINE_S = 90.0


@pytest.fixture
def crash_settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(
        db_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        worker_batch_size=50,
        relay_batch_size=5000,
        expand_page_size=CRASH_PAGE,
        expand_ahead_max=CRASH_AHEAD,
    )


@pytest.fixture
def processes(crash_settings: Settings, tmp_path: Path) -> Iterator[Components]:
    extra = {"EXPAND_PAGE_SIZE": str(CRASH_PAGE), "EXPAND_AHEAD_MAX": str(CRASH_AHEAD)}
    with components(crash_settings, tmp_path, extra) as group:
        yield group


async def wait_until(
    db: Database, job_id: uuid.UUID, running: list[Process], *, processed: int
) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        job = await job_row(db, job_id)
        if job.processed_count >= processed or job.completed_at is not None:
            return job
        for process in running:
            process.assert_running()
        assert loop.time() < deadline, f"job stuck: {job}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_filter_job_expands_every_match_exactly_once_across_worker_crashes(
    crash_settings: Settings, db: Database, processes: Components
) -> None:
    """A worker stopped mid-job and another killed after a committed batch (whose
    offsets it never committed) leave every match deleted once, audited once, announced
    once, and an audit chain that verifies."""
    workspace_id, matches = await seed(db, CRASH_CONTACTS, "Crashed")
    job_id = await filter_job(db, crash_settings, workspace_id, "Crashed")
    relay = processes.start("relay")
    first = processes.start("worker")
    job = await wait_until(db, job_id, [relay, first], processed=CRASH_CONTACTS // 4)
    assert not job.expanded, "the job must still be expanding when its worker goes"
    first.stop()

    doomed = processes.start("worker", failpoint="worker_after_db_commit")
    assert await doomed.wait_exit(DEADLINE_S) == -signal.SIGKILL
    last = processes.start("worker")
    job = await wait_until(db, job_id, [relay, last], processed=CRASH_CONTACTS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while job.completed_at is None:
        assert loop.time() < deadline, job
        await asyncio.sleep(0.1)
        job = await job_row(db, job_id)

    assert job.status == "completed", job
    assert (job.total_requested, job.processed_count, job.deleted_count) == (
        CRASH_CONTACTS,
        CRASH_CONTACTS,
        CRASH_CONTACTS,
    )
    once = {str(i): 1 for i in matches}
    async with db.read() as conn:
        items = (
            await conn.execute(
                sa.select(deletion_job_items.c.contact_id, sa.func.count())
                .where(deletion_job_items.c.job_id == job_id)
                .group_by(deletion_job_items.c.contact_id)
            )
        ).all()
        audited = (
            await conn.execute(
                sa.select(audit_events.c.target_id, sa.func.count())
                .where(
                    audit_events.c.workspace_id == workspace_id,
                    audit_events.c.action == "contact.deleted",
                )
                .group_by(audit_events.c.target_id)
            )
        ).all()
        announced = (
            await conn.execute(
                sa.select(outbox.c.key, sa.func.count())
                .where(
                    outbox.c.topic == crash_settings.topic(TOPIC_CONTACT_DELETED),
                    outbox.c.key.in_([str(i) for i in matches]),
                )
                .group_by(outbox.c.key)
            )
        ).all()
    assert {str(c): n for c, n in items} == once
    assert {str(t): n for t, n in audited} == once
    assert {str(k): n for k, n in announced} == once
    events = [e async for e in stream_events(db, workspace_id)]
    chain = verify_events(events, workspace_id=str(workspace_id))
    assert chain.ok, chain


# --- what a huge job costs to look at -----------------------------------------------------------


@pytest.mark.parametrize("status", [ItemStatus.NOT_FOUND, ItemStatus.FAILED])
async def test_the_job_object_lists_read_only_the_items_with_that_outcome(
    db: Database, status: ItemStatus
) -> None:
    """A GET of a job lists its not_found refs and errors through a partial index that
    holds only those items, not by reading all of a million-item job's items."""
    sent: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        sent.append((args[2], args[3]))  # the statement and parameters the driver gets

    async with db.read() as conn:
        if not db.is_sqlite:
            # Whether the index can serve the statement as sent, in a plan that does not
            # know its parameters, whatever the table's size today.
            await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            await conn.exec_driver_sql("SET enable_seqscan = off")
        sa.event.listen(conn.sync_connection, "before_cursor_execute", capture)
        await conn.execute(outcome_list(uuid.uuid4(), status))
        sa.event.remove(conn.sync_connection, "before_cursor_execute", capture)
        statement, parameters = sent[-1]
        if db.is_sqlite:
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)).all()
        else:
            # A prepared statement's generic plan, as a long-lived connection ends up using.
            name = f"outcome_{uuid.uuid4().hex}"
            await conn.exec_driver_sql(f"PREPARE {name} AS {statement}")
            values = ", ".join(str(p) if isinstance(p, int) else f"'{p}'" for p in parameters)
            rows = (await conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({values})")).all()
    plan = " ".join(str(r[-1]) for r in rows)
    assert f"ix_deletion_job_items_{status.value}" in plan, plan


async def test_a_job_that_grows_large_is_known_to_the_planner_by_its_size(
    db_url: str, db: Database
) -> None:
    """The worker finds a batch's items by (job_id, ref). Planned with statistics from when a
    job had few items, PostgreSQL scanned the job's whole (job_id, position) range for each
    batch instead of probing the primary key (137 ms per 500-contact batch at 100,000 items,
    measured): expansion refreshes the statistics once a job reaches ANALYZE_FROM_ITEMS
    items, so the planner estimates the job's size. SQLite looks the items up by the
    primary key's own index."""
    count = ANALYZE_FROM_ITEMS + 10
    settings = make_settings(db_url, expand_page_size=count, expand_ahead_max=count)
    workspace_id, matches = await seed(db, count, "Planned")
    job_id = await filter_job(db, settings, workspace_id, "Planned")
    worker = DeletionWorker(settings, db, Metrics())
    worker.hash_key = await load_hash_key(db, None)
    await worker.process([JobExpand(job_id=job_id, workspace_id=workspace_id)])
    assert (await job_row(db, job_id)).total_requested == count

    async with db.read() as conn:
        if db.is_sqlite:
            refs = sorted(str(m) for m in matches)[:500]
            statement = str(
                pending_items_statement([job_id], refs).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}
                )
            )
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement)).all()
            plan = " ".join(str(r[-1]) for r in rows)
            assert "sqlite_autoindex_deletion_job_items_1" in plan, plan
            return
        rows = (
            await conn.exec_driver_sql(
                f"EXPLAIN SELECT * FROM deletion_job_items WHERE job_id = '{job_id}'"
            )
        ).all()
    estimate = int(str(rows[0][0]).split(" rows=")[1].split(" ")[0])
    assert estimate >= count // 2, rows[0][0]
