"""What an error means: the one classification every component uses.

Two kinds, nothing in between:

- **transient**: the database or the broker is not answering right now: unreachable,
  shutting down, starting up, in recovery, out of connections or resources; a
  serialization failure or deadlock; a lock or statement timeout; SQLite busy/locked; a
  consumer-group rebalance. Retried with capped exponential back-off and jitter
  (:class:`service.aio.Backoff`) for as long as it lasts, never counted against an item,
  and answered 503 with ``Retry-After`` at the HTTP edge. :func:`outage_cause` names its
  kind for the 503's code, the retry loops' log lines and /readyz: ``database_timeout``
  (no answer within a bound of `service.db.Timeouts`), ``storage_full``,
  ``database_busy`` (another process holds SQLite's write lock), ``kafka_unavailable``,
  else ``database_unreachable``.
- **permanent**: everything else, and in particular a statement the database refuses
  (a syntax or data error, SQLite "too many SQL variables", a constraint). Retrying cannot
  fix it: the item or job fails with a code, a message and its audit event.

Permanent errors that belong to one unit, not to the component, are named here too, so
that the component fails that unit and goes on: a record the broker refuses
(:func:`record_refused`: the relay sets its row aside) and a fetched batch the consumer
cannot decode (:func:`unreadable_fetch`: the consumer steps past it); a partition position
that is no longer in its log (:func:`position_lost`: the records never read are gone, the
consumer redoes what they held and goes on).

The worker, the relay, the dispatcher, the API and start-up all call :func:`is_transient`;
nothing else decides. The rules read the SQLSTATE of PostgreSQL errors (asyncpg, raw or
as SQLAlchemy wraps it), the extended result code of SQLite errors (``sqlite3``, which
aiosqlite raises as is), and the type of aiokafka errors. Sources: PostgreSQL
"Appendix A. PostgreSQL Error Codes"; SQLite "Result and Error Codes"; KIP-345/aiokafka
``errors.py`` for the group errors.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import aiokafka.errors as kafka_errors
import sqlalchemy.exc as sa_exc
from pydantic import ValidationError

from service.errors import RetryLater, ServiceError

# SQLSTATE classes and codes that mean "not answering right now" (PostgreSQL Appendix A).
_TRANSIENT_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources: too many connections, disk full, out of memory
        "58",  # system error: I/O error
    }
)
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown ("terminating connection due to administrator command")
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now ("the database system is shutting down/starting up")
        "57P05",  # idle_session_timeout
        "25P03",  # idle_in_transaction_session_timeout
        "25006",  # read_only_sql_transaction (a standby, during a failover)
    }
)

# SQLite primary result codes (the low byte of the extended code) that mean "busy".
_SQLITE_TRANSIENT = frozenset(
    {
        5,  # SQLITE_BUSY: another connection holds the lock past the busy timeout
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL: the disk is full
        15,  # SQLITE_PROTOCOL
    }
)

# The group moved under us: the work will be redelivered to the partition's new owner.
_REBALANCE = (
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalStateError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.UnknownMemberIdError,
    kafka_errors.IllegalGenerationError,
)
_KAFKA_TRANSIENT = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.KafkaTimeoutError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.NoBrokersAvailable,
    kafka_errors.KafkaUnavailableError,
)

# The broker refused an idempotent producer's state (its id, epoch or sequence numbers):
# typically after a broker restart lost batches that were in flight. That producer can never
# send again (aiokafka issue #1017; Kafka's own docs: "the only remedy is a new producer
# instance"), so the state is dropped with the producer, and the resend is transient.
_PRODUCER_STATE_LOST = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
    kafka_errors.UnknownProducerId,
    kafka_errors.ProducerFenced,
)


# The broker (or the producer, before sending) refused the RECORD itself: the same record
# is refused every time, whatever the broker's state, so its outbox row is set aside instead
# of being retried (service.relay). Kafka's protocol: MESSAGE_TOO_LARGE (10: over the
# producer's max_request_size, checked client-side, or the topic's max.message.bytes),
# RECORD_LIST_TOO_LARGE (18), INVALID_TOPIC_EXCEPTION (17), CORRUPT_MESSAGE (2: a failed
# CRC or, say, a null key on a compacted topic), INVALID_TIMESTAMP (32), INVALID_RECORD (87,
# which aiokafka maps to UnknownError, so it is not listed). None of them is retriable.
_RECORD_REFUSED = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
)


# What aiokafka raises, out of the consumer's getmany(), for a fetched batch it cannot decode
# (aiokafka.consumer.fetcher.PartitionRecords._unpack_records, the same on every fetch of
# that batch): a compression codec whose library is missing (UnsupportedCodecError), a
# failed CRC or a record that does not parse (CorruptRecordException), a header name that
# is not UTF-8 (UnicodeDecodeError: not even a Kafka error), and whatever else its decoder
# raises there. Where it was raised decides, not the class: `unreadable_fetch`. Also
# RecordTooLargeError, which the fetcher raises for a batch over the fetch size (brokers
# before fetch v3 only) after moving the position past that offset itself.
_FETCH_DECODER = "_unpack_records"
_FETCH_MODULE = "aiokafka/consumer/fetcher.py"


class UnreadableRecord(ValueError):
    """A stored record (an outbox row) cannot be turned into a Kafka record: its headers,
    key or payload do not decode. Permanent for the record, like a broker's refusal."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what SQLAlchemy wrapped (``orig``) and the explicit causes."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        orig = getattr(link, "orig", None)
        todo.append(orig if isinstance(orig, BaseException) else None)
        todo.append(link.__cause__)


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE anywhere in the chain, if any."""
    for link in _chain(exc):
        code = getattr(link, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def producer_state_lost(exc: BaseException) -> bool:
    """True if the broker refused the producer's idempotence state: it needs a new producer.

    Such an error is transient for the work (resent by a new producer, it goes through)
    but permanent for the producer that got it.
    """
    return any(isinstance(link, _PRODUCER_STATE_LOST) for link in _chain(exc))


def record_refused(exc: BaseException) -> str | None:
    """Why the record itself can never be published, or None if ``exc`` does not say so.

    Permanent for the RECORD (set it aside, publish the others): a refusal in
    ``_RECORD_REFUSED`` or an :class:`UnreadableRecord`. The answer is the error's class
    name, fit for the row's ``error`` column and a log line (never the message text, which
    may quote a value). A transient error (:func:`is_transient`) always answers None, even
    when it wraps such a refusal: the broker was not answering, so nothing is known of the
    record yet.
    """
    if is_transient(exc):
        return None
    for link in _chain(exc):
        if isinstance(link, (*_RECORD_REFUSED, UnreadableRecord)):
            return type(link).__name__
    return None


def unreadable_fetch(exc: BaseException) -> str | None:
    """Why the consumer cannot read a batch it fetched, or None if ``exc`` is not that.

    Permanent for the BATCH, never for the consumer: the same bytes come back on every
    fetch, so the consumer steps past the batch (`service.kafka.Consumer.getmany`) rather
    than meet it forever, and every later record of its partition (every job whose
    contacts hash there) waits behind it. The answer is the error's class name (never its
    message). An error raised by aiokafka's record decoder (see ``_FETCH_DECODER``), or a
    ``RecordTooLargeError``; a transient error (:func:`is_transient`) is never one.
    """
    if is_transient(exc):
        return None
    if isinstance(exc, kafka_errors.RecordTooLargeError):
        return type(exc).__name__
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == _FETCH_DECODER and code.co_filename.endswith(_FETCH_MODULE):
            return type(exc).__name__
        tb = tb.tb_next
    return None


# What aiokafka raises, out of the consumer's getmany(), when a partition's position is no
# longer in its log and the consumer is told not to pick another itself
# (``auto_offset_reset="none"``, service.kafka.Consumer): the fetch offset is below the log
# start (retention, log.retention.bytes, DeleteRecords moved it past records never read)
# or beyond the log end (the topic was deleted and created again, the log truncated):
# OffsetOutOfRangeError({tp: fetch offset}); or the group has no committed offset for it
# (a new group, or its offsets expired: offsets.retention.minutes): NoOffsetForPartitionError(tp).
_POSITION_LOST = (kafka_errors.OffsetOutOfRangeError, kafka_errors.NoOffsetForPartitionError)


def position_lost(exc: BaseException) -> str | None:
    """Why the consumer has no position in a partition's log, or None if ``exc`` is not that.

    Permanent for the RECORDS between the position and the log (the ones never read are
    gone: retention deleted them, or the topic was created again), never for the consumer:
    it logs the gap, lets the records' owner redo what they could have held, and goes on
    from the log's start (`service.kafka.Consumer.getmany`). The answer is the error's
    class name. A transient error (:func:`is_transient`) is never one.
    """
    if is_transient(exc):
        return None
    if isinstance(exc, _POSITION_LOST):
        return type(exc).__name__
    return None


class DatabaseOutage(Exception):
    """A wait on the database that ran out, raised by `service.db.Database` with the cause
    named (one of :data:`OUTAGE_CAUSES`): transient, like the error it was raised from."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


