"""The one error classification (service.faults), over real exception instances.

SQLite errors are made by SQLite itself (through sqlite3 and aiosqlite); asyncpg and
aiokafka errors are instances of those libraries' own classes, raw and wrapped the way
SQLAlchemy's asyncpg dialect wraps them. Transient means "the database or broker is not
answering right now"; a statement the database refuses is permanent.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from pathlib import Path

import aiokafka.errors as kafka_errors
import aiosqlite
import asyncpg
import asyncpg.exceptions as pg
import pytest
import sqlalchemy.exc as sa_exc
from pydantic import BaseModel, ValidationError
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from service.aio import Backoff, Stopped, retry_transient, wait_for_dependency
from service.errors import Unavailable, ValidationFailed
from service.faults import (
    OUTAGE_CAUSES,
    DatabaseOutage,
    UnreadableRecord,
    describe,
    is_rebalance,
    is_transient,
    outage_cause,
    producer_state_lost,
    record_refused,
    sqlstate,
)
from service.http import unavailable
from service.kafka import KafkaUnavailable
from service.logs import configure_logging
from tests.real_errors import sqlite_busy, sqlite_full, sqlite_too_many_variables, wrapped

_DBAPI = AsyncAdapt_asyncpg_dbapi(asyncpg)  # type: ignore[no-untyped-call]


@pytest.fixture(autouse=True)
def _logs_to_a_live_stream() -> None:
    # The retry loops log; a test that ran before may have left structlog writing to a
    # capture stream pytest has closed since (the CLI tests configure logging under capsys).
    configure_logging("json", "WARNING")


def through_sqlalchemy(error: pg.PostgresError | pg.InterfaceError) -> sa_exc.DBAPIError:
    """An asyncpg error as SQLAlchemy's asyncpg dialect raises it from a statement."""
    for cls in type(error).__mro__:
        if cls in _DBAPI._asyncpg_error_translate:
            translated = _DBAPI._asyncpg_error_translate[cls](f"{type(error)}: {error}")
            translated.pgcode = translated.sqlstate = getattr(error, "sqlstate", None)
            translated.__cause__ = error
            result = sa_exc.DBAPIError.instance("SELECT 1", {}, translated, _DBAPI.Error)
            assert isinstance(result, sa_exc.DBAPIError)
            return result
    raise AssertionError(f"SQLAlchemy does not translate {type(error)}")


TRANSIENT_PG = [
    pg.CannotConnectNowError("the database system is shutting down"),
    pg.CannotConnectNowError("the database system is starting up"),
    pg.CannotConnectNowError("the database system is in recovery mode"),
    pg.AdminShutdownError("terminating connection due to administrator command"),
    pg.CrashShutdownError("terminating connection because of crash of another server process"),
    pg.TooManyConnectionsError("sorry, too many clients already"),
    pg.SerializationError("could not serialize access due to concurrent update"),
    pg.DeadlockDetectedError("deadlock detected"),
    pg.LockNotAvailableError("canceling statement due to lock timeout"),
    pg.QueryCanceledError("canceling statement due to statement timeout"),
    pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    pg.ConnectionFailureError("connection failure"),
    pg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    pg.DiskFullError("could not extend file: No space left on device"),
]
PERMANENT_PG = [
    pg.PostgresSyntaxError('syntax error at or near "SELEC"'),
    pg.UniqueViolationError("duplicate key value violates unique constraint"),
    pg.NotNullViolationError('null value in column "url" violates not-null constraint'),
    pg.StringDataRightTruncationError("value too long for type character varying(320)"),
    pg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),
    pg.InvalidTextRepresentationError('invalid input syntax for type uuid: "x"'),
    pg.NumericValueOutOfRangeError("bigint out of range"),
    pg.ProgramLimitExceededError("index row size exceeds maximum"),
    pg.UndefinedTableError('relation "nope" does not exist'),
]


@pytest.mark.parametrize("error", TRANSIENT_PG, ids=lambda e: type(e).__name__)
def test_postgres_outage_errors_are_transient_raw_and_wrapped(error: pg.PostgresError) -> None:
    assert is_transient(error)  # as asyncpg raises it while connecting (not wrapped)
    assert is_transient(through_sqlalchemy(error))  # as a statement raises it


@pytest.mark.parametrize("error", PERMANENT_PG, ids=lambda e: type(e).__name__)
def test_statements_postgres_refuses_are_permanent(error: pg.PostgresError) -> None:
    assert not is_transient(error)
    assert not is_transient(through_sqlalchemy(error))
    assert sqlstate(through_sqlalchemy(error)) == error.sqlstate


