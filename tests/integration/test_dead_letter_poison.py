"""A dead-letter copy the broker refuses for good does not wedge a consumer (GUIDE "Errors
mean something"; service.kafka.send_dead_letters), the sibling of the relay's refused rows
(test_relay_poison.py).

Real broker, both databases. Each topic's dead-letter topic is created with a small
``max.message.bytes``, so the copy of a large poison message (a large value, large headers,
a large key) is refused there; a message near the source topic's limit has a copy the
producer itself refuses (its ``max_request_size``), the dead-letter headers pushing it over.
Before, such a copy was retried forever and every later message of its partition waited;
now a stub without the value goes instead (or, when even that is refused, nothing, with an
error line), and the consumer moves on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from service import deadletters
from service.app import Services
from service.audit.store import load_hash_key
from service.config import Settings
from service.db import outbox, webhook_deliveries
from service.deletion import worker as worker_module
from service.deletion.worker import DeletionWorker
from service.events import (
    DLQ_SUFFIX,
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
)
from service.kafka import InMessage, OutMessage, Producer, read_topics
from service.metrics import Metrics
from service.topics import create_topics
from service.webhooks import dispatcher as dispatcher_module
from tests.components import contact_deleted_event
from tests.conftest import Tenant, components_running, make_settings
from tests.logcapture import json_logs
from tests.real_errors import sqlite_too_many_variables, wrapped

DLQ_LIMIT = 8 * 1024  # the dead-letter topics' max.message.bytes
BOUND_S = 30  # a wedged consumer fails the test instead of hanging it
BROKER_LIMIT = 1_048_588  # a topic's default max.message.bytes (the broker's message.max.bytes)


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """One partition, so a message is read only after those before it."""
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap, kafka_partitions=1)


async def _topics(settings: Settings, source: str) -> str:
    """The topics, ``source``'s dead-letter topic with a small max.message.bytes; returns
    the dead-letter topic's name."""
    dlq = settings.topic(source) + DLQ_SUFFIX
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(dlq, 1, 1, topic_configs={"max.message.bytes": str(DLQ_LIMIT)})]
        )
    finally:
        await admin.close()
    await create_topics(settings)  # the others; an existing topic is left as it is
    return dlq


def _near_limit_value(key: bytes) -> bytes:
    """Garbage whose record fits a default topic with under 100 bytes to spare: its
    dead-letter copy (two more headers) is over the producer's max_request_size."""
    size = BROKER_LIMIT - 100
    value = b"\xfe" * size
    while DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, []) > BROKER_LIMIT - 100:
        value = value[:-1]
    return value


async def _dead_letters(settings: Settings, dlq: str) -> dict[bytes | None, Any]:
    """The dead-letter topic's records by key (each key's last copy: a copy may be repeated)."""
    return {m.key: m async for m in read_topics(settings.kafka_bootstrap_servers, [dlq])}


def _assert_stub(stub: Any, source: str, original: bytes, reason: str) -> None:
    headers = dict(stub.headers)
    assert stub.value == b""
    assert set(headers) == {
        "dlq-reason",
        "dlq-source",
        "dlq-refused",
        "dlq-original-size",
        "dlq-original-sha256",
    }
    assert reason in headers["dlq-reason"].decode()
    assert headers["dlq-source"].decode().startswith(f"{source}/0/")
    assert headers["dlq-refused"] == b"MessageSizeTooLargeError"
    assert headers["dlq-original-size"] == str(len(original)).encode()
    assert headers["dlq-original-sha256"] == hashlib.sha256(original).hexdigest().encode()


