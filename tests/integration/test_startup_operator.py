"""Start-up as an operator sees it: a database that cannot serve as configured, a port
that cannot be bound, an audit key changed after the first start, a component waiting
for Kafka. Each is one line (exit 2) or the documented log lines, on both databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.app import warn_of_other_topics
from service.audit.store import HashKeyMismatch, load_hash_key
from service.cli import main
from service.db import Database, audit_events, outbox, server_secrets, utcnow
from service.migrate import upgrade_sync
from tests.components import COMMAND
from tests.conftest import components_running, make_settings, opened_services
from tests.logcapture import json_logs

KEY_A = "a" * 40
KEY_B = "b" * 40


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(DATA_DIR=str(tmp_path / "data"), LOG_FORMAT="json", LOG_LEVEL="INFO")
    env.update(values)
    return env


def _cli(
    env: dict[str, str], *argv: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *argv], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a command that refused to start (exit 2, no traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("contact-deletion: error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


@pytest.fixture
def fresh_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of the backend under test with nothing in it (not migrated): an SQLite
    file path not created yet, or a new PostgreSQL database on the test cluster."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"fresh_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(
            host=server.host, port=server.port, user=server.username, database=server.database
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# -- Kind 1: the database ---------------------------------------------------------------


def test_a_database_that_does_not_exist_is_one_line_saying_how_to_create_it(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`api` against a PostgreSQL database that does not exist ended in ~80 lines of
    InvalidCatalogNameError; an SQLite file that is not there is reported, not created."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'none' / 'cd.db'}"
        says = ["no database at", "contact-deletion migrate"]
    else:
        server = make_url(request.getfixturevalue("postgres_url"))
        # As an operator writes it: postgres://, no driver.
        url = f"postgres://{server.username}@{server.host}:{server.port}/no_such_db"
        says = ["'no_such_db' does not exist", "createdb", "contact-deletion migrate"]
    done = _cli(_env(tmp_path, DATABASE_URL=url, HTTP_PORT="0"), "api")
    assert done.returncode == 2, done.stderr
    line = _error_line(done)
    assert all(s in line for s in says), line
    assert not (tmp_path / "none").exists()


def test_migrate_waits_for_a_database_that_is_down_then_gives_up_with_exit_3(
    tmp_path: Path,
) -> None:
    """`migrate` with PostgreSQL down was a ConnectionRefusedError traceback, exit 1. It
    waits like `run` (waiting_for_dependency lines), then says so in one line, exit 3."""
    url = f"postgresql://nobody@127.0.0.1:{_closed_port()}/cd"
    done = _cli(_env(tmp_path, DATABASE_URL=url), "migrate", "--wait", "1")
    assert done.returncode == 3, done.stderr
    assert "did not answer within 1 s" in _error_line(done)
    waits = [json.loads(x) for x in done.stderr.splitlines() if "waiting_for_dependency" in x]
    assert waits and waits[0]["component"] == "migrate" and waits[0]["dependency"] == "database"


async def test_migrate_says_whether_it_created_the_schema_or_did_nothing(
    fresh_db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_db_url)
    outs = []
    for _ in range(2):
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["migrate"]) == 0
        outs.append(capsys.readouterr().out.strip())
    assert "schema created" in outs[0] and "nothing to do" not in outs[0], outs
    assert "already at the latest schema" in outs[1] and "nothing to do" in outs[1], outs


# -- Kind 1: the HTTP listener ------------------------------------------------------------


async def _read_until(proc: subprocess.Popen[str], event: str, timeout_s: float) -> dict[str, Any]:
    """The first JSON log line of `event` the process writes to stderr."""
    assert proc.stderr is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen = []
    while loop.time() < deadline:
        line = await asyncio.wait_for(
            loop.run_in_executor(None, proc.stderr.readline), deadline - loop.time()
        )
        if not line:
            break
        seen.append(line)
        if line.startswith("{") and json.loads(line).get("event") == event:
            return dict(json.loads(line))
    raise AssertionError(f"no {event} line; the process wrote:\n{''.join(seen[-20:])}")


def _stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM (SIGKILL if it does not stop in 30 s); its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
    return proc.returncode


def _migrated_sqlite(tmp_path: Path) -> str:
    """A migrated SQLite file of its own, for a start-up path no database changes."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cd.db'}"
    upgrade_sync(url)
    return url


