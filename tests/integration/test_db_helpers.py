"""The statement helpers of service.db on SQLite and PostgreSQL.

`any_of` binds a whole list as one parameter (PostgreSQL ``= ANY(array)``, SQLite
``IN (SELECT value FROM json_each(?))``): it must select exactly what a plain ``IN`` list
selects, for UUID and text columns, and keep using the column's index. `insert_rows`
inserts NamedTuple rows through the driver: what it stores must read back exactly as what
a SQLAlchemy insert of the same values stores. On SQLite, commits are checkpointed beside
the writer (`service.db._WalCheckpointer`).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa

from service.db import (
    WAL_AUTOCHECKPOINT_FALLBACK,
    WAL_CHECKPOINT_INTERVAL_S,
    Database,
    EncodedJSON,
    any_of,
    deletion_job_items,
    insert_rows,
    outbox,
    stored_values,
    utcnow,
)
from service.erasure.scrubber import Scrubber
from service.faults import describe, is_transient
from tests.conftest import make_settings


async def test_any_of_selects_what_an_in_list_selects(db: Database) -> None:
    """UUIDs and text, with duplicates, values that match nothing, one value and none;
    given as they are and as `stored_values` binds them."""
    job_a, job_b, job_none = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    refs = [f"ref-{i}" for i in range(6)] + ['é-"quoted"-\\', "a'b"]
    now = utcnow()
    async with db.begin() as conn:
        await conn.execute(
            deletion_job_items.insert(),
            [
                {"job_id": job, "ref": ref, "position": i, "status": "pending", "processed_at": now}
                for job in (job_a, job_b)
                for i, ref in enumerate(refs)
            ],
        )
    items = deletion_job_items.c
    cases: list[tuple[list[uuid.UUID], list[str]]] = [
        ([job_a], [*refs[:3], refs[1], "nothing"]),
        ([job_a, job_b, job_none, job_a], refs[5:]),
        ([job_b], [refs[0]]),
        ([job_none], refs),
        ([job_a], []),
    ]
    async with db.read() as conn:
        for jobs, wanted in cases:
            columns = (items.job_id, items.ref)
            plain = sa.select(*columns).where(items.job_id.in_(jobs), items.ref.in_(wanted))
            one = sa.select(*columns).where(any_of(items.job_id, jobs), any_of(items.ref, wanted))
            expected = sorted((await conn.execute(plain)).all())
            assert sorted((await conn.execute(one)).all()) == expected
            # The values converted once beforehand (`stored`): the same rows, and the two
            # forms, run one after the other, never share a compiled statement.
            ids = stored_values(conn, items.job_id, jobs)
            stored = sa.select(*columns).where(
                any_of(items.job_id, ids, stored=True), any_of(items.ref, wanted, stored=True)
            )
            assert sorted((await conn.execute(stored)).all()) == expected
            assert sorted((await conn.execute(one)).all()) == expected
            assert len(expected) == len({j for j in jobs if j != job_none}) * len(
                set(wanted) & set(refs)
            )


async def test_any_of_keeps_the_primary_key_index(db: Database) -> None:
    """The look-up by (job_id, ref) keeps its index: SQLite's plan searches the primary
    key's; PostgreSQL's (sequential scans disabled: a small table would not need an index)
    uses the index a plain IN list gets."""
    stmt = sa.select(deletion_job_items.c.status).where(
        any_of(deletion_job_items.c.job_id, [uuid.uuid4()]),
        any_of(deletion_job_items.c.ref, ["a", "b"]),
    )
    async with db.begin() as conn:
        if db.is_sqlite:
            sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()
            plan = " ".join(str(r[-1]) for r in rows)
            assert "SEARCH deletion_job_items USING" in plan, plan
            assert "sqlite_autoindex_deletion_job_items_1" in plan, plan
            return
        # As the worker runs it (prepared, the arrays bound as parameters), against the
        # plain IN list: the same index.
        job = uuid.uuid4()
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        await conn.exec_driver_sql(f"PREPARE any_of_plan AS {stmt.compile(dialect=conn.dialect)}")
        bound = await conn.exec_driver_sql(f"EXPLAIN EXECUTE any_of_plan('{{{job}}}', '{{a,b}}')")
        listed = await conn.exec_driver_sql(
            "EXPLAIN SELECT status FROM deletion_job_items"
            f" WHERE job_id IN ('{job}') AND ref IN ('a', 'b')"
        )
        plans = [" ".join(str(r[0]) for r in rows) for rows in (bound.all(), listed.all())]
    indexes = [plan.split("Index Scan using ")[1].split(" ")[0] for plan in plans]
    assert indexes[0] == indexes[1], plans
    assert "ANY" in plans[0], plans


class _OutboxRow(NamedTuple):
    topic: str
    key: str | None
    payload: bytes
    headers: Any
    created_at: datetime


@pytest.mark.parametrize("first", [True, False], ids=["first-statement", "after-a-read"])
async def test_insert_rows_stores_what_a_sqlalchemy_insert_stores(
    db: Database, first: bool
) -> None:
    """Values that need their column type's conversion (a UTC time, JSON, a shared
    EncodedJSON, bytes, null) read back equal to the same values inserted by SQLAlchemy,
    as the transaction's first statement and after a read (PostgreSQL: ``unnest`` arrays,
    then a binary COPY)."""
    topic = f"t-{uuid.uuid4().hex}"
    at = datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)
    shared = EncodedJSON((("content-type", "application/json"), ("ce_type", "x")))
    rows = [
        _OutboxRow(topic, "k1", b"\x00\xffpayload", shared, at),
        _OutboxRow(topic, None, b"", [["a", "é"]], at.replace(microsecond=0)),
    ]
    async with db.begin() as conn:
        if not first:
            await conn.execute(sa.select(outbox.c.id).limit(1))
        await insert_rows(conn, outbox, rows)
        await conn.execute(outbox.insert(), [r._asdict() for r in rows])
    columns = [outbox.c[name] for name in _OutboxRow._fields]
    async with db.read() as conn:
        stored = (
            await conn.execute(
                sa.select(*columns).where(outbox.c.topic == topic).order_by(outbox.c.id)
            )
        ).all()
    assert len(stored) == 4
    assert stored[:2] == stored[2:]
    assert stored[0].created_at == at
    assert stored[0].headers == [["content-type", "application/json"], ["ce_type", "x"]]
    assert stored[1].key is None


class _NotAColumn(NamedTuple):
    topic: str
    colour: str


@pytest.mark.parametrize("first", [True, False], ids=["first-statement", "after-a-read"])
async def test_insert_rows_refused_is_permanent_and_rolls_back(db: Database, first: bool) -> None:
    """A row the database refuses (a duplicate key) fails the statement with a permanent
    error naming the SQLSTATE or SQLite's result, never the values, and the transaction
    keeps none of the rows, whichever way the rows were sent."""
    job_id = uuid.uuid4()
    rows = [
        _ItemRow(job_id, "secret@example.com", 0, "pending"),
        _ItemRow(job_id, "secret@example.com", 1, "pending"),
    ]
    with pytest.raises(Exception) as raised:
        async with db.begin() as conn:
            if not first:
                await conn.execute(sa.select(deletion_job_items.c.ref).limit(1))
            await insert_rows(conn, deletion_job_items, rows)
    assert not is_transient(raised.value)
    described = describe(raised.value)
    assert "23505" in described or "CONSTRAINT" in described, described
    assert "secret" not in described
    async with db.read() as conn:
        left = await conn.execute(
            sa.select(sa.func.count()).where(deletion_job_items.c.job_id == job_id)
        )
        assert left.scalar_one() == 0


class _ItemRow(NamedTuple):
    job_id: uuid.UUID
    ref: str
    position: int
    status: str


async def test_insert_rows_refuses_a_field_that_is_not_a_column(db: Database) -> None:
    async with db.begin() as conn:
        with pytest.raises(ValueError, match="colour"):
            await insert_rows(conn, outbox, [_NotAColumn("t", "blue")])


async def _rows_in_main_file(db: Database, topic: str) -> int:
    """Outbox rows of ``topic`` in SQLite's main database file, leaving the write-ahead log
    aside (``immutable=1`` reads the file as it is): what checkpoints have copied there."""
    path = sa.engine.make_url(db.url).database
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(
            conn.execute("SELECT count(*) FROM outbox WHERE topic = ?", (topic,)).fetchone()[0]
        )
    finally:
        conn.close()


async def _write_outbox_rows(db: Database, topic: str, count: int, size: int = 1) -> None:
    now = utcnow()
    payload = b"x" * size
    async with db.begin() as conn:
        await conn.execute(
            outbox.insert(),
            [
                {
                    "topic": topic,
                    "key": str(i),
                    "payload": payload,
                    "headers": [],
                    "created_at": now,
                }
                for i in range(count)
            ],
        )


async def test_sqlite_commits_are_checkpointed_beside_the_writer(db: Database) -> None:
    """SQLite: the write connection leaves checkpoints to a background one (its own
    automatic checkpoint only as a bound), which copies committed pages into the main
    file soon after a commit; a caller in `checkpoint_turn` (the scrubber) holds them off.
    PostgreSQL: writes commit as ever and `checkpoint_turn` is only a block."""
    topic = f"checkpoint-{uuid.uuid4()}"
    if not db.is_sqlite:
        async with db.checkpoint_turn():
            await _write_outbox_rows(db, topic, 2)
        async with db.read() as conn:
            stmt = sa.select(sa.func.count()).where(outbox.c.topic == topic)
            assert (await conn.execute(stmt)).scalar_one() == 2
        return
    async with db.begin() as conn:
        pages = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one()
        assert pages == WAL_AUTOCHECKPOINT_FALLBACK
    await asyncio.sleep(WAL_CHECKPOINT_INTERVAL_S)
    async with db.checkpoint_turn():
        await _write_outbox_rows(db, topic, 5)
        await asyncio.sleep(WAL_CHECKPOINT_INTERVAL_S * 2)
        # A few pages, far from any automatic checkpoint, and none in the background.
        assert await _rows_in_main_file(db, topic) == 0
    await _write_outbox_rows(db, topic, 5)
    deadline = time.monotonic() + 10
    while await _rows_in_main_file(db, topic) < 10:
        assert time.monotonic() < deadline, "the commits were not checkpointed"
        await asyncio.sleep(0.05)


async def test_the_scrubbers_truncate_outlasts_another_process_checkpointing(
    db: Database, db_url: str
) -> None:
    """SQLite refuses a checkpoint at once, without waiting, while another connection
    checkpoints (another process's background checkpoints, `_WalCheckpointer`; here a
    connection of the test copying some 20 MB of log in a thread): the scrubber's TRUNCATE
    is tried again shortly instead of failing its run, which waits a whole erasure delay."""
    scrubber = Scrubber(make_settings(db_url), db)
    topic = f"scrub-{uuid.uuid4()}"
    async with db.checkpoint_turn():  # the log grows, nothing copies it yet
        for _ in range(5):
            await _write_outbox_rows(db, topic, 1000, size=4000)

    def checkpoint() -> None:
        conn = sqlite3.connect(sa.engine.make_url(db.url).database or "", isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    other = asyncio.create_task(asyncio.to_thread(checkpoint)) if db.is_sqlite else None
    try:
        assert await scrubber.scrub()
    finally:
        if other is not None:
            await other


@pytest.mark.parametrize("one_hop", [True, False], ids=["one-hop", "stock-adapter"])
async def test_a_sqlite_statement_is_one_hand_off_to_its_connection_thread(
    db_url: str, monkeypatch: pytest.MonkeyPatch, one_hop: bool
) -> None:
    """SQLite: each statement (rows, no rows, many rows, RETURNING, an error) is one piece
    of work for aiosqlite's thread, where SQLAlchemy's own cursor made three or four
    (cursor, execute, fetch, close), with the same rows, counts and errors; with an
    aiosqlite that lacks what `_OneHopCursor` uses, SQLAlchemy's own cursor (the fallback)
    gives the same. PostgreSQL: the statements as ever."""

    if not one_hop:
        monkeypatch.setattr("service.db._one_hop_dbapi", lambda: {})
    db = Database(db_url)
    try:
        await _statements_one_hop(db, monkeypatch, one_hop)
    finally:
        await db.dispose()


def test_an_aiosqlite_without_its_work_queue_gets_the_stock_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_one_hop_dbapi` chooses SQLAlchemy's own adapter when aiosqlite's Connection lacks
    ``_execute`` or ``_conn`` (an aiosqlite that changed them)."""
    import aiosqlite

    from service.db import _one_hop_dbapi

    assert "module" in _one_hop_dbapi()
    for name in ("_execute", "_conn"):
        with monkeypatch.context() as patched:
            patched.delattr(aiosqlite.Connection, name)
            assert _one_hop_dbapi() == {}


