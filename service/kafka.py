"""A small typed interface over aiokafka: producer, consumer and topic administration.

aiokafka ships no type information, so the rest of the service talks to Kafka only through
the frozen messages and the three wrappers here. Keys, values and header values are bytes;
serialisation belongs to the callers.

Failures of the broker or of the connection surface as :class:`KafkaUnavailable`, a
:class:`~service.errors.RetryLater`: back off and try again, never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    for_code,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import Counter

from service.errors import RetryLater
from service.events import (
    DLQ_ORIGINAL_SHA256_HEADER,
    DLQ_ORIGINAL_SIZE_HEADER,
    DLQ_REASON_HEADER,
    DLQ_REFUSED_HEADER,
    DLQ_SOURCE_END_HEADER,
    DLQ_SOURCE_HEADER,
)
from service.faults import (
    describe,
    is_rebalance,
    is_transient,
    position_lost,
    producer_state_lost,
    record_refused,
    unreadable_fetch,
)

log = structlog.get_logger(__name__)

DEFAULT_CLIENT_ID = "contact-deletion"

_TOPIC_ALREADY_EXISTS = 36
# KRaft answers "only 0 broker(s) are registered" with this code until the broker has
# registered with its controller, which happens just after start-up.
_INVALID_REPLICATION_FACTOR = 38

# aiokafka's (and the Java client's) default max.request.size; the broker's default
# message.max.bytes (1,048,588) is just above it.
DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024


_UNPACK_WORDS: dict[int, Any] = {}


# The partitioner's hash of recently produced keys: an outbox's rows come in pairs per key
# (a contact's deletion request, then its contact.deleted), so the second one of a pair is
# looked up instead of hashed again. Bounded: emptied when full.
_KEY_HASHES: dict[bytes, int] = {}
_KEY_HASHES_MAX = 50_000


def key_hash(key: bytes) -> int:
    """``murmur2(key) & 0x7FFFFFFF``, the default partitioner's hash of a key (the partition
    is it modulo the partition count), remembered for the last keys produced."""
    h = _KEY_HASHES.get(key)
    if h is None:
        if len(_KEY_HASHES) >= _KEY_HASHES_MAX:
            _KEY_HASHES.clear()
        h = _KEY_HASHES[key] = murmur2(key) & 0x7FFFFFFF
    return h


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of ``data`` (an unsigned 32-bit int), as the Java client's
    ``Utils.murmur2`` and aiokafka's ``partitioner.murmur2`` compute it (property-tested equal
    to the latter): the default partitioner's partition is ``(h & 0x7FFFFFFF) % count``.

    Reads the input's whole 32-bit words with one ``struct`` call instead of byte by byte.
    """
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    words = length >> 2
    unpack = _UNPACK_WORDS.get(words)
    if unpack is None:
        unpack = _UNPACK_WORDS[words] = struct.Struct(f"<{words}I").unpack_from
    h = 0x9747B28C ^ length
    for k in unpack(data):
        k = (k * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    tail = words << 2
    extra = length & 3
    if extra:
        if extra >= 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    return h ^ (h >> 15)


class KafkaUnavailable(RetryLater):
    """Kafka did not accept, deliver or answer a request; transient, so retry later."""


class UnreadableBatch(Exception):
    """:func:`read_topics` met a batch it cannot decode (:func:`service.faults.unreadable_fetch`):
    permanent, so not a :class:`KafkaUnavailable`; the message names the topic, partition,
    offsets and the error's class, never a byte of the batch."""


class TopicCreationFailed(Exception):
    """The broker refused to create a topic for a reason that retrying will not fix."""


class OutMessage(NamedTuple):
    """A record to produce (immutable; a named tuple, which costs a third of a frozen
    dataclass to make: the relay makes one per outbox row)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class InMessage(NamedTuple):
    """A consumed record, with where it came from (a tombstone's value reads as ``b""``).
    Immutable; a named tuple, as `OutMessage`: the consumers make one per record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


class Producer:
    """An idempotent producer (``acks=all``): no duplicates or reordering on retries.

    ``max_request_size`` (bytes) bounds one record as aiokafka's own ``send()`` does: a
    larger one is refused before anything is sent (:class:`MessageSizeTooLargeError`).
    ``report_refusals``: a record refused for good raises its own error from
    :meth:`send_many` (the caller sets it aside: the relay, :func:`send_isolating`,
    :func:`send_dead_letters`); without it, a :class:`KafkaUnavailable` like any failed
    delivery.
    """

    def __init__(
        self,
        bootstrap: str,
        client_id: str = DEFAULT_CLIENT_ID,
        *,
        linger_ms: int = 5,
        max_batch_size: int = 256 * 1024,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        report_refusals: bool = False,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._linger_ms = linger_ms
        self._max_batch_size = max_batch_size
        self._max_request_size = max_request_size
        self._report_refusals = report_refusals
        self._producer: Any = None
        # Set when the broker refused this producer's idempotence state: the next send
        # replaces it (see `send_many`).
        self._state_lost = False
        # Set by `stop`: a connection it raced (a start or a replacement under way in
        # another task) is closed instead of kept, so no client outlives its owner.
        self._stopped = False

    async def start(self) -> None:
        """Connect to the cluster; raises :class:`KafkaUnavailable` if it cannot, or if
        :meth:`stop` was called while it connected (the new connection is closed)."""
        self._stopped = False
        await self._connect()

    async def _connect(self) -> None:
        # aiokafka binds its objects to the running loop, so they are made here, not in __init__.
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_idempotence=True,  # implies acks="all"
            linger_ms=self._linger_ms,
            max_batch_size=self._max_batch_size,
            max_request_size=self._max_request_size,
        )
        _back_off_failed_metadata(producer.client)
        try:
            await producer.start()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, KafkaError | OSError):
                raise KafkaUnavailable(f"cannot connect a producer to {self._bootstrap}") from exc
            raise
        if self._stopped:
            await producer.stop()
            raise KafkaUnavailable("the producer was stopped while it connected")
        self._producer = producer

    async def stop(self) -> None:
        """Flush what is pending and disconnect; safe to call twice, and while a start or a
        replacement is under way in another task (that one then closes what it opened)."""
        self._stopped = True
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send_many(
        self, messages: Sequence[OutMessage], *, report_refusals: bool | None = None
    ) -> None:
        """Produce ``messages`` and return once the broker has acknowledged every one.

        Each message goes to the partition Kafka's default partitioner picks for its key
        (murmur2 of the key, as the Java client and aiokafka do; a random available one for
        no key), and the messages of one partition are appended to record batches in their
        order, so the order within each partition (hence of each key) is kept. Raises
        :class:`KafkaUnavailable` if any delivery failed for a transient reason; some of
        the others may have been written, so callers resend the whole batch (consumers are
        idempotent). A record refused for good (:func:`service.faults.record_refused`: over
        ``max_request_size``, checked here before anything is sent, or refused by the
        broker: too large for the topic, invalid topic, corrupt) raises that aiokafka error
        as is (with ``report_refusals``), when no delivery failed transiently: resending
        the batch cannot help, the caller must find and set aside the record (the relay,
        :func:`send_isolating`). ``report_refusals`` (None: the producer's own setting)
        decides it for this call.

        A producer whose sequence numbers or id the broker refused (after a broker restart
        lost batches in flight: :func:`service.faults.producer_state_lost`) would be refused
        forever; it is replaced by a new one (a new producer id) before the next send. So
        is one that had a batch refused (its sequence numbers went ahead of the broker's).
        """
        report = self._report_refusals if report_refusals is None else report_refusals
        if self._state_lost:
            await self._replace()
        producer = self._started()
        futures: list[asyncio.Future[Any]] = []
        try:
            # Record batches built here, one per partition, rather than one producer.send()
            # per message: the per-message cost was the pure-Python partitioner and a
            # future each (most of the relay's publish time).
            groups: dict[tuple[str, int], list[OutMessage]] = {}
            partitions_of: dict[str, list[int]] = {}
            for message in messages:
                self._check_size(message)
                partitions = partitions_of.get(message.topic)
                if partitions is None:
                    _check_topic(message.topic)  # once per topic and call
                    partitions = sorted(await producer.partitions_for(message.topic))
                    partitions_of[message.topic] = partitions
                if message.key is None:
                    partition = self._any_partition(message.topic, partitions)
                else:
                    partition = partitions[key_hash(message.key) % len(partitions)]
                groups.setdefault((message.topic, partition), []).append(message)
            for (topic, partition), group in groups.items():
                batch = producer.create_batch()
                for message in group:
                    if not self._append(batch, message):
                        futures.append(await producer.send_batch(batch, topic, partition=partition))
                        batch = producer.create_batch()
                        if not self._append(batch, message):  # pragma: no cover - cannot happen
                            raise RuntimeError("an empty record batch refused a record")
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        except BaseException as exc:
            # Let the already-enqueued sends finish so none is left unobserved.
            await asyncio.gather(*futures, return_exceptions=True)
            if isinstance(exc, KafkaError) and not (report and record_refused(exc)):
                raise KafkaUnavailable(f"cannot enqueue a message: {exc}") from exc
            raise
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        refused = [e for e in errors if record_refused(e) is not None]
        if refused or any(producer_state_lost(e) for e in errors):
            # A batch the broker refused used up its sequence numbers on our side only:
            # this producer's next batch to that partition is (or would be) refused as out
            # of order (aiokafka does not rewind them), so it is replaced before the next
            # send. Those out-of-order refusals are the refused record's doing, not an
            # outage: resending the whole batch would only meet them again.
            self._state_lost = True
        outages = [
            e
            for e in errors
            if record_refused(e) is None and not (refused and producer_state_lost(e))
        ]
        # An outage first: the batch is resent as it is. Only then a refused record.
        for error in outages or refused:
            if isinstance(error, KafkaError) and not (report and record_refused(error)):
                raise KafkaUnavailable(f"a message was not delivered: {error}") from error
            raise error

    def _check_size(self, message: OutMessage) -> None:
        """Refuse a record over ``max_request_size``, as aiokafka's ``send()`` does (its
        ``send_batch()``, used here, does not check)."""
        rough = len(message.value) + (len(message.key) if message.key else 0)
        for name, value in message.headers:
            rough += len(name) + (len(value) if value is not None else 0)  # Kafka allows null
        if rough + 1024 < self._max_request_size:
            return  # far enough below the limit: the exact size is not needed
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            message.key, message.value, list(message.headers)
        )
        if size > self._max_request_size:
            raise MessageSizeTooLargeError(
                f"the record is {size} bytes, over max_request_size ({self._max_request_size})"
            )

    async def _replace(self) -> None:
        """Drop a producer the broker no longer accepts and start a new one.

        Raises :class:`KafkaUnavailable` if the broker cannot be reached (the caller's retry
        comes back here) or the producer was stopped (a send still under way when its
        owner stopped: no new client is opened for it).
        """
        if self._stopped:
            raise KafkaUnavailable("the producer is stopped")
        old, self._producer = self._producer, None
        if old is not None:
            # Nothing of ours is pending on it (every send's future was awaited); a stop
            # that hangs on a broker still away is not waited for past 10 s.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), timeout=10)
        log.warning(
            "kafka_producer_replaced",
            reason="the broker refused its sequence state, or one of its batches",
        )
        await self._connect()
        self._state_lost = False

    @staticmethod
    def _append(batch: Any, message: OutMessage) -> bool:
        """Append to a record batch; False when the batch is full (an empty one takes any)."""
        metadata = batch.append(
            timestamp=None, key=message.key, value=message.value, headers=list(message.headers)
        )
        return metadata is not None

    def _any_partition(self, topic: str, partitions: list[int]) -> int:
        """A keyless record's partition, as aiokafka's DefaultPartitioner picks it."""
        available: set[int] = self._started().client.cluster.available_partitions_for_topic(topic)
        return random.choice(sorted(available) if available else partitions)

    def _started(self) -> Any:
        if self._producer is None:
            raise RuntimeError("Producer.start() has not been awaited")
        return self._producer


