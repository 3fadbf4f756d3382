"""Outages with real processes: every component rides through, and the data stay right.

Relay, workers and dispatcher run as separate `contact-deletion` processes while a
dependency goes away mid-run: PostgreSQL stopped with `pg_ctl stop -m fast` and started
again (a dedicated throwaway cluster, so the session's shared one is left alone), the
broker stopped and started with a backlog, a worker started while the database is down, a
worker joining mid-run (a rebalance under the others' feet), and on SQLite the database
file locked by another process for longer than the busy timeout.

Each test asserts that no process exited, that no item was marked failed, and the data
invariants of the crash tests: every contact deleted exactly once, one `contact.deleted`
audit event and one `contact.deleted` outbox row each, one `deletion.completed`, and an
audit chain that verifies. It prints, per fault, the time from the end of the fault to the
first progress (shown with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.audit.chain import verify_events
from service.audit.store import stream_events
from service.config import Settings
from service.contacts.store import contact_row
from service.db import (
    Database,
    audit_events,
    contacts,
    deletion_job_items,
    deletion_jobs,
    new_id,
    outbox,
    utcnow,
)
from service.deletion.models import BulkDeleteRequest
from service.deletion.store import Requester, create_job
from service.events import TOPIC_CONTACT_DELETED
from service.faults import is_transient
from service.keys import ensure_workspace
from service.localkafka import LocalKafka
from service.localpg import LocalPostgres
from service.migrate import upgrade
from service.procs import free_port
from tests.components import Process, components
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

DEADLINE_S = 90.0


# -- set-up ----------------------------------------------------------------------------


@dataclass
class Job:
    workspace_id: uuid.UUID
    job_id: uuid.UUID
    contact_ids: list[uuid.UUID]


async def seed_job(db: Database, settings: Settings, count: int) -> Job:
    """`count` contacts in a new workspace, and a filter job that selects all of them."""
    workspace_id = await ensure_workspace(db, f"outage-{uuid.uuid4().hex[:10]}")
    marker = f"o{uuid.uuid4().hex[:8]}"
    now = utcnow()
    ids = [new_id() for _ in range(count)]
    rows: list[dict[str, Any]] = [
        contact_row(
            ids[n],
            workspace_id,
            f"{marker}-{n}@example.com",
            first_name="Out",
            last_name=f"Age{n}",
            at=now,
        )
        for n in range(count)
    ]
    async with db.begin() as conn:
        await conn.execute(contacts.insert(), rows)
    job_id = uuid.uuid4()
    # Every contact of the workspace, so the request must say so (match_all).
    request = BulkDeleteRequest.model_validate(
        {"filter": {"email": {"$startsWith": marker}}, "match_all": True}
    )
    async with db.begin() as conn:
        await create_job(
            conn, db, settings, Requester(workspace_id, None, f"req-{marker}"), request, job_id
        )
    return Job(workspace_id, job_id, ids)


async def job_row(db: Database, job: Job) -> Any:
    async with db.read() as conn:
        return (
            await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == job.job_id))
        ).one()


async def processed(db: Database, job: Job) -> int | None:
    """The job's processed count, or None while the database does not answer."""
    try:
        return int((await job_row(db, job)).processed_count)
    except Exception as exc:
        if is_transient(exc):
            return None
        raise


async def wait_until(
    check: Callable[[], Awaitable[bool]], running: list[Process], what: str, timeout_s: float
) -> float:
    """Poll `check` (every 0.1 s) until true; every process must stay up meanwhile.

    Returns the seconds it took.
    """
    started = time.monotonic()
    while not await check():
        for process in running:
            process.assert_running()
        assert time.monotonic() - started < timeout_s, f"not {what} after {timeout_s} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def progress_past(db: Database, job: Job, count: int) -> bool:
    done = await processed(db, job)
    return done is not None and done > count


async def finished(db: Database, job: Job) -> bool:
    try:
        return (await job_row(db, job)).completed_at is not None
    except Exception as exc:
        if is_transient(exc):
            return False
        raise


async def counts_by(
    db: Database, column: sa.ColumnElement[Any], *where: sa.ColumnElement[bool]
) -> dict[str, int]:
    async with db.read() as conn:
        rows = (
            await conn.execute(sa.select(column, sa.func.count()).where(*where).group_by(column))
        ).all()
    return {str(value): int(count) for value, count in rows}


