"""Outages of the database that do not refuse, named and bounded (service.faults.outage_cause).

Three kinds, each with real parts: a PostgreSQL server that stops answering without
refusing (a cluster of the test's own, every process of it paused with SIGSTOP), a SQLite
database whose storage is full (SQLite's own ``max_page_count`` limit on the service's
writer: every write fails with SQLITE_FULL while reads answer), and a SQLite database split
across processes where one paused process holds the write lock. For each: the API answers
503 with the cause's code within a few seconds, `/readyz` names it, and a component's
retry loop logs it while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy import event

from service.aio import Stopped, retry_transient
from service.app import Services, create_app
from service.config import Settings
from service.db import Database, contacts, new_id, utcnow
from service.faults import outage_cause
from service.localpg import LocalPostgres
from service.migrate import upgrade
from tests.conftest import Tenant, contact_row, make_settings, new_tenant, opened_services
from tests.logcapture import json_logs

# "Within a few seconds": what each answer below must take at most, with the bounds the
# tests set (1 s to connect or ping, 2 s for a statement, 1 s for the pool or the lock).
ANSWER_S = 8.0


@contextlib.asynccontextmanager
async def serving(services: Services) -> AsyncIterator[str]:
    """The API of `services` on a real socket; yields its base URL."""
    runner = web.AppRunner(create_app(services), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def timed(tenant: Tenant, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    """(status, body, seconds taken) of one call, Retry-After checked on a 503."""
    started = time.monotonic()
    status, answer, headers = await tenant.call(method, path, body)
    if status == 503:
        assert int(headers["Retry-After"]) >= 1
    return status, answer, time.monotonic() - started


async def readiness(base: str, http: aiohttp.ClientSession) -> tuple[int, Any, float]:
    started = time.monotonic()
    async with http.get(base + "/readyz") as response:
        return response.status, await response.json(), time.monotonic() - started


def new_contact() -> dict[str, str]:
    return {"email": f"o-{uuid.uuid4().hex[:10]}@example.com"}


async def write_a_row(db: Database) -> None:
    """One small write transaction (a contact of a workspace nobody reads), as a
    component's."""
    async with db.begin() as conn:
        await conn.execute(
            sa.insert(contacts).values(contact_row(uuid.uuid4(), new_id(), utcnow()))
        )


def component_retrying(db: Database) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """A component's retry loop (`service.aio.retry_transient`, as the worker and the
    dispatcher run theirs) over a write, logging ``outage_retrying`` while it waits; it
    finishes once the write commits (or raises `Stopped` once the event is set)."""
    stop = asyncio.Event()
    work = retry_transient(
        lambda: write_a_row(db), stop, event="outage_retrying", max_backoff_s=0.5
    )
    return stop, asyncio.create_task(work)


# -- PostgreSQL that stops answering -------------------------------------------------------