METADATA_RETRY_BACKOFF_S = 0.5
"""How long a client waits after a metadata request that no broker answered."""


def _back_off_failed_metadata(client: Any) -> None:
    """Every aiokafka client the service makes (producer, consumers, the topic reader) gets
    this. Make this aiokafka client wait `METADATA_RETRY_BACKOFF_S` after a metadata update
    that no known broker answered, before it says so.

    aiokafka 0.14's producer sender, holding batches for a partition whose leader is
    unknown (the broker is down), asks for a metadata update and waits for it, in a loop
    without back-off; with the broker gone the update fails at once (connection refused),
    so the loop spun: a core's worth of CPU and ~2,300 ERROR lines a second ("Unable to
    update metadata", "Unable connect to node") for as long as the outage lasted (found
    by an operator's trial). This wraps the client's own ``_metadata_update`` (a private
    method; pyproject bounds aiokafka ``<0.15``, and a test of a broker outage counts the
    lines) so that a failed update returns only after the back-off.
    """
    update = client._metadata_update

    async def backed_off(cluster_metadata: Any, topics: Any) -> bool:
        ok: bool = await update(cluster_metadata, topics)
        if not ok:
            await asyncio.sleep(METADATA_RETRY_BACKOFF_S)
        return ok

    client._metadata_update = backed_off


