"""`contact-deletion keys` through the real console entry, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import create_async_engine

from service.cli import main
from service.config import Settings
from service.db import Database, admin_sql
from service.dev import broker_dir, demo_key, port_in_use
from service.keys import authenticate
from service.procs import free_port
from tests.components import COMMAND, stop_process
from tests.conftest import Tenant


@pytest.fixture(autouse=True)
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI reads the same database as the `api` fixture; its logging set-up is undone."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("LOG_FORMAT", "json")
    saved = dict(structlog.get_config())
    yield
    # main() binds structlog to the sys.stderr of the moment (capsys's); put it back.
    structlog.configure(**saved)


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `contact-deletion ARGV` (main() calls asyncio.run, so off this loop's thread)."""
    return (await run_cli_both(capsys, *argv))[:2]


async def run_cli_both(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`run_cli` with its stderr too: exit code, stdout, stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def create_key(capsys: pytest.CaptureFixture[str], *scopes: str) -> dict[str, Any]:
    workspace = f"cli-{uuid.uuid4().hex[:10]}"
    scope_args = [arg for s in scopes for arg in ("--scope", s)]
    code, out = await run_cli(
        capsys, "keys", "create", "--workspace", workspace, *scope_args, "--json"
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1, out
    created: dict[str, Any] = json.loads(lines[0])
    return created


def as_tenant(api: str, http: aiohttp.ClientSession, created: dict[str, Any]) -> Tenant:
    return Tenant(
        api,
        created["key"],
        uuid.UUID(created["key_id"]),
        uuid.UUID(created["workspace_id"]),
        http,
    )


async def test_keys_create_says_when_it_made_a_new_workspace_and_refuses_blank_names(
    capsys: pytest.CaptureFixture[str], db_url: str
) -> None:
    """A typo ("Acme" for "acme") made a second, empty workspace that looked like the
    first: the answer now says the workspace is new. A blank or space-edged name is
    refused (exit 2) and creates nothing."""
    name = f"cli-{uuid.uuid4().hex[:10]}"
    args = ("keys", "create", "--workspace", name, "--scope", "audit:read")
    first = json.loads((await run_cli(capsys, *args, "--json"))[1])
    again = json.loads((await run_cli(capsys, *args, "--json"))[1])
    assert (first["new_workspace"], again["new_workspace"]) == (True, False)
    assert first["workspace_id"] == again["workspace_id"]
    code, out = await run_cli(capsys, *args[:-2], "--scope", "audit:read")
    assert code == 0 and "a new workspace" not in out

    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            count = sa.text("SELECT count(*) FROM workspaces")
            before = (await conn.execute(count)).scalar_one()
            for bad in ("", "   ", " acme", "acme ", "a\tb", "x" * 201):
                with pytest.raises(SystemExit) as exited:
                    await asyncio.to_thread(
                        main, ["keys", "create", "--workspace", bad, "--scope", "audit:read"]
                    )
                assert exited.value.code == 2
                assert "workspace" in capsys.readouterr().err
            assert (await conn.execute(count)).scalar_one() == before
    finally:
        await engine.dispose()


async def test_keys_create_json_prints_exactly_one_line_with_the_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    created = await create_key(capsys, "contacts:read")

    assert set(created) == {"key", "key_id", "workspace_id", "new_workspace"}
    assert created["key"].startswith("cdk_")
    uuid.UUID(created["key_id"])
    uuid.UUID(created["workspace_id"])


async def test_a_created_key_works_against_the_api_with_its_scopes(
    capsys: pytest.CaptureFixture[str], api: str, http: aiohttp.ClientSession
) -> None:
    tenant = as_tenant(api, http, await create_key(capsys, "contacts:read"))

    read_status, read_body, _ = await tenant.call("POST", "/v1/contacts/query", json={})
    write_status, _, _ = await tenant.call("POST", "/v1/contacts", json={"email": "a@example.com"})

    assert read_status == 200
    assert read_body["data"] == []
    assert write_status == 403


async def test_keys_for_the_same_workspace_name_share_the_workspace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    workspace = f"cli-shared-{uuid.uuid4().hex[:10]}"
    outs = []
    for _ in range(2):
        code, out = await run_cli(
            capsys, "keys", "create", "--workspace", workspace, "--scope", "audit:read", "--json"
        )
        assert code == 0
        outs.append(json.loads(out))

    assert outs[0]["workspace_id"] == outs[1]["workspace_id"]
    assert outs[0]["key_id"] != outs[1]["key_id"]


async def test_keys_list_json_shows_the_key_without_the_clear_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    created = await create_key(capsys, "contacts:write", "contacts:read")

    code, out = await run_cli(capsys, "keys", "list", "--json")

    assert code == 0
    assert created["key"] not in out
    listed = {k["key_id"]: k for k in json.loads(out)}
    mine = listed[created["key_id"]]
    assert "key" not in mine
    assert "key_hash" not in mine
    assert mine["workspace_id"] == created["workspace_id"]
    assert mine["scopes"] == ["contacts:read", "contacts:write"]
    assert created["key"].startswith(mine["prefix"])
    assert mine["revoked_at"] is None
    assert mine["created_at"].endswith("Z")  # as the API writes times (README), not +00:00


async def test_keys_revoke_makes_the_key_401(
    capsys: pytest.CaptureFixture[str], api: str, http: aiohttp.ClientSession
) -> None:
    created = await create_key(capsys, "contacts:read")
    tenant = as_tenant(api, http, created)
    assert (await tenant.call("POST", "/v1/contacts/query", json={}))[0] == 200

    code, out = await run_cli(capsys, "keys", "revoke", created["key_id"])
    status, body, _ = await tenant.call("POST", "/v1/contacts/query", json={})
    _, listing = await run_cli(capsys, "keys", "list", "--json")

    assert code == 0
    assert created["key_id"] in out
    assert status == 401
    again, out, said = await run_cli_both(capsys, "keys", "revoke", created["key_id"])
    assert again == 1 and out == "" and "already revoked at" in said, said
    never, out, said = await run_cli_both(capsys, "keys", "revoke", str(uuid.uuid4()))
    assert never == 1 and out == "" and said.startswith("contact-deletion: error: no key "), said
    assert body["error"]["code"] == "invalid_key"
    revoked = {k["key_id"]: k for k in json.loads(listing)}[created["key_id"]]
    assert revoked["revoked_at"] is not None


async def test_revoking_an_unknown_or_revoked_key_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    created = await create_key(capsys, "contacts:read")
    assert (await run_cli(capsys, "keys", "revoke", created["key_id"]))[0] == 0

    again, _ = await run_cli(capsys, "keys", "revoke", created["key_id"])
    unknown, _ = await run_cli(capsys, "keys", "revoke", str(uuid.uuid4()))
    malformed, _ = await run_cli(capsys, "keys", "revoke", "not-a-key-id")

    assert (again, unknown, malformed) == (1, 1, 2)


async def test_an_unknown_scope_is_an_argparse_error_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["keys", "create", "--workspace", "w", "--scope", "contacts:nuke", "--json"])

    assert excinfo.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "contacts:nuke" in captured.err


@pytest.fixture
def empty_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of the backend under test with no schema at all."""
    if db_url.startswith("sqlite"):
        path = tmp_path / "empty.db"
        sqlite3.connect(path).close()
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = f"empty_{uuid.uuid4().hex[:10]}"
    asyncio.run(admin_sql(db_url, f'CREATE DATABASE "{name}"'))
    base, _, _ = db_url.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(admin_sql(db_url, f'DROP DATABASE "{name}"'))


async def test_a_database_without_schema_is_named_with_the_command_to_run(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """keys and audit verify on an unmigrated database: exit 2 and one line naming the
    database and `contact-deletion migrate` (no traceback); after migrate they work."""
    monkeypatch.setenv("DATABASE_URL", empty_db_url)
    for argv in (["keys", "list"], ["audit", "verify"]):
        capsys.readouterr()
        code = await asyncio.to_thread(main, argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert "contact-deletion migrate" in err and "Traceback" not in err
        where = Settings(database_url=empty_db_url).describe_database()
        assert where in err
    code, out = await run_cli(capsys, "migrate")
    assert code == 0 and "latest schema" in out
    code, _ = await run_cli(capsys, "keys", "list")
    assert code == 0


async def test_dev_keeps_one_demo_key_across_starts(db_url: str, tmp_path: Path) -> None:
    """Every `make dev` shows the same live key (it used to add one each start);
    --new-key revokes it and stores another."""
    db = Database(db_url)
    key_file = tmp_path / "demo-key"
    try:
        first, new = await demo_key(db, key_file, new_key=False)
        assert new and key_file.read_text().strip() == first
        assert (key_file.stat().st_mode & 0o777) == 0o600
        again, new = await demo_key(db, key_file, new_key=False)
        assert (again, new) == (first, False)
        replaced, new = await demo_key(db, key_file, new_key=True)
        assert new and replaced != first
        assert await authenticate(db, first) is None
        assert await authenticate(db, replaced) is not None
    finally:
        await db.dispose()


def test_dev_refuses_a_port_in_use_before_printing_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        monkeypatch.setenv("HTTP_PORT", str(port))
        monkeypatch.setenv("DATA_DIR", str(tmp_path))
        capsys.readouterr()
        assert main(["dev", "--no-kafka"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    # the one start-up error line of every command (README "The command line")
    assert err.count("\n") == 1 and err.startswith("contact-deletion: error: "), err
    assert f"HTTP_HOST=127.0.0.1 HTTP_PORT={port}: Address already in use" in err, err
    assert f"HTTP_PORT={port + 1} make dev" in err, err
    assert list(tmp_path.iterdir()) == []  # no database, no key
    assert not port_in_use("127.0.0.1", port)


async def test_every_json_answer_is_one_document_and_an_empty_list_is_an_empty_array(
    capsys: pytest.CaptureFixture[str],
    db_url: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dlq list --json` with no dead letters printed nothing, `keys list --json` an array,
    `audit verify --json` a line per workspace: every `--json` answer is one JSON document,
    an array for a listing (`[]` when empty) and an object for one result (README "The
    command line")."""
    from tests.conftest import own_database

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:10]}.")  # no topics yet
    async with own_database(db_url, tmp_path, "cli_json") as url:
        monkeypatch.setenv("DATABASE_URL", url)
        for listing in (["keys", "list"], ["audit", "verify"], ["dlq", "list"]):
            code, out, err = await run_cli_both(capsys, *listing, "--json")
            assert (code, json.loads(out), err) == (0, [], ""), (listing, out, err)
            assert out.count("\n") == 1, (listing, out)

        created = await create_key(capsys, "audit:read")
        one_result = {
            ("audit", "verify"): list,
            ("keys", "list"): list,
            ("erasure", "check", "--email", "ada@example.com"): dict,
        }
        for argv, shape in one_result.items():
            code, out, err = await run_cli_both(capsys, *argv, "--json")
            assert code == 0 and err == "", (argv, code, err)
            answer = json.loads(out)  # the whole of stdout is one document
            assert isinstance(answer, shape) and answer, (argv, answer)
        listed = json.loads((await run_cli_both(capsys, "keys", "list", "--json"))[1])
        assert [k["key_id"] for k in listed] == [created["key_id"]]