# What an outage is, for a 503's code, a log line's ``cause`` and /readyz: the first of
# these that matches the error's chain (`outage_cause`).
DATABASE_TIMEOUT = "database_timeout"  # no answer in time: a paused server, a black hole
STORAGE_FULL = "storage_full"  # the database's storage is full: every write fails
DATABASE_BUSY = "database_busy"  # another process holds SQLite's write lock
DATABASE_UNREACHABLE = "database_unreachable"  # refused, reset, shutting down, in recovery
KAFKA_UNAVAILABLE = "kafka_unavailable"
OUTAGE_CAUSES = (
    DATABASE_TIMEOUT,
    STORAGE_FULL,
    DATABASE_BUSY,
    DATABASE_UNREACHABLE,
    KAFKA_UNAVAILABLE,
)

_SQLITE_FULL = 13
_SQLITE_BUSY = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_PG_STORAGE_FULL = "53100"  # disk_full
_PG_TIMEOUT = frozenset({"57014"})  # query_canceled: statement_timeout
_PG_BUSY = frozenset({"55P03"})  # lock_not_available: lock_timeout
# aiokafka's errors, and service.kafka's KafkaUnavailable (which this module cannot import).
_KAFKA_MODULES = ("aiokafka", "service.kafka")


def _link_cause(link: BaseException) -> str | None:
    if isinstance(link, DatabaseOutage):
        return link.cause
    if isinstance(link, sqlite3.Error):
        code = getattr(link, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == _SQLITE_FULL:
            return STORAGE_FULL
        if primary in _SQLITE_BUSY or (primary is None and "database is locked" in str(link)):
            return DATABASE_BUSY
        return None
    code = getattr(link, "sqlstate", None)
    if isinstance(code, str) and len(code) == 5:
        if code == _PG_STORAGE_FULL:
            return STORAGE_FULL
        if code in _PG_TIMEOUT:
            return DATABASE_TIMEOUT
        if code in _PG_BUSY:
            return DATABASE_BUSY
        return None
    if isinstance(link, TimeoutError | sa_exc.TimeoutError):
        # asyncpg's connect or command timeout, a pool checkout, an asyncio.wait_for.
        return DATABASE_TIMEOUT
    return None


def outage_cause(exc: BaseException) -> str | None:
    """What outage a transient error is, or None for a permanent one.

    One of :data:`OUTAGE_CAUSES`: ``database_timeout`` (the database did not answer in
    time: asyncpg's connect or command timeout, a pool checkout, PostgreSQL's
    statement_timeout), ``storage_full`` (SQLITE_FULL, SQLSTATE 53100 disk_full),
    ``database_busy`` (SQLITE_BUSY/LOCKED past the busy timeout: another process holds the
    write lock; SQLSTATE 55P03 lock_not_available), ``kafka_unavailable`` (a broker
    error), else ``database_unreachable``. The most specific cause anywhere in the chain
    wins (a pool timeout that wraps nothing is a timeout; a commit refused for a full disk
    is ``storage_full`` however SQLAlchemy wrapped it).
    """
    if not is_transient(exc):
        return None
    causes = {cause for link in _chain(exc) if (cause := _link_cause(link)) is not None}
    for cause in (STORAGE_FULL, DATABASE_BUSY, DATABASE_TIMEOUT):
        if cause in causes:
            return cause
    if any(type(link).__module__.startswith(_KAFKA_MODULES) for link in _chain(exc)):
        return KAFKA_UNAVAILABLE
    return DATABASE_UNREACHABLE


def is_rebalance(exc: BaseException) -> bool:
    """True if the error says the consumer group moved (a partition is no longer ours)."""
    return any(isinstance(link, _REBALANCE) for link in _chain(exc))


def _link_is_transient(link: BaseException) -> bool:
    if isinstance(link, RetryLater | OSError | TimeoutError | DatabaseOutage):
        return True
    if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
        return True
    if isinstance(link, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True  # the pool had no connection to give in time / a dead connection
    if isinstance(link, sqlite3.Error):
        code = getattr(link, "sqlite_errorcode", None)
        if isinstance(code, int):
            return (code & 0xFF) in _SQLITE_TRANSIENT
        return "database is locked" in str(link)
    code = getattr(link, "sqlstate", None)
    if isinstance(code, str) and len(code) == 5:
        return code in _TRANSIENT_SQLSTATES or code[:2] in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(link, (*_KAFKA_TRANSIENT, *_REBALANCE)):
        return True
    if isinstance(link, kafka_errors.KafkaError) and link.retriable:
        return True
    # asyncpg raises this bare when its connection died under it.
    return type(link).__name__ == "InterfaceError" and "connection is closed" in str(link)


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` means "the database or broker is not answering right now".

    Everything else is permanent: retrying the same work cannot make it succeed.
    """
    return any(_link_is_transient(link) for link in _chain(exc))


def describe(exc: BaseException) -> str:
    """A short, value-free description of an error, fit for an item's error message.

    Names the driver's code (SQLSTATE or SQLite result name) and the error class, never
    the statement's parameters or the message text (which may quote a value, such as an
    email address).
    """
    if isinstance(exc, ServiceError):
        return exc.message  # our own words, written for the client
    if isinstance(exc, ValidationError):
        # Where and what, without the input (pydantic's text quotes it: a message on a
        # topic may hold anything, an address included).
        problems = exc.errors(include_url=False, include_input=False, include_context=False)
        where = "; ".join(
            f"{'.'.join(map(str, p['loc'])) or 'the value'}: {p['type']}" for p in problems[:5]
        )
        count = exc.error_count()
        return f"invalid ({count} error{'s' if count != 1 else ''}: {where})"[:500]
    for link in _chain(exc):
        if isinstance(link, sqlite3.Error):
            name = getattr(link, "sqlite_errorname", None) or type(link).__name__
            # SQLite's own messages name a limit or a table, never a bound value.
            return f"the database refused the statement ({name}: {str(link)[:120]})"
    coded = [link for link in _chain(exc) if isinstance(getattr(link, "sqlstate", None), str)]
    if coded:
        # The driver's own class (asyncpg's) names the condition best.
        link = next((c for c in coded if type(c).__module__.startswith("asyncpg")), coded[0])
        return (
            f"the database refused the statement (SQLSTATE {link.sqlstate}, {type(link).__name__})"  # type: ignore[attr-defined]
        )
    for link in _chain(exc):
        if isinstance(link, sa_exc.DBAPIError):
            # A refusal by the driver itself (asyncpg's limit of 32767 arguments, a value it
            # cannot encode): its class says enough, its message may quote the value.
            inner = [type(x).__name__ for x in _chain(link) if x is not link]
            return f"the database refused the statement ({inner[-1] if inner else 'DBAPIError'})"
    return f"an unexpected error ({type(exc).__name__})"