def test_asyncpg_client_side_refusals_are_permanent_and_a_closed_connection_is_not() -> None:
    too_many = pg.InterfaceError("the number of query arguments cannot exceed 32767")
    assert not is_transient(too_many)
    assert not is_transient(through_sqlalchemy(too_many))
    closed = pg.InterfaceError("cannot call Connection.fetch(): connection is closed")
    assert is_transient(closed)


def test_a_connection_sqlalchemy_saw_die_is_transient() -> None:
    error = sa_exc.DBAPIError.instance(
        "SELECT 1",
        {},
        _DBAPI.InterfaceError("connection is closed"),
        _DBAPI.Error,
        connection_invalidated=True,
    )
    assert isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
    assert is_transient(error)
    assert is_transient(sa_exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached"))


def test_sqlite_busy_is_transient_and_too_many_variables_is_permanent() -> None:
    busy = sqlite_busy()
    assert busy.sqlite_errorname == "SQLITE_BUSY"
    assert is_transient(busy) and is_transient(wrapped(busy))
    refused = sqlite_too_many_variables()
    assert not is_transient(refused) and not is_transient(wrapped(refused))


def test_sqlite_constraint_and_syntax_errors_are_permanent(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (x UNIQUE)")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as unique:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError) as syntax:
        conn.execute("SELEC 1")
    conn.close()
    assert not is_transient(wrapped(unique.value))
    assert not is_transient(wrapped(syntax.value))


async def test_aiosqlite_raises_the_same_errors_and_they_classify_the_same(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    async with aiosqlite.connect(path, isolation_level=None) as holder:
        await holder.execute("CREATE TABLE t (x)")
        await holder.execute("BEGIN IMMEDIATE")
        async with aiosqlite.connect(path, timeout=0, isolation_level=None) as other:
            with pytest.raises(aiosqlite.OperationalError) as busy:
                await other.execute("BEGIN IMMEDIATE")
            limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            with pytest.raises(aiosqlite.OperationalError) as refused:
                await other.execute("SELECT " + ",".join("?" * (limit + 1)), [0] * (limit + 1))
    assert is_transient(busy.value)
    assert not is_transient(refused.value)


KAFKA_TRANSIENT = [
    kafka_errors.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
    kafka_errors.NodeNotReadyError("node 1 not ready"),
    kafka_errors.RequestTimedOutError(),
    kafka_errors.KafkaTimeoutError(),
    kafka_errors.NotCoordinatorForGroupError(),
    kafka_errors.CoordinatorNotAvailableError(),
    kafka_errors.LeaderNotAvailableError(),
]
KAFKA_REBALANCE = [
    kafka_errors.IllegalStateError(
        "Partition TopicPartition(topic='t', partition=0) is not assigned"
    ),
    kafka_errors.CommitFailedError("membership changed"),
    kafka_errors.RebalanceInProgressError(),
    kafka_errors.UnknownMemberIdError(),
    kafka_errors.IllegalGenerationError(),
]


@pytest.mark.parametrize("error", KAFKA_TRANSIENT + KAFKA_REBALANCE, ids=repr)
def test_broker_outage_and_rebalance_errors_are_transient(error: Exception) -> None:
    assert is_transient(error)
    try:
        raise KafkaUnavailable("offset commit failed") from error
    except KafkaUnavailable as wrapper:
        assert is_transient(wrapper)
        assert is_rebalance(wrapper) == (error in KAFKA_REBALANCE)


@pytest.mark.parametrize(
    "error",
    [
        kafka_errors.RecordTooLargeError(),
        kafka_errors.MessageSizeTooLargeError(),
        kafka_errors.TopicAuthorizationFailedError(),
    ],
    ids=repr,
)
def test_broker_refusals_are_permanent(error: Exception) -> None:
    assert not is_transient(error)


# What the broker (or the producer, before sending) answers about one record that it will
# answer every time: permanent for the RECORD, which the relay sets aside.
RECORD_REFUSED = [
    kafka_errors.MessageSizeTooLargeError("the record is 2000000 bytes, over max_request_size"),
    kafka_errors.MessageSizeTooLargeError(),  # the broker's MESSAGE_TOO_LARGE (10)
    kafka_errors.for_code(10)(),
    kafka_errors.RecordListTooLargeError(),
    kafka_errors.InvalidTopicError(),
    kafka_errors.CorruptRecordException(),
    kafka_errors.InvalidTimestampError(),
    UnreadableRecord("unreadable outbox row (JSONDecodeError)"),
]
# Not the record's fault: the broker is away, a leader moves, a request timed out, the
# producer's state was lost (a new producer resends it), or the relay is not allowed to
# write the topic at all (configuration, not this record: retried, never set aside).
NOT_THE_RECORD = [
    *KAFKA_TRANSIENT,
    kafka_errors.NotLeaderForPartitionError(),
    kafka_errors.NotEnoughReplicasError(),
    kafka_errors.NotEnoughReplicasAfterAppendError(),
    kafka_errors.UnknownTopicOrPartitionError(),
    kafka_errors.OutOfOrderSequenceNumber(),
    kafka_errors.TopicAuthorizationFailedError(),
    ValueError("a bug"),
]


@pytest.mark.parametrize("error", RECORD_REFUSED, ids=repr)
def test_a_record_the_broker_will_never_accept_is_refused_for_good(error: Exception) -> None:
    assert not is_transient(error)
    assert record_refused(error) == type(error).__name__
    try:
        raise RuntimeError("while publishing") from error
    except RuntimeError as wrapper:
        assert record_refused(wrapper) == type(error).__name__


@pytest.mark.parametrize("error", NOT_THE_RECORD, ids=repr)
def test_outages_and_configuration_errors_are_not_the_records_fault(error: Exception) -> None:
    assert record_refused(error) is None
    try:
        raise KafkaUnavailable("a message was not delivered") from error
    except KafkaUnavailable as wrapper:
        assert record_refused(wrapper) is None and is_transient(wrapper)


def test_an_outage_that_wraps_a_refusal_is_an_outage() -> None:
    """Nothing is known of the record while the broker is not answering: resend it."""
    try:
        raise KafkaUnavailable("cannot enqueue") from kafka_errors.MessageSizeTooLargeError()
    except KafkaUnavailable as wrapper:
        assert is_transient(wrapper) and record_refused(wrapper) is None


@pytest.mark.parametrize(
    "error",
    [
        kafka_errors.OutOfOrderSequenceNumber(),
        kafka_errors.UnknownProducerId(),
        kafka_errors.InvalidProducerEpoch(),
        kafka_errors.InvalidProducerIdMapping(),
        kafka_errors.ProducerFenced(),
    ],
    ids=repr,
)
def test_a_refused_producer_state_needs_a_new_producer_and_the_resend_is_transient(
    error: Exception,
) -> None:
    """The broker refusing an idempotent producer's id, epoch or sequence (as after a broker
    restart) is permanent for that producer, so Producer replaces it; the work is resent."""
    assert producer_state_lost(error)
    try:
        raise KafkaUnavailable("a message was not delivered") from error
    except KafkaUnavailable as wrapper:
        assert producer_state_lost(wrapper) and is_transient(wrapper)


@pytest.mark.parametrize("error", KAFKA_TRANSIENT + KAFKA_REBALANCE, ids=repr)
def test_outages_keep_the_producer(error: Exception) -> None:
    assert not producer_state_lost(error)


def test_sockets_and_timeouts_are_transient_bugs_and_bad_data_are_not() -> None:
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(TimeoutError())

    class Model(BaseModel):
        x: int

    with pytest.raises(ValidationError) as invalid:
        Model.model_validate({"x": "nope"})
    for error in (ValueError("bad"), KeyError("k"), RuntimeError("bug"), invalid.value):
        assert not is_transient(error)


# Each outage by its kind (service.faults.outage_cause): what the 503, the retry loops'
# log lines and /readyz name. Real instances, raw and as SQLAlchemy wraps them.
OUTAGES: list[tuple[str, BaseException]] = [
    ("database_timeout", TimeoutError()),  # asyncpg's connect/command timeout, a wait_for
    ("database_timeout", sa_exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached")),
    ("database_timeout", pg.QueryCanceledError("canceling statement due to statement timeout")),
    ("storage_full", pg.DiskFullError("could not extend file: No space left on device")),
    ("database_busy", pg.LockNotAvailableError("canceling statement due to lock timeout")),
    ("database_busy", DatabaseOutage("database_busy", "no SQLite write connection")),
    ("database_unreachable", ConnectionRefusedError(111, "Connection refused")),
    ("database_unreachable", pg.CannotConnectNowError("the database system is shutting down")),
    ("database_unreachable", pg.TooManyConnectionsError("sorry, too many clients already")),
    ("kafka_unavailable", kafka_errors.KafkaConnectionError("no broker")),
    ("kafka_unavailable", KafkaUnavailable("the broker did not answer")),
]


@pytest.mark.parametrize(("cause", "error"), OUTAGES, ids=lambda x: getattr(x, "__name__", None))
def test_each_outage_is_named_by_its_kind_raw_and_wrapped(cause: str, error: Exception) -> None:
    assert outage_cause(error) == cause
    if isinstance(error, pg.PostgresError):
        assert outage_cause(through_sqlalchemy(error)) == cause
    elif not isinstance(error, sa_exc.SQLAlchemyError):  # (SQLAlchemy's own are not wrapped)
        assert outage_cause(wrapped(error)) == cause


def test_sqlite_full_and_busy_are_named_as_sqlite_raises_them() -> None:
    full = sqlite_full()
    assert full.sqlite_errorname == "SQLITE_FULL"
    assert outage_cause(full) == outage_cause(wrapped(full)) == "storage_full"
    busy = sqlite_busy()
    assert outage_cause(busy) == outage_cause(wrapped(busy)) == "database_busy"
    # The most specific cause wins wherever it is in the chain.
    try:
        raise TimeoutError("the write gave up") from wrapped(full)
    except TimeoutError as chained:
        assert outage_cause(chained) == "storage_full"


def test_a_permanent_error_is_no_outage() -> None:
    for error in (*PERMANENT_PG, sqlite_too_many_variables(), ValueError("bad")):
        assert outage_cause(error) is None


@pytest.mark.parametrize("cause", OUTAGE_CAUSES)
def test_each_outage_is_a_503_with_retry_after_and_its_own_code(cause: str) -> None:
    answer = unavailable(cause)
    assert isinstance(answer, Unavailable) and answer.status == 503
    assert int(answer.headers["Retry-After"]) >= 1
    if cause in {"database_timeout", "storage_full", "database_busy"}:
        assert answer.code == cause
        assert "cannot reach" not in answer.message  # it is reached: it says what is wrong
    else:
        assert answer.code == "service_unavailable"


def test_describe_names_the_code_never_a_value() -> None:
    leaky = pg.InvalidTextRepresentationError('invalid input syntax for type uuid: "ann@x.io"')
    text = describe(through_sqlalchemy(leaky))
    assert "22P02" in text and "ann@x.io" not in text
    client_side = pg.DataError("invalid input for query argument $1: 'ann@x.io'")
    assert "ann@x.io" not in describe(through_sqlalchemy(client_side))
    assert "too many SQL variables" in describe(wrapped(sqlite_too_many_variables()))
    assert describe(ValidationFailed("filter too wide")) == "filter too wide"


def test_describe_of_a_validation_error_names_where_and_what_never_the_input() -> None:
    class Model(BaseModel):
        contact_id: uuid.UUID
        count: int

    with pytest.raises(ValidationError) as invalid:
        Model.model_validate({"contact_id": "ann@x.io", "count": "ann@x.io"})
    text = describe(invalid.value)
    assert "ann@x.io" not in text
    assert text == "invalid (2 errors: contact_id: uuid_parsing; count: int_parsing)"


# -- back-off --------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    policy = Backoff(base_s=0.1, cap_s=2.0, rng=random.Random(7))
    delays = [policy.next_delay() for _ in range(10)]
    for n, delay in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, so many clients do not march in step
    policy.reset()
    assert policy.next_delay() <= 0.1


async def test_retry_transient_waits_out_an_outage_and_lets_a_refusal_through() -> None:
    slept: list[float] = []

    async def sleep(delay: float, stop: asyncio.Event) -> None:
        slept.append(delay)

    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise through_sqlalchemy(pg.CannotConnectNowError("the database system is starting up"))
        return "done"

    backoff = Backoff(sleep=sleep, rng=random.Random(1))
    assert await retry_transient(flaky, asyncio.Event(), event="t", backoff=backoff) == "done"
    assert len(slept) == 4 and slept == sorted(slept)

    async def refused() -> None:
        raise through_sqlalchemy(pg.PostgresSyntaxError("syntax error"))

    with pytest.raises(sa_exc.DBAPIError):
        await retry_transient(refused, asyncio.Event(), event="t", backoff=Backoff(sleep=sleep))
    assert len(slept) == 4  # a refusal is never retried


async def test_waiting_for_a_dependency_stops_on_request() -> None:
    stop = asyncio.Event()

    async def sleep(delay: float, stop_: asyncio.Event) -> None:
        stop.set()

    async def down() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(Stopped):
        await wait_for_dependency(
            down, stop, dependency="database", component="worker", backoff=Backoff(sleep=sleep)
        )
