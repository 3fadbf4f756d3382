"""The fan-out's backstop (service.webhooks.refanout.LostEvents): contact.deleted events
lost unseen get their deliveries. Real broker, both databases.

A topic deleted and created again shows the fan-out no gap (the broker drops the group's
committed offsets with it, and the new log is read from 0): before, the events it held
were never fanned out, their webhooks never sent, and nothing said so.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import webhook_deliveries
from service.events import TOPIC_CONTACT_DELETED, TOPIC_JOB_COMPLETED
from service.kafka import Consumer
from service.topics import create_topics
from service.webhooks.refanout import LostEvents
from tests.conftest import Tenant, components_running
from tests.integration.test_lost_records import (
    BOUND_S,
    _deliveries,
    _done,
    _endpoint,
    own_db_url,
    recreate_topic,
    settings,
)
from tests.integration.test_unreadable_batches import _all_published, _bulk_delete
from tests.logcapture import json_logs

__all__ = ["own_db_url", "settings"]  # the fixtures, used by name


@pytest.mark.parametrize("settings", [{"webhook_lost_events_check_s": 0.3}], indirect=True)
async def test_events_of_a_topic_created_again_get_their_deliveries(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's two contact.deleted events were published while the fan-out was stopped;
    then their topic was deleted and created again. The fan-out, idle and caught up on the
    new log, finds them in the outbox with no delivery for the endpoint that existed when
    they were published: it makes those two (not one to an endpoint created after them;
    job 0's, fanned out before, not again), says so once, and later checks write nothing."""
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    first = await _endpoint(tenant)
    async with components_running(services, "relay", "worker", "dispatcher"):
        _done(await _bulk_delete(tenant, 1, wait=True), 1)
        before = await _deliveries(services, 1)
    async with components_running(services, "relay", "worker"):
        _done(await _bulk_delete(tenant, 2, wait=True), 2)
        await _all_published(services)
    later = await _endpoint(tenant)  # created after job A's events were published
    await recreate_topic(settings.kafka_bootstrap_servers, topic)

    with json_logs() as lines:
        async with components_running(services, "relay", "dispatcher"):
            found = await _deliveries(services, 3)
            async with asyncio.timeout(BOUND_S):
                while not lines.events("webhook_lost_events_resent"):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # three more checks: nothing more is lost
            assert len(await _deliveries(services, 3)) == 3
    assert len(found) == len(set(found)) == 3
    assert {endpoint for _, endpoint in found} == {first} and later != first
    assert set(before) < set(found)
    [resent] = lines.events("webhook_lost_events_resent")
    assert (resent["topic"], resent["partitions"], resent["deliveries"]) == (topic, [0], 2)
    assert resent["level"] == "warning"
    assert not lines.events("kafka_records_lost")  # no gap showed


async def test_a_check_reads_a_few_pages_at_each_idle_moment(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's five contact.deleted events (and its deletion_job.completed) were published
    and read by a fan-out that wrote nothing (as if lost). A check reads one page of two
    rows per call, newest first: the deliveries come two at most per call, a check goes
    on from where it stopped without waiting for the interval, all six are made once,
    and the next check (the rows since this one) makes none."""
    await create_topics(settings)
    endpoint = await _endpoint(tenant)
    async with components_running(services, "relay", "worker"):
        _done(await _bulk_delete(tenant, 5, wait=True), 5)
        await _all_published(services)
    topics = [settings.topic(TOPIC_CONTACT_DELETED), settings.topic(TOPIC_JOB_COMPLETED)]
    consumer = Consumer(
        settings.kafka_bootstrap_servers, topics, f"{settings.kafka_consumer_group_prefix}.x"
    )
    backstop = LostEvents(
        services.db, settings.model_copy(update={"webhook_lost_events_check_s": 0.2}), None
    )
    backstop.page, backstop.pages_per_call = 2, 1
    await consumer.start()
    try:
        read: list[object] = []
        async with asyncio.timeout(BOUND_S):
            while len(read) < 6:
                read += await consumer.getmany(200, 100)
        assert await backstop.check(consumer) == 0  # the first: an interval after this
        await asyncio.sleep(0.25)
        made = [await backstop.check(consumer) for _ in range(6)]
        await asyncio.sleep(0.25)
        made.append(await backstop.check(consumer))
    finally:
        await consumer.stop()
    assert made == [2, 2, 1, 1, 0, 0, 0]  # 5 + 1 rows, two a call; nothing after
    async with services.db.read() as conn:
        pairs = (
            await conn.execute(
                sa.select(webhook_deliveries.c.event_id, webhook_deliveries.c.endpoint_id)
            )
        ).all()
    assert len(pairs) == len(set(pairs)) == 6 and {e for _, e in pairs} == {endpoint}