# Kafka's rule for a topic name (org.apache.kafka.common.internals.Topic.validate):
# 1 to 249 characters of ASCII letters, digits, '.', '_' and '-', and not "." or "..".
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def _check_topic(topic: str) -> None:
    """Refuse a record for a topic that cannot exist (:class:`InvalidTopicError`, as the
    broker would): aiokafka asks the broker for such a topic's partitions until it gives
    up (a timeout, which reads as an outage) instead of saying the name is illegal."""
    if topic in (".", "..") or not isinstance(topic, str) or not _LEGAL_TOPIC.fullmatch(topic):
        raise InvalidTopicError(f"an illegal topic name ({len(str(topic))} characters)")


@dataclass(frozen=True)
class _Unreadable:
    """Where a fetch met a batch it cannot decode (`_unreadable`): the first offset not
    read (``offset``), the first after the batch (``end``: ``offset + 1`` when the batch's
    own header cannot say), the records read before it in that call (lost by aiokafka's
    ``getmany``, which raised instead of returning them), and the error's class name."""

    topic: str
    partition: int
    offset: int
    end: int
    read: dict[Any, list[Any]]
    error: str
    moved: bool  # aiokafka moved the position past it itself (RecordTooLargeError)


def _unreadable(exc: BaseException) -> _Unreadable | None:
    """What a ``getmany`` that raised ``exc`` met, if it is an unreadable batch
    (:func:`service.faults.unreadable_fetch`); None otherwise.

    aiokafka's exception names no partition and no offset (``consumer/fetcher.py``, read
    and tested on aiokafka 0.14.0, which pyproject's ``<0.15`` bounds; a release that
    renames what follows fails tests/unit/test_unreadable_fetch.py or
    tests/integration/test_unreadable_batches.py, and such an error then propagates as
    before): ``Fetcher.fetched_records`` drains the partitions in turn,
    each through ``FetchResult.getall``, which iterates ``PartitionRecords``, whose
    ``_unpack_records`` decodes batch after batch. The error leaves all of them, so the
    frames of its traceback still hold: the partition (``PartitionRecords._tp``) and its
    first offset not read (``next_fetch_offset``); the failing batch (``next_batch``,
    whose ``next_offset`` ends it, when it is the batch after that offset); the records
    ``getall`` had read of that partition (``ret_list``), whose position did not move, and
    those of the partitions drained before it (``drained``), whose positions did move: if
    they were not returned now they would be skipped, never read.
    """
    error = unreadable_fetch(exc)
    if error is None:
        return None
    if isinstance(exc, RecordTooLargeError):
        # RecordTooLargeError(message, tp, fetch_offset, max_bytes), position already moved.
        tp: Any = exc.args[1] if len(exc.args) >= 3 else None
        offset: Any = exc.args[2] if len(exc.args) >= 3 else None
        if not isinstance(offset, int) or not isinstance(tp, TopicPartition):
            return None
        return _Unreadable(tp.topic, tp.partition, offset, offset + 1, {}, error, moved=True)
    drained: dict[Any, list[Any]] = {}
    partial: list[Any] = []
    records: Any = None
    batch: Any = None
    tb = exc.__traceback__
    while tb is not None:
        name, local = tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals
        if name == "fetched_records" and isinstance(local.get("drained"), dict):
            drained = dict(local["drained"])
        elif name == "getall" and isinstance(local.get("ret_list"), list):
            partial = list(local["ret_list"])
        elif name == "_unpack_records":
            records, batch = local.get("self"), local.get("next_batch")
        tb = tb.tb_next
    tp = getattr(records, "_tp", None)
    offset = getattr(records, "next_fetch_offset", None)
    if tp is None or not isinstance(offset, int):
        return None
    end = getattr(batch, "next_offset", None)
    if not isinstance(end, int) or end <= offset:
        end = offset + 1  # it failed between batches: one offset at a time
    if partial:
        drained[tp] = [*drained.get(tp, ()), *partial]
    return _Unreadable(tp.topic, tp.partition, offset, end, drained, error, moved=False)


