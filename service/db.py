"""Database: engines, the schema (SQLAlchemy Core), and transactions.

SQLite is the embedded default and PostgreSQL the production backend; both run the same
Core statements. SQLite allows one writer at a time, so on SQLite write transactions go
through an engine of one connection that starts with ``BEGIN IMMEDIATE`` (writers queue
in-process instead of failing with "database is locked"), and reads use a second engine.
The write-ahead log is copied into the database file (checkpointed) by a connection of its
own, beside the writer rather than inside its commits (`_WalCheckpointer`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

from service.faults import DATABASE_BUSY, STORAGE_FULL, DatabaseOutage, outage_cause
from service.logs import get_logger

if TYPE_CHECKING:
    from service.config import Settings

log = get_logger(__name__)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class EncodedJSON(tuple[Any, ...]):
    """A JSON array value that many rows share, with its JSON text computed once.

    The engines' JSON serializer (:func:`json_serializer`) writes ``json`` instead of
    encoding the value again for every row; any other serializer sees a tuple and writes
    the same array. Immutable, so the text cannot go stale.
    """

    json: str

    def __new__(cls, items: Iterable[Any]) -> EncodedJSON:
        value = super().__new__(cls, items)
        value.json = json.dumps(list(value))
        return value


def json_serializer(value: Any) -> str:
    """JSON text of a JSON column's value: ``json.dumps``, or the text an
    :class:`EncodedJSON` carries (byte-for-byte what ``json.dumps`` gives for it)."""
    if type(value) is EncodedJSON:
        return value.json
    return json.dumps(value)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the stores use)."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on both backends."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UUID = sa.Uuid(as_uuid=True)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("workspace_id", UUID, sa.ForeignKey("workspaces.id"), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("scopes", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
)

contacts = sa.Table(
    "contacts",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("workspace_id", UUID, nullable=False),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("first_name", sa.String(200), nullable=True),
    sa.Column("last_name", sa.String(200), nullable=True),
    sa.Column("phone", sa.String(64), nullable=True),
    sa.Column("properties", JSONType, nullable=False),
    sa.Column("member_role", sa.String(16), nullable=True),
    sa.Column("has_billing_subscription", sa.Boolean, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_contacts_workspace_id_id", "workspace_id", "id"),
    sa.Index("ix_contacts_workspace_id_email", "workspace_id", "email"),
    sa.Index("ix_contacts_workspace_id_last_name", "workspace_id", "last_name"),
    # SQLite: rows stored in id order, the order a filter job deletes them in, so that a
    # batch's deletions share pages (migration 0012).
    sqlite_with_rowid=False,
)


def _timeline_table(name: str, *columns: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", UUID, primary_key=True),
        sa.Column("workspace_id", UUID, nullable=False),
        # Nullable on purpose: deleting a contact keeps its timeline and nulls this.
        sa.Column("contact_id", UUID, nullable=True),
        *columns,
        sa.Column("created_at", UTCDateTime, nullable=False),
        # Only rows still linked to a contact: every reader names contacts, and a deletion
        # then only removes its rows' entries (migration 0010).
        sa.Index(
            f"ix_{name}_contact_id",
            "contact_id",
            postgresql_where=sa.text("contact_id IS NOT NULL"),
            sqlite_where=sa.text("contact_id IS NOT NULL"),
        ),
    )


activities = _timeline_table(
    "activities",
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(500), nullable=True),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
)
notes = _timeline_table(
    "notes",
    sa.Column("body", sa.Text, nullable=False),
)
tasks = _timeline_table(
    "tasks",
    sa.Column("title", sa.String(500), nullable=False),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("due_at", UTCDateTime, nullable=True),
)

deletion_jobs = sa.Table(
    "deletion_jobs",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("workspace_id", UUID, nullable=False),
    sa.Column("api_key_id", UUID, nullable=True),
    sa.Column("request_id", sa.String(200), nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("delete_members", sa.Boolean, nullable=False),
    # Redact the deleted contacts' values inside the timeline they leave (issue 12).
    sa.Column("redact_timeline", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("selector", JSONType, nullable=False),
    # Filter/search jobs learn their size while the worker expands them.
    sa.Column("expanded", sa.Boolean, nullable=False),
    # Where the next expansion page starts; a repeated expansion message is ignored.
    sa.Column("expand_after", UUID, nullable=True),
    sa.Column("total_requested", sa.Integer, nullable=False),
    # Filter/search jobs: how many contacts matched when the job was accepted (an estimate:
    # contacts may come and go while the job runs). Null for ids/emails jobs.
    sa.Column("estimated_total", sa.Integer, nullable=True),
    sa.Column("processed_count", sa.Integer, nullable=False),
    sa.Column("deleted_count", sa.Integer, nullable=False),
    sa.Column("not_found_count", sa.Integer, nullable=False),
    sa.Column("failed_count", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    # A `failed` job's reason (it could not run at all); null for every other job (0006).
    sa.Column("failure_code", sa.String(64), nullable=True),
    sa.Column("failure_message", sa.String(500), nullable=True),
    sa.Index("ix_deletion_jobs_workspace_id_created_at", "workspace_id", "created_at"),
)

deletion_job_items = sa.Table(
    "deletion_job_items",
    metadata,
    sa.Column("job_id", UUID, primary_key=True),
    # What the caller named: a contact id, or an email address for the emails selector.
    sa.Column("ref", sa.String(320), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("contact_id", UUID, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.String(500), nullable=True),
    sa.Column("processed_at", UTCDateTime, nullable=True),
    sa.Index("ix_deletion_job_items_job_id_position", "job_id", "position"),
    # The job object's not_found and errors lists, without reading the job's other items
    # (migration 0005).
    *(
        sa.Index(
            f"ix_deletion_job_items_{status}",
            "job_id",
            "position",
            postgresql_where=sa.text(f"status = '{status}'"),
            sqlite_where=sa.text(f"status = '{status}'"),
        )
        for status in ("not_found", "failed")
    ),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("workspace_id", UUID, primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # The job the first request created, so a crashed request can still be answered.
    sa.Column("job_id", UUID, nullable=True),
    sa.Column("response_status", sa.Integer, nullable=True),
    sa.Column("response_headers", JSONType, nullable=True),
    sa.Column("response_body", sa.LargeBinary, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    # The contact the stored answer shows (a created contact, a timeline item's contact):
    # deleting the contact erases the answer (service.idempotency.erase_answers).
    sa.Column("contact_id", UUID, nullable=True),
    sa.Index(
        "ix_idempotency_keys_contact_id",
        "contact_id",
        postgresql_where=sa.text("contact_id IS NOT NULL"),
        sqlite_where=sa.text("contact_id IS NOT NULL"),
    ),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", BigIntPK, primary_key=True, autoincrement=True),
    sa.Column("topic", sa.String(200), nullable=False),
    sa.Column("key", sa.String(200), nullable=True),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("headers", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("published_at", UTCDateTime, nullable=True),
    # Set instead of published_at when the broker refused the row for good (too large,
    # invalid topic, corrupt) or it cannot be read: never published, never retried.
    sa.Column("failed_at", UTCDateTime, nullable=True),
    sa.Column("error", sa.String(500), nullable=True),
    sa.Index(
        "ix_outbox_unpublished",
        "id",
        postgresql_where=sa.text("published_at IS NULL AND failed_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL AND failed_at IS NULL"),
    ),
)

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("workspace_id", UUID, nullable=False, index=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("description", sa.String(500), nullable=True),
    sa.Column("event_types", JSONType, nullable=False),
    sa.Column("rate_limit_per_s", sa.Float, nullable=True),
    # Concurrent requests at most, across every dispatcher; null: the service default.
    sa.Column("max_in_flight", sa.Integer, nullable=True),
    # The one dispatcher sending to this endpoint, until when (a lease it renews).
    sa.Column("owner", sa.String(64), nullable=True),
    sa.Column("owner_until", UTCDateTime, nullable=True),
    sa.Column("secret", sa.String(100), nullable=False),
    # Rotated-out secrets that still sign: [{"secret", "expires_at"}], newest first.
    sa.Column("retired_secrets", JSONType, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # null | "gone" (the receiver answered 410) | "failing" (failed for too long)
    sa.Column("disabled_reason", sa.String(200), nullable=True),
    sa.Column("disabled_at", UTCDateTime, nullable=True),
    sa.Column("failing_since", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("workspace_id", UUID, nullable=False),
    sa.Column("endpoint_id", UUID, nullable=False),
    sa.Column("event_id", sa.String(100), nullable=False),
    sa.Column("event_type", sa.String(100), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt_count", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Column("last_attempt_at", UTCDateTime, nullable=True),
    # In flight until then (a lease: a dispatcher that dies lets it lapse).
    sa.Column("claimed_until", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("completed_at", UTCDateTime, nullable=True),
    # A retry asked for while an attempt was in flight: due again once that is recorded.
    sa.Column("retry_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("delivery_id", UUID, nullable=False, index=True),
    sa.Column("attempted_at", UTCDateTime, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("error", sa.String(500), nullable=True),
    sa.Column("response_body", sa.Text, nullable=True),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("workspace_id", UUID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    # Random (v4): no index on it alone, no query reads an event by its id (0010).
    sa.Column("id", UUID, nullable=False),
    # Stored exactly as hashed (a string) so that re-hashing needs no re-formatting.
    sa.Column("occurred_at", sa.String(40), nullable=False),
    sa.Column("actor_type", sa.String(32), nullable=False),
    sa.Column("actor_id", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("target_type", sa.String(64), nullable=True),
    sa.Column("target_id", sa.String(200), nullable=True),
    sa.Column("job_id", sa.String(64), nullable=True),
    sa.Column("request_id", sa.String(200), nullable=True),
    # Canonical JSON text, exactly the bytes that were hashed.
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("email_hmac", sa.String(64), nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_audit_events_target", "workspace_id", "target_id"),
    sa.Index("ix_audit_events_job", "workspace_id", "job_id"),
    sa.Index("ix_audit_events_email", "workspace_id", "email_hmac"),
)

# One row per workspace: the head of its audit chain. Writers lock it, which is what
# makes `seq` gap-free and the chain fork-free with many concurrent writers.
audit_heads = sa.Table(
    "audit_heads",
    metadata,
    sa.Column("workspace_id", UUID, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

server_secrets = sa.Table(
    "server_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(200), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


class _ValueList(sa.TypeDecorator[Collection[Any]]):
    """The values of `any_of` as one parameter: a PostgreSQL array (asyncpg encodes it in
    C), or on SQLite the JSON array of what the column's own type binds (``json_each``);
    with ``stored`` the values already are that (`stored_values`) and go as they are.
    (``stored`` is part of the type's cache key, as an argument of ``__init__``: a
    statement compiled for one kind of value is never reused for the other.)"""

    impl = sa.String
    cache_ok = True

    def __init__(self, item_type: sa.types.TypeEngine[Any], stored: bool = False) -> None:
        super().__init__()
        self.item_type = item_type
        self.stored = stored

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(self.item_type))
        return dialect.type_descriptor(sa.String())

    def process_bind_param(self, value: Collection[Any] | None, dialect: sa.Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        item = None if self.stored else self.item_type._cached_bind_processor(dialect)
        values = [item(v) for v in value] if item is not None else list(value)
        try:
            # orjson: a batch's hundreds of ids in a fraction of json.dumps's time.
            return orjson.dumps(values).decode()
        except TypeError:  # orjson.JSONEncodeError: a str with a lone surrogate, say
            return json.dumps(values)


class _AnyOf(sa.sql.expression.ColumnElement[bool]):
    """``column`` equals one of the values bound as a single parameter (`any_of`)."""

    __visit_name__ = "any_of"
    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("values", InternalTraversal.dp_clauseelement),
    ]
    type = sa.Boolean()
    # A comparison, not a boolean value: SQLite must not get `... = 1` appended in a WHERE.
    _is_implicitly_boolean = True

    def __init__(self, column: sa.ColumnElement[Any], values: sa.BindParameter[Any]) -> None:
        self.column = column
        self.values = values


@compiles(_AnyOf, "postgresql")
def _any_of_postgresql(element: _AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    return (
        f"{compiler.process(element.column, **kw)} = ANY({compiler.process(element.values, **kw)})"
    )


@compiles(_AnyOf)
def _any_of_sqlite(element: _AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"{column} IN (SELECT value FROM json_each({compiler.process(element.values, **kw)}))"


def any_of(
    column: sa.ColumnElement[Any], values: Collection[Any], *, stored: bool = False
) -> sa.ColumnElement[bool]:
    """``column IN values`` with the values bound as ONE parameter, however many there are.

    A plain ``IN`` list binds one parameter per value, each through SQLAlchemy's bind
    processing, and renders the statement anew for its length: with the worker's batches
    of hundreds of ids that was about a fifth of its busy time (py-spy). PostgreSQL:
    ``column = ANY($1)`` with an array; SQLite: ``column IN (SELECT value FROM
    json_each(?))`` with a JSON array of what the column's type binds (a `Uuid` as its 32
    hex digits, as stored). Both use the column's index as the ``IN`` list did
    (tests/integration/test_db_helpers.py). ``stored``: the values are already in the form
    the column's type binds them (`stored_values`), so a list bound by several statements
    of a batch is converted once, not by each.
    """
    param = sa.bindparam(None, list(values), type_=_ValueList(column.type, stored), unique=True)
    return _AnyOf(column, param)


def stored_values(
    conn: AsyncConnection, column: sa.ColumnElement[Any], values: Iterable[Any]
) -> list[Any]:
    """``values`` as ``column``'s type binds them on this connection's database (SQLite: a
    `Uuid` as its 32 hex digits; PostgreSQL: as they are, asyncpg encodes them), for
    `any_of(..., stored=True)`."""
    dialect = conn.dialect
    if dialect.name == "postgresql":
        return list(values)
    process = column.type._cached_bind_processor(dialect)
    return [process(v) for v in values] if process is not None else list(values)


_Processors = list[tuple[int, Callable[[Any], Any]]]
_INSERTS: dict[tuple[str, sa.Table, tuple[str, ...]], tuple[str, _Processors]] = {}


async def insert_rows(
    conn: AsyncConnection, table: sa.Table, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` in one statement through the driver; each row is a NamedTuple whose
    field names are the table's columns (one definition of the row's shape).

    PostgreSQL: a binary ``COPY`` of the rows (asyncpg's ``copy_records_to_table``) once
    the transaction is open, else (the transaction's first statement)
    ``INSERT ... SELECT * FROM unnest($1::type[], ...)``, one array per column; either way
    one round trip, not one per row; errors are asyncpg's own (service.faults reads both).
    SQLite: one executemany. Only the values whose column type needs it are
    converted, by that type's own bind processor (a `Uuid` on SQLite, a `UTCDateTime`,
    JSON), so hundreds of rows cost no dict each nor SQLAlchemy's per-parameter bind
    processing. The statement is compiled once per dialect, table and column list.
    """
    if not rows:
        return
    dialect = conn.dialect
    columns: tuple[str, ...] = rows[0]._fields  # type: ignore[attr-defined]
    key = (dialect.name, table, columns)
    found = _INSERTS.get(key)
    if found is None:
        found = _INSERTS[key] = _insert_statement(dialect, table, columns)
    sql, processors = found
    values = _converted(rows, processors) if processors else list(rows)
    if dialect.name != "postgresql":
        await conn.exec_driver_sql(sql, values)
        return
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if driver is not None and driver.is_in_transaction():
        # COPY: asyncpg encodes the rows as they are. Bound as arrays, every element of
        # every column went through asyncpg's test for a nested array (isinstance against
        # collections.abc, twice for a string): 4.6 -> 0.8 us of the client's CPU per
        # audit event, the server's the same. Only inside the transaction the adapter has
        # opened (it opens it at its first statement; before that a COPY would commit on
        # its own): the hot paths insert after a read, so never first.
        await driver.copy_records_to_table(
            table.name, records=values, columns=columns, schema_name=table.schema
        )
        return
    await conn.exec_driver_sql(sql, tuple(map(list, zip(*values, strict=True))))


