"""How the deletion worker treats each kind of error (DESIGN §1, STYLE "error kinds").

A malformed message is dead-lettered with its reason and committed, and the worker carries
on; a transient database error is retried until it clears, never skipped; a failure that
is permanent (service.faults) fails that contact's item at once, with its code, message and
audit event, while the rest of its batch (and other jobs, other workspaces) goes through.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from asyncpg.exceptions import CannotConnectNowError

from service.app import Services
from service.audit.chain import verify_events
from service.audit.store import load_hash_key, stream_events
from service.config import Settings
from service.db import contacts, deletion_jobs, outbox
from service.deletion.worker import BatchResult, DeletionWorker
from service.events import DLQ_SUFFIX, TOPIC_DELETION_REQUESTED, DeletionRequested, JobExpand
from service.kafka import Consumer, InMessage, OutMessage, Producer
from service.metrics import Metrics
from service.topics import create_topics
from tests.components import contact_deleted_event
from tests.conftest import Tenant, make_settings
from tests.real_errors import sqlite_busy, sqlite_too_many_variables, wrapped

Command = DeletionRequested | JobExpand


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """The real broker with one partition, so a message is read only after those before it."""
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap, kafka_partitions=1)


async def make_contacts(tenant: Tenant, count: int) -> list[str]:
    ids = []
    for n in range(count):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": f"w{n}-{uuid.uuid4().hex[:6]}@example.com"}
        )
        assert status == 201, body
        ids.append(body["data"]["id"])
    return ids


async def contact_exists(services: Services, contact_id: str) -> bool:
    async with services.db.read() as conn:
        row = (
            await conn.execute(
                sa.select(contacts.c.id).where(contacts.c.id == uuid.UUID(contact_id))
            )
        ).first()
    return row is not None


# -- malformed messages ----------------------------------------------------------------


async def read_all(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[InMessage]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    got: list[InMessage] = []
    while len(got) < count and loop.time() < deadline:
        got += await consumer.getmany(timeout_ms=500, max_records=100)
    return got


async def test_malformed_messages_are_dead_lettered_and_the_worker_carries_on(
    tenant: Tenant, pipeline: Services, settings: Settings
) -> None:
    """Garbage and unknown event types land on <topic>.dlq with a reason; later work is done."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    unknown_type = json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/somewhere-else",
            "type": "contact.teleported",
            "time": "2024-01-01T00:00:00Z",
            "data": {"contact_id": str(uuid.uuid4())},
        }
    ).encode()
    # A known type whose data is wrong, quoting an address: the reason must not repeat it
    # (it goes into the dead-letter header and the worker's log line).
    leaky = json.loads(unknown_type) | {"type": "contact.deletion_requested"}
    leaky["data"] = {"contact_id": "ann@x.io", "ref": "ann@x.io"}
    poison = {
        b"garbage": b"\x00\xff not json at all \xfe",
        b"unknown-type": unknown_type,
        b"leaky": json.dumps(leaky).encode(),
    }
    producer = Producer(settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_many(
            [
                OutMessage(topic=topic, key=k, value=v, headers=(("x-test", b"1"),))
                for k, v in poison.items()
            ]
        )
    finally:
        await producer.stop()

    # Behind the poison on the one partition: a real job, which must still complete.
    ids = await make_contacts(tenant, 3)
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": ids}, {"Prefer": "wait=30"}
    )
    assert status == 200, body
    assert body["data"]["status"] == "completed"
    assert body["data"]["deleted_count"] == 3

    consumer = Consumer(
        settings.kafka_bootstrap_servers,
        [topic + DLQ_SUFFIX],
        f"{settings.kafka_consumer_group_prefix}.dlq-reader",
    )
    await consumer.start()
    try:
        dead = await read_all(consumer, len(poison))
    finally:
        await consumer.stop()
    assert {m.key: m.value for m in dead} == poison
    for message in dead:
        headers = dict(message.headers)
        assert headers["x-test"] == b"1"  # the original headers travel along
        assert headers["dlq-reason"], message
        assert headers["dlq-source"].startswith(f"{topic}/0/".encode())
    reasons = {m.key: dict(m.headers)["dlq-reason"].decode() for m in dead}
    assert "malformed" in reasons[b"garbage"]
    assert "contact.teleported" in reasons[b"unknown-type"]
    assert "data.contact_id: uuid_parsing" in reasons[b"leaky"]
    assert "ann@x.io" not in reasons[b"leaky"]


# -- retries ---------------------------------------------------------------------------