@dataclass(frozen=True)
class LostRecords:
    """Records of a partition a :class:`Consumer` will never read, and what is known of them
    (never a record: their keys and contents are not known), for its ``on_lost``.

    ``first``: the first offset not read (None: from the log's very start; the group had no
    committed offset); ``end``: the first offset after them (None: not known; the log was
    truncated or the topic created again beyond them). ``partitions``: the topic's
    partition count now; ``earlier_partitions``: its count when the last record before
    them was committed, when that was another (partitions were added since: a key's
    records went to the partition its hash picks among the count of their time, so the
    lost ones may be those of keys that map there under either); None: the same, or not
    known. ``since``: when the last record read before them was written (its
    Kafka timestamp, the producer's clock), so that they were written after it (give or take
    the producers' clock skew); None: not known. ``reason``: ``"retention"`` (the log's
    start moved past them: retention, log.retention.bytes, DeleteRecords), ``"log_reset"``
    (the position is beyond the log's end: the topic deleted and created again, or its log
    truncated), ``"no_committed_offset"`` (a group without an offset, a new one or one whose
    offsets expired, on a log whose start is past 0), ``"unreadable"`` (a batch that cannot
    be decoded, stepped past), ``"stalled"`` (none seen: work left undone while the
    consumer was caught up, `Consumer.caught_up`).
    """

    topic: str
    partition: int
    partitions: int
    first: int | None
    end: int | None
    since: datetime | None
    reason: str
    earlier_partitions: int | None = None

    def holds(self, key: bytes | None) -> bool:
        """True if a record with ``key`` can have been among them: Kafka's default
        partitioner (murmur2 of the key, as the relay's producer picks it) maps it to
        ``partition`` among ``partitions`` or ``earlier_partitions``; a record without a key
        may be on any partition."""
        if key is None:
            return True
        hashed = murmur2(key) & 0x7FFFFFFF
        return any(
            hashed % count == self.partition
            for count in (self.partitions, self.earlier_partitions)
            if count
        )


def _commit_metadata(stamp: int | None, partitions: int) -> str:
    """A commit's metadata (`Consumer.commit`): the last record's time (ms) and the topic's
    partition count, ``ts=<ms>;n=<count>``."""
    return f"ts={'' if stamp is None else stamp};n={partitions}"


def _read_metadata(metadata: object) -> tuple[int | None, int | None]:
    """(record time in ms, partition count) of a commit's metadata; None where absent."""
    found: dict[str, int] = {}
    if isinstance(metadata, str):
        for part in metadata.split(";"):
            name, _, value = part.partition("=")
            if value.isdigit():
                found[name] = int(value)
    return found.get("ts"), found.get("n")


def _seek_if_assigned(consumer: Any, tp: TopicPartition, offset: int) -> None:
    """Seek ``tp`` to ``offset``, unless the group just moved it to another member (which
    reads it from the committed offset)."""
    if tp in consumer.assignment():
        consumer.seek(tp, offset)