async def test_the_worker_replaces_a_refused_dead_letter_copy_and_carries_on(
    tenant: Tenant,
    services: Services,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dlq = await _topics(settings, TOPIC_DELETION_REQUESTED)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    poison = {
        b"small": b"not json",  # its copy goes as it is
        b"large-headers": b"not json at all",  # its headers travel in the copy: refused
        b"large-value": b"\xff" * (3 * DLQ_LIMIT),  # refused by the dead-letter topic
        b"near-limit": _near_limit_value(b"near-limit"),  # refused by the producer
        b"k" * (2 * DLQ_LIMIT): b"not json either",  # even the stub is refused: dropped
    }
    producer = Producer(settings.kafka_bootstrap_servers, max_request_size=2 * BROKER_LIMIT)
    await producer.start()
    try:
        await producer.send_many(
            [
                OutMessage(topic, key, value, (("x-big", b"h" * (2 * DLQ_LIMIT)),))
                if key == b"large-headers"
                else OutMessage(topic, key, value)
                for key, value in poison.items()
            ]
        )
    finally:
        await producer.stop()

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            # Behind the poison on the one partition: a job, which must still complete.
            ids = []
            for n in range(2):
                status, body, _ = await tenant.call(
                    "POST", "/v1/contacts", {"email": f"d{n}-{uuid.uuid4().hex[:6]}@example.com"}
                )
                assert status == 201, body
                ids.append(body["data"]["id"])
            status, body, _ = await tenant.call(
                "POST",
                "/v1/contacts/bulk-delete",
                {"contact_ids": ids},
                {"Prefer": f"wait={BOUND_S}"},
            )
            assert status == 200, body
            assert (body["data"]["status"], body["data"]["deleted_count"]) == ("completed", 2)

    dead = await _dead_letters(settings, dlq)
    assert set(dead) == {b"small", b"large-headers", b"large-value", b"near-limit"}
    assert dead[b"small"].value == b"not json"  # the full copy
    assert dict(dead[b"small"].headers)["dlq-reason"].startswith(b"malformed message")
    for key in (b"large-headers", b"large-value", b"near-limit"):
        _assert_stub(dead[key], topic, poison[key], "malformed message")

    refused = {(e["outcome"], e["offset"]) for e in lines.events("dead_letter_refused")}
    assert refused == {("stub", 1), ("stub", 2), ("stub", 3), ("dropped", 4)}
    for line in lines.events("dead_letter_refused"):
        assert (line["topic"], line["partition"]) == (topic, 0)
        assert line["reason"] == "MessageSizeTooLargeError"
        assert "not json" not in str(line)  # never the payload
    assert [e["level"] for e in lines.events("dead_letter_refused", outcome="dropped")] == ["error"]
    samples = {
        outcome: services.metrics.registry.get_sample_value(
            "dead_letters_refused_total", {"topic": topic, "outcome": outcome}
        )
        for outcome in ("stub", "dropped")
    }
    assert samples == {"stub": 3, "dropped": 1}  # the worker did not retry them

    # `contact-deletion dlq list` shows each of them, where it came from and why, and
    # never a value (an operator had no way to read the dead letters without Kafka's tools).
    capsys.readouterr()
    assert await deadletters.list_dead_letters(settings, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)  # one JSON array
    ours = [d for d in listed if d["topic"] == dlq]
    assert len(ours) == 4
    assert {d["source"].rsplit("/", 1)[0] for d in ours} == {f"{topic}/0"}
    assert all(d["reason"].startswith("malformed message") for d in ours)
    assert "not json" not in json.dumps(listed)
    assert await deadletters.list_dead_letters(settings, as_json=False) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[-1].startswith(f"{len(listed)} dead letter(s) in ")


def _event_message(topic: str, tenant: Tenant, offset: int) -> tuple[str, InMessage]:
    """A contact.deleted event of the tenant, as consumed at ``offset``; with its id."""
    event = contact_deleted_event(tenant.workspace_id)
    value = event.model_dump_json().encode()
    return event.id, InMessage(topic, 0, offset, str(event.subject).encode(), value, ())


async def _fan_out(settings: Settings, services: Services, messages: list[InMessage]) -> Metrics:
    """The dispatcher's fan-out of ``messages`` (bounded: a wedged one fails the test)."""
    metrics = Metrics()
    dispatcher = dispatcher_module.Dispatcher(settings, services.db, metrics)
    dlq = Producer(settings.kafka_bootstrap_servers)
    await dlq.start()
    stop = asyncio.Event()
    try:
        done = await asyncio.wait_for(
            dispatcher._fan_out_isolating(messages, dlq, stop), timeout=BOUND_S
        )
        assert done
    finally:
        stop.set()
        await dlq.stop()
    return metrics


async def _delivered(services: Services, tenant: Tenant) -> set[str]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(webhook_deliveries.c.event_id).where(
                webhook_deliveries.c.workspace_id == tenant.workspace_id
            )
        )
        return {str(r.event_id) for r in rows}


@pytest.fixture
async def endpoint(tenant: Tenant) -> None:
    status, body, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, body