async def assert_deleted_exactly_once(db: Database, settings: Settings, job: Job) -> None:
    expected = {str(i): 1 for i in job.contact_ids}
    row = await job_row(db, job)
    assert row.status == "completed", row
    n = len(job.contact_ids)
    assert (row.total_requested, row.processed_count, row.deleted_count) == (n, n, n)
    assert (row.not_found_count, row.failed_count) == (0, 0)
    items = await counts_by(
        db, deletion_job_items.c.status, deletion_job_items.c.job_id == job.job_id
    )
    assert items == {"deleted": n}  # in particular: no item marked failed
    audited = await counts_by(
        db,
        audit_events.c.target_id,
        audit_events.c.workspace_id == job.workspace_id,
        audit_events.c.action == "contact.deleted",
    )
    assert audited == expected
    announced = await counts_by(
        db,
        outbox.c.key,
        outbox.c.topic == settings.topic(TOPIC_CONTACT_DELETED),
        outbox.c.key.in_([str(i) for i in job.contact_ids]),
    )
    assert announced == expected
    completed = await counts_by(
        db,
        audit_events.c.job_id,
        audit_events.c.workspace_id == job.workspace_id,
        audit_events.c.action == "deletion.completed",
    )
    assert completed == {str(job.job_id): 1}
    async with db.read() as conn:
        left = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(contacts)
                .where(contacts.c.workspace_id == job.workspace_id)
            )
        ).scalar_one()
    assert left == 0
    events = [e async for e in stream_events(db, job.workspace_id)]
    result = verify_events(events, workspace_id=str(job.workspace_id))
    assert result.ok, result
    assert result.events_checked == len(events)


def report(fault: str, **figures: Any) -> None:
    print(f"\nOUTAGE {fault}: " + " ".join(f"{k}={v}" for k, v in figures.items()))


async def first_progress_after(db: Database, job: Job, moment: datetime) -> float:
    """Seconds from `moment` to the first item of `job` processed after it.

    Fails if none was: then the fault did not happen mid-run and proves nothing.
    """
    items = deletion_job_items.c
    async with db.read() as conn:
        first = (
            await conn.execute(
                sa.select(sa.func.min(items.processed_at)).where(
                    items.job_id == job.job_id, items.processed_at > moment
                )
            )
        ).scalar_one()
    assert first is not None, "the job had finished before the fault ended"
    if first.tzinfo is None:
        first = first.replace(tzinfo=UTC)
    return float(round((first - moment).total_seconds(), 2))


def all_running(processes: list[Process]) -> bool:
    for process in processes:
        process.assert_running()
    return True


# -- PostgreSQL stopped and started ------------------------------------------------------


@pytest.fixture
def dedicated_postgres() -> Iterator[LocalPostgres]:
    """A cluster of this test's own: stopping it leaves the session's cluster alone."""
    with LocalPostgres("outage_test") as cluster:
        yield cluster


async def test_postgres_fast_shutdown_mid_run_stops_no_component(
    dedicated_postgres: LocalPostgres, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`pg_ctl stop -m fast` for 5 s mid-run; a third worker is started meanwhile, so it
    also joins the group mid-run (the others' commits for moved partitions are refused
    and skipped): every process rides through."""
    cluster = dedicated_postgres
    await upgrade(cluster.url)
    settings = make_settings(
        cluster.url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=3,
        worker_batch_size=10,
        relay_batch_size=100,
    )
    db = Database(cluster.url)
    try:
        job = await seed_job(db, settings, 1500)
        with components(settings, tmp_path, {"KAFKA_WATCH_INTERVAL_S": "0.5"}) as group:
            running = [
                group.start("relay"),
                group.start("worker"),
                group.start("worker"),
                group.start("dispatcher"),
            ]
            await wait_until(lambda: progress_past(db, job, 50), running, "started", DEADLINE_S)
            await asyncio.to_thread(cluster.stop_server, "fast")
            down = time.monotonic()
            late = group.start("worker")  # started while the database is down: a third one
            running.append(late)

            async def late_is_waiting() -> bool:
                return "waiting_for_dependency" in late.log_path.read_text()

            # Down for 5 s, and until the late worker met the outage: on a loaded machine its
            # interpreter may take longer than that to start.
            await wait_until(late_is_waiting, running, "the late worker waiting", DEADLINE_S)
            await asyncio.sleep(max(0.0, 5 - (time.monotonic() - down)))
            assert all_running(running)
            await asyncio.to_thread(cluster.start_server)
            back = utcnow()

            await wait_until(lambda: finished(db, job), running, "finished", DEADLINE_S)
            assert all_running(running)
            await assert_deleted_exactly_once(db, settings, job)
            report(
                "postgres_fast_shutdown_5s",
                processes_up=f"{len(running)}/{len(running)}",
                first_progress_s=await first_progress_after(db, job, back),
            )
    finally:
        await db.dispose()


# -- the broker stopped and started with a backlog; a third worker joins -----------------


@pytest.fixture
def stoppable_kafka(
    kafka_broker: LocalKafka | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKafka]:
    """The session's broker, which this test stops and restarts in place (same port and
    data); a broker of its own when the session's is external and cannot be stopped."""
    if kafka_broker is not None:
        try:
            yield kafka_broker
        finally:
            if kafka_broker.pid is None:  # the test failed while it was down
                kafka_broker.start()
        return
    kafka = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("outage-kafka"))
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


