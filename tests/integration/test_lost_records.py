"""Records a consumer never gets to read leave no work undone (GUIDE "Errors mean
something"; service.kafka.Consumer, service.faults.position_lost, LostRecords).

Real broker, both databases, no mocks. The records are removed the way the broker removes
them: DeleteRecords (what retention and log.retention.bytes do, moving the log's start
past them, at once instead of after retention.ms), and a batch the consumer cannot
decode (a position beyond the log's end: tests/integration/test_lost_position.py).
Before, aiokafka's ``auto_offset_reset="earliest"`` jumped silently to the log's start:
the deletion items those records were for stayed ``pending`` (their job never
completed), and the ``contact.deleted`` events were never fanned out (their webhooks
never sent). One partition, so every record is in the gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic, RecordsToDelete

from service.app import Services
from service.config import Settings
from service.db import outbox, utcnow, webhook_deliveries, webhook_endpoints
from service.events import TOPIC_CONTACT_DELETED, TOPIC_DELETION_REQUESTED, TYPE_CONTACT_DELETED
from service.topics import create_topics
from tests.conftest import Tenant, components_running, make_settings, own_database
from tests.integration.test_unreadable_batches import _all_published, _bulk_delete, _completed
from tests.logcapture import json_logs
from tests.unreadable_batches import produce_raw, zstd_batch

BOUND_S = 30  # work left undone fails the test instead of hanging it


@pytest.fixture
async def own_db_url(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database of the test's own: what is redone is every pending item (or published
    event) of the partition, and the shared database holds other tests' ones."""
    async with own_database(db_url, tmp_path, "lost") as url:
        yield url


@pytest.fixture
def settings(own_db_url: str, kafka_bootstrap: str, request: pytest.FixtureRequest) -> Settings:
    """One partition; ``request.param``: more settings (indirect parametrization)."""
    more = getattr(request, "param", {})
    return make_settings(
        own_db_url, kafka_bootstrap_servers=kafka_bootstrap, kafka_partitions=1, **more
    )


async def _deliveries(services: Services, count: int) -> list[tuple[str, uuid.UUID]]:
    """Wait until ``count`` contact.deleted deliveries exist; their (event, endpoint)."""
    async with asyncio.timeout(BOUND_S):
        while True:
            async with services.db.read() as conn:
                rows = (
                    await conn.execute(
                        sa.select(
                            webhook_deliveries.c.event_id, webhook_deliveries.c.endpoint_id
                        ).where(webhook_deliveries.c.event_type == TYPE_CONTACT_DELETED)
                    )
                ).all()
            if len(rows) >= count:
                return [(r.event_id, r.endpoint_id) for r in rows]
            await asyncio.sleep(0.1)


async def _delete_records(bootstrap: str, topic: str) -> int:
    """Move the log start of ``topic``/0 to its end, as retention would; returns it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tp = TopicPartition(topic, 0)
        ends = await admin.delete_records({tp: RecordsToDelete(-1)})  # -1: the high watermark
        return int(ends[tp])
    finally:
        await admin.close()


async def _endpoint(tenant: Tenant) -> uuid.UUID:
    status, body, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, body
    return uuid.UUID(body["data"]["id"])


def _done(job: dict[str, Any], deleted: int) -> None:
    assert (job["status"], job["deleted_count"], job["failed_count"]) == ("completed", deleted, 0)


async def recreate_topic(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again with one partition (the deletion completes in
    the background: TopicAlreadyExists until it has)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        async with asyncio.timeout(BOUND_S):
            while True:
                try:
                    response = await admin.create_topics([NewTopic(topic, 1, 1)])
                except Exception:  # TopicAlreadyExists while it is being deleted
                    response = None
                if response is not None and all(e[1] == 0 for e in response.topic_errors):
                    return
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "no-offset"])
async def test_commands_removed_before_the_worker_read_them_are_sent_again(
    tenant: Tenant, services: Services, settings: Settings, committed: bool
) -> None:
    """The worker was away while the log's start moved past job A's commands (retention;
    here DeleteRecords). With a committed offset below the new start ("committed"), or
    none at all ("no-offset": a new group, or its offsets expired, offsets.retention.minutes),
    the gap is logged and the partition's pending work written again: job A completes."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    if committed:
        async with components_running(services, "relay", "worker"):
            _done(await _bulk_delete(tenant, 1, wait=True), 1)
    async with components_running(services, "relay"):
        job_a = await _bulk_delete(tenant, 2)
        await _all_published(services)
    start = await _delete_records(settings.kafka_bootstrap_servers, topic)
    assert start > 0

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            _done(await _completed(tenant, job_a["job_id"]), 2)
    [lost] = lines.events("kafka_records_lost")
    assert (lost["topic"], lost["partition"], lost["level"]) == (topic, 0, "error")
    assert (lost["end_offset"], lost["log_start"]) == (start, start)
    if committed:
        assert lost["reason"] == "retention"
        assert 0 < lost["first_offset"] < start  # job 0's commands were read and committed
    else:
        assert (lost["reason"], lost["first_offset"]) == ("no_committed_offset", None)
    [resent] = lines.events("worker_lost_commands_resent")
    assert (resent["topic"], resent["partition"], resent["requests"]) == (topic, 0, 2)


