"""One outbox row the broker will never accept does not stall the relay (GUIDE "Errors mean
something"; service.relay).

Real broker, both databases. The deletion topic is created with a small
``max.message.bytes`` and the relay's producer has a lowered ``max_request_size``, so a
padded row is refused by the broker or by the producer itself; a row whose stored headers
cannot be read is refused before sending. The rows around them are published in id order,
the refused ones are set aside with their reason and never retried, their job items fail
with ``FAILED_DELETE_CONTACT`` (and an audit event), their jobs complete, and the relay
carries on.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import InvalidTopicError

from service.app import Services
from service.config import Settings
from service.db import outbox, utcnow
from service.events import TOPIC_DELETION_REQUESTED
from service.kafka import OutMessage, Producer, read_topics
from service.metrics import Metrics
from service.outbox import encoded_outbox_row
from service.relay import Relay
from service.topics import create_topics
from tests.conftest import Tenant, components_running, make_settings
from tests.logcapture import json_logs

TOPIC_LIMIT = 16 * 1024  # the deletion topic's max.message.bytes
PRODUCER_LIMIT = 32 * 1024  # the relay's max_request_size
BOUND_S = 60


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """One partition, so that the order of everything published can be read back."""
    return make_settings(
        db_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=1,
        relay_max_request_size=PRODUCER_LIMIT,
    )


async def _topics(settings: Settings) -> str:
    """The topics, the deletion topic with a small max.message.bytes; returns its name."""
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": str(TOPIC_LIMIT)})]
        )
    finally:
        await admin.close()
    await create_topics(settings)  # the others; an existing topic is left as it is
    return topic


async def _contacts(tenant: Tenant, count: int) -> list[str]:
    ids = []
    for n in range(count):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": f"p{n}-{uuid.uuid4().hex[:6]}@example.com"}
        )
        assert status == 201, body
        ids.append(body["data"]["id"])
    return ids


async def _job(tenant: Tenant, selector: dict[str, Any]) -> str:
    status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", selector)
    assert status == 202, body
    return str(body["data"]["job_id"])


async def _rows(services: Services, job_id: str) -> list[Any]:
    """The job's outbox rows, in id order (its payloads name the job)."""
    async with services.db.read() as conn:
        rows = (await conn.execute(sa.select(outbox).order_by(outbox.c.id))).all()
    return [r for r in rows if job_id.encode() in bytes(r.payload)]


async def _update(services: Services, row_id: int, **values: Any) -> None:
    async with services.db.begin() as conn:
        await conn.execute(outbox.update().where(outbox.c.id == row_id).values(**values))


def _padded(payload: bytes, size: int) -> bytes:
    """The same CloudEvent with an extension attribute that makes it ``size`` bytes long."""
    event = json.loads(payload)
    event["padding"] = ""
    event["padding"] = "x" * (size - len(json.dumps(event).encode()))
    return json.dumps(event).encode()