async def _statements_one_hop(db: Database, monkeypatch: pytest.MonkeyPatch, one_hop: bool) -> None:
    import aiosqlite

    handed: list[str] = []
    if db.is_sqlite:
        real = aiosqlite.Connection._execute

        async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            handed.append(getattr(fn, "__name__", "?"))
            return await real(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)

    def hops() -> bool:  # one hand-off with ours; three or four with SQLAlchemy's
        if not db.is_sqlite:
            return not handed
        return len(handed) == 1 if one_hop else len(handed) >= 3

    topic = f"one-hop-{uuid.uuid4()}"
    async with db.begin() as conn:
        handed.clear()
        await conn.execute(
            outbox.insert(),
            [
                {
                    "topic": topic,
                    "key": f"k{i}",
                    "payload": b"x",
                    "headers": [],
                    "created_at": utcnow(),
                }
                for i in range(3)
            ],
        )
        assert hops(), handed
        handed.clear()
        rows = (
            await conn.execute(
                sa.select(outbox.c.key).where(outbox.c.topic == topic).order_by(outbox.c.key)
            )
        ).all()
        assert [r.key for r in rows] == ["k0", "k1", "k2"]
        assert hops(), handed
        handed.clear()
        changed = await conn.execute(
            outbox.update().where(outbox.c.topic == topic).values(error="x")
        )
        assert changed.rowcount == 3
        assert hops(), handed
        handed.clear()
        returned = await conn.execute(
            outbox.update()
            .where(outbox.c.topic == topic, outbox.c.key == "k1")
            .values(error="y")
            .returning(outbox.c.key)
        )
        assert returned.scalars().all() == ["k1"]
        assert hops(), handed
    with pytest.raises(sa.exc.IntegrityError):
        async with db.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO outbox (id, topic, payload, headers, created_at) "
                    "SELECT id, topic, payload, headers, created_at FROM outbox WHERE topic = :t"
                ),
                {"t": topic},
            )


