"""A consumer position beyond its partition's log end is a gap it says and settles, not a
silent jump (service.kafka.Consumer, ``auto_offset_reset="none"``; the worker's and the
fan-out's settling: tests/integration/test_lost_records.py). Real broker, no database."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.kafka import Consumer, LostRecords
from tests.logcapture import json_logs
from tests.unreadable_batches import create_topic, plain_batch, produce_raw

BOUND_S = 30


async def test_a_position_beyond_the_log_end_is_a_gap_and_the_log_is_read_from_its_start(
    kafka_bootstrap: str,
) -> None:
    """The group's committed offset is beyond the log's end: the log was truncated under
    it (an unclean leader election), or the topic created again on a broker that keeps
    the group's offsets, or an operator set it there. aiokafka's "earliest" read the new
    log from its start without a word; now the gap is said (``log_reset``: what lay from
    the offset on is not known) and settled (``on_lost``), and the log read from its start.
    """
    topic = f"reset-{uuid.uuid4().hex[:8]}"
    group = f"g-{topic}"
    await create_topic(kafka_bootstrap, topic)
    await produce_raw(kafka_bootstrap, topic, 0, bytes(plain_batch([(b"new", b"{}", [])])))
    # A member of the group commits offset 5 (the broker takes any offset).
    member = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await member.start()
    try:
        async with asyncio.timeout(BOUND_S):
            while not member.assignment():
                await member.getmany(timeout_ms=100)
        await member.commit({TopicPartition(topic, 0): 5})
    finally:
        await member.stop()

    lost: list[LostRecords] = []

    async def on_lost(records: LostRecords) -> None:
        lost.append(records)

    consumer = Consumer(kafka_bootstrap, [topic], group, on_lost=on_lost)
    await consumer.start()
    read: list[bytes | None] = []
    try:
        with json_logs() as lines:
            async with asyncio.timeout(BOUND_S):
                while not read:
                    read += [m.key for m in await consumer.getmany(200, 100)]
    finally:
        await consumer.stop()
    assert read == [b"new"]
    assert lost == [LostRecords(topic, 0, 1, 5, None, None, "log_reset")]
    [line] = lines.events("kafka_records_lost")
    assert (line["first_offset"], line["log_start"], line["log_end"]) == (5, 0, 1)