def _insert_statement(
    dialect: sa.Dialect, table: sa.Table, columns: tuple[str, ...]
) -> tuple[str, _Processors]:
    compiled = table.insert().compile(dialect=dialect, column_keys=list(columns))
    order = tuple(compiled.positiontup or ())
    if order != columns:
        raise ValueError(f"insert_rows: the statement binds {order}, not {columns}")
    processors: _Processors = [
        (i, p)
        for i, name in enumerate(columns)
        if (p := table.c[name].type._cached_bind_processor(dialect)) is not None
    ]
    if dialect.name != "postgresql":
        return str(compiled), processors
    preparer = dialect.identifier_preparer
    arrays = ", ".join(
        f"${i}::{table.c[name].type.compile(dialect=dialect)}[]"
        for i, name in enumerate(columns, start=1)
    )
    names = ", ".join(preparer.quote(name) for name in columns)
    return (
        f"INSERT INTO {preparer.format_table(table)} ({names}) SELECT * FROM unnest({arrays})",
        processors,
    )


def _converted(rows: Sequence[tuple[Any, ...]], processors: _Processors) -> list[tuple[Any, ...]]:
    """The rows with the values of the columns in ``processors`` converted, column by
    column. A value that is the same object as the one before it in its column (a batch's
    rows share their job id, time and topic) is converted once: a processor's result
    depends only on its value."""
    values = [list(row) for row in rows]
    for i, process in processors:
        last: Any = None
        converted: Any = None
        for row in values:
            value = row[i]
            if value is None:
                continue
            if value is not last:
                last, converted = value, process(value)
            row[i] = converted
    return [tuple(row) for row in values]