async def test_the_sqlite_writer_holds_a_batchs_pages_until_it_commits(db: Database) -> None:
    """SQLite: a write transaction that changes some 3,000 pages (a filter job's worker
    batch changes that many) keeps them in the write connection's page cache until it
    commits, where SQLite's default 2 MB cache (a reading connection's, here the slow way)
    wrote them to the log in the middle of the transaction and read them back.
    PostgreSQL: the rows commit as ever."""
    topic = f"cache-{uuid.uuid4()}"
    rows = [
        {
            "topic": topic,
            "key": str(i),
            "payload": b"x" * 4000,
            "headers": [],
            "created_at": utcnow(),
        }
        for i in range(3000)
    ]
    if not db.is_sqlite:
        async with db.begin() as conn:
            await conn.execute(outbox.insert(), rows)
        async with db.read() as conn:
            stmt = sa.select(sa.func.count()).where(outbox.c.topic == topic)
            assert (await conn.execute(stmt)).scalar_one() == len(rows)
        return
    log = f"{sa.engine.make_url(db.url).database}-wal"

    async def log_growth_before_commit(conn: Any) -> int:
        before = os.path.getsize(log) if os.path.exists(log) else 0
        await conn.execute(outbox.insert(), rows)
        return os.path.getsize(log) - before

    async with db.checkpoint_turn():  # no background checkpoint moves the log meanwhile
        async with db.begin() as conn:
            assert await log_growth_before_commit(conn) <= 0
        async with db.read() as conn:
            try:
                assert await log_growth_before_commit(conn) > 0
            finally:
                await conn.rollback()