async def test_the_dispatcher_replaces_a_refused_copy_of_an_unreadable_event(
    tenant: Tenant, services: Services, settings: Settings, endpoint: None
) -> None:
    """An event whose routing cannot be read (``fan_out``'s poison list), too large for
    the dead-letter topic: a stub goes, and the good event beside it gets its delivery."""
    dlq = await _topics(settings, TOPIC_CONTACT_DELETED)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    garbage = b"\xff" * (3 * DLQ_LIMIT)
    good_id, good = _event_message(topic, tenant, 1)
    messages = [InMessage(topic, 0, 0, b"garbage", garbage, ()), good]
    metrics = await _fan_out(settings, services, messages)

    assert await _delivered(services, tenant) == {good_id}
    dead = await _dead_letters(settings, dlq)
    assert set(dead) == {b"garbage"}
    _assert_stub(dead[b"garbage"], topic, garbage, "invalid (1 error: the value: json_invalid)")
    labels = {"topic": topic, "outcome": "stub"}
    assert metrics.registry.get_sample_value("dead_letters_refused_total", labels) == 1


async def test_the_dispatcher_replaces_a_refused_copy_of_an_event_that_failed_for_good(
    tenant: Tenant,
    services: Services,
    settings: Settings,
    endpoint: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event the database refuses for good (``_fan_out_isolating``'s dead letter), whose
    headers make its copy too large for the dead-letter topic: a stub goes, without them."""
    dlq = await _topics(settings, TOPIC_CONTACT_DELETED)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    bad_id, bad = _event_message(topic, tenant, 0)
    bad = InMessage(topic, 0, 0, bad.key, bad.value, (("x-big", b"h" * (2 * DLQ_LIMIT)),))
    good_id, good = _event_message(topic, tenant, 1)
    _refuse_to_enqueue(monkeypatch, bad_id)
    metrics = await _fan_out(settings, services, [bad, good])

    assert await _delivered(services, tenant) == {good_id}
    dead = await _dead_letters(settings, dlq)
    assert set(dead) == {bad.key}
    _assert_stub(dead[bad.key], topic, bad.value, "too many SQL variables")
    labels = {"topic": topic, "outcome": "stub"}
    assert metrics.registry.get_sample_value("dead_letters_refused_total", labels) == 1


async def test_a_command_whose_failure_cannot_be_written_is_dead_lettered_and_the_rest_done(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A command the database refuses even to record as failed (a NUL in its ref: PostgreSQL
    text cannot hold one) used to raise out of the worker's batch, which stopped the worker,
    and on restart it met the same message again. It is dead-lettered with both reasons
    now; the commands beside it in its batch are done. (SQLite stores the NUL: the command
    names no item there and changes nothing.)"""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    job_id, _ = await _bulk_delete(tenant, 2)
    async with services.db.read() as conn:
        rows = (await conn.execute(sa.select(outbox.c.payload).order_by(outbox.c.id))).all()
    payloads = [bytes(r.payload) for r in rows if job_id.encode() in bytes(r.payload)]
    assert len(payloads) == 2
    event = json.loads(payloads[0])
    event["id"] = str(uuid.uuid4())
    event["data"] |= {"ref": "a\u0000b", "contact_id": str(uuid.uuid4())}
    nul = json.dumps(event).encode()
    messages = [
        InMessage(topic, 0, 0, b"good-0", payloads[0], ()),
        InMessage(topic, 0, 1, b"nul", nul, ()),
        InMessage(topic, 0, 2, b"good-1", payloads[1], ()),
    ]
    worker = DeletionWorker(settings, services.db, Metrics())
    worker.hash_key = await load_hash_key(services.db, None)
    dlq = Producer(settings.kafka_bootstrap_servers)
    await dlq.start()
    stop = asyncio.Event()
    try:
        with json_logs() as lines:
            assert await asyncio.wait_for(worker.handle(messages, dlq, stop), timeout=BOUND_S)
    finally:
        stop.set()
        await dlq.stop()

    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200, body
    assert (body["data"]["status"], body["data"]["deleted_count"]) == ("completed", 2)
    dead = await _dead_letters(settings, topic + DLQ_SUFFIX)
    if services.db.is_sqlite:
        assert dead == {}
        return
    assert set(dead) == {b"nul"}
    assert dead[b"nul"].value == nul
    reason = dict(dead[b"nul"].headers)["dlq-reason"].decode()
    assert "not recorded: the database refused the statement (SQLSTATE 22021" in reason
    [line] = lines.events("message_dead_lettered")
    assert (line["topic"], line["partition"], line["offset"]) == (topic, 0, 1)


async def test_an_unreadable_expansion_message_fails_its_job_by_its_key(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A ``deletion_job.expand`` message whose payload cannot be read (published from a
    corrupted outbox row, say) is dead-lettered; its key (the job's id) and ``ce_type``
    header still name the job, which fails instead of waiting forever for that page."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    for body in ({"email": "keep@example.com"}, {"email": "x@example.com", "last_name": "Xp"}):
        status, created, _ = await tenant.call("POST", "/v1/contacts", body)
        assert status == 201, created
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"filter": {"last_name": "Xp"}}
    )
    assert status == 202, body
    job_id = body["data"]["job_id"]
    ce_type = ("ce_type", b"deletion_job.expand")
    messages = [
        InMessage(topic, 0, 0, job_id.encode(), b"\xff garbage", (ce_type,)),
        # Keyed by an id that is no job's: dead-lettered, nothing else.
        InMessage(topic, 0, 1, str(uuid.uuid4()).encode(), b"\xff garbage", (ce_type,)),
    ]
    worker = DeletionWorker(settings, services.db, Metrics())
    dlq = Producer(settings.kafka_bootstrap_servers)
    await dlq.start()
    try:
        done = worker.handle(messages, dlq, asyncio.Event())
        assert await asyncio.wait_for(done, timeout=BOUND_S)
    finally:
        await dlq.stop()

    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200, body
    assert body["data"]["status"] == "failed"
    message = body["data"]["failure"]["message"]
    assert f"its expansion message could not be read (dead-lettered: {topic}/0/0)" in message
    dead = await _dead_letters(settings, topic + DLQ_SUFFIX)
    assert set(dead) == {m.key for m in messages}


def _refuse_to_enqueue(monkeypatch: pytest.MonkeyPatch, bad_id: Any) -> None:
    """The dispatcher's database refuses for good (SQLite's real "too many SQL variables")
    to enqueue the deliveries of the event ``bad_id``; every other event goes in."""
    real_enqueue = dispatcher_module.enqueue_many  # type: ignore[attr-defined]

    async def refuses_bad(conn: Any, db: Any, planned: Any) -> list[dict[str, Any]]:
        if any(p.event_id == bad_id for p in planned):
            raise wrapped(sqlite_too_many_variables(), "INSERT INTO webhook_deliveries ...")
        return await real_enqueue(conn, db, planned)

    monkeypatch.setattr(dispatcher_module, "enqueue_many", refuses_bad)


async def _bulk_delete(tenant: Tenant, count: int) -> tuple[str, list[str]]:
    ids = []
    for n in range(count):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": f"u{n}-{uuid.uuid4().hex[:6]}@example.com"}
        )
        assert status == 201, body
        ids.append(body["data"]["id"])
    status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", {"contact_ids": ids})
    assert status == 202, body
    return str(body["data"]["job_id"]), ids


async def test_an_unreadable_deletion_request_message_fails_its_item_by_its_job_header(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """A deletion request published from a corrupted outbox row: the worker dead-letters it
    and, since its key (the contact's id) does not say which job's item it was, finds the
    job in its ``job-id`` header (written with the row): that item fails and the job
    completes instead of waiting forever. Ahead of it on the partition, a message with a
    null header value (legal in Kafka), whose dead-letter copy keeps it."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    producer = Producer(settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        null_header = OutMessage(topic, b"null-header", b"not json", (("x-null", None),))  # type: ignore[arg-type]
        await producer.send_many([null_header])
    finally:
        await producer.stop()
    job_id, ids = await _bulk_delete(tenant, 2)
    async with services.db.begin() as conn:
        (row_id,) = (await conn.execute(sa.select(outbox.c.id).where(outbox.c.key == ids[1]))).one()
        await conn.execute(
            outbox.update().where(outbox.c.id == row_id).values(payload=b"\xff corrupted")
        )

    async with components_running(services, "relay", "worker"):
        async with asyncio.timeout(BOUND_S):
            while True:
                status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
                assert status == 200, body
                if body["data"]["completed_at"] is not None:
                    break
                await asyncio.sleep(0.1)
    job = body["data"]
    assert (job["status"], job["deleted_count"], job["failed_count"]) == (
        "completed_with_errors",
        1,
        1,
    )
    [error] = job["errors"]
    assert (error["contact_id"], error["code"]) == (ids[1], "FAILED_DELETE_CONTACT")
    assert "its deletion request message could not be read (dead-lettered: " in error["message"]
    dead = await _dead_letters(settings, topic + DLQ_SUFFIX)
    assert set(dead) == {b"null-header", ids[1].encode()}
    assert dead[b"null-header"].value == b"not json"
    assert ("x-null", None) in dead[b"null-header"].headers


class _Unsendable(Producer):
    """A dead-letter producer that fails, for good and not as the broker would, every
    batch holding a record with an ``x-unsendable`` header (fault injection: a bug in
    sending, which no broker error stands for)."""

    async def send_many(self, messages: Any, *, report_refusals: bool | None = None) -> None:
        if any(name == "x-unsendable" for m in messages for name, _ in m.headers):
            raise ValueError("cannot send this one")
        await super().send_many(messages, report_refusals=report_refusals)


async def test_a_dead_letter_copy_that_fails_for_good_is_replaced_and_the_worker_goes_on(
    tenant: Tenant, services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any permanent error sending a dead-letter copy (not only the broker's refusal) is
    the copy's: a stub goes instead. And if dead-lettering fails for good as a whole, the
    worker says so per message (``dead_letter_dropped``) and goes on: before, the error
    left the batch's task, which stopped the worker, which met it again after a restart."""
    dlq_topic = await _topics(settings, TOPIC_DELETION_REQUESTED)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    job_id, ids = await _bulk_delete(tenant, 1)
    async with services.db.read() as conn:
        (payload,) = (
            await conn.execute(sa.select(outbox.c.payload).where(outbox.c.key == ids[0]))
        ).one()
    messages = [
        InMessage(topic, 0, 0, b"unsendable", b"not json", (("x-unsendable", b"1"),)),
        InMessage(topic, 0, 1, ids[0].encode(), bytes(payload), ()),
    ]
    worker = DeletionWorker(settings, services.db, Metrics())
    worker.hash_key = await load_hash_key(services.db, None)
    dlq = _Unsendable(settings.kafka_bootstrap_servers)
    await dlq.start()
    try:
        assert await asyncio.wait_for(worker.handle(messages, dlq, asyncio.Event()), BOUND_S)
        dead = await _dead_letters(settings, dlq_topic)
        assert set(dead) == {b"unsendable"}
        headers = dict(dead[b"unsendable"].headers)
        assert dead[b"unsendable"].value == b""
        assert headers["dlq-refused"] == b"an unexpected error (ValueError)"

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug in dead-lettering")

        monkeypatch.setattr(worker_module, "send_dead_letters", broken)
        again = [InMessage(topic, 0, 2, b"garbage", b"not json", ())]
        with json_logs() as lines:
            done = worker.handle(again, dlq, asyncio.Event())
            assert await asyncio.wait_for(done, BOUND_S)
    finally:
        await dlq.stop()
    [dropped] = lines.events("dead_letter_dropped")
    assert (dropped["level"], dropped["offset"]) == ("error", 2)
    assert dropped["error"] == "an unexpected error (RuntimeError)"
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200, body
    assert (body["data"]["status"], body["data"]["deleted_count"]) == ("completed", 1)


async def test_the_dispatcher_does_not_retry_a_dead_letter_that_failed_for_good(
    tenant: Tenant,
    services: Services,
    settings: Settings,
    endpoint: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_durably`` retried a permanent error at the slowest pace forever, holding every
    later event of the partition: now it is logged once, with the event's source, and the
    fan-out goes on (the event stays in its topic until retention)."""
    await _topics(settings, TOPIC_CONTACT_DELETED)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    bad_id, bad = _event_message(topic, tenant, 0)
    good_id, good = _event_message(topic, tenant, 1)
    _refuse_to_enqueue(monkeypatch, bad_id)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in dead-lettering")

    monkeypatch.setattr(dispatcher_module, "send_dead_letters", broken)
    with json_logs() as lines:
        await _fan_out(settings, services, [bad, good])

    assert await _delivered(services, tenant) == {good_id}
    [failed] = lines.events("dispatcher_work_failed")
    assert (failed["level"], failed["topic"], failed["offset"]) == ("error", topic, 0)
    assert failed["error"] == "an unexpected error (RuntimeError)"