async def _finished(tenant: Tenant, job_id: str) -> dict[str, Any]:
    """The job once it completed (the bound is there so a wedged relay fails the test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while True:
        status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
        assert status == 200, body
        job: dict[str, Any] = body["data"]
        if job["completed_at"] is not None or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert job["completed_at"] is not None, job
    return job


async def _failed_audit(tenant: Tenant, job_id: str) -> set[str]:
    status, body, _ = await tenant.call(
        "GET", f"/v1/audit/events?job_id={job_id}&action=contact.deletion_failed"
    )
    assert status == 200, body
    return {e["target"]["id"] for e in body["data"]}


async def test_rows_too_large_are_set_aside_the_rest_go_out_in_order_and_the_job_completes(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    topic = await _topics(settings)
    ids = await _contacts(tenant, 6)
    job_id = await _job(tenant, {"contact_ids": ids})
    rows = await _rows(services, job_id)
    assert len(rows) == 6
    # Between good rows: one the broker refuses (over the topic's limit, under the
    # producer's) and one the producer refuses before sending (over max_request_size).
    by_broker, by_producer = rows[1], rows[4]
    await _update(services, by_broker.id, payload=_padded(by_broker.payload, TOPIC_LIMIT + 2048))
    await _update(
        services, by_producer.id, payload=_padded(by_producer.payload, PRODUCER_LIMIT + 2048)
    )
    refused_contacts = {
        json.loads(r.payload)["data"]["contact_id"] for r in (by_broker, by_producer)
    }

    async with components_running(services, "relay", "worker"):
        job = await _finished(tenant, job_id)
        assert job["status"] == "completed_with_errors"
        assert (job["deleted_count"], job["failed_count"], job["processed_count"]) == (4, 2, 6)
        assert {e["contact_id"] for e in job["errors"]} == refused_contacts
        assert {e["code"] for e in job["errors"]} == {"FAILED_DELETE_CONTACT"}
        assert all("MessageSizeTooLargeError" in e["message"] for e in job["errors"])
        assert await _failed_audit(tenant, job_id) == refused_contacts

        # The relay goes on: a later job goes through at once.
        later = await _job(tenant, {"contact_ids": await _contacts(tenant, 2)})
        assert (await _finished(tenant, later))["status"] == "completed"

    good = [r for r in rows if r.id not in (by_broker.id, by_producer.id)]
    after = {r.id: r for r in await _rows(services, job_id)}
    for row in good:
        assert after[row.id].published_at is not None and after[row.id].failed_at is None
    for row in (by_broker, by_producer):
        assert after[row.id].published_at is None and after[row.id].failed_at is not None
        assert "MessageSizeTooLargeError" in after[row.id].error

    # On the one partition: the good rows once each, in id order; the refused ones never.
    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    mine = [v for v in sent if job_id.encode() in v]
    assert mine == [bytes(r.payload) for r in good]


async def test_unreadable_rows_are_set_aside_their_items_and_jobs_fail_and_the_rest_go_out(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    topic = await _topics(settings)
    ids = await _contacts(tenant, 3)
    job_id = await _job(tenant, {"contact_ids": ids})
    rows = await _rows(services, job_id)
    # Stored headers that are not [name, value] pairs: the payload still names the item.
    await _update(services, rows[1].id, headers=[1])
    refused_contact = json.loads(rows[1].payload)["data"]["contact_id"]
    # A filter job's expansion row, unreadable too: the job fails.
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts", {"email": "poisoned@example.com", "last_name": "Poisoned"}
    )
    assert status == 201, body
    expanding = await _job(tenant, {"filter": {"last_name": "Poisoned"}})
    (expansion,) = await _rows(services, expanding)
    await _update(services, expansion.id, headers={"not": "pairs"})
    # A row whose payload is not even an event: it names no job, it is only set aside.
    async with services.db.begin() as conn:
        garbage = (
            await conn.execute(
                outbox.insert()
                .values(
                    topic=topic,
                    key="k",
                    payload=b"\xff not json",
                    headers=[["a"]],
                    created_at=utcnow(),
                )
                .returning(outbox.c.id)
            )
        ).scalar_one()

    async with components_running(services, "relay", "worker"):
        job = await _finished(tenant, job_id)
        assert (job["deleted_count"], job["failed_count"]) == (2, 1)
        assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
            (refused_contact, "FAILED_DELETE_CONTACT")
        ]
        assert "unreadable outbox row (TypeError)" in job["errors"][0]["message"]
        assert await _failed_audit(tenant, job_id) == {refused_contact}
        failed_job = await _finished(tenant, expanding)
        assert failed_job["status"] == "failed"
        assert failed_job["failure"]["code"] == "FAILED_DELETE_CONTACT"
        assert "unreadable outbox row (ValueError)" in failed_job["failure"]["message"]

    async with services.db.read() as conn:
        result = await conn.execute(
            sa.select(outbox.c.id, outbox.c.failed_at, outbox.c.error).where(
                outbox.c.id.in_([rows[1].id, expansion.id, garbage])
            )
        )
        set_aside = {r.id: r for r in result}
    assert all(r.failed_at is not None for r in set_aside.values())
    assert "unreadable outbox row (TypeError)" in set_aside[rows[1].id].error
    assert "unreadable outbox row (ValueError)" in set_aside[garbage].error

    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    assert [v for v in sent if job_id.encode() in v] == [
        bytes(rows[0].payload),
        bytes(rows[2].payload),
    ]
    assert b"\xff not json" not in sent


async def test_a_refused_record_among_several_record_batches_of_one_partition(
    services: Services, settings: Settings
) -> None:
    """Small record batches (one row each), so that the batches behind the refused one on
    its partition are refused too, as out of order (the producer's sequence numbers ran
    ahead of the broker's): that is the refused record's doing, not an outage, so the pass
    neither loops nor waits; the good rows go out (first copies in id order), once marked."""
    topic = await _topics(settings)
    rows = [
        encoded_outbox_row(topic, "one-key", "x", f"{n:04d}".encode() * 150)._asdict()
        for n in range(10)
    ]
    rows[4]["payload"] = b"y" * (TOPIC_LIMIT + 2048)
    async with services.db.begin() as conn:
        ids = list((await conn.execute(outbox.insert().returning(outbox.c.id), rows)).scalars())
    producer = Producer(settings.kafka_bootstrap_servers, max_batch_size=1024, report_refusals=True)
    await producer.start()
    metrics = Metrics()
    try:
        relay = Relay(settings, services.db, producer, metrics)
        assert await relay.publish_once() == 10
        assert (relay.published, relay.rejected) == (9, 1)
        assert await relay.publish_once() == 0
    finally:
        await producer.stop()
    labels = {"event_type": "unknown", "effect": "none"}
    assert metrics.registry.get_sample_value("outbox_rejected_total", labels) == 1

    async with services.db.read() as conn:
        result = await conn.execute(
            sa.select(outbox.c.id, outbox.c.published_at, outbox.c.error).order_by(outbox.c.id)
        )
        stored = {r.id: r for r in result}
    assert [stored[i].published_at is not None for i in ids] == [n != 4 for n in range(10)]
    assert stored[ids[4]].error == "the broker refused the record (MessageSizeTooLargeError)"

    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    good = [bytes(r["payload"]) for n, r in enumerate(rows) if n != 4]
    assert list(dict.fromkeys(sent)) == good


async def test_rows_for_an_illegal_topic_are_set_aside_instead_of_waiting_for_it(
    services: Services, settings: Settings
) -> None:
    """A topic name Kafka cannot have (an unreadable row's, say): aiokafka would wait for
    its metadata and time out, which reads as an outage, so the relay would retry that
    pass forever; it is refused before sending (InvalidTopicError) and set aside."""
    topic = await _topics(settings)
    illegal = ["bad topic!", "", "..", "a/b"]  # (the column holds 200 characters)
    rows = [encoded_outbox_row(topic, "k", "x", b"good-%d" % n)._asdict() for n in range(3)]
    rows[1:1] = [encoded_outbox_row(t, "k", "x", b"illegal")._asdict() for t in illegal]
    async with services.db.begin() as conn:
        # The pass below counts every waiting row: rows earlier tests on this database left
        # unpublished (which tests ran before depends on the order, e.g. under xdist) are
        # not this test's.
        await conn.execute(
            outbox.update()
            .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))
            .values(published_at=utcnow())
        )
        ids = list((await conn.execute(outbox.insert().returning(outbox.c.id), rows)).scalars())
    producer = Producer(settings.kafka_bootstrap_servers, report_refusals=True)
    await producer.start()
    try:
        relay = Relay(settings, services.db, producer, Metrics())
        assert await asyncio.wait_for(relay.publish_once(), timeout=20) == len(rows)
        assert (relay.published, relay.rejected) == (3, len(illegal))
        # Longer than the outbox column holds, but Kafka's limit is 249 characters.
        with pytest.raises(InvalidTopicError):
            await asyncio.wait_for(
                producer.send_many([OutMessage("x" * 250, b"k", b"v")], report_refusals=True),
                timeout=20,
            )
    finally:
        await producer.stop()

    async with services.db.read() as conn:
        result = await conn.execute(
            sa.select(outbox.c.id, outbox.c.published_at, outbox.c.error).order_by(outbox.c.id)
        )
        stored = {r.id: r for r in result}
    for row_id in ids[1 : 1 + len(illegal)]:
        assert stored[row_id].published_at is None
        assert stored[row_id].error == "the broker refused the record (InvalidTopicError)"
    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    assert sent == [b"good-0", b"good-1", b"good-2"]


async def test_an_expansion_row_whose_payload_cannot_be_read_fails_its_job_by_its_key(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A refused expansion row whose payload (which names the job) cannot be read: its key
    (the job's id) and headers (its type) are enough, so the job fails instead of waiting
    forever for an expansion that never comes."""
    await _topics(settings)
    await _contacts(tenant, 1)  # not matched: a filter may not match every contact
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts", {"email": "unread@example.com", "last_name": "Unread"}
    )
    assert status == 201, body
    expanding = await _job(tenant, {"filter": {"last_name": "Unread"}})
    (expansion,) = await _rows(services, expanding)
    # Unreadable, and too large for the topic: refused (a readable row of that size would
    # fail its job through its payload, as in the first test).
    await _update(services, expansion.id, payload=b"\xff not json" * (2 * TOPIC_LIMIT // 10))

    async with components_running(services, "relay", "worker"):
        job = await _finished(tenant, expanding)
    assert job["status"] == "failed"
    assert "the broker refused the record (MessageSizeTooLargeError)" in job["failure"]["message"]


async def test_an_unreadable_deletion_request_row_fails_its_item_by_its_job_header(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A refused deletion-request row whose payload (which names its job item) cannot be
    read: its key is the contact's id, which may be an item of several jobs, but its
    ``job-id`` header names the job, so that item fails and the job completes; the same
    contact's item in another job is left to its own row."""
    await _topics(settings)
    ids = await _contacts(tenant, 2)
    job_id = await _job(tenant, {"contact_ids": ids})
    other = await _job(tenant, {"contact_ids": ids[:1]})  # the same contact, another job
    rows = await _rows(services, job_id)
    assert dict(rows[0].headers)["job-id"] == job_id
    # Unreadable, and too large for the topic: refused.
    await _update(services, rows[0].id, payload=b"\xff not json" * (2 * TOPIC_LIMIT // 10))

    async with components_running(services, "relay", "worker"):
        job = await _finished(tenant, job_id)
        assert (job["deleted_count"], job["failed_count"]) == (1, 1)
        assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
            (ids[0], "FAILED_DELETE_CONTACT")
        ]
        assert "MessageSizeTooLargeError" in job["errors"][0]["message"]
        assert await _failed_audit(tenant, job_id) == {ids[0]}
        # The other job's item of that contact was not touched by it: it is processed
        # by its own message (the contact is gone by then: not found, or deleted first).
        later = await _finished(tenant, other)
        assert later["failed_count"] == 0, later


_DEEP = "[" * 5000 + "]" * 5000  # valid JSON that Python's json module cannot read


def _state(row_id: int) -> sa.Select[Any]:
    """A row's outcome columns (not its headers, which the test's reader cannot read)."""
    c = outbox.c
    return sa.select(c.published_at, c.failed_at, c.error).where(c.id == row_id)


_POISONED: list[int] = []


@pytest.fixture(autouse=True)
async def _unpoison(services: Services) -> AsyncIterator[None]:
    """The database outlives the test: give back readable headers to the rows it poisoned,
    or every later test that reads whole outbox rows (or runs a relay) meets them."""
    yield
    if _POISONED:
        async with services.db.begin() as conn:
            await conn.execute(
                outbox.update().where(outbox.c.id.in_(list(_POISONED))).values(headers=[])
            )
        _POISONED.clear()


async def _deep_headers(services: Services, row_id: int) -> None:
    """Give a row stored headers that crash their reader (RecursionError, not a
    ValueError): written as JSON text, since json.dumps cannot write them either."""
    cast = ":h" if services.db.is_sqlite else "CAST(:h AS jsonb)"
    _POISONED.append(row_id)
    async with services.db.begin() as conn:
        await conn.execute(
            sa.text(f"UPDATE outbox SET headers = {cast} WHERE id = :id"),
            {"h": _DEEP, "id": row_id},
        )


async def test_a_row_that_crashes_the_pass_is_set_aside_alone_and_its_item_fails(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A permanent error that is neither an outage nor a broker's refusal (here a row whose
    stored headers crash their reading) used to fail every pass, retried at the slowest
    pace forever (``relay_batch_failed``): the relay published nothing more. Now the batch
    goes row by row; the row that fails alone is set aside with its error, its item fails,
    the job completes, and the rows around it go out."""
    topic = await _topics(settings)
    ids = await _contacts(tenant, 3)
    job_id = await _job(tenant, {"contact_ids": ids})
    rows = await _rows(services, job_id)
    await _deep_headers(services, rows[1].id)
    bad_contact = json.loads(rows[1].payload)["data"]["contact_id"]

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            job = await _finished(tenant, job_id)
            later = await _job(tenant, {"contact_ids": await _contacts(tenant, 1)})
            assert (await _finished(tenant, later))["status"] == "completed"
    assert (job["deleted_count"], job["failed_count"]) == (2, 1)
    assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
        (bad_contact, "FAILED_DELETE_CONTACT")
    ]
    assert "RecursionError" in job["errors"][0]["message"]
    assert await _failed_audit(tenant, job_id) == {bad_contact}
    assert lines.events("relay_refusing") == []
    [rejected] = lines.events("outbox_row_rejected")
    assert (rejected["row_id"], rejected["effect"]) == (rows[1].id, "item_failed")

    async with services.db.read() as conn:
        stored = (await conn.execute(_state(rows[1].id))).one()
    assert stored.published_at is None and stored.failed_at is not None
    assert stored.error == "an unexpected error (RecursionError)"
    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    assert [v for v in sent if job_id.encode() in v] == [
        bytes(rows[0].payload),
        bytes(rows[2].payload),
    ]


async def test_a_pass_that_fails_for_every_row_is_refused_not_set_aside(
    services: Services, settings: Settings
) -> None:
    """When no row goes through alone, the fault is not shown to be a row's: setting rows
    aside could set every row aside, so the relay refuses to go on (an error line, not an
    outage's warning) and keeps the row; once another row goes through, the one that
    still fails alone is set aside."""
    topic = await _topics(settings)
    bad = encoded_outbox_row(topic, "k", "x", b"bad")._asdict()
    async with services.db.begin() as conn:
        bad_id = (await conn.execute(outbox.insert().values(bad).returning(outbox.c.id))).scalar()
    assert bad_id is not None
    await _deep_headers(services, bad_id)
    slept: list[float] = []

    async def briefly(delay: float, stop: asyncio.Event) -> None:
        slept.append(delay)
        await asyncio.sleep(0.05)

    producer = Producer(settings.kafka_bootstrap_servers, report_refusals=True)
    await producer.start()
    relay = Relay(settings, services.db, producer, Metrics(), sleep=briefly)
    stop = asyncio.Event()
    try:
        with json_logs() as lines:
            running = asyncio.create_task(relay.run(stop))
            async with asyncio.timeout(BOUND_S):
                while not lines.events("relay_refusing"):
                    await asyncio.sleep(0.05)
                refusing = lines.events("relay_refusing")[0]
                assert refusing["level"] == "error"
                assert "RecursionError" in refusing["error"]
                assert slept and min(slept) >= settings.retry_max_backoff_s / 2  # slowest pace
                assert relay.rejected == 0
                async with services.db.begin() as conn:
                    row = encoded_outbox_row(topic, "k", "x", b"good")._asdict()
                    await conn.execute(outbox.insert().values(row))
                relay.wakeup.set()
                while relay.rejected == 0:
                    await asyncio.sleep(0.05)
            stop.set()
            await running
    finally:
        stop.set()
        await producer.stop()
    assert lines.events("relay_retrying") == []  # never taken for an outage
    async with services.db.read() as conn:
        stored = (await conn.execute(_state(bad_id))).one()
    assert stored.failed_at is not None and stored.published_at is None
    sent = [m.value async for m in read_topics(settings.kafka_bootstrap_servers, [topic])]
    assert sent == [b"good"]
