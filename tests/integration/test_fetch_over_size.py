"""A record batch larger than the consumer's fetch size is read whole: with the real broker
a fetch never ends in aiokafka's ``RecordTooLargeError`` (service.faults.unreadable_fetch
still classifies one as an unreadable batch, stepped past and dead-lettered).

Why it cannot be produced: aiokafka 0.14 sends Fetch v4 and later only, and since Fetch v3
(KIP-74) the broker returns the first batch of a partition whole even when it is larger
than ``max_partition_fetch_bytes`` (it replaces a first batch it would cut with an empty
set); aiokafka raises ``RecordTooLargeError`` only for a response whose first batch is
cut, which only Fetch v0-v2's hard limits produce. This test holds that assumption
against the broker the service runs with: a 1.5 MB record (on a topic that allows 3 MB)
comes back from the service's consumer (1 MB fetch size) whole and in order, and
nothing is dead-lettered or lost.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.kafka import Consumer, InMessage
from tests.logcapture import json_logs

BIG = 1_500_000  # over aiokafka's default max_partition_fetch_bytes (1,048,576)


async def test_a_batch_over_the_fetch_size_is_read_whole(kafka_bootstrap: str) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.big"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "3000000"})]
        )
    finally:
        await admin.close()
    values = [b"a" * 10, os.urandom(BIG), b"b" * 10]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=3_000_000)
    await producer.start()
    try:
        for value in values:  # one batch each: the big one alone is over the fetch size
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()

    consumer = Consumer(kafka_bootstrap, [topic], f"g{uuid.uuid4().hex[:10]}")
    got: list[InMessage] = []
    with json_logs() as lines:
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                while len(got) < len(values):
                    got += await consumer.getmany(timeout_ms=200, max_records=10)
        finally:
            await consumer.stop()
    assert [m.value for m in got] == values
    assert [m.offset for m in got] == [0, 1, 2]
    assert not lines.events("kafka_batch_unreadable")
    assert not lines.events("kafka_batch_refetched")
