"""The worker's backstop (service.deletion.backstop) leaves commands on their way alone and
writes lost ones once; its end-to-end case (a topic deleted and created again) is in
tests/integration/test_lost_records.py. Real broker, both databases."""

from __future__ import annotations

import asyncio

from service.app import Services
from service.config import Settings
from service.deletion.backstop import LostWork
from service.events import TOPIC_DELETION_REQUESTED
from service.kafka import Consumer
from service.topics import create_topics
from tests.conftest import Tenant, components_running
from tests.integration.test_lost_records import (
    BOUND_S,
    own_db_url,
    settings,
)
from tests.integration.test_unreadable_batches import _all_published, _bulk_delete

__all__ = ["own_db_url", "settings"]  # the fixtures, used by name


async def test_the_backstop_leaves_commands_on_their_way_alone(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Job A's commands are not lost while they are on their way: not yet published (a row
    in the outbox), or published and not read to the end of the log. The backstop writes
    nothing then; once the log is read to its end (here, with nothing handling it, as if
    lost), it writes them, once."""
    await create_topics(settings)
    await _bulk_delete(tenant, 2)  # in the outbox, not published
    consumer = Consumer(
        settings.kafka_bootstrap_servers,
        [settings.topic(TOPIC_DELETION_REQUESTED)],
        f"{settings.kafka_consumer_group_prefix}.worker",
    )
    backstop = LostWork(services.db, settings.model_copy(update={"worker_lost_work_check_s": 1e-3}))
    await consumer.start()
    try:

        async def check() -> int:
            await asyncio.sleep(2e-3)  # past the interval
            return await backstop.check(consumer)

        async with asyncio.timeout(BOUND_S):
            while not consumer.assignment():
                await consumer.getmany(100, 1)  # nothing to read yet
        assert await check() == 0  # the first: an interval after the first idle moment
        assert await check() == 0  # unpublished
        async with components_running(services, "relay"):
            await _all_published(services)
        assert await check() == 0  # published, not read
        read: list[object] = []
        async with asyncio.timeout(BOUND_S):
            while len(read) < 2:
                read += await consumer.getmany(200, 100)
        assert await check() == 2  # read and not handled: lost
        assert await check() == 0  # once an hour per job
    finally:
        await consumer.stop()
