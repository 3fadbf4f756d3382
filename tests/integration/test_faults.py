"""Fault tests with real processes: a relay or worker SIGKILLed at the worst moment.

Each test seeds a workspace, posts a bulk delete through the in-process API, and runs the
relay and the worker as separate `contact-deletion` processes against the same database
and broker. One of them has a failpoint (see service.failpoints) that kills it with
SIGKILL between a side effect and its bookkeeping; it is then restarted without it. The
outcome must be the same as without the crash: every contact deleted exactly once, one
audit event and one `contact.deleted` outbox row per contact, the job completed with the
right counts, and an audit chain that still verifies.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from service.app import Services
from service.audit.chain import verify_events
from service.audit.store import stream_events
from service.config import Settings
from service.contacts.models import ActivityCreate, ContactCreate, NoteCreate
from service.contacts.store import add_timeline_item, create_contact
from service.db import activities, audit_events, contacts, deletion_job_items, notes, outbox
from service.events import TOPIC_CONTACT_DELETED, TOPIC_DELETION_REQUESTED, TOPIC_JOB_COMPLETED
from tests.components import Components, Process, components
from tests.conftest import Tenant, make_settings, new_tenant

pytestmark = pytest.mark.slow

CONTACTS = 30
BATCH = 10
# Generous bounds: a restarted worker waits out the dead member's session (10 s) before
# the group rebalances and hands it the partition.
DEADLINE_S = 60.0


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """The real broker, one partition (one worker owns all the work), small batches."""
    return make_settings(
        db_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=1,
        worker_batch_size=BATCH,
        # Large enough that the relay's first batch holds every row this test wrote, even
        # with unpublished rows of earlier tests in the shared database before them.
        relay_batch_size=5000,
    )


# -- processes -------------------------------------------------------------------------


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Components]:
    with components(settings, tmp_path) as group:
        yield group


# -- set-up and observations -----------------------------------------------------------


@dataclass
class Seeded:
    tenant: Tenant
    contact_ids: list[uuid.UUID]
    job_id: str


async def seed_and_request(services: Services, api: str, http: aiohttp.ClientSession) -> Seeded:
    """A workspace with contacts (each with an activity and a note) and a posted bulk delete."""
    tenant = await new_tenant(services, api, http)
    ids: list[uuid.UUID] = []
    for n in range(CONTACTS):
        contact = await create_contact(
            services.db, tenant.workspace_id, ContactCreate(email=f"fault{n}@example.com")
        )
        contact_id = uuid.UUID(contact["id"])
        await add_timeline_item(
            services.db, tenant.workspace_id, contact_id, ActivityCreate(subject=f"call {n}")
        )
        await add_timeline_item(
            services.db, tenant.workspace_id, contact_id, NoteCreate(body=f"note {n}")
        )
        ids.append(contact_id)
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": [str(i) for i in ids]}
    )
    assert status == 202, body
    return Seeded(tenant, ids, body["data"]["job_id"])


async def get_job(seeded: Seeded) -> dict[str, Any]:
    status, body, _ = await seeded.tenant.call("GET", f"/v1/bulk-jobs/{seeded.job_id}")
    assert status == 200, body
    job: dict[str, Any] = body["data"]
    return job


async def wait_for_job(seeded: Seeded, running: list[Process]) -> dict[str, Any]:
    """The job once it has finished; fails if it has not within the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        job = await get_job(seeded)
        if job["completed_at"] is not None:
            return job
        for process in running:
            process.assert_running()
        assert loop.time() < deadline, f"job not finished after {DEADLINE_S} s: {job}"
        await asyncio.sleep(0.2)


async def unpublished(services: Services, topic: str) -> int:
    async with services.db.read() as conn:
        count = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(outbox)
                .where(outbox.c.topic == topic, outbox.c.published_at.is_(None))
            )
        ).scalar_one()
    return int(count)


