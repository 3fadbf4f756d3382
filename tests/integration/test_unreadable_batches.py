"""A Kafka record batch the consumer cannot read stops no consumer and no job (GUIDE
"Errors mean something"; service.kafka.Consumer.getmany, service.faults.unreadable_fetch).

Real broker, both databases, real bad data (tests/unreadable_batches.py): a batch
compressed with zstd, which this client has no library for (aiokafka raises
``UnsupportedCodecError``), and a batch whose record has a header name that is not UTF-8
(``UnicodeDecodeError``); the broker validated and accepted both, as it would from any
other client. Before, aiokafka raised out of ``getmany`` on every fetch of them: the worker
and the fan-out stopped, and met them again after every restart, so every job whose
contacts hash to that partition waited forever. One partition here, so every later record
is behind them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import outbox, webhook_deliveries
from service.events import (
    DLQ_SUFFIX,
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
    TYPE_CONTACT_DELETED,
)
from service.kafka import Consumer, UnreadableBatch, read_topics
from service.topics import create_topics
from tests.conftest import Tenant, components_running, make_settings, own_database
from tests.logcapture import json_logs
from tests.unreadable_batches import (
    bad_header_key_batch,
    create_topic,
    plain_batch,
    produce_raw,
    zstd_batch,
)

BOUND_S = 30  # a wedged consumer fails the test instead of hanging it


@pytest.fixture
async def own_db_url(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database of the test's own: the worker writes again every waiting command of the
    partition it lost (service.deletion.giveup.resend_lost), and the shared database
    holds other tests' unfinished jobs."""
    async with own_database(db_url, tmp_path, "unreadable") as url:
        yield url


@pytest.fixture
def settings(own_db_url: str, kafka_bootstrap: str) -> Settings:
    """One partition, so a record is read only after those before it."""
    return make_settings(own_db_url, kafka_bootstrap_servers=kafka_bootstrap, kafka_partitions=1)


async def _unreadable(settings: Settings, topic: str) -> None:
    """Append the two unreadable batches to ``topic``'s partition 0: offsets n, n+1 (zstd,
    two records) and n+2 (the header name)."""
    bootstrap = settings.kafka_bootstrap_servers
    records = [(b"zstd-1", b"{}", [("ce_type", b"x")]), (b"zstd-2", b"{}", [])]
    await produce_raw(bootstrap, topic, 0, zstd_batch(records))
    await produce_raw(bootstrap, topic, 0, bad_header_key_batch(b"bad-header", b"{}"))


async def _bulk_delete(tenant: Tenant, count: int, wait: bool = False) -> dict[str, Any]:
    ids = []
    for n in range(count):
        email = f"u{n}-{uuid.uuid4().hex[:6]}@example.com"
        status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": email})
        assert status == 201, body
        ids.append(body["data"]["id"])
    headers = {"Prefer": f"wait={BOUND_S}"} if wait else None
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": ids}, headers
    )
    assert status == (200 if wait else 202), body
    return dict(body["data"])