def new_id() -> uuid.UUID:
    """A random UUID (v4) for a new row."""
    return uuid.uuid4()


# Of a 128-bit integer: the version nibble and the two variant bits (RFC 9562, 4.1-4.2).
_VERSION_VARIANT_MASK = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_4_VARIANT = (4 << 76) | (0x8000 << 48)


def raw_column(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The column under its own name, without SQLAlchemy's result conversion: what the
    driver returns (SQLite: text; asyncpg: its UUID and an aware datetime)."""
    return sa.type_coerce(column, sa.types.NullType()).label(column.key)


def new_ids(count: int) -> list[uuid.UUID]:
    """``count`` random UUIDs (v4, as `uuid.uuid4` makes them) from one read of the
    system's random source: a batch of the worker needs two per contact, and `uuid.uuid4`
    (a read and the keyword parsing of ``UUID(bytes=..., version=4)`` each) cost several
    microseconds apiece."""
    raw = os.urandom(16 * count)
    from_bytes = int.from_bytes
    return [
        uuid.UUID(int=(from_bytes(raw[i : i + 16]) & _VERSION_VARIANT_MASK) | _VERSION_4_VARIANT)
        for i in range(0, 16 * count, 16)
    ]


def new_time_ids(count: int) -> list[uuid.UUID]:
    """``count`` time-ordered UUIDs (v7, RFC 9562 §5.7): the unix time in milliseconds,
    then the place in this batch (12 bits, so a batch's ids ascend), then 62 random bits.

    For rows written in bulk and then read and updated in the order they were made
    (webhook deliveries and their attempts): an index over random ids takes each new row
    on a random page, so a transaction of a few hundred of them dirtied a few hundred pages
    of every such index (on SQLite each written to the log and copied back at the
    checkpoint); time-ordered ids go to the index's last pages (issue 8)."""
    # Past 4,096 ids the place carries into the millisecond field: a batch still ascends.
    start = (time.time_ns() // 1_000_000) << 12
    raw = os.urandom(8 * count)
    from_bytes = int.from_bytes
    tail_mask = (1 << 62) - 1
    return [
        uuid.UUID(
            int=((start + n) >> 12 & 0xFFFF_FFFF_FFFF) << 80
            | 7 << 76
            | ((start + n) & 0xFFF) << 64
            | 2 << 62
            | from_bytes(raw[8 * n : 8 * n + 8]) & tail_mask
        )
        for n in range(count)
    ]


def new_id_texts(count: int) -> list[str]:
    """The canonical text (``str(uuid)``) of ``count`` random UUIDs (v4), made from the
    random bytes without a `uuid.UUID` each: for ids that are only ever written as text
    (event ids), where making the UUID and then its text cost two thirds more."""
    raw = bytearray(os.urandom(16 * count))
    for i in range(6, 16 * count, 16):
        raw[i] = (raw[i] & 0x0F) | 0x40  # version 4
        raw[i + 2] = (raw[i + 2] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return [
        f"{h[j : j + 8]}-{h[j + 8 : j + 12]}-{h[j + 12 : j + 16]}-"
        f"{h[j + 16 : j + 20]}-{h[j + 20 : j + 32]}"
        for j in range(0, 32 * count, 32)
    ]


def _run_statement(
    conn: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any] | None, Any, int]:
    """In the connection's thread: one statement from cursor to close (`_OneHopCursor`)."""
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        if cursor.description:
            return cursor.description, cursor.fetchall(), -1, -1
        return None, None, cursor.lastrowid, cursor.rowcount
    finally:
        cursor.close()


class _OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor with each statement in ONE hand-off to the
    connection's thread (`_run_statement`), where the stock one takes four (open a cursor,
    execute, fetch the rows, close), each a round trip through the event loop: on the
    one SQLite writer every hand-off is time the write lock is held while the main thread
    is busy elsewhere. Same results, errors and rows (buffered, as the stock cursor
    buffers them). Uses aiosqlite's queue of work for its thread (``_execute``) and its
    ``sqlite3`` connection (``_conn``); `_one_hop_dbapi` falls back to the stock cursor
    where an aiosqlite lacks them."""

    __slots__ = ()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._run(operation, parameters, many=False)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._run(operation, seq_of_parameters, many=True)

    def _run(self, operation: Any, parameters: Any, *, many: bool) -> None:
        aio = self._connection
        try:
            description, rows, lastrowid, rowcount = self.await_(
                aio._execute(_run_statement, aio._conn, operation, parameters, many)
            )
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self.description = description
        self.lastrowid = lastrowid if description is None else -1
        self.rowcount = rowcount if description is None else -1
        if rows is not None:
            self._rows = collections.deque(rows)


class _OneHopConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    def cursor(self, server_side: bool = False) -> AsyncAdapt_aiosqlite_cursor:
        if server_side:
            return super().cursor(server_side=True)
        return _OneHopCursor(self)


class _OneHopDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """aiosqlite as SQLAlchemy adapts it, with `_OneHopCursor` for its cursors."""

    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        adapted = super().connect(*arg, **kw)
        if type(adapted) is not AsyncAdapt_aiosqlite_connection:
            return adapted
        return _OneHopConnection(self, adapted._connection)


def _one_hop_dbapi() -> dict[str, Any]:
    """The ``module`` argument of a SQLite engine: `_OneHopDBAPI` where this aiosqlite has
    what it uses, else nothing (SQLAlchemy's own adapter)."""
    import aiosqlite

    if not (hasattr(aiosqlite.Connection, "_execute") and hasattr(aiosqlite.Connection, "_conn")):
        return {}
    return {"module": _OneHopDBAPI(aiosqlite, sqlite3)}


@dataclass(frozen=True)
class Timeouts:
    """How long the service waits on its database, each wait in seconds (DESIGN §3: a
    database that stops answering without refusing is an outage with a bound, never a
    hang). Defaults are the settings' (``DATABASE_*_TIMEOUT_S``, ``SQLITE_BUSY_TIMEOUT_MS``).

    - ``connect_s``: opening a PostgreSQL connection (asyncpg's ``timeout``; its default
      is 60 s), and the pool's ping of a pooled connection before use.
    - ``statement_s``: one PostgreSQL statement's answer (asyncpg's ``command_timeout``);
      None: no bound. Meant to sit far above the longest statement the service runs (an
      expansion page, at most ``EXPAND_WINDOWS_PER_PAGE`` windows; a filter job's count
      when it is accepted; a worker's delete batch), which take well under a second at
      the bench's sizes. Migrations run on an engine of their own (`migration_engine`),
      without it; `Database.unbounded` lifts it for maintenance (``VACUUM FULL``).
    - ``pool_s``: waiting for a connection of the pool (SQLAlchemy's ``pool_timeout``,
      30 s by default): on SQLite, the one writer connection of the process.
    - ``busy_ms``: SQLite's busy timeout, how long a writer waits for a lock another
      process holds before SQLITE_BUSY (milliseconds).
    """

    connect_s: float = 5.0
    statement_s: float | None = 30.0
    pool_s: float = 10.0
    busy_ms: int = 5_000


class Database:
    """The engines of one database and the two kinds of transaction the service uses.

    Every wait on the database is bounded (`Timeouts`). A write that fails because the
    storage is full or another process holds SQLite's write lock is remembered for
    ``TROUBLE_MEMORY_S`` (`write_trouble`, for /readyz), until a write commits.
    """

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        busy_timeout_ms: int | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        bounds = timeouts or Timeouts()
        if busy_timeout_ms is not None:
            bounds = replace(bounds, busy_ms=busy_timeout_ms)
        self.timeouts = bounds
        self._trouble: tuple[str, float] | None = None
        if self.is_sqlite:
            _ensure_sqlite_dir(url)
            if ":memory:" in url:
                # One shared in-memory database: one connection serves reads and writes.
                self._writer = create_async_engine(url, echo=echo, json_serializer=json_serializer)
                self._reader = self._writer
            else:
                self._writer = create_async_engine(
                    url,
                    echo=echo,
                    pool_size=1,
                    max_overflow=0,
                    pool_timeout=bounds.pool_s,
                    json_serializer=json_serializer,
                    **_one_hop_dbapi(),
                )
                self._reader = create_async_engine(
                    url,
                    echo=echo,
                    pool_size=4,
                    max_overflow=4,
                    pool_timeout=bounds.pool_s,
                    json_serializer=json_serializer,
                    **_one_hop_dbapi(),
                )
            self._checkpointer = None if ":memory:" in url else _WalCheckpointer(_sqlite_path(url))
            _sqlite_pragmas(
                self._writer,
                immediate=True,
                busy_timeout_ms=bounds.busy_ms,
                autocheckpoint=WAL_AUTOCHECKPOINT_FALLBACK if self._checkpointer else None,
                cache_kib=WRITER_CACHE_KIB,
            )
            if self._reader is not self._writer:
                _sqlite_pragmas(self._reader, immediate=False, busy_timeout_ms=bounds.busy_ms)
        else:
            self._writer = create_async_engine(
                url,
                echo=echo,
                pool_size=10,
                max_overflow=10,
                pool_pre_ping=True,
                pool_timeout=bounds.pool_s,
                json_serializer=json_serializer,
                connect_args={"timeout": bounds.connect_s, "command_timeout": bounds.statement_s},
            )
            _bound_the_ping(self._writer, bounds.connect_s)
            self._reader = self._writer
            self._checkpointer = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """The database of ``settings`` with its waits bounded as they say."""
        statement_s = settings.database_statement_timeout_s
        return cls(
            settings.database_url,
            timeouts=Timeouts(
                connect_s=settings.database_connect_timeout_s,
                statement_s=statement_s or None,
                pool_s=settings.database_pool_timeout_s,
                busy_ms=settings.sqlite_busy_timeout_ms,
            ),
        )

    @property
    def engine(self) -> AsyncEngine:
        """The engine that writes (the only one on PostgreSQL)."""
        return self._writer

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: commits when the block ends, rolls back on error. Inside
        `unit`, a savepoint of the unit's transaction instead (committed with the unit).

        Raises `DatabaseOutage` (``database_busy``) when the process's one SQLite writer
        connection is not free within ``Timeouts.pool_s``: on SQLite that wait is behind a
        writer that itself waits for another process's write lock.
        """
        unit = self._joined()
        if unit is not None:
            conn = await unit.connection()
            async with conn.begin_nested():
                yield conn
            return
        async with self._transaction() as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """The writer's transaction of `begin` and of a `unit`: a failure is named
        (`_note`), a commit clears the remembered trouble and tells the checkpointer."""
        try:
            async with self._writer.begin() as conn:
                yield conn
        except Exception as exc:
            self._note(exc)
            raise
        self._trouble = None
        if self._checkpointer is not None:
            self._checkpointer.committed()

    def _note(self, exc: Exception) -> None:
        """Remember a write's failure for /readyz if it names a storage problem, and name
        a SQLite pool wait that ran out for what it is (the writer is held, waiting)."""
        cause = outage_cause(exc)
        if self.is_sqlite and isinstance(exc, sa_exc.TimeoutError):
            cause = DATABASE_BUSY
            raise DatabaseOutage(
                cause,
                f"no SQLite write connection within {self.timeouts.pool_s:g} s: the writer "
                "waits for the write lock (another process holds it?)",
            ) from exc
        if cause in (STORAGE_FULL, DATABASE_BUSY):
            self._trouble = (cause, time.monotonic())

    def write_trouble(self) -> str | None:
        """``storage_full`` or ``database_busy`` if this process's last write failed so,
        less than ``TROUBLE_MEMORY_S`` ago and no write committed since; else None."""
        if self._trouble is None:
            return None
        cause, at = self._trouble
        return cause if time.monotonic() - at < TROUBLE_MEMORY_S else None

    @asynccontextmanager
    async def unbounded(self) -> AsyncIterator[AsyncConnection]:
        """A connection of the writer with no bound on a statement's answer
        (``Timeouts.statement_s`` lifted until it goes back to the pool), for maintenance
        that may legitimately run for minutes (``VACUUM FULL``)."""
        async with self._writer.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            config = getattr(raw, "_config", None)
            if config is None or not hasattr(config, "command_timeout"):
                yield conn  # SQLite: no statement bound to lift
                return
            raw._config = config._replace(command_timeout=None)  # type: ignore[union-attr]
            try:
                yield conn
            finally:
                raw._config = config  # type: ignore[union-attr]

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[None]:
        """Run a block as one write transaction that every `begin` and `read` of this
        database inside it joins (in the same task, or one it starts while the block runs):
        opened by the first of them (none: no transaction), committed when the block ends,
        rolled back if it raises. For a caller that must commit its own write together with
        whatever the block writes (service.idempotency: an answer and its Idempotency-Key).
        The block's reads see its writes; its statements run one at a time (no gather)."""
        async with AsyncExitStack() as stack:
            unit = _Unit(self, stack)
            token = _UNIT.set(unit)
            try:
                yield
            finally:
                unit.closed = True
                _UNIT.reset(token)
        for callback in unit.after:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` once this task's writes are committed: now, or, inside `unit`,
        when the unit commits (never if it rolls back). For news that makes another reader
        look at the rows again (a dispatcher told of an endpoint's change or of new work):
        told before the commit, it would read what was there before."""
        unit = self._joined()
        if unit is None:
            callback()
        else:
            unit.after.append(callback)

    def _joined(self) -> _Unit | None:
        unit = _UNIT.get()
        return unit if unit is not None and unit.db is self and not unit.closed else None

    @asynccontextmanager
    async def checkpoint_turn(self) -> AsyncIterator[None]:
        """Hold off this process's background WAL checkpoints (SQLite) while the block runs:
        for a caller that checkpoints by itself (the erasure scrubber's ``TRUNCATE``), which
        SQLite refuses (busy) while another checkpoint runs."""
        if self._checkpointer is None:
            yield
            return
        async with self._checkpointer.lock:
            yield

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (inside `unit`, the unit's: it sees the unit's writes)."""
        unit = self._joined()
        if unit is not None:
            yield await unit.connection()
            return
        async with self._reader.connect() as conn:
            yield conn

    def for_update(self, stmt: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        """Row locks on PostgreSQL; SQLite's single writer already serialises."""
        if self.is_sqlite:
            return stmt
        return stmt.with_for_update(skip_locked=skip_locked)

    async def ping(self) -> None:
        """Raise unless the database answers."""
        async with self._reader.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.close()
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()


# How long /readyz reports a write's failure for a full storage or a held lock (seconds).
TROUBLE_MEMORY_S = 30.0


def migration_engine(url: str) -> AsyncEngine:
    """An engine for migrations and the schema checks before them: its connect is bounded
    (`Timeouts.connect_s`: a paused server is a TimeoutError, not asyncpg's 60 s), its
    statements are not (a migration may rewrite a big table)."""
    if url.startswith("postgresql"):
        return create_async_engine(url, connect_args={"timeout": Timeouts.connect_s})
    return create_async_engine(url)


def _bound_the_ping(engine: AsyncEngine, timeout_s: float) -> None:
    """The pool's ping of a pooled PostgreSQL connection (``pool_pre_ping``) answered
    within ``timeout_s``, or TimeoutError: SQLAlchemy's own waits for the statement
    timeout, and on a timeout then opens a new connection (another connect timeout).
    A connection whose ping timed out is discarded by the pool."""
    dialect = engine.sync_engine.dialect

    def do_ping(dbapi_connection: Any) -> bool:
        driver = dbapi_connection._connection
        try:
            dbapi_connection.await_(driver.fetchrow(";", timeout=timeout_s))
        except Exception as error:
            dbapi_connection._handle_exception(error)
        return True

    dialect.do_ping = do_ping  # type: ignore[method-assign]


def _ensure_sqlite_dir(url: str) -> None:
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_path(url: str) -> str:
    return sa.engine.make_url(url).database or ""


# The write connection's page cache (SQLite's default is 2 MB): a worker batch of a filter
# job changes some 3,000 pages, which a 2 MB cache wrote to the log once in the middle of
# the transaction (a spill) and read back; and the pages it reads first (the contacts, their
# timeline rows) it changes next. Measured on 200,000 contacts, 500 a batch: 84 -> 77 us of
# SQLite CPU per deleted contact in the statements and the commit. The reading connections
# keep the default (they are up to eight).
WRITER_CACHE_KIB = 65_536
# SQLite checkpoints by itself (in the commit that takes the log past this many pages) only
# when the background checkpoints leave that much behind: SQLite's default is 1,000 pages.
WAL_AUTOCHECKPOINT_FALLBACK = 10_000
# A background checkpoint starts after a commit, at most this often (seconds).
WAL_CHECKPOINT_INTERVAL_S = 0.2


class _WalCheckpointer:
    """Copies SQLite's write-ahead log into the database file beside the writer, on a
    connection of its own, rather than inside the writer's commits.

    SQLite checkpoints in the commit that takes the log past ``wal_autocheckpoint`` pages
    (1,000 by default): with ``synchronous=NORMAL`` that commit writes the logged pages
    into the database file and syncs the log and the file, while every writer of the
    process waits for the one write connection. A filter job's worker batches dirty more
    than 1,000 pages each, so nearly every one of its commits did so (commit time was a
    third of the writer's busy time: 0.14-0.19 ms per deleted contact, 0.05 of it CPU).
    Here a ``PASSIVE`` checkpoint (it neither waits for nor blocks readers and the writer)
    runs in a thread after a commit, one at a time and at most every
    ``WAL_CHECKPOINT_INTERVAL_S``, while the writer goes on. The log restarts from its
    beginning only at a moment when it is all copied, which a steady stream of commits
    rarely leaves: the writer's own automatic checkpoint, at ``WAL_AUTOCHECKPOINT_FALLBACK``
    pages, then copies the little that is left, and bounds the log (about 40 MB) if these
    fall behind. Durability is unchanged: WAL with ``synchronous=NORMAL``, a commit is
    durable once the log is synced, which a checkpoint does (now at least as often).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # Held by each checkpoint, and by whoever else checkpoints in this process.
        self.lock = asyncio.Lock()
        self.runs = 0
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = float("-inf")

    def committed(self) -> None:
        """A write transaction committed: checkpoint soon, unless one is under way."""
        if self._task is not None or self.lock.locked():
            return
        now = time.monotonic()
        if now - self._last < WAL_CHECKPOINT_INTERVAL_S:
            return
        self._last = now
        self._task = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            async with self.lock:
                await asyncio.to_thread(self._run)
            self.runs += 1
        except Exception as exc:  # housekeeping: the next commit starts another
            log.warning("sqlite_checkpoint_failed", error=repr(exc)[:300])
        finally:
            self._task = None

    def _run(self) -> None:
        if self._conn is None:
            # Autocommit: a checkpoint cannot run inside a transaction. PASSIVE never calls
            # the busy handler: while another connection checkpoints it returns at once.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def close(self) -> None:
        """Wait for the checkpoint under way, if any; close the connection."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def _unicode_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class _Unit:
    """The transaction of one `Database.unit` block, opened when first asked for."""

    def __init__(self, db: Database, stack: AsyncExitStack) -> None:
        self.db = db
        self.conn: AsyncConnection | None = None
        self.closed = False
        self.after: list[Callable[[], None]] = []  # `Database.after_commit`
        self._stack = stack

    async def connection(self) -> AsyncConnection:
        if self.conn is None:
            # The same transaction as `begin`'s own: its failures named, its commit noted.
            self.conn = await self._stack.enter_async_context(self.db._transaction())
        return self.conn


_UNIT: ContextVar[_Unit | None] = ContextVar("database_unit", default=None)


def _sqlite_pragmas(
    engine: AsyncEngine,
    *,
    immediate: bool,
    busy_timeout_ms: int,
    autocheckpoint: int | None = None,
    cache_kib: int | None = None,
) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to issue.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if autocheckpoint is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if cache_kib is not None:
            cursor.execute(f"PRAGMA cache_size={-int(cache_kib)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Deleted content is overwritten with zeros (cells, free pages), so a deleted row
        # cannot be read back from the main file; the WAL's old frames go at the next
        # checkpoint(TRUNCATE) (service.erasure.scrubber).
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()
        # Unicode-aware lowercase for search (service.contacts.filters.unicode_lower).
        dbapi_connection.create_function("unicode_lower", 1, _unicode_lower, deterministic=True)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


async def admin_sql(server_url: str, statement: str) -> None:
    """Run one statement outside any transaction (``CREATE`` / ``DROP DATABASE``) on the
    PostgreSQL server of ``server_url``, on a connection of its own."""
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()