class Consumer:
    """A group member that reads from the earliest offset and commits only when told to.

    A batch it fetched and cannot decode (:func:`service.faults.unreadable_fetch`) does not
    stop it: see :meth:`getmany`. Its dead-letter stub goes to the topic's
    ``dead_letter_suffix`` topic (None: none is written), from a producer of its own,
    started the first time one is needed.

    It never picks a position by itself (aiokafka's ``auto_offset_reset="none"``): a
    position no longer in the log (:func:`service.faults.position_lost`: the log's start
    moved past records never read, the topic was created again, the group has no offset)
    is a gap it says and settles (see :meth:`getmany`), where aiokafka's "earliest" jumped
    to the log's start silently, and the items and events the lost records were for waited
    forever.

    ``on_lost(LostRecords)``, when given, is awaited for records it will never read (an
    unreadable batch, once dead-lettered; a gap in the log), before the partition goes on:
    the records' owner redoes what they may have been for from what it still knows (the
    worker: service.deletion.giveup.resend_lost; the fan-out:
    service.webhooks.refanout.recover_events). A transient error there propagates like the
    dead-letter's (the records are met again on the retry); a permanent one is logged
    (``kafka_batch_not_settled`` / ``kafka_records_not_settled``) and the partition goes on.

    Each commit carries, as its metadata, the timestamp of the last record it covers and
    the topic's partition count (``ts=<ms>;n=<count>``): a gap found after a restart is
    bounded by the one and mapped by the other (`LostRecords`).
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        group_id: str,
        client_id: str = DEFAULT_CLIENT_ID,
        *,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        dead_letter_suffix: str | None = ".dlq",
        on_lost: Callable[[LostRecords], Awaitable[object]] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = tuple(topics)
        self._group_id = group_id
        self._client_id = client_id
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._consumer: Any = None
        self._dead_letter_suffix = dead_letter_suffix
        self._dead_letters: Producer | None = None
        self._on_lost = on_lost
        # Per partition, the offset where a batch could not be read, once: met there again
        # with nothing read before it, the batch is stepped past.
        self._unreadable_at: dict[Any, int] = {}
        # Per partition, for each batch returned and not committed yet: the offset after its
        # last record -> that record's timestamp (ms), for the commit's metadata.
        self._stamps: dict[Any, dict[int, int]] = {}
        # Per topic, its partition count at this member's last commit.
        self._counts: dict[str, int] = {}
        # Set by `stop`: a client another task opens meanwhile is closed, not kept.
        self._stopped = False

    async def start(self) -> None:
        """Connect and subscribe; raises :class:`KafkaUnavailable` if the cluster is down,
        or if :meth:`stop` was called while it connected (the new client is closed)."""
        self._stopped = False
        consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            client_id=self._client_id,
            # No silent jump over records never read (see the class): getmany says the gap.
            auto_offset_reset="none",
            enable_auto_commit=False,
            # A rebalance waits for every member for up to this long (aiokafka makes the
            # rebalance timeout equal to the session timeout), so a short session is what
            # makes the group recover quickly after a member died.
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
        )
        _back_off_failed_metadata(consumer._client)
        try:
            await consumer.start()
        except BaseException as exc:
            await consumer.stop()
            if isinstance(exc, KafkaError | OSError):
                raise KafkaUnavailable(f"cannot connect a consumer to {self._bootstrap}") from exc
            raise
        if self._stopped:
            await consumer.stop()
            raise KafkaUnavailable("the consumer was stopped while it connected")
        self._consumer = consumer

    async def stop(self) -> None:
        """Leave the group and disconnect (uncommitted offsets are not committed); safe
        while another task starts it or opens its dead-letter producer."""
        self._stopped = True
        consumer, self._consumer = self._consumer, None
        producer, self._dead_letters = self._dead_letters, None
        try:
            if consumer is not None:
                await consumer.stop()
        finally:
            if producer is not None:
                await producer.stop()

    async def getmany(self, timeout_ms: int, max_records: int) -> list[InMessage]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` for the first one.

        Records of one partition come in offset order.

        A batch that cannot be decoded (a compression codec this client lacks, a failed
        CRC, a record or header that does not parse: :func:`service.faults.unreadable_fetch`)
        makes aiokafka raise on every fetch of it, naming neither partition nor offset, and
        drop the records read before it in that call. Here it is the batch's failure, not
        the consumer's (:func:`_unreadable` finds where): the records read before it are
        returned, and the partition is read again from the batch (a batch damaged on the
        way reads the second time). Met again there, it is unreadable for good: an error
        line ``kafka_batch_unreadable`` (topic, partition, first and last offset, the
        error's class; never a byte of it), a dead-letter stub (:func:`unreadable_stub`:
        aiokafka keeps none of the batch's bytes, so the source's place is what is kept;
        the records stay there until retention), ``on_lost`` (its records' contents,
        keys included, are not known: only their partition), and the partition goes on
        after it. A transient error while dead-lettering or settling propagates
        (:class:`KafkaUnavailable`): the batch is met again on the retry. Its offsets are
        committed with the next record read after it; a restart before that meets it, and
        dead-letters and settles it, once more.

        A partition whose position is not in its log (:func:`service.faults.position_lost`)
        is said and settled, then read from the log's start: see :meth:`_position_lost`.
        A restart before the next commit on it meets the gap, and settles it, once more
        (what ``on_lost`` does is idempotent).
        """
        consumer = self._started()
        try:
            batches: dict[Any, list[Any]] = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except Exception as exc:
            unreadable = _unreadable(exc)
            if unreadable is not None:
                batches = await self._step_past(unreadable)
            elif position_lost(exc) is not None:
                await self._position_lost(exc)
                batches = {}
            else:
                raise
        messages: list[InMessage] = []
        for tp in sorted(batches, key=lambda tp: (tp.topic, tp.partition)):
            records = batches[tp]
            if records and isinstance(records[-1].timestamp, int):
                stamps = self._stamps.setdefault(tp, {})
                if len(stamps) >= 256:  # batches never committed (the partition moved)
                    stamps.clear()
                stamps[records[-1].offset + 1] = records[-1].timestamp
            # Positional: (topic, partition, offset, key, value, headers: the (name, value)
            # pairs as they come).
            messages.extend(
                InMessage(
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    record.value if record.value is not None else b"",
                    tuple(record.headers),
                )
                for record in records
            )
        return messages

    async def _position_lost(self, exc: BaseException) -> None:
        """What :meth:`getmany` does when aiokafka has no position for a partition in its log
        (:func:`service.faults.position_lost`; ``auto_offset_reset="none"``): where aiokafka's
        "earliest" would have jumped silently, the gap is said and settled.

        The log's start and end decide: a position below the start (retention or
        DeleteRecords removed records never read) loses ``[position, start)``; one beyond
        the end (the topic deleted and created again, the log truncated) loses what lay from
        it on (not known), and the whole log is read from its start; no committed offset (a
        new group, or offsets expired) on a log whose start is past 0 loses what lay before
        it. Each loss: an error line ``kafka_records_lost`` (topic, partition, offsets,
        reason; never a record), ``on_lost``, then the partition is read from the log's
        start. A position back in the log (it moved meanwhile) is read from where it is.
        A transient error propagates (:class:`KafkaUnavailable`): the position is unchanged,
        so the retry meets the same gap.
        """
        consumer = self._started()
        why = position_lost(exc) or type(exc).__name__
        found: list[tuple[Any, int | None]] = []
        if isinstance(exc, OffsetOutOfRangeError) and exc.args and isinstance(exc.args[0], dict):
            found = [(tp, o) for tp, o in exc.args[0].items() if isinstance(o, int)]
        elif isinstance(exc, NoOffsetForPartitionError) and exc.args:
            found = [(exc.args[0], None)]
        if not found:
            raise exc  # aiokafka said it otherwise: not understood, so not stepped over
        for tp, offset in found:
            if not isinstance(tp, TopicPartition) or tp not in consumer.assignment():
                continue
            try:
                start: int = (await consumer.beginning_offsets([tp]))[tp]
                end: int = (await consumer.end_offsets([tp]))[tp]
            except KafkaError as error:
                raise KafkaUnavailable(f"cannot read the offsets of {tp.topic}") from error
            if offset is None:
                reason, first, last = "no_committed_offset", None, start
                lost = start > 0
            elif offset < start:
                reason, first, last, lost = "retention", offset, start, True
            elif offset > end:
                reason, first, last, lost = "log_reset", offset, None, True
            else:
                reason, first, last, lost = "", offset, offset, False
            if lost:
                log.error(
                    "kafka_records_lost",
                    topic=tp.topic,
                    partition=tp.partition,
                    first_offset=first,
                    end_offset=last,
                    log_start=start,
                    log_end=end,
                    reason=reason,
                    error=why,
                )
                await self._settle(tp.topic, tp.partition, first, last, reason)
            _seek_if_assigned(consumer, tp, start if lost or offset is None else offset)

    async def _step_past(self, bad: _Unreadable) -> dict[Any, list[Any]]:
        """What :meth:`getmany` does with an unreadable batch (see there); returns the
        records read before it."""
        consumer = self._started()
        tp = TopicPartition(bad.topic, bad.partition)
        where = {"topic": bad.topic, "partition": bad.partition, "offset": bad.offset}
        if not bad.moved and (bad.read or self._unreadable_at.get(tp) != bad.offset):
            self._unreadable_at[tp] = bad.offset
            _seek_if_assigned(consumer, tp, bad.offset)  # after the records returned now
            if not bad.read:
                log.warning("kafka_batch_refetched", **where, error=bad.error)
            return bad.read
        log.error(
            "kafka_batch_unreadable",
            **where,
            last_offset=bad.end - 1,
            error=bad.error,
            dead_letter=self._dead_letter_suffix is not None,
        )
        try:
            await self._dead_letter(bad)
            await self._settle(bad.topic, bad.partition, bad.offset, bad.end, "unreadable")
        except BaseException:
            if not bad.moved:
                _seek_if_assigned(consumer, tp, bad.offset)  # met again on the retry
            raise
        self._unreadable_at.pop(tp, None)
        if not bad.moved:
            _seek_if_assigned(consumer, tp, bad.end)
        return {}

    async def _settle(
        self, topic: str, partition: int, first: int | None, end: int | None, reason: str
    ) -> None:
        """``on_lost`` for these records (see the class)."""
        if self._on_lost is None:
            return
        where = {"topic": topic, "partition": partition, "offset": first}
        partitions = len(self._started().partitions_for_topic(topic) or ())
        try:
            if not partitions:
                raise KafkaUnavailable(f"the partitions of {topic} are not known yet")
            since, earlier = await self._before(TopicPartition(topic, partition), first)
            lost = LostRecords(
                topic,
                partition,
                partitions,
                first,
                end,
                since,
                reason,
                earlier if earlier != partitions else None,
            )
            await self._on_lost(lost)
        except Exception as exc:
            if is_transient(exc):
                raise
            event = (
                "kafka_batch_not_settled" if reason == "unreadable" else "kafka_records_not_settled"
            )
            log.error(event, **where, error=describe(exc))

    async def _before(
        self, tp: TopicPartition, first: int | None
    ) -> tuple[datetime | None, int | None]:
        """When the record before offset ``first`` was written, and the topic's partition
        count when it was committed: from a batch this member returned (and its last
        commit), else from the group's committed offset's metadata (`commit`); None where
        not known."""
        stamp = self._stamps.get(tp, {}).get(first) if first is not None else None
        count = self._counts.get(tp.topic)
        if stamp is None:
            try:
                # aiokafka's committed() gives the offset alone; its coordinator gives the
                # metadata too (aiokafka <0.15, as pyproject bounds it).
                got = await self._started()._coordinator.fetch_committed_offsets([tp])
            except KafkaError as exc:
                raise KafkaUnavailable(f"cannot read the committed offset of {tp.topic}") from exc
            committed = got.get(tp)
            if committed is not None:
                at, count = _read_metadata(committed.metadata)
                if committed.offset == first:
                    stamp = at
        since = None if stamp is None else datetime.fromtimestamp(stamp / 1000, UTC)
        return since, count

    async def _dead_letter(self, bad: _Unreadable) -> None:
        if self._dead_letter_suffix is None:
            return
        if self._dead_letters is None:
            producer = Producer(self._bootstrap, self._client_id)
            await producer.start()
            if self._stopped:
                await producer.stop()
                raise KafkaUnavailable("the consumer was stopped while it dead-lettered")
            self._dead_letters = producer
        suffix = self._dead_letter_suffix
        stub = unreadable_stub(bad.topic, bad.partition, bad.offset, bad.end, bad.error, suffix)
        for _, why in await send_isolating(self._dead_letters, [stub], permanent_failure):
            log.error(
                "dead_letter_refused",
                topic=bad.topic,
                partition=bad.partition,
                offset=bad.offset,
                reason=why,
                outcome="dropped",
            )

    async def caught_up(self) -> list[LostRecords] | None:
        """The partitions assigned to this member, if every one of them has been read to
        its log's end (the position, after the records :meth:`getmany` returned, is the end
        offset), each as the `LostRecords` a command lost unseen there would be
        (``reason="stalled"``, offsets not known); None when one has not, none is
        assigned, or a position or the partition count is not known. Raises
        :class:`KafkaUnavailable` if the broker does not answer."""
        consumer = self._started()
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        if not assigned:
            return None
        try:
            ends: dict[Any, int] = await consumer.end_offsets(assigned)
        except KafkaError as exc:
            raise KafkaUnavailable(f"cannot read the end offsets: {exc}") from exc
        found = []
        for tp in assigned:
            try:
                # A partition without a valid position waits in position(): not caught up.
                position = await asyncio.wait_for(consumer.position(tp), timeout=1)
            except (KafkaError, TimeoutError):
                return None
            partitions = len(consumer.partitions_for_topic(tp.topic) or ())
            if position < ends[tp] or not partitions:
                return None
            found.append(
                LostRecords(tp.topic, tp.partition, partitions, None, None, None, "stalled")
            )
        return found

    def assigned_share(self) -> float | None:
        """The fraction of its topics' partitions the group assigned to this member now
        (0 < share <= 1), or None when that is not known: not started, between two
        rebalances (nothing assigned), or the topics' partitions not known yet."""
        consumer = self._consumer
        if consumer is None:
            return None
        mine = len(consumer.assignment())
        total = 0
        for topic in self._topics:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                return None
            total += len(partitions)
        return min(1.0, mine / total) if mine else None

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> bool:
        """Commit, for each ``(topic, partition)``, the NEXT offset to read (last done + 1).

        Returns False, with a log line, when the group refused the commit because it
        rebalanced (a partition is no longer ours, or our generation is old): the work is
        already durable and the partition's new owner reads those records again, which
        idempotent handlers allow. Partitions still assigned are committed. Raises
        :class:`KafkaUnavailable` if the broker did not answer (transient; retry).
        """
        if not offsets:
            return True
        consumer = self._started()
        assigned = consumer.assignment()
        positions = {TopicPartition(t, p): offset for (t, p), offset in offsets.items()}
        kept = {tp: offset for tp, offset in positions.items() if tp in assigned}
        moved = sorted(f"{tp.topic}/{tp.partition}" for tp in positions if tp not in kept)
        if moved:
            log.warning("offset_commit_skipped", reason="partition_moved", partitions=moved)
        if not kept:
            return False
        stamped: dict[Any, tuple[int, str]] = {}
        for tp, offset in kept.items():
            stamps = self._stamps.get(tp)
            stamp = stamps.get(offset) if stamps else None
            if stamps:
                for done in [o for o in stamps if o <= offset]:
                    del stamps[done]
            count = self._counts[tp.topic] = len(consumer.partitions_for_topic(tp.topic) or ())
            stamped[tp] = (offset, _commit_metadata(stamp, count))
        try:
            await consumer.commit(stamped)
        except KafkaError as exc:
            if is_rebalance(exc):
                log.warning("offset_commit_skipped", reason="rebalance", error=repr(exc))
                return False
            raise KafkaUnavailable(f"offset commit failed: {exc}") from exc
        return not moved

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``topic``/``partition`` from ``offset`` on the next :meth:`getmany`."""
        self._started().seek(TopicPartition(topic, partition), offset)

    async def seek_to_committed(self) -> None:
        """Rewind every assigned partition to its committed offset (the start if none).

        After a failed batch this re-reads it without restarting the consumer.
        """
        consumer = self._started()
        # Not aiokafka's seek_to_committed(): it leaves partitions whose committed offset is
        # 0 or missing where they are, which would skip a failed first batch.
        for tp in consumer.assignment():
            committed: int | None = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

    def assignment(self) -> set[tuple[str, int]]:
        """The ``(topic, partition)`` pairs currently assigned to this member."""
        return {(tp.topic, tp.partition) for tp in self._started().assignment()}

    def _started(self) -> Any:
        if self._consumer is None:
            raise RuntimeError("Consumer.start() has not been awaited")
        return self._consumer


class _RetryTopics(Exception):
    """The cluster is not ready to create topics yet."""


async def ensure_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int,
    replication_factor: int = 1,
    *,
    timeout_s: float = 30.0,
    client_id: str = DEFAULT_CLIENT_ID,
) -> None:
    """Create those of ``names`` that do not exist yet, and wait until they are visible.

    Existing topics are left as they are (their partition count is not changed). While the
    broker is still starting, retries for up to ``timeout_s``, then raises
    :class:`KafkaUnavailable`; a refusal that retrying cannot fix raises
    :class:`TopicCreationFailed`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    wanted = list(dict.fromkeys(names))
    while True:
        try:
            await _create_missing(bootstrap, wanted, partitions, replication_factor, client_id)
            return
        except (_RetryTopics, KafkaError, OSError) as exc:
            if loop.time() >= deadline:
                raise KafkaUnavailable(f"could not ensure topics on {bootstrap}: {exc}") from exc
            log.debug("ensure_topics_retrying", bootstrap=bootstrap, error=str(exc))
            await asyncio.sleep(0.5)


