"""service.faults.unreadable_fetch and service.kafka._unreadable on aiokafka's own record
decoder (``PartitionRecords``, as the fetcher builds it for a fetched partition), fed the
real unreadable batches of tests/unreadable_batches.py: the class of the error does not
decide, where it was raised does."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.errors import (
    KafkaConnectionError,
    RecordTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.record.memory_records import MemoryRecords

from service.faults import is_transient, unreadable_fetch
from service.kafka import _unreadable
from tests.unreadable_batches import bad_header_key_batch, plain_batch, zstd_batch

TP = TopicPartition("t", 3)


def _decode(data: bytes, fetch_offset: int = 0) -> tuple[list[int], BaseException]:
    """Decode a fetched partition's bytes as the fetcher does; the offsets read and the
    error it stopped at."""
    records = PartitionRecords(
        TP, MemoryRecords(data), [], fetch_offset, None, None, True, READ_UNCOMMITTED
    )
    read: list[int] = []
    with pytest.raises(Exception) as info:
        for record in records:
            read.append(record.offset)
    return read, info.value


def _at(offset: int, batch: bytes | bytearray) -> bytes:
    """``batch`` with its base offset set, as the broker stores it."""
    return offset.to_bytes(8, "big") + bytes(batch[8:])


def test_a_codec_the_client_lacks_is_an_unreadable_batch_after_the_records_before_it() -> None:
    good = _at(0, plain_batch([(b"a", b"1", []), (b"b", b"2", [])]))
    bad = _at(2, zstd_batch([(b"z", b"1", []), (b"y", b"2", []), (b"x", b"3", [])]))
    read, exc = _decode(good + bad)
    assert read == [0, 1]
    assert unreadable_fetch(exc) == "UnsupportedCodecError"
    found = _unreadable(exc)
    assert found is not None
    assert (found.topic, found.partition, found.offset, found.end) == ("t", 3, 2, 5)
    assert not found.moved


def test_a_header_name_that_is_not_utf8_is_an_unreadable_batch() -> None:
    read, exc = _decode(_at(7, bad_header_key_batch(b"k", b"v")), fetch_offset=7)
    assert read == []
    assert isinstance(exc, UnicodeDecodeError)
    assert unreadable_fetch(exc) == "UnicodeDecodeError"
    found = _unreadable(exc)
    assert found is not None and (found.offset, found.end) == (7, 8)


def test_the_same_errors_raised_elsewhere_are_not_an_unreadable_batch() -> None:
    for exc in (UnsupportedCodecError("x"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")):
        try:
            raise exc
        except Exception as raised:
            assert unreadable_fetch(raised) is None
            assert _unreadable(raised) is None


def test_a_transient_error_stays_transient() -> None:
    exc = KafkaConnectionError("the broker went away")
    assert is_transient(exc) and unreadable_fetch(exc) is None


def test_a_record_over_the_fetch_size_is_one_the_fetcher_already_stepped_past() -> None:
    exc = RecordTooLargeError("There are some messages at %s=%s ...", TP, 41, 1048576)
    assert unreadable_fetch(exc) == "RecordTooLargeError"
    found = _unreadable(exc)
    assert found is not None
    assert (found.topic, found.partition, found.offset, found.end, found.moved) == (
        "t",
        3,
        41,
        42,
        True,
    )