async def test_keys_list_is_a_table_whose_columns_line_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Workspace names of different lengths pushed the later columns about: each column
    starts at the same place on every line, under its header."""
    await create_key(capsys, "audit:read")
    await run_cli(capsys, "keys", "create", "--workspace", "w", "--scope", "audit:read")
    code, out = await run_cli(capsys, "keys", "list")

    assert code == 0
    header, *rows = out.splitlines()
    assert len(rows) >= 2
    starts = [header.index(name) for name in ("prefix", "workspace", "state", "scopes")]
    for row in rows:
        for start in starts:
            assert row[start - 2 : start] == "  " and row[start] != " ", (header, row)


async def test_erasure_check_in_a_workspace_that_does_not_exist_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--workspace` with a typo searched nothing, yet answered like a check ("not checked",
    a verdict). A name or id of no workspace is refused with exit 2 and no verdict; a
    workspace that exists goes through."""
    created = await create_key(capsys, "audit:read")

    for unknown in (f"cli-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())):
        capsys.readouterr()
        argv = ["erasure", "check", "--email", "a@example.com", "--workspace", unknown]
        code = await asyncio.to_thread(main, argv)
        out, err = capsys.readouterr()
        assert code == 2
        assert "--workspace" in err and repr(unknown) in err, err
        assert "verdict" not in out
    code, out = await run_cli(
        capsys,
        "erasure",
        "check",
        "--email",
        "a@example.com",
        "--workspace",
        created["workspace_id"],
    )
    assert "verdict" in out, out


def test_dev_makes_a_data_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    """README Quick start: `HTTP_PORT=8082 DATA_DIR=/tmp/other make dev` for a second set-up.
    A DATA_DIR not made yet ended `dev` in a traceback ("unable to open database file");
    `run` and `migrate` make it, and now `dev` does too, and serves."""
    data_dir = tmp_path / "not" / "yet"
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HTTP_PORT": str(port),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # none: it waits for one
    }
    env.pop("DATABASE_URL", None)
    errors = tmp_path / "dev.err"
    with errors.open("wb") as sink:
        dev = subprocess.Popen(
            [COMMAND, "dev", "--no-kafka"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert dev.poll() is None, errors.read_text()[-2000:]
            assert time.monotonic() < deadline, "dev did not serve within 90 s"
            url = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
            time.sleep(0.5)
        assert (data_dir / "contact-deletion.db").is_file()
        assert (data_dir / "demo-key").is_file()
    finally:
        stop_process(dev, signal.SIGINT)  # Ctrl-C, as make dev is stopped


def test_a_broker_on_another_port_gets_a_folder_of_its_own(tmp_path: Path) -> None:
    """README: `KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 make dev` runs its own broker beside
    the default one; both in one DATA_DIR took one folder's lock and the second rewrote the
    first one's server.properties."""
    assert broker_dir(tmp_path, 9092) == tmp_path / "kafka"  # where it always was
    assert broker_dir(tmp_path, 19092) == tmp_path / "kafka-19092"