async def _create_missing(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication_factor: int,
    client_id: str,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
    try:
        await admin.start()
        existing: set[str] = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, partitions, replication_factor) for name in missing]
            )
            _check_topic_errors(response.topic_errors)
            log.info("kafka_topics_created", topics=missing, partitions=partitions)
        # Creation returns before every listener's metadata has the topic.
        if missing and not set(missing) <= set(await admin.list_topics()):
            raise _RetryTopics("created topics are not visible yet")
    finally:
        await admin.close()


def _check_topic_errors(topic_errors: Sequence[tuple[Any, ...]]) -> None:
    """Accept success and "already exists"; retry transient errors; raise on the rest."""
    transient: list[str] = []
    for entry in topic_errors:
        # (topic, error_code) in v0 of the response, (topic, error_code, error_message) later
        topic, code = str(entry[0]), int(entry[1])
        message = entry[2] if len(entry) > 2 else None
        if code in (0, _TOPIC_ALREADY_EXISTS):
            continue
        error = for_code(code)
        description = f"{topic}: {error.__name__} ({code}) {message or ''}".strip()
        if error.retriable or code == _INVALID_REPLICATION_FACTOR:
            transient.append(description)
        else:
            raise TopicCreationFailed(description)
    if transient:
        raise _RetryTopics("; ".join(transient))


