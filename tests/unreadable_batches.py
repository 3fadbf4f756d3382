"""Real Kafka record batches that the broker accepts and aiokafka's consumer cannot read,
and a producer that writes them as they are.

Real bad data, not a failpoint: the broker validates each batch it is given (it
decompresses a compressed one and parses its records) before appending it, so what lands
in the topic is what any other Kafka client could have written:

- :func:`zstd_batch`: records compressed with zstd (RFC 8878 frames of "raw" blocks, which
  every zstd decoder reads). The broker (zstd-jni) reads it; aiokafka raises
  ``UnsupportedCodecError`` when the ``zstandard`` module is not installed, which it is not
  here (the project does not depend on it, as a consumer may not have a producer's codec).
- :func:`bad_header_key_batch`: an uncompressed batch whose record has a header name that
  is not UTF-8. Kafka's broker decodes header names leniently; aiokafka's decoder raises
  ``UnicodeDecodeError``, which is not even a Kafka error.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_zstd
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

Record = tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]

_HEADER_SIZE = 61  # a v2 batch's header (DefaultRecordBase.HEADER_STRUCT)
_LENGTH_AT = 8  # batchLength (int32), after baseOffset (int64)
_CRC_AT = 17  # crc (uint32), after partitionLeaderEpoch (int32) and magic (int8)
_ATTRIBUTES_AT = 21  # attributes (int16): the crc covers from here to the end
_ZSTD = 0x04


def plain_batch(records: Sequence[Record]) -> bytearray:
    """An uncompressed v2 record batch of ``records`` (key, value, headers), as aiokafka
    builds it."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 16 * 1024 * 1024)
    for n, (key, value, headers) in enumerate(records):
        assert builder.append(n, timestamp=None, key=key, value=value, headers=list(headers))
    return bytearray(builder.build())


def _seal(batch: bytearray) -> bytes:
    """Set the batch's length and CRC-32C (Kafka's v2 format) after changing it."""
    struct.pack_into(">i", batch, _LENGTH_AT, len(batch) - _LENGTH_AT - 4)
    struct.pack_into(">I", batch, _CRC_AT, calc_crc32c(bytes(batch[_ATTRIBUTES_AT:])))
    return bytes(batch)


def _zstd_frame(data: bytes) -> bytes:
    """``data`` as a zstd frame of raw (stored) blocks, without a checksum (RFC 8878 §3.1.1:
    single segment, a 4-byte content size; each block header is 3 bytes, little-endian:
    last-block bit, type 0 = raw, size << 3)."""
    frame = bytearray(struct.pack("<IB", 0xFD2FB528, 0b1010_0000) + struct.pack("<I", len(data)))
    chunks = [data[i : i + 128 * 1024] for i in range(0, len(data), 128 * 1024)] or [b""]
    for n, chunk in enumerate(chunks):
        last = 1 if n == len(chunks) - 1 else 0
        frame += (last | (len(chunk) << 3)).to_bytes(3, "little") + chunk
    return bytes(frame)


def zstd_batch(records: Sequence[Record]) -> bytes:
    """A v2 batch of ``records`` compressed with zstd (see the module)."""
    assert not has_zstd(), "the consumer side must lack zstd for this batch to be unreadable"
    batch = plain_batch(records)
    compressed = bytearray(batch[:_HEADER_SIZE]) + _zstd_frame(bytes(batch[_HEADER_SIZE:]))
    (attributes,) = struct.unpack_from(">h", compressed, _ATTRIBUTES_AT)
    struct.pack_into(">h", compressed, _ATTRIBUTES_AT, attributes | _ZSTD)
    return _seal(compressed)


def bad_header_key_batch(key: bytes, value: bytes) -> bytes:
    """An uncompressed v2 batch of one record whose header name is not UTF-8 (see the
    module)."""
    placeholder = "h" * 16
    batch = plain_batch([(key, value, [(placeholder, b"x")])])
    at = batch.index(placeholder.encode())
    batch[at : at + len(placeholder)] = b"\xff" * len(placeholder)
    return _seal(batch)


async def produce_raw(bootstrap: str, topic: str, partition: int, raw: bytes) -> None:
    """Append the batch ``raw`` to ``topic``/``partition`` as it is (acks=all; the broker
    assigns its offsets). A producer without idempotence: the batch carries no producer id."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._buffer = bytearray(raw)  # the bytes as built here, not re-encoded
        batch._relative_offset = struct.unpack_from(">i", raw, _HEADER_SIZE - 4)[0]  # not empty
        batch.close()
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


async def create_topic(bootstrap: str, *topics: str) -> None:
    """Create each of `topics` with one partition: a record is read only after those
    written before it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1) for topic in topics])
    finally:
        await admin.close()