async def worker_and_messages(
    services: Services, tenant: Tenant, ids: list[str]
) -> tuple[DeletionWorker, list[InMessage], str]:
    """A worker, and the messages the relay would deliver for a bulk delete of `ids`."""
    status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", {"contact_ids": ids})
    assert status == 202, body
    topic = services.settings.topic(TOPIC_DELETION_REQUESTED)
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(outbox.c.key, outbox.c.payload)
                .where(outbox.c.topic == topic, outbox.c.key.in_(ids))
                .order_by(outbox.c.id)
            )
        ).all()
    assert len(rows) == len(ids)
    messages = [
        InMessage(
            topic=topic,
            partition=0,
            offset=n,
            key=row.key.encode(),
            value=bytes(row.payload),
            headers=(),
        )
        for n, row in enumerate(rows)
    ]
    worker = DeletionWorker(services.settings, services.db, Metrics())
    worker.hash_key = await load_hash_key(services.db, None)
    return worker, messages, body["data"]["job_id"]


def unused_producer(settings: Settings) -> Producer:
    """The dead-letter producer: never started, since these batches hold no poison."""
    return Producer(settings.kafka_bootstrap_servers)


async def test_transient_database_error_is_retried_until_it_clears(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite busy is retried with back-off; the batch is then done, nothing skipped."""
    ids = await make_contacts(tenant, 2)
    worker, messages, job_id = await worker_and_messages(services, tenant, ids)
    real_process = worker.process
    calls = 0

    async def flaky(commands: Sequence[Command]) -> BatchResult:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise wrapped(sqlite_busy(), "DELETE FROM contacts")
        return await real_process(commands)

    monkeypatch.setattr(worker, "process", flaky)
    done = await worker.handle(messages, unused_producer(services.settings), asyncio.Event())

    assert done is True
    assert calls == 3
    for contact_id in ids:
        assert not await contact_exists(services, contact_id)
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200
    assert body["data"]["status"] == "completed"
    assert body["data"]["deleted_count"] == 2
    assert body["data"]["failed_count"] == 0


async def test_transient_error_at_shutdown_leaves_the_batch_uncommitted(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that stays down is never given up on: on stop, handle says "not done"."""
    ids = await make_contacts(tenant, 2)
    worker, messages, job_id = await worker_and_messages(services, tenant, ids)

    async def down(commands: Sequence[Command]) -> BatchResult:
        raise wrapped(CannotConnectNowError("the database system is shutting down"))

    monkeypatch.setattr(worker, "process", down)
    monkeypatch.setattr(worker, "give_up", down)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    done = await asyncio.wait_for(
        worker.handle(messages, unused_producer(services.settings), stop), timeout=10
    )

    assert done is False  # so the offsets are not committed and the batch is read again
    for contact_id in ids:
        assert await contact_exists(services, contact_id)
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200
    assert body["data"]["processed_count"] == 0
    assert body["data"]["failed_count"] == 0


async def test_persistent_failure_fails_only_its_own_item(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contact that keeps failing ends FAILED_DELETE_CONTACT; its batch-mates are deleted."""
    ids = await make_contacts(tenant, 4)
    bad = uuid.UUID(ids[1])
    worker, messages, job_id = await worker_and_messages(services, tenant, ids)
    real_process = worker.process
    attempts: list[int] = []

    async def breaks_on_bad(commands: Sequence[Command]) -> BatchResult:
        attempts.append(len(commands))
        if any(isinstance(c, DeletionRequested) and c.contact_id == bad for c in commands):
            raise RuntimeError("this contact cannot be deleted")
        return await real_process(commands)

    monkeypatch.setattr(worker, "process", breaks_on_bad)
    done = await asyncio.wait_for(
        worker.handle(messages, unused_producer(services.settings), asyncio.Event()), timeout=30
    )

    assert done is True
    # Bounded: a few tries of the batch, then each command alone, a few tries for the bad one.
    assert len(attempts) <= 20, attempts
    assert await contact_exists(services, str(bad))
    for contact_id in ids:
        if contact_id != str(bad):
            assert not await contact_exists(services, contact_id)

    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200
    job: dict[str, Any] = body["data"]
    assert job["status"] == "completed_with_errors", job
    assert (job["processed_count"], job["deleted_count"], job["failed_count"]) == (4, 3, 1)
    assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
        (str(bad), "FAILED_DELETE_CONTACT")
    ]
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}/items?status=failed")
    assert status == 200
    assert [i["ref"] for i in body["data"]] == [str(bad)]
    assert body["data"][0]["error_code"] == "FAILED_DELETE_CONTACT"

    # The failure is in the audit trail too, in a chain that still verifies.
    events = [e async for e in stream_events(services.db, tenant.workspace_id)]
    failed = [e for e in events if e["action"] == "contact.deletion_failed"]
    assert [(e["target"]["id"], e["data"]["code"]) for e in failed] == [
        (str(bad), "FAILED_DELETE_CONTACT")
    ]
    assert sum(e["action"] == "contact.deleted" for e in events) == 3
    assert verify_events(events, workspace_id=str(tenant.workspace_id)).ok


async def test_a_statement_the_database_refuses_fails_its_item_with_a_message_not_a_retry(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "too many SQL variables" is permanent: one item fails at once, nothing waits on it."""
    ids = await make_contacts(tenant, 3)
    bad = uuid.UUID(ids[0])
    worker, messages, job_id = await worker_and_messages(services, tenant, ids)
    real_process = worker.process
    sleeps: list[float] = []

    async def no_sleep(delay: float, stop: asyncio.Event) -> None:
        sleeps.append(delay)

    async def refused_for_bad(commands: Sequence[Command]) -> BatchResult:
        if any(isinstance(c, DeletionRequested) and c.contact_id == bad for c in commands):
            raise wrapped(sqlite_too_many_variables(), "DELETE FROM contacts WHERE id IN (...)")
        return await real_process(commands)

    worker.sleep = no_sleep
    monkeypatch.setattr(worker, "process", refused_for_bad)
    done = await asyncio.wait_for(
        worker.handle(messages, unused_producer(services.settings), asyncio.Event()), timeout=30
    )

    assert done is True
    assert sleeps == []  # permanent: never backed off, never retried
    _, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    job: dict[str, Any] = body["data"]
    assert (job["status"], job["deleted_count"], job["failed_count"]) == (
        "completed_with_errors",
        2,
        1,
    )
    [error] = job["errors"]
    assert error["code"] == "FAILED_DELETE_CONTACT"
    assert "too many SQL variables" in error["message"]
    events = [e async for e in stream_events(services.db, tenant.workspace_id)]
    failed = [e for e in events if e["action"] == "contact.deletion_failed"]
    assert [e["target"]["id"] for e in failed] == [str(bad)]
    assert "too many SQL variables" in failed[0]["data"]["message"]


async def test_transient_errors_back_off_exponentially_with_jitter_and_a_cap(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wait grows (jittered within [d/2, d]) up to the cap; no item is ever failed."""
    ids = await make_contacts(tenant, 1)
    worker, messages, job_id = await worker_and_messages(services, tenant, ids)
    real_process = worker.process
    sleeps: list[float] = []

    async def record(delay: float, stop: asyncio.Event) -> None:
        sleeps.append(delay)

    async def down_for_a_while(commands: Sequence[Command]) -> BatchResult:
        if len(sleeps) < 12:
            raise wrapped(CannotConnectNowError("the database system is starting up"))
        return await real_process(commands)

    worker.sleep = record
    monkeypatch.setattr(worker, "process", down_for_a_while)
    assert await worker.handle(messages, unused_producer(services.settings), asyncio.Event())

    cap = services.settings.retry_max_backoff_s
    assert len(sleeps) == 12
    for n, delay in enumerate(sleeps):
        ceiling = min(cap, 0.1 * 2**n)
        assert ceiling / 2 <= delay <= ceiling, (n, delay)
    assert max(sleeps) <= cap
    _, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert (body["data"]["status"], body["data"]["failed_count"]) == ("completed", 0)


async def test_an_expansion_that_cannot_run_fails_its_job_and_not_another_workspace(
    services: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    """A filter job whose selection cannot run (over the bound-value limit, which the worker
    enforces again, before the database would refuse it) ends `failed` with its code and an
    audit event; another workspace's job in the same batch completes."""
    from service.deletion.models import BulkDeleteRequest
    from service.deletion.store import Requester, create_job

    # Over both drivers' limits on bound values (this SQLite's, asyncpg's 32767). The HTTP
    # edge refuses such a filter; the worker must still survive one that got through.
    limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    groups = max(limit, 32_767) // 1000 + 1
    huge = {
        "$or": [{"email": {"$in": [f"u{n}-{m}@x.io" for n in range(1000)]}} for m in range(groups)]
    }
    big_job = uuid.uuid4()
    async with services.db.begin() as conn:
        await create_job(
            conn,
            services.db,
            services.settings,
            Requester(tenant.workspace_id, tenant.key_id, "req-huge"),
            BulkDeleteRequest.model_validate({"filter": {"last_name": "Nobody"}}),
            big_job,
        )
        # The stored selector is what the worker expands: make it the one that got through.
        await conn.execute(
            deletion_jobs.update()
            .where(deletion_jobs.c.id == big_job)
            .values(selector={"filter": huge})
        )
    other_ids = await make_contacts(other_tenant, 1)
    worker, small_messages, small_job = await worker_and_messages(services, other_tenant, other_ids)
    topic = services.settings.topic(TOPIC_DELETION_REQUESTED)
    async with services.db.read() as conn:
        payload = (
            await conn.execute(
                sa.select(outbox.c.payload).where(
                    outbox.c.topic == topic, outbox.c.key == str(big_job)
                )
            )
        ).scalar_one()
    expand = InMessage(topic, 0, 99, str(big_job).encode(), bytes(payload), ())

    done = await asyncio.wait_for(
        worker.handle(
            [expand, *small_messages], unused_producer(services.settings), asyncio.Event()
        ),
        timeout=60,
    )

    assert done is True
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{big_job}")
    assert status == 200, body
    assert body["data"]["status"] == "failed"
    assert body["data"]["completed_at"] is not None
    # Why, on the job itself: the same reason as its audit event below.
    failure = body["data"]["failure"]
    assert failure["code"] == "FAILED_DELETE_CONTACT"
    assert failure["message"].startswith("the job's contacts could not be selected")
    assert "binds more than" in failure["message"]
    status, body, _ = await other_tenant.call("GET", f"/v1/bulk-jobs/{small_job}")
    assert (body["data"]["status"], body["data"]["deleted_count"]) == ("completed", 1)
    assert body["data"]["failure"] is None
    events = [e async for e in stream_events(services.db, tenant.workspace_id)]
    [finished] = [e for e in events if e["action"] == "deletion.completed"]
    assert finished["job_id"] == str(big_job)
    assert finished["data"]["status"] == "failed"
    assert finished["data"]["code"] == "FAILED_DELETE_CONTACT"
    assert finished["data"]["message"].startswith("the job's contacts could not be selected")
    assert "binds more than" in finished["data"]["message"]
    assert verify_events(events, workspace_id=str(tenant.workspace_id)).ok


# -- the dispatcher's fan-out meets the same classification ------------------------------


async def test_an_event_the_database_refuses_is_dead_lettered_and_its_batch_mates_delivered(
    services: Services, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permanent error in the dispatcher's fan-out splits the batch: the bad event goes to
    the dead-letter topic with its reason, the good one gets its delivery row."""
    from service.db import webhook_deliveries
    from service.events import (
        TOPIC_CONTACT_DELETED,
    )
    from service.webhooks import dispatcher as dispatcher_module

    status, body, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, body
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    events = [contact_deleted_event(tenant.workspace_id) for _ in range(2)]
    bad, good = events
    messages = [
        InMessage(topic, 0, n, str(e.subject).encode(), e.model_dump_json().encode(), ())
        for n, e in enumerate(events)
    ]
    real_enqueue = dispatcher_module.enqueue_many  # type: ignore[attr-defined]

    async def refuses_bad(conn: Any, db: Any, planned: Any) -> list[dict[str, Any]]:
        if any(p.event_id == bad.id for p in planned):
            raise wrapped(sqlite_too_many_variables(), "INSERT INTO webhook_deliveries ...")
        return await real_enqueue(conn, db, planned)

    monkeypatch.setattr(dispatcher_module, "enqueue_many", refuses_bad)
    dispatcher = dispatcher_module.Dispatcher(settings, services.db, Metrics())
    dlq = Producer(settings.kafka_bootstrap_servers)
    await dlq.start()
    try:
        assert await dispatcher._fan_out_isolating(messages, dlq, asyncio.Event())
    finally:
        await dlq.stop()

    async with services.db.read() as conn:
        delivered = (
            (
                await conn.execute(
                    sa.select(webhook_deliveries.c.event_id).where(
                        webhook_deliveries.c.workspace_id == tenant.workspace_id
                    )
                )
            )
            .scalars()
            .all()
        )
    assert list(delivered) == [good.id]
    consumer = Consumer(
        settings.kafka_bootstrap_servers,
        [topic + DLQ_SUFFIX],
        f"{settings.kafka_consumer_group_prefix}.dlq-reader",
    )
    await consumer.start()
    try:
        [dead] = await read_all(consumer, 1)
    finally:
        await consumer.stop()
    assert dead.key == str(bad.subject).encode()
    assert "too many SQL variables" in dict(dead.headers)["dlq-reason"].decode()