async def test_http_port_0_logs_the_port_it_bound(tmp_path: Path) -> None:
    """HTTP_PORT=0 logged `port=0`; the line names the port the system chose, which answers."""
    url = await asyncio.to_thread(_migrated_sqlite, tmp_path)
    env = _env(tmp_path, DATABASE_URL=url, HTTP_PORT="0")
    proc = subprocess.Popen([COMMAND, "api"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        listening = await _read_until(proc, "api_listening", 60)
        port = listening["port"]
        assert isinstance(port, int) and port > 0, listening
        # Something answers on that port (a refused connection raises and fails the test).
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        assert _stop(proc) == 0


def test_an_address_it_cannot_listen_on_is_one_line(tmp_path: Path) -> None:
    """A host name that does not resolve was a gaierror traceback."""
    env = _env(
        tmp_path,
        DATABASE_URL=_migrated_sqlite(tmp_path),
        HTTP_HOST="no-such-host.invalid",
        HTTP_PORT="0",
    )
    done = _cli(env, "api")
    assert done.returncode == 2, done.stderr
    line = _error_line(done)
    assert "cannot listen on HTTP_HOST=no-such-host.invalid" in line, line


@pytest.mark.parametrize(
    "argv", [["run"], ["api"], ["dev", "--no-kafka"], ["dispatcher"]], ids=" ".join
)
def test_a_taken_port_is_the_one_error_line_before_anything_starts(
    tmp_path: Path, argv: list[str]
) -> None:
    """`run` with its port taken migrated first and logged `migrated` and
    `component_failed` before its error line; `dev` printed its own "contact-deletion
    dev: … is already in use" and exited 1. Every command that serves says it in the one
    start-up error line, exit 2, before it migrates (no database file is made)."""
    database = tmp_path / "not-yet.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = _env(
            tmp_path,
            DATABASE_URL=f"sqlite+aiosqlite:///{database}",
            KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{_closed_port()}",
            HTTP_PORT=port,
            OPS_PORT=port,
        )
        done = _cli(env, *argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [_error_line(done)], done.stderr
    assert f"PORT={port}: " in done.stderr and done.stdout == "", done
    assert not database.exists()


def test_a_one_shot_command_without_a_broker_prints_only_its_own_lines(tmp_path: Path) -> None:
    """With no broker, `dlq list` and `erasure check` wrote aiokafka's JSON log record
    ("Unable connect to …") before their own answer: a one-shot command's stderr holds its
    own error line only, and its stdout its answer."""
    env = _env(
        tmp_path,
        DATABASE_URL=_migrated_sqlite(tmp_path),
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{_closed_port()}",
    )
    dlq = _cli(env, "dlq", "list", "--json", timeout_s=120)
    assert dlq.returncode == 2 and dlq.stdout == "", dlq
    assert dlq.stderr.splitlines() == [_error_line(dlq)], dlq.stderr
    erasure = _cli(env, "erasure", "check", "--email", "ada@example.com", timeout_s=120)
    assert erasure.returncode == 2, erasure  # some place not checked: nothing proven
    assert erasure.stderr == "", erasure.stderr
    assert "not checked" in erasure.stdout, erasure.stdout


# -- Kind 2: the audit key ----------------------------------------------------------------


async def test_audit_hash_key_changed_after_the_first_start_is_refused(fresh_db_url: str) -> None:
    """Events keyed with one key are not found by address with another: a start with a
    different key, or with none after a configured one, is refused (the fingerprint of the
    key in use is kept, never the key); the same key starts again."""
    await asyncio.to_thread(upgrade_sync, fresh_db_url)
    db = Database(fresh_db_url)
    try:
        assert await load_hash_key(db, KEY_A) == KEY_A.encode()
        assert await load_hash_key(db, KEY_A) == KEY_A.encode()
        with pytest.raises(
            HashKeyMismatch, match=r"AUDIT_HASH_KEY \(fingerprint \w+\) is not the key"
        ):
            await load_hash_key(db, KEY_B)
        with pytest.raises(HashKeyMismatch, match="AUDIT_HASH_KEY is not set"):
            await load_hash_key(db, None)
        async with db.read() as conn:
            kept = (await conn.execute(sa.select(server_secrets.c.value))).scalars().all()
        assert KEY_A not in kept and len(kept) == 1
    finally:
        await db.dispose()


async def test_a_key_set_after_events_were_keyed_with_the_generated_one_is_refused(
    fresh_db_url: str,
) -> None:
    """AUDIT_HASH_KEY set after the first start: the events keyed with the generated key
    (kept in server_secrets) would no longer be found by address."""
    await asyncio.to_thread(upgrade_sync, fresh_db_url)
    db = Database(fresh_db_url)
    try:
        generated = await load_hash_key(db, None)
        async with db.begin() as conn:  # an event keyed with the generated key
            await conn.execute(
                audit_events.insert().values(
                    workspace_id=uuid.uuid4(),
                    seq=1,
                    id=uuid.uuid4(),
                    occurred_at="2026-11-30T00:00:00.000Z",
                    actor_type="api_key",
                    actor_id="k",
                    action="contact.deleted",
                    data="{}",
                    email_hmac="0" * 64,
                    prev_hash="0" * 64,
                    hash="1" * 64,
                )
            )
        with pytest.raises(HashKeyMismatch, match="keyed with the key generated at its first"):
            await load_hash_key(db, KEY_A)
        # The generated key itself, named explicitly, is the same key: accepted.
        assert await load_hash_key(db, generated.decode()) == generated
        assert await load_hash_key(db, None) == generated
    finally:
        await db.dispose()


def test_a_worker_started_with_another_audit_key_refuses_in_one_line(
    fresh_db_url: str, tmp_path: Path
) -> None:
    """The CLI path: the refusal is the one-line answer, exit 2, before any work."""
    upgrade_sync(fresh_db_url)
    asyncio.run(_store_fingerprint(fresh_db_url, KEY_A))  # the first start, with key A
    env = _env(
        tmp_path,
        DATABASE_URL=fresh_db_url,
        AUDIT_HASH_KEY=KEY_B,
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{_closed_port()}",
    )
    done = _cli(env, "worker")
    assert done.returncode == 2, done.stderr
    line = _error_line(done)
    assert "AUDIT_HASH_KEY" in line and "set it back" in line, line
    assert KEY_A not in done.stderr and KEY_B not in done.stderr


async def _store_fingerprint(url: str, key: str) -> None:
    db = Database(url)
    try:
        await load_hash_key(db, key)
    finally:
        await db.dispose()


# -- Kind 3: components say what they wait for and when they start ------------------------


@pytest.mark.parametrize("component", ["relay", "worker"])
def test_a_component_alone_with_no_broker_says_it_waits_for_kafka(
    tmp_path: Path, component: str
) -> None:
    """A standalone relay or worker with no broker wrote only aiokafka errors (the topics'
    own 30 s of retries came first); now `waiting_for_dependency` within seconds."""
    env = _env(
        tmp_path,
        DATABASE_URL=_migrated_sqlite(tmp_path),
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{_closed_port()}",
        KAFKA_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:8]}.",
    )
    proc = subprocess.Popen([COMMAND, component], env=env, stderr=subprocess.PIPE, text=True)
    try:
        waiting = asyncio.run(_read_until(proc, "waiting_for_dependency", 25))
        assert (waiting["component"], waiting["dependency"]) == (component, "kafka")
    finally:
        assert _stop(proc) == 0