@pytest.mark.parametrize("settings", [{"worker_lost_work_check_s": 0.5}], indirect=True)
async def test_commands_of_a_topic_created_again_are_sent_again(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """The deletion topic was deleted, with job A's commands in it, and created again. The
    broker drops the group's committed offsets with the topic, so the worker reads the new
    log from 0 as a new group would: no gap shows. The backstop (service.deletion.backstop)
    sees the worker idle and caught up, the outbox empty, and job A still pending on its
    partition: its commands are written again, and it completes."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    async with components_running(services, "relay", "worker"):
        _done(await _bulk_delete(tenant, 1, wait=True), 1)
    async with components_running(services, "relay"):
        job_a = await _bulk_delete(tenant, 2)
        await _all_published(services)
    await recreate_topic(settings.kafka_bootstrap_servers, topic)

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            _done(await _completed(tenant, job_a["job_id"]), 2)
    [resent] = lines.events("worker_lost_work_resent")
    assert (resent["topic"], resent["partition"], resent["requests"]) == (topic, 0, 2)
    assert resent["jobs"] == [job_a["job_id"]]


async def test_commands_lost_after_partitions_were_added_are_sent_again(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's six commands were written to the topic's one partition; then a partition was
    added (keys re-hash: about half of the contacts now map to partition 1), and the log's
    start of partition 0 moved past the commands before the worker read them. What the
    gap held is mapped by the partition count of the worker's last commit (in its
    metadata) as well as by today's: all six are written again, and job A completes."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    async with components_running(services, "relay", "worker"):
        _done(await _bulk_delete(tenant, 1, wait=True), 1)
    async with components_running(services, "relay"):
        job_a = await _bulk_delete(tenant, 6)
        await _all_published(services)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_partitions({topic: NewPartitions(2)})
    finally:
        await admin.close()
    await _delete_records(settings.kafka_bootstrap_servers, topic)

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            _done(await _completed(tenant, job_a["job_id"]), 6)
    [lost] = lines.events("kafka_records_lost")
    assert (lost["partition"], lost["reason"]) == (0, "retention")
    [resent] = lines.events("worker_lost_commands_resent")
    assert (resent["partition"], resent["requests"]) == (0, 6)


async def test_events_removed_before_the_fanout_read_them_get_their_deliveries(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """The fan-out was away while the log's start of the contact.deleted topic moved past
    job A's events: their deliveries are made again from the outbox, one per (event,
    endpoint), to the endpoints that existed when each was published (not to one created
    after), and job 0's, read before the gap, are not written twice."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    first = await _endpoint(tenant)
    async with components_running(services, "relay", "worker", "dispatcher"):
        _done(await _bulk_delete(tenant, 1, wait=True), 1)
        before = await _deliveries(services, 1)
    # Job 0's event (read, and committed) and the endpoint, an hour old: the events
    # examined are those since the committed record's time (its Kafka timestamp, kept in
    # the commit's metadata), not every event since the endpoint was created.
    hour_ago = utcnow() - timedelta(hours=1)
    async with services.db.begin() as conn:
        await conn.execute(
            outbox.update().where(outbox.c.topic == topic).values(published_at=hour_ago)
        )
        await conn.execute(webhook_endpoints.update().values(created_at=hour_ago))
    async with components_running(services, "relay", "worker"):
        _done(await _bulk_delete(tenant, 2, wait=True), 2)
        await _all_published(services)
    later = await _endpoint(tenant)  # created after job A's events were published
    start = await _delete_records(settings.kafka_bootstrap_servers, topic)
    assert start == 3

    with json_logs() as lines:
        async with components_running(services, "relay", "dispatcher"):
            found = await _deliveries(services, 3)
            [recovered] = lines.events("webhook_lost_events_recovered")
    assert len(found) == len(set(found)) == 3
    assert {endpoint for _, endpoint in found} == {first} and later != first
    assert set(before) < set(found)
    [lost] = lines.events("kafka_records_lost")
    assert (lost["topic"], lost["reason"], lost["first_offset"], lost["end_offset"]) == (
        topic,
        "retention",
        1,
        3,
    )
    assert (recovered["topic"], recovered["partition"], recovered["deliveries"]) == (topic, 0, 2)
    assert recovered["events_examined"] == 2  # job A's; not job 0's, an hour before


async def test_events_in_an_unreadable_batch_get_their_deliveries(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's contact.deleted events went out (and are marked published) only inside a
    zstd batch, which this client cannot decode: the fan-out dead-letters it and steps past
    (as before), and now makes the deliveries its events would have had, from the outbox."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    endpoint = await _endpoint(tenant)
    async with components_running(services, "relay"):
        job = await _bulk_delete(tenant, 2)
        await _all_published(services)
    async with components_running(services, "worker"):  # no relay: the events stay unsent
        _done(await _completed(tenant, job["job_id"]), 2)
    async with services.db.begin() as conn:
        rows = (
            await conn.execute(
                sa.select(outbox.c.id, outbox.c.key, outbox.c.payload, outbox.c.headers).where(
                    outbox.c.published_at.is_(None), outbox.c.topic == topic
                )
            )
        ).all()
        assert len(rows) == 2
        await conn.execute(
            outbox.update()
            .where(outbox.c.id.in_([r.id for r in rows]))
            .values(published_at=utcnow())
        )
    records = [
        (r.key.encode(), bytes(r.payload), [(str(n), str(v).encode()) for n, v in r.headers])
        for r in rows
    ]
    await produce_raw(settings.kafka_bootstrap_servers, topic, 0, zstd_batch(records))

    with json_logs() as lines:
        async with components_running(services, "dispatcher"):
            found = await _deliveries(services, 2)
            [recovered] = lines.events("webhook_lost_events_recovered")
    assert sorted(found) == sorted(set(found)) and {e for _, e in found} == {endpoint}
    assert len(found) == 2
    assert lines.events("kafka_batch_unreadable")
    assert (recovered["reason"], recovered["deliveries"]) == ("unreadable", 2)