def _processes_of(postmaster: int) -> list[int]:
    """The postmaster and every process it started (its backends and workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


@contextlib.contextmanager
def paused(cluster: LocalPostgres) -> Iterator[None]:
    """Every process of the cluster stopped (SIGSTOP) in the block: connections stay open,
    new ones are accepted by the kernel, and nothing answers; SIGCONT afterwards."""
    assert cluster.pid is not None
    stopped = []
    try:
        for pid in _processes_of(cluster.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def paused_postgres_settings() -> AsyncIterator[tuple[LocalPostgres, Settings]]:
    """A cluster of the test's own (pausing it leaves the session's alone), migrated."""
    with LocalPostgres("pause_test") as cluster:
        await upgrade(cluster.url)
        yield (
            cluster,
            make_settings(
                cluster.url,
                database_connect_timeout_s=1.0,
                database_statement_timeout_s=2.0,
                database_pool_timeout_s=1.0,
            ),
        )


async def test_a_postgresql_that_stops_answering_is_a_database_timeout_within_seconds(
    paused_postgres_settings: tuple[LocalPostgres, Settings],
) -> None:
    """Paused with SIGSTOP (it accepts connections and never answers): asyncpg's 60 s
    connect timeout made the API answer after 60 s and components log nothing; now every
    wait is bounded, the API answers 503 database_timeout in seconds whether its pooled
    connection or a new one waits, /readyz says database_timeout, a component's loop logs
    it while it waits, and all carry on once the server answers again."""
    cluster, settings = paused_postgres_settings
    async with (
        opened_services(settings) as services,
        serving(services) as base,
        aiohttp.ClientSession() as http,
    ):
        tenant = await new_tenant(services, base, http)
        status, _, _ = await timed(tenant, "POST", "/v1/contacts", new_contact())
        assert status == 201
        with json_logs() as logs, paused(cluster):
            for method, path, body in (
                ("GET", "/v1/bulk-jobs", None),  # a pooled connection: its ping waits
                ("POST", "/v1/contacts", new_contact()),
                ("GET", "/v1/contacts", None),
            ):
                status, answer, took = await timed(tenant, method, path, body)
                assert status == 503, (method, path, answer)
                assert answer["error"]["code"] == "database_timeout", answer
                assert "not answering in time" in answer["error"]["message"]
                assert took < ANSWER_S, (method, path, took)
            status, ready, took = await readiness(base, http)
            assert status == 503 and ready["error"]["details"]["database"] == "database_timeout"
            assert took < ANSWER_S, took
            failed = logs.events("readiness_database_failed", cause="database_timeout")
            assert failed and "TimeoutError" in failed[0]["error"], failed
            assert logs.events("service_unavailable", cause="database_timeout")
            _, retrying = component_retrying(services.db)
            await logs.wait_for("outage_retrying", timeout_s=ANSWER_S, cause="database_timeout")
        await asyncio.wait_for(retrying, timeout=30)  # resumed: the write commits
        # The server answers again: the same pool serves the API at once.
        deadline = time.monotonic() + 30
        while (status := (await timed(tenant, "GET", "/v1/bulk-jobs"))[0]) != 200:
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.2)
        status, ready, _ = await readiness(base, http)
        assert ready["error"]["details"]["database"] == "ok"  # kafka is not up in this test


@pytest.mark.parametrize("statement_timeout_s", [0.5])
async def test_maintenance_lifts_the_statement_bound_and_others_keep_it(
    paused_postgres_settings: tuple[LocalPostgres, Settings], statement_timeout_s: float
) -> None:
    """A statement longer than the bound fails as database_timeout, except on a
    `Database.unbounded` connection (VACUUM FULL of a big table may take minutes), and the
    bound is back on that connection once it returns to the pool."""
    from service.db import Timeouts

    cluster, _ = paused_postgres_settings
    db = Database(cluster.url, timeouts=Timeouts(statement_s=statement_timeout_s))
    try:
        sleep = sa.text("SELECT pg_sleep(:s)")
        with pytest.raises(Exception) as caught:
            async with db.read() as conn:
                await conn.execute(sleep, {"s": statement_timeout_s * 3})
        assert outage_cause(caught.value) == "database_timeout", repr(caught.value)
        async with db.unbounded() as conn:
            await conn.execute(sleep, {"s": statement_timeout_s * 3})
        with pytest.raises(Exception) as caught:
            async with db.read() as conn:
                await conn.execute(sleep, {"s": statement_timeout_s * 3})
        assert outage_cause(caught.value) == "database_timeout", repr(caught.value)
    finally:
        await db.dispose()


async def fill(db: Database) -> None:
    """Contacts written one at a time until SQLite refuses one for want of space."""
    for _ in range(100_000):
        try:
            await write_a_row(db)
        except Exception as exc:
            assert outage_cause(exc) == "storage_full", repr(exc)
            return
    raise AssertionError("SQLite never ran out of pages")


# -- storage full ------------------------------------------------------------------------


async def test_a_full_sqlite_storage_is_named_by_the_api_and_readiness(tmp_path: Path) -> None:
    """SQLite refuses every write with SQLITE_FULL (its page limit reached: what a full
    disk gives), reads still answer: /readyz said 200 and the 503 said "cannot reach its
    database". Now a write's 503 is storage_full, /readyz names storage_full after it (a
    ping reads, so only a write's failure shows it), and a component logs it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'full.db'}"
    await upgrade(url)
    settings = make_settings(url)
    async with (
        opened_services(settings) as services,
        serving(services) as base,
        aiohttp.ClientSession() as http,
    ):
        tenant = await new_tenant(services, base, http)

        @event.listens_for(services.db.engine.sync_engine, "connect")
        def _no_more_pages(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA max_page_count = 1")  # the least: the file's own size
            cursor.close()

        await services.db.engine.dispose()  # the writer reconnects with the limit
        await fill(services.db)
        with json_logs() as logs:
            status, answer, took = await timed(tenant, "POST", "/v1/contacts", new_contact())
            assert status == 503, answer
            assert answer["error"]["code"] == "storage_full", answer
            assert "storage is full" in answer["error"]["message"]
            assert took < ANSWER_S
            status, answer, _ = await timed(tenant, "GET", "/v1/contacts")
            assert status == 200, answer  # reads answer
            status, ready, _ = await readiness(base, http)
            assert status == 503 and ready["error"]["details"]["database"] == "storage_full"
            stop, task = component_retrying(services.db)
            await logs.wait_for("outage_retrying", cause="storage_full")
            stop.set()
            with pytest.raises(Stopped):
                await task
        # Space again: the next write commits and readiness forgets the failure.
        event.remove(services.db.engine.sync_engine, "connect", _no_more_pages)
        await services.db.engine.dispose()
        status, answer, _ = await timed(tenant, "POST", "/v1/contacts", new_contact())
        assert status == 201, answer
        status, ready, _ = await readiness(base, http)
        assert ready["error"]["details"]["database"] == "ok"


# -- SQLite's write lock held by a paused process -------------------------------------------

LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_by_a_paused_process(path: Path) -> Iterator[None]:
    """Another process takes SQLite's write lock, and is then paused (SIGSTOP)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        os.kill(holder.pid, signal.SIGSTOP)
        yield
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


async def test_sqlite_locked_by_a_paused_process_is_database_busy_within_seconds(
    tmp_path: Path,
) -> None:
    """Split across processes on SQLite, one paused while it holds the write lock: the API
    answered after 32 s that it "cannot reach its database", a dispatcher timed out on
    the pool, /readyz said 200. Now each waits at most the busy or pool timeout and says
    database_busy: the write that waits for the lock, and the writes queued behind it in
    this process alike; /readyz names it; a component logs it; all go on once the lock is
    released."""
    path = tmp_path / "split.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    settings = make_settings(url, sqlite_busy_timeout_ms=1000, database_pool_timeout_s=1.0)
    async with (
        opened_services(settings) as services,
        serving(services) as base,
        aiohttp.ClientSession() as http,
    ):
        tenant = await new_tenant(services, base, http)
        with json_logs() as logs, lock_held_by_a_paused_process(path):
            answers = await asyncio.gather(
                *(timed(tenant, "POST", "/v1/contacts", new_contact()) for _ in range(3))
            )
            for status, answer, took in answers:
                assert status == 503, answer
                assert answer["error"]["code"] == "database_busy", answer
                assert "write lock" in answer["error"]["message"]
                assert took < ANSWER_S, took
            status, ready, took = await readiness(base, http)
            assert status == 503 and ready["error"]["details"]["database"] == "database_busy"
            assert took < ANSWER_S
            assert logs.events("service_unavailable", cause="database_busy")
            _, task = component_retrying(services.db)
            await logs.wait_for("outage_retrying", cause="database_busy", timeout_s=10)
        await asyncio.wait_for(task, timeout=30)  # the holder is gone: the write commits
        status, answer, _ = await timed(tenant, "POST", "/v1/contacts", new_contact())
        assert status == 201, answer
        status, ready, _ = await readiness(base, http)
        assert ready["error"]["details"]["database"] == "ok"
