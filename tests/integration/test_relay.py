"""The relay's wake-ups: rows go out on the signal of the commit, not on the poll.

Runs on SQLite and PostgreSQL against the real broker. The poll interval is an hour, so
only the wake-up can make the relay publish within the test; the bounds on the waits are
there so that a lost wake-up fails the test instead of hanging it, not to time anything.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from aiokafka.partitioner import DefaultPartitioner

from service.app import Services
from service.db import Database, outbox, utcnow
from service.deployment import DEPLOYMENT_HEADER, deployment_id
from service.events import (
    TOPIC_DELETION_REQUESTED,
    TYPE_DELETION_REQUESTED,
    CloudEvent,
    DeletionRequestedEncoder,
)
from service.kafka import OutMessage, Producer, read_topics
from service.metrics import Metrics
from service.outbox import encoded_outbox_row, outbox_row
from service.relay import Relay
from tests.conftest import make_settings, opened_services

BOUND_S = 60


async def _insert(db: Database, topic: str) -> int:
    async with db.begin() as conn:
        result = await conn.execute(
            outbox.insert()
            .values(
                topic=topic,
                key=str(uuid.uuid4()),
                payload=b"{}",
                headers=[["content-type", "application/json"]],
                created_at=utcnow(),
            )
            .returning(outbox.c.id)
        )
        return int(result.scalar_one())


async def _published(db: Database, ids: Sequence[int]) -> set[int]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(outbox.c.id).where(outbox.c.id.in_(ids), outbox.c.published_at.is_not(None))
        )
        return {r.id for r in rows}


class CommitsWhilePublishing(Producer):
    """A real producer during whose first publish another outbox row commits and signals,
    as an API request accepted while the relay is busy does."""

    def __init__(self, bootstrap: str, services: Services, topic: str) -> None:
        super().__init__(bootstrap)
        self.services = services
        self.topic = topic
        self.committed_meanwhile: int | None = None

    async def send_many(
        self, messages: Sequence[OutMessage], *, report_refusals: bool | None = None
    ) -> None:
        await super().send_many(messages, report_refusals=report_refusals)
        if self.committed_meanwhile is None:
            self.committed_meanwhile = await _insert(self.services.db, self.topic)
            self.services.outbox_signal.set()


async def test_rows_committed_while_the_relay_publishes_or_idles_go_out_on_the_wake_up(
    db_url: str, kafka_bootstrap: str
) -> None:
    settings = make_settings(
        db_url, kafka_bootstrap_servers=kafka_bootstrap, relay_poll_interval_s=3600.0
    )
    async with opened_services(settings) as services:
        await services.ensure_topics()
        topic = settings.topic(TOPIC_DELETION_REQUESTED)
        producer = CommitsWhilePublishing(kafka_bootstrap, services, topic)
        await producer.start()
        relay = Relay(settings, services.db, producer, Metrics(), services.outbox_signal)
        stop = asyncio.Event()
        first = await _insert(services.db, topic)
        task = asyncio.create_task(relay.run(stop))
        try:
            # The row committed during the first publish went out on its signal, in a pass
            # of its own, before the relay went idle (it used to wait out the poll).
            await asyncio.wait_for(relay.idle.wait(), BOUND_S)
            meanwhile = producer.committed_meanwhile
            assert meanwhile is not None
            assert await _published(services.db, [first, meanwhile]) == {first, meanwhile}
            assert relay.published >= 2

            # Idle: a commit's signal starts exactly one pass, which publishes the row.
            passes = relay.passes
            idle_row = await _insert(services.db, topic)
            relay.idle.clear()
            services.outbox_signal.set()
            await asyncio.wait_for(relay.idle.wait(), BOUND_S)
            assert await _published(services.db, [idle_row]) == {idle_row}
            assert relay.passes == passes + 1
        finally:
            stop.set()
            await asyncio.wait_for(task, BOUND_S)
            await producer.stop()


async def test_a_pass_publishes_rows_as_stored_keyed_to_their_partition_and_marks_them(
    db_url: str, kafka_bootstrap: str
) -> None:
    """The wire format the consumers read: each row's payload bytes, key and headers as
    stored, then the deployment's header (shared pre-encoded headers, per-row JSON lists,
    a CloudEvent row), the key's default-partitioner partition, rows of one key in id
    order; then all marked published."""
    settings = make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)
    async with opened_services(settings) as services:
        await services.ensure_topics()
        topic = settings.topic(TOPIC_DELETION_REQUESTED)
        job, ws, now = uuid.uuid4(), uuid.uuid4(), utcnow()
        encoder = DeletionRequestedEncoder(job, ws, now)
        keys = [uuid.uuid4() for _ in range(7)]
        rows = [
            encoded_outbox_row(
                topic, str(k), TYPE_DELETION_REQUESTED, encoder.encode(f"r{i}", k)
            )._asdict()
            for i in range(21)
            for k in [keys[i % 7]]
        ]
        rows.append(
            {
                **encoded_outbox_row(topic, "plain", "x", b'{"n": 1}')._asdict(),
                "headers": [["h", "v é"]],
            }
        )
        event = CloudEvent(id="e1", type="t.x", time=now, data={"a": 1})
        rows.append(outbox_row(topic, str(keys[0]), event))
        async with services.db.begin() as conn:
            ids = list((await conn.execute(outbox.insert().returning(outbox.c.id), rows)).scalars())
        producer = Producer(kafka_bootstrap)
        await producer.start()
        try:
            relay = Relay(settings, services.db, producer, Metrics())
            assert await relay.publish_once() == len(rows)
            assert await relay.publish_once() == 0
        finally:
            await producer.stop()
        assert await _published(services.db, ids) == set(ids)

        got = [m async for m in read_topics(kafka_bootstrap, [topic])]
        by_value = {m.value: m for m in got}
        assert len(got) == len(rows) == len(by_value)
        partitions = list(range(settings.kafka_partitions))
        for row in rows:
            m = by_value[bytes(row["payload"])]
            assert m.key == row["key"].encode()
            assert m.partition == DefaultPartitioner()(m.key, partitions, partitions)
            # The row's own headers, then this deployment's (service.deployment).
            assert [[k, v.decode()] for k, v in m.headers] == [
                *(list(h) for h in row["headers"]),
                [DEPLOYMENT_HEADER, await deployment_id(services.db)],
            ]
        for key in keys:
            in_id_order = [bytes(r["payload"]) for r in rows if r["key"] == str(key)]
            arrived = sorted((m for m in got if m.key == str(key).encode()), key=lambda m: m.offset)
            assert [m.value for m in arrived] == in_id_order
