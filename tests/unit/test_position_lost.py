"""service.faults.position_lost on the errors aiokafka's fetcher raises with
``auto_offset_reset="none"``, and what a gap's `LostRecords` maps and a commit carries
(service.kafka): pure, no broker."""

from __future__ import annotations

import uuid

from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnsupportedCodecError,
)
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from service.faults import is_transient, position_lost, unreadable_fetch
from service.kafka import LostRecords, _commit_metadata, _read_metadata

TP = TopicPartition("t", 1)


def test_a_position_outside_the_log_is_lost_records_and_nothing_else() -> None:
    # As the fetcher builds them (aiokafka/consumer/fetcher.py): a dict of the fetch
    # offsets, and the partition.
    out_of_range = OffsetOutOfRangeError({TP: 7})
    no_offset = NoOffsetForPartitionError(TP)
    assert position_lost(out_of_range) == "OffsetOutOfRangeError"
    assert position_lost(no_offset) == "NoOffsetForPartitionError"
    for exc in (out_of_range, no_offset):
        assert not is_transient(exc)  # never retried as an outage: said and settled
        assert unreadable_fetch(exc) is None  # not a batch to step past
    assert position_lost(KafkaConnectionError()) is None  # an outage stays an outage
    assert position_lost(UnsupportedCodecError()) is None
    assert position_lost(ValueError("x")) is None


def test_lost_records_hold_the_keys_of_their_partition_under_either_count() -> None:
    keys = [str(uuid.uuid4()).encode() for _ in range(400)]
    now = LostRecords("t", 1, 3, 5, 9, None, "retention")
    then = LostRecords("t", 1, 3, 5, 9, None, "retention", earlier_partitions=2)
    for key in keys:
        hashed = aiokafka_murmur2(key) & 0x7FFFFFFF  # the producer's partitioner
        assert now.holds(key) == (hashed % 3 == 1)
        assert then.holds(key) == (hashed % 3 == 1 or hashed % 2 == 1)
    assert now.holds(None) and then.holds(None)  # a keyless record: any partition
    assert sum(then.holds(k) for k in keys) > sum(now.holds(k) for k in keys)


def test_a_commit_carries_the_last_record_time_and_the_partition_count() -> None:
    assert _read_metadata(_commit_metadata(1_700_000_000_123, 4)) == (1_700_000_000_123, 4)
    assert _read_metadata(_commit_metadata(None, 4)) == (None, 4)
    # Another client's commit (or none): nothing known.
    for other in ("", None, "hello", "ts=abc;n=", 5):
        assert _read_metadata(other) == (None, None)