async def _completed(tenant: Tenant, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(BOUND_S):
        while True:
            status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
            assert status == 200, body
            if body["data"]["completed_at"] is not None:
                return dict(body["data"])
            await asyncio.sleep(0.1)


async def _all_published(services: Services) -> None:
    async with asyncio.timeout(BOUND_S):
        while True:
            async with services.db.read() as conn:
                waiting = (
                    await conn.execute(
                        sa.select(sa.func.count()).where(outbox.c.published_at.is_(None))
                    )
                ).scalar_one()
            if not waiting:
                return
            await asyncio.sleep(0.1)


def _assert_stepped_past(lines: Any, settings: Settings, topic: str, first: int) -> None:
    unreadable = [
        (e["offset"], e["last_offset"], e["error"]) for e in lines.events("kafka_batch_unreadable")
    ]
    # Each at most twice: a batch met again after a restart is dead-lettered again.
    assert sorted(set(unreadable)) == [
        (first, first + 1, "UnsupportedCodecError"),
        (first + 2, first + 2, "UnicodeDecodeError"),
    ]
    for line in lines.events("kafka_batch_unreadable"):
        assert (line["topic"], line["partition"], line["level"]) == (topic, 0, "error")
        assert "zstd-1" not in str(line)  # never a byte of it


async def _stubs(settings: Settings, topic: str) -> set[tuple[bytes, bytes, bytes]]:
    dead = [m async for m in read_topics(settings.kafka_bootstrap_servers, [topic + DLQ_SUFFIX])]
    found = set()
    for m in dead:
        headers = dict(m.headers)
        assert (m.key, m.value) == (None, b"")
        found.add((headers["dlq-reason"], headers["dlq-source"], headers["dlq-source-end"]))
    return found


async def test_the_worker_steps_past_unreadable_batches_and_loses_nothing_read_before_them(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's commands are on the partition before the unreadable batches, and read in the
    same fetch as the first of them (aiokafka dropped those records when it raised: a fix
    that only stepped past would lose them); job B's after. Both complete."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    async with components_running(services, "relay"):
        job_a = await _bulk_delete(tenant, 2)
        await _all_published(services)
    first = len([m async for m in read_topics(settings.kafka_bootstrap_servers, [topic])])
    assert first > 0  # job A's commands, not read yet
    await _unreadable(settings, topic)

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            job_b = await _bulk_delete(tenant, 2, wait=True)
            done_a = await _completed(tenant, job_a["job_id"])
    for job in (done_a, job_b):
        assert (job["status"], job["deleted_count"], job["failed_count"]) == ("completed", 2, 0)
    _assert_stepped_past(lines, settings, topic, first)
    assert await _stubs(settings, topic) == {
        (
            b"unreadable record batch (UnsupportedCodecError)",
            f"{topic}/0/{first}".encode(),
            str(first + 2).encode(),
        ),
        (
            b"unreadable record batch (UnicodeDecodeError)",
            f"{topic}/0/{first + 2}".encode(),
            str(first + 3).encode(),
        ),
    }


async def test_the_fanout_steps_past_unreadable_batches(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """The dispatcher's consumer: the events behind the unreadable batches get their
    deliveries."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    status, body, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, body
    await _unreadable(settings, topic)

    with json_logs() as lines:
        async with components_running(services, "relay", "worker", "dispatcher"):
            job = await _bulk_delete(tenant, 2, wait=True)
            assert job["deleted_count"] == 2
            async with asyncio.timeout(BOUND_S):
                while True:
                    async with services.db.read() as conn:
                        count = (
                            await conn.execute(
                                sa.select(sa.func.count()).where(
                                    webhook_deliveries.c.workspace_id == tenant.workspace_id,
                                    webhook_deliveries.c.event_type == TYPE_CONTACT_DELETED,
                                )
                            )
                        ).scalar_one()
                    if count == 2:
                        break
                    await asyncio.sleep(0.1)
    _assert_stepped_past(lines, settings, topic, 0)
    assert len(await _stubs(settings, topic)) == 2


async def test_a_batch_damaged_on_disk_is_fetched_again_then_stepped_past(
    kafka_bootstrap: str, kafka_log_dir: Path
) -> None:
    """Real damage: a byte of a record's value flipped in the broker's log segment after it
    was written, as a failing disk would (the broker serves the file as it is: the batch's
    CRC-32C no longer matches, ``CorruptRecordException``). The consumer fetches it twice
    (a batch damaged in transit reads the second time), then steps past it, and reads on.
    No database: the consumer alone."""
    topic = f"damaged-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_bootstrap, topic, topic + DLQ_SUFFIX)
    marker = f"victim-{uuid.uuid4().hex}".encode()
    for key, value in ((b"before", b"{}"), (b"victim", marker), (b"after", b"{}")):
        await produce_raw(kafka_bootstrap, topic, 0, bytes(plain_batch([(key, value, [])])))
    [segment] = (kafka_log_dir / f"{topic}-0").glob("*.log")
    data = bytearray(segment.read_bytes())
    at = data.index(marker)
    data[at] ^= 0xFF
    with segment.open("r+b") as f:  # in place: the broker's open file sees it
        f.seek(at)
        f.write(bytes(data[at : at + 1]))

    consumer = Consumer(kafka_bootstrap, [topic], f"g-{topic}")
    await consumer.start()
    read: list[bytes | None] = []
    try:
        with json_logs() as lines:
            async with asyncio.timeout(BOUND_S):
                while b"after" not in read:
                    read += [m.key for m in await consumer.getmany(500, 100)]
    finally:
        await consumer.stop()
    assert read == [b"before", b"after"]
    # (The first fetch also held "before": returned then, and the partition read again
    # from the damaged batch; a fetch that meets it first thing logs kafka_batch_refetched.)
    [unreadable] = lines.events("kafka_batch_unreadable")
    assert (unreadable["topic"], unreadable["offset"], unreadable["last_offset"]) == (topic, 1, 1)
    assert unreadable["error"] == "CorruptRecordException"
    stubs = [m async for m in read_topics(kafka_bootstrap, [topic + DLQ_SUFFIX])]
    assert [dict(m.headers)["dlq-source"] for m in stubs] == [f"{topic}/0/1".encode()]


async def test_reading_a_topic_whole_says_which_batch_it_cannot_read(kafka_bootstrap: str) -> None:
    """`read_topics` (the erasure check reads every topic with it) cannot step past a batch
    silently: whatever it looks for may be in there. It says where, as a permanent error
    (before: a ``KafkaUnavailable``, "try again later", for the codec; the header name's
    ``UnicodeDecodeError`` escaped as is). No database: the reader alone."""
    topic = f"whole-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_bootstrap, topic)
    await produce_raw(kafka_bootstrap, topic, 0, bytes(plain_batch([(b"k", b"{}", [])])))
    await produce_raw(kafka_bootstrap, topic, 0, bad_header_key_batch(b"bad-header", b"{}"))
    read = []
    with pytest.raises(
        UnreadableBatch, match=rf"^{topic}/0/1-1 cannot be read \(UnicodeDecodeError\)$"
    ):
        async for message in read_topics(kafka_bootstrap, [topic]):
            read.append(message.key)
    assert read == [b"k"]


async def test_the_commands_an_unreadable_batch_held_are_sent_again(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """The job's own deletion requests are the unreadable batch: its two outbox rows went
    out (and are marked published) only inside a zstd batch, as if its producer had used a
    codec the worker lacks. Nothing in the batch can be read, not even a key; the worker
    writes again what its partition may have held (service.deletion.giveup.resend_lost):
    the job completes, each contact deleted once."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    job = await _bulk_delete(tenant, 2)
    async with services.db.begin() as conn:
        rows = [
            r
            for r in (
                await conn.execute(
                    sa.select(outbox.c.id, outbox.c.key, outbox.c.payload, outbox.c.headers).where(
                        outbox.c.published_at.is_(None)
                    )
                )
            ).all()
            if job["job_id"].encode() in bytes(r.payload)
        ]
        assert len(rows) == 2
        await conn.execute(
            outbox.update()
            .where(outbox.c.id.in_([r.id for r in rows]))
            .values(published_at=sa.func.now())
        )
    records = [
        (r.key.encode(), bytes(r.payload), [(str(n), str(v).encode()) for n, v in r.headers])
        for r in rows
    ]
    await produce_raw(settings.kafka_bootstrap_servers, topic, 0, zstd_batch(records))

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            done = await _completed(tenant, job["job_id"])
    assert (done["status"], done["deleted_count"], done["failed_count"]) == ("completed", 2, 0)
    [resent] = lines.events("worker_lost_commands_resent")
    assert (resent["topic"], resent["partition"]) == (topic, 0)
    assert (resent["requests"], resent["expansions"]) == (2, 0)  # the only job waiting