async def test_each_kafka_component_logs_one_line_when_it_starts(
    db_url: str, kafka_bootstrap: str
) -> None:
    settings = make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)
    with json_logs() as logs:
        async with (
            opened_services(settings) as services,
            components_running(services, "relay", "worker", "dispatcher"),
        ):
            for component in ("relay", "worker", "dispatcher"):
                await logs.wait_for("component_started", timeout_s=30, component=component)
    started = logs.events("component_started")
    assert sorted(e["component"] for e in started) == ["dispatcher", "relay", "worker"]
    assert all(e["kafka"] == kafka_bootstrap for e in started)


async def test_outbox_rows_for_another_topic_prefix_are_reported_at_relay_start(
    db_url: str,
) -> None:
    """KAFKA_TOPIC_PREFIX changed while rows waited in the outbox: the relay would send
    them to the old topics, which no consumer of this deployment reads. It says so."""
    settings = make_settings(db_url)
    old_topic = f"0old{uuid.uuid4().hex[:8]}.contact.deleted"  # sorts first among topics
    async with opened_services(settings) as services:
        async with services.db.begin() as conn:
            row_id = (
                await conn.execute(
                    outbox.insert()
                    .values(
                        topic=old_topic, key=None, payload=b"{}", headers=[], created_at=utcnow()
                    )
                    .returning(outbox.c.id)
                )
            ).scalar_one()
        try:
            with json_logs() as logs:
                assert await warn_of_other_topics(services) >= 1
            [line] = logs.events("outbox_rows_for_other_topics")
            assert old_topic in line["topics"] and line["count"] >= 1
        finally:
            async with services.db.begin() as conn:
                await conn.execute(outbox.delete().where(outbox.c.id == row_id))


async def test_erasure_check_with_another_audit_key_refuses_rather_than_find_nothing(
    fresh_db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With another key the audit trail would find no deletion: a false "nowhere"."""
    await asyncio.to_thread(upgrade_sync, fresh_db_url)
    await _store_fingerprint(fresh_db_url, KEY_A)
    monkeypatch.setenv("DATABASE_URL", fresh_db_url)
    monkeypatch.setenv("AUDIT_HASH_KEY", KEY_B)
    capsys.readouterr()
    argv = ["erasure", "check", "--email", "gone@example.com"]
    assert await asyncio.to_thread(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("contact-deletion: error: AUDIT_HASH_KEY (fingerprint"), err
    assert len(err.splitlines()) == 1 and KEY_B not in err