async def topic_progress(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """(messages in the one-partition `topic`, offset committed by `group` on it)."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        end: int = (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    committed = offsets.get(tp)
    return end, committed.offset if committed is not None else 0


async def wait_consumed(settings: Settings, at_least: int, running: list[Process]) -> int:
    """Wait until the worker group has committed past every message of the work topic."""
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    group = f"{settings.kafka_consumer_group_prefix}.worker"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        end, committed = await topic_progress(settings.kafka_bootstrap_servers, topic, group)
        if end >= at_least and committed == end:
            return end
        for process in running:
            process.assert_running()
        assert loop.time() < deadline, f"work topic has {end} messages, {committed} committed"
        await asyncio.sleep(0.3)


async def counts_by(
    services: Services, column: sa.ColumnElement[Any], *where: sa.ColumnElement[bool]
) -> dict[str, int]:
    async with services.db.read() as conn:
        rows = (
            await conn.execute(sa.select(column, sa.func.count()).where(*where).group_by(column))
        ).all()
    return {str(value): int(count) for value, count in rows}


async def assert_deleted_exactly_once(services: Services, seeded: Seeded) -> None:
    """The outcome a crash must not change."""
    settings = services.settings
    workspace = seeded.tenant.workspace_id
    expected = {str(i): 1 for i in seeded.contact_ids}

    job = await get_job(seeded)
    assert job["status"] == "completed", job
    assert job["total_requested"] == CONTACTS
    assert job["processed_count"] == CONTACTS
    assert job["deleted_count"] == CONTACTS
    assert job["not_found_count"] == 0
    assert job["failed_count"] == 0

    audited = await counts_by(
        services,
        audit_events.c.target_id,
        audit_events.c.workspace_id == workspace,
        audit_events.c.action == "contact.deleted",
    )
    assert audited == expected
    announced = await counts_by(
        services, outbox.c.key, outbox.c.topic == settings.topic(TOPIC_CONTACT_DELETED)
    )
    assert announced == expected
    completed = await counts_by(
        services,
        audit_events.c.job_id,
        audit_events.c.workspace_id == workspace,
        audit_events.c.action == "deletion.completed",
    )
    assert completed == {seeded.job_id: 1}
    job_events = await counts_by(
        services, outbox.c.key, outbox.c.topic == settings.topic(TOPIC_JOB_COMPLETED)
    )
    assert job_events == {seeded.job_id: 1}
    items = await counts_by(
        services,
        deletion_job_items.c.status,
        deletion_job_items.c.job_id == uuid.UUID(seeded.job_id),
    )
    assert items == {"deleted": CONTACTS}

    async with services.db.read() as conn:
        left = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(contacts)
                .where(contacts.c.id.in_(seeded.contact_ids))
            )
        ).scalar_one()
        assert left == 0
        for table in (activities, notes):
            kept = (
                await conn.execute(
                    sa.select(table.c.contact_id).where(table.c.workspace_id == workspace)
                )
            ).all()
            assert len(kept) == CONTACTS, table.name
            assert all(r.contact_id is None for r in kept), table.name

    events = [e async for e in stream_events(services.db, workspace)]
    result = verify_events(events, workspace_id=str(workspace))
    assert result.ok, result
    assert result.events_checked == len(events)


# -- the tests -------------------------------------------------------------------------


async def test_worker_killed_between_db_commit_and_offset_commit(
    services: Services, api: str, http: aiohttp.ClientSession, processes: Components
) -> None:
    """A worker crash after its transaction but before its offset commit repeats nothing."""
    seeded = await seed_and_request(services, api, http)
    relay = processes.start("relay")
    doomed = processes.start("worker", failpoint="worker_after_db_commit")

    assert await doomed.wait_exit(DEADLINE_S) == -signal.SIGKILL
    first = await get_job(seeded)
    # The batches under way (up to worker_concurrency of them, each in its own
    # transaction) committed in the database before the crash; their offsets were not.
    assert 0 < first["processed_count"] <= services.settings.worker_concurrency * BATCH, first
    assert first["completed_at"] is None

    worker = processes.start("worker")
    job = await wait_for_job(seeded, [relay, worker])
    assert job["status"] == "completed", job
    # The restarted worker read the crashed batch again (and skipped it) before the rest.
    assert await wait_consumed(services.settings, CONTACTS, [relay, worker]) == CONTACTS
    await assert_deleted_exactly_once(services, seeded)


async def test_relay_killed_between_publish_and_mark(
    services: Services, api: str, http: aiohttp.ClientSession, processes: Components
) -> None:
    """A relay crash after publishing but before marking only duplicates messages."""
    seeded = await seed_and_request(services, api, http)
    work_topic = services.settings.topic(TOPIC_DELETION_REQUESTED)
    worker = processes.start("worker")
    doomed = processes.start("relay", failpoint="relay_after_publish")

    assert await doomed.wait_exit(DEADLINE_S) == -signal.SIGKILL
    # Published, but never marked: the restarted relay sends every one of them again.
    assert await unpublished(services, work_topic) == CONTACTS

    relay = processes.start("relay")
    job = await wait_for_job(seeded, [relay, worker])
    assert job["status"] == "completed", job
    # Every request went out twice, and the worker has consumed (and absorbed) them all.
    assert await wait_consumed(services.settings, 2 * CONTACTS, [relay, worker]) == 2 * CONTACTS
    # The relay marks what it published after the broker acknowledged it: the worker may
    # have consumed the copies before that commit (seen once in a full run under load).
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while await unpublished(services, work_topic):
        assert asyncio.get_running_loop().time() < deadline, "published rows never marked"
        await asyncio.sleep(0.1)
    await assert_deleted_exactly_once(services, seeded)