async def kafka_reachable(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True if a broker at ``bootstrap`` answers a metadata request within ``timeout_s``."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=DEFAULT_CLIENT_ID,
        request_timeout_ms=max(1, int(timeout_s * 1000)),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
        return True
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()


def next_offsets(messages: Sequence[InMessage]) -> dict[tuple[str, int], int]:
    """The offsets to commit once these messages are durable: last offset + 1 per partition."""
    offsets: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        offsets[key] = max(offsets.get(key, 0), m.offset + 1)
    return offsets


def dead_letter(message: InMessage, reason: str, suffix: str = ".dlq") -> OutMessage:
    """The copy of a message that can never be processed, for the topic's dead-letter topic."""
    return OutMessage(
        topic=message.topic + suffix,
        key=message.key,
        value=message.value,
        headers=(
            *message.headers,
            (DLQ_REASON_HEADER, reason.encode()[:1000]),
            (DLQ_SOURCE_HEADER, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ),
    )


async def send_isolating(
    producer: Producer,
    messages: Sequence[OutMessage],
    refused_when: Callable[[BaseException], str | None] = record_refused,
) -> list[tuple[int, str]]:
    """Send ``messages``, all but those refused for good; returns the refused ones as
    ``(index in messages, reason)``, the reason from ``refused_when`` (by default
    :func:`service.faults.record_refused`; None: not a refusal, the error propagates).

    The whole list is sent first; if the broker (or the producer) refuses one of its records
    for good, each half is sent in turn the same way, the first before the second, down to
    the refused records alone (about 2·log2(n) sends for one among n), so what goes out
    keeps the order of each key. Records of a refused batch on its other partitions may go
    out twice (as after a crash: consumers are idempotent). A transient error propagates
    (:class:`KafkaUnavailable`): the caller sends the whole list again.
    """
    refused: list[tuple[int, str]] = []

    async def send(start: int, stop: int) -> None:
        if start == stop:
            return
        try:
            await producer.send_many(messages[start:stop], report_refusals=True)
        except Exception as exc:
            reason = refused_when(exc)
            if reason is None:
                raise
            if stop - start == 1:
                refused.append((start, reason))
                return
            log.warning("kafka_batch_isolating", records=stop - start, error=reason)
            middle = (start + stop) // 2
            await send(start, middle)
            await send(middle, stop)

    await send(0, len(messages))
    return refused


def permanent_failure(exc: BaseException) -> str | None:
    """Why a record failed for good (:func:`service.faults.record_refused`, else the
    error's value-free description), or None for a transient error: for
    :func:`send_isolating` where any permanent error is the record's (dead-letter copies,
    whose loss costs a copy, never the original)."""
    if is_transient(exc):
        return None
    return record_refused(exc) or describe(exc)


def unreadable_stub(
    topic: str, partition: int, offset: int, end: int, error: str, suffix: str = ".dlq"
) -> OutMessage:
    """The dead-letter record of a batch of ``topic`` the consumer could not decode: no
    key, no value, and headers ``dlq-reason`` ("unreadable record batch (<error class>)"),
    ``dlq-source`` (``topic/partition/offset``, its first offset, as for a message) and
    ``dlq-source-end`` (the first offset after it)."""
    return OutMessage(
        topic=topic + suffix,
        key=None,
        value=b"",
        headers=(
            (DLQ_REASON_HEADER, f"unreadable record batch ({error})".encode()[:1000]),
            (DLQ_SOURCE_HEADER, f"{topic}/{partition}/{offset}".encode()),
            (DLQ_SOURCE_END_HEADER, str(end).encode()),
        ),
    )


def dead_letter_stub(
    message: InMessage, reason: str, refusal: str, suffix: str = ".dlq"
) -> OutMessage:
    """What stands for a dead-letter copy the broker refused for good (:func:`dead_letter`'s
    copy too large for the dead-letter topic or the producer, say): the key, the reason and
    the source, the refusal (``dlq-refused``), the original value's size in bytes
    (``dlq-original-size``) and SHA-256 (``dlq-original-sha256``, hex), and no value or
    original headers. The original stays at ``dlq-source`` until its topic's retention."""
    return OutMessage(
        topic=message.topic + suffix,
        key=message.key,
        value=b"",
        headers=(
            (DLQ_REASON_HEADER, reason.encode()[:1000]),
            (DLQ_SOURCE_HEADER, f"{message.topic}/{message.partition}/{message.offset}".encode()),
            (DLQ_REFUSED_HEADER, refusal.encode()[:200]),
            (DLQ_ORIGINAL_SIZE_HEADER, str(len(message.value)).encode()),
            (DLQ_ORIGINAL_SHA256_HEADER, hashlib.sha256(message.value).hexdigest().encode()),
        ),
    )


async def send_dead_letters(
    producer: Producer,
    poison: Sequence[tuple[InMessage, str]],
    suffix: str = ".dlq",
    refused_counter: Counter | None = None,
) -> None:
    """Dead-letter each ``(message, reason)``: what the consumers (the deletion worker, the
    webhook dispatcher) do with a message they can never process, before committing past it.

    Each message's :func:`dead_letter` copy goes to its topic's dead-letter topic. A copy
    the broker refuses for good (:func:`send_isolating`: the dead-letter topic's
    ``max.message.bytes`` is below the source topic's, or the added headers push a message
    near the limit over it, or the producer's ``max_request_size``; or any other
    permanent error while sending it, :func:`permanent_failure`: say, a header of the
    original with a null value, which the producer cannot size) must not be retried
    forever, which would hold every later message of its partition: its
    :func:`dead_letter_stub` goes instead (log ``dead_letter_refused``, ``outcome="stub"``),
    and if even that is refused, nothing goes (``outcome="dropped"``, an error line naming
    the source topic, partition and offset; the original stays in its topic until
    retention). Either way the consumer moves on; ``refused_counter`` (labels ``topic``,
    ``outcome``) counts them. Transient errors propagate (:class:`KafkaUnavailable`): the
    caller retries the whole call (copies already written go out again).
    """
    if not poison:
        return
    copies = [dead_letter(message, reason, suffix) for message, reason in poison]
    refused = await send_isolating(producer, copies, permanent_failure)
    if not refused:
        return
    stubs = [dead_letter_stub(poison[i][0], poison[i][1], why, suffix) for i, why in refused]
    dropped = dict(await send_isolating(producer, stubs, permanent_failure))
    for n, (i, why) in enumerate(refused):
        message = poison[i][0]
        outcome = "dropped" if n in dropped else "stub"
        (log.error if n in dropped else log.warning)(
            "dead_letter_refused",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=why,
            outcome=outcome,
            **({"stub_reason": dropped[n]} if n in dropped else {}),
        )
        if refused_counter is not None:
            refused_counter.labels(message.topic, outcome).inc()


async def read_topics(
    bootstrap: str, topics: Sequence[str], timeout_s: float = 30.0
) -> AsyncIterator[InMessage]:
    """Every record of these topics, from the beginning to the end they have now.

    No consumer group: nothing is committed and no member of the service's groups is
    disturbed. Topics that do not exist are skipped. Raises :class:`KafkaUnavailable` when
    the cluster does not answer, or the end is not reached within ``timeout_s``, and
    :class:`UnreadableBatch` when a batch cannot be decoded (it cannot be read past
    without saying so: a caller that looks for something cannot say it is not there).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id=f"{DEFAULT_CLIENT_ID}-reader",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    _back_off_failed_metadata(consumer._client)
    try:
        await consumer.start()
    except (KafkaError, OSError) as exc:
        await consumer.stop()
        raise KafkaUnavailable(f"cannot connect a reader to {bootstrap}") from exc
    try:
        # consumer.partitions_for_topic() reads a metadata cache that only subscriptions
        # fill, so it answers None here: ask the cluster for its metadata directly.
        cluster = await consumer._client.fetch_all_metadata()
        known = cluster.topics()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in known
            for p in sorted(cluster.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends: dict[Any, int] = await consumer.end_offsets(partitions)
        left = {tp for tp in partitions if ends[tp] > 0}
        deadline = asyncio.get_running_loop().time() + timeout_s
        while left:
            if asyncio.get_running_loop().time() > deadline:
                raise KafkaUnavailable("the end of the topics was not reached in time")
            try:
                batches: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=500)
            except Exception as exc:
                bad = _unreadable(exc)
                if bad is None:
                    raise
                if not bad.read:
                    where = f"{bad.topic}/{bad.partition}/{bad.offset}-{bad.end - 1}"
                    raise UnreadableBatch(f"{where} cannot be read ({bad.error})") from None
                # The records read before it first (aiokafka dropped them); it comes next.
                batches = bad.read
                consumer.seek(TopicPartition(bad.topic, bad.partition), bad.offset)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield InMessage(
                            topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            key=record.key,
                            value=record.value if record.value is not None else b"",
                            headers=tuple(record.headers),  # (name, value) pairs, as they come
                        )
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading topics failed: {exc}") from exc
    finally:
        await consumer.stop()