async def test_broker_outage_with_a_backlog_stops_no_component(
    postgres_url: str, stoppable_kafka: LocalKafka, tmp_path: Path
) -> None:
    """The broker stops mid-run for 3 s while a new job queues in the outbox (a backlog):
    every process waits, and the backlog drains once it is back.

    On PostgreSQL only: the broker is the subject here, and each run costs a broker
    restart; SQLite's outage is the lock test below.
    """
    await upgrade(postgres_url)
    db_url = postgres_url
    settings = make_settings(
        db_url,
        kafka_bootstrap_servers=stoppable_kafka.bootstrap,
        kafka_partitions=3,
        worker_batch_size=10,
        relay_batch_size=100,
    )
    db = Database(db_url)
    try:
        job = await seed_job(db, settings, 300)
        with components(settings, tmp_path) as group:
            running = [
                group.start("relay"),
                group.start("worker"),
                group.start("worker"),
                group.start("dispatcher"),
            ]
            await wait_until(lambda: progress_past(db, job, 20), running, "started", DEADLINE_S)

            stoppable_kafka.stop()
            # Written while the broker is down: none of it can have progressed before.
            backlog = await seed_job(db, settings, 300)
            await asyncio.sleep(3)
            assert all_running(running)
            # aiokafka's producer asked a dead broker for metadata in a loop without
            # back-off: ~2,300 ERROR lines a second and a busy core, for the whole outage.
            # Every component's clients (the producer's and the consumers') back off.
            for process in running:
                library_lines = [
                    line
                    for line in process.log_path.read_text(errors="replace").splitlines()
                    if '"logger": "aiokafka' in line
                ]
                assert len(library_lines) < 40, (process.name, library_lines[-5:])
                # A line of ours says what waits and why (trial 9: only the library's
                # lines said so); once, not one per check. (Its next check may trail the
                # stop by a moment on a loaded machine.)
                deadline = time.monotonic() + 20
                while not (said := _logged(process, "dependency_unavailable")):
                    assert time.monotonic() < deadline, (process.name, "no line")
                    await asyncio.sleep(0.2)
                assert len(said) == 1, (process.name, said)
                assert said[0]["cause"] == "kafka_unavailable", said
                assert said[0]["waiting"] == [process.name.split("-")[0]], said
            stoppable_kafka.start()
            back = utcnow()

            await wait_until(
                lambda: progress_past(db, backlog, 20), running, "progressing", DEADLINE_S
            )
            for each in (job, backlog):
                await wait_until(
                    functools.partial(finished, db, each), running, "finished", DEADLINE_S
                )
            assert all_running(running)
            for process in running:
                deadline = time.monotonic() + 20
                while not (back_lines := _logged(process, "dependency_recovered")):
                    events = [e["event"] for e in _logged(process, "dependency_unavailable")]
                    assert time.monotonic() < deadline, (process.name, events)
                    await asyncio.sleep(0.2)
                [recovered] = back_lines
                assert recovered["dependency"] == "kafka" and recovered["down_s"] >= 3
            await assert_deleted_exactly_once(db, settings, job)
            await assert_deleted_exactly_once(db, settings, backlog)
            report(
                f"broker_stop_3s_{db.engine.dialect.name}",
                processes_up=f"{len(running)}/{len(running)}",
                backlog_first_progress_s=await first_progress_after(db, backlog, back),
            )
    finally:
        await db.dispose()


def _logged(process: Any, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of a component process with this event."""
    lines = process.log_path.read_text(errors="replace").splitlines()
    found = [json.loads(line) for line in lines if f'"event": "{event}"' in line]
    return [entry for entry in found if entry.get("event") == event]


# -- SQLite locked by another process --------------------------------------------------

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


async def test_sqlite_locked_by_another_process_past_the_busy_timeout(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Another process holds the write lock 4 s, the busy timeout is 0.3 s: SQLITE_BUSY is
    transient, so every component waits it out and no item fails."""
    path = tmp_path / "locked.db"
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    settings = make_settings(
        url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_partitions=2,
        worker_batch_size=10,
        relay_batch_size=100,
    )
    db = Database(url)
    try:
        job = await seed_job(db, settings, 1000)
        with components(settings, tmp_path, {"SQLITE_BUSY_TIMEOUT_MS": "300"}) as group:
            running = [group.start("relay"), group.start("worker"), group.start("dispatcher")]
            await wait_until(lambda: progress_past(db, job, 50), running, "started", DEADLINE_S)
            locker = subprocess.Popen(
                [sys.executable, "-c", LOCKER, str(path), "4"], stdout=subprocess.PIPE
            )
            assert locker.stdout is not None
            assert await asyncio.to_thread(locker.stdout.readline) == b"locked\n"
            assert await asyncio.to_thread(locker.wait, 30) == 0
            locker.stdout.close()
            back = utcnow()
            assert all_running(running)

            await wait_until(lambda: finished(db, job), running, "finished", DEADLINE_S)
            assert all_running(running)
            logs = "".join(p.log_path.read_text() for p in running)
            assert "database is locked" in logs  # the lock was met, and waited out
            await assert_deleted_exactly_once(db, settings, job)
            report(
                "sqlite_locked_4s",
                processes_up=f"{len(running)}/{len(running)}",
                first_progress_s=await first_progress_after(db, job, back),
            )
    finally:
        await db.dispose()
