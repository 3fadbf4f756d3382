"""Tampering with the audit table is caught, writers never fork the chain, and the deleted
contact's address is nowhere: on SQLite and PostgreSQL.

Tampering goes straight at the table with SQLAlchemy Core, as someone with database
access would (on PostgreSQL with the append-only trigger disabled inside the same
transaction, so no other session ever sees it off). Each case then asks both the API and
`contact-deletion audit verify` for the first broken seq, puts the row back, and checks
that the chain verifies again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import sqlalchemy as sa
import structlog
from aiohttp.test_utils import TestServer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from service.app import Services, create_app, run_components
from service.audit import cli as audit_cli
from service.audit.chain import email_hmac
from service.audit.export import verify_export
from service.audit.store import AuditRecord, append_events, verify_workspace
from service.config import Settings
from service.db import Database, audit_events, audit_heads, workspaces
from service.keys import SCOPES, create_key
from service.logs import configure_logging
from service.migrate import upgrade
from tests.conftest import Tenant

HASH_KEY = b"test-audit-key"


@pytest.fixture
async def api(services: Services) -> AsyncIterator[str]:
    """The HTTP API with the audit routes (added here until create_app wires them)."""
    app = create_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


# --- a chain to tamper with ----------------------------------------------------------------


@dataclass
class Chain:
    tenant: Tenant
    name: str
    length: int
    db: Database
    settings: Settings


def _records(workspace_id: uuid.UUID) -> list[list[AuditRecord]]:
    """Eleven events in four transactions, with every optional field set somewhere."""
    key = {"type": "api_key", "id": str(uuid.uuid4())}
    job = str(uuid.uuid4())
    deleted_hmac = email_hmac(HASH_KEY, "someone@example.com")

    def contact(**kw: Any) -> AuditRecord:
        base: dict[str, Any] = {
            "workspace_id": workspace_id,
            "actor": key,
            "action": "contact.deleted",
            "target": {"type": "contact", "id": str(uuid.uuid4())},
            "job_id": job,
            "request_id": "req-tamper",
        }
        return AuditRecord(**(base | kw))

    return [
        [
            contact(
                action="deletion.requested",
                target={"type": "deletion_job", "id": job},
                data={"selector": {"type": "contact_ids", "count": 5}, "dry_run": False},
            )
        ],
        [
            contact(
                data={
                    "email_hmac": deleted_hmac,
                    "preserved_timeline": {
                        "activities": [{"id": str(uuid.uuid4()), "kind": "activity", "at": "x"}],
                        "notes": [],
                        "tasks": [],
                    },
                    "note": 'ünïcödé, "quotes" and a\nnewline',
                },
                email_hmac=deleted_hmac,
            ),
            contact(action="contact.deletion_failed", data={"code": "CANNOT_DELETE_SITE_MEMBERS"}),
            contact(data={"email_hmac": "ab" * 32}, email_hmac="ab" * 32),
        ],
        [
            contact(action="audit.exported", target=None, job_id=None, request_id=None),
            contact(action="contact.deletion_failed", data={"code": "X", "n": 2**40}),
            contact(data={"email_hmac": "cd" * 32}, email_hmac="cd" * 32),
        ],
        [
            contact(
                actor={"type": "system", "id": "worker"},
                action="deletion.completed",
                target={"type": "deletion_job", "id": job},
                data={"deleted": 3, "failed": 2, "not_found": 0},
            ),
            contact(action="webhook.endpoint.created", request_id=None, data={"url": "https://x"}),
            contact(action="contact.deletion_failed", data={"code": "Y"}),
            contact(data={"email_hmac": "ef" * 32}, email_hmac="ef" * 32),
        ],
    ]


@pytest.fixture
async def chain(services: Services, tenant: Tenant) -> Chain:
    """The tenant's chain: its api_key.created (seq 1) and eleven more events (seq 2..12)."""
    db = services.db
    for batch in _records(tenant.workspace_id):
        async with db.begin() as conn:
            await append_events(conn, db, batch)
    async with db.read() as conn:
        name = (
            await conn.execute(
                sa.select(workspaces.c.name).where(workspaces.c.id == tenant.workspace_id)
            )
        ).scalar_one()
    return Chain(tenant, name, 12, db, services.settings)


@asynccontextmanager
async def tampering(db: Database) -> AsyncIterator[AsyncConnection]:
    """A transaction that may UPDATE and DELETE audit rows (PostgreSQL: trigger off inside)."""
    async with db.begin() as conn:
        if not db.is_sqlite:
            await conn.execute(
                sa.text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
            )
        yield conn
        if not db.is_sqlite:
            await conn.execute(
                sa.text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")
            )


def at(workspace_id: uuid.UUID, seq: int) -> sa.ColumnElement[bool]:
    return sa.and_(audit_events.c.workspace_id == workspace_id, audit_events.c.seq == seq)


async def read_row(db: Database, workspace_id: uuid.UUID, seq: int) -> dict[str, Any]:
    async with db.read() as conn:
        row = (
            (await conn.execute(sa.select(audit_events).where(at(workspace_id, seq))))
            .mappings()
            .one()
        )
    return dict(row)


async def put_back(db: Database, where: sa.ColumnElement[bool], original: dict[str, Any]) -> None:
    async with tampering(db) as conn:
        await conn.execute(audit_events.update().where(where).values(**original))


async def api_verify(tenant: Tenant) -> dict[str, Any]:
    status, body, _ = await tenant.call("GET", "/v1/audit/verify")
    assert status == 200, body
    result: dict[str, Any] = body["data"]
    return result


def audit_args(*argv: str) -> argparse.Namespace:
    """Arguments as `contact-deletion audit ...` would parse them."""
    parser = argparse.ArgumentParser(prog="contact-deletion")
    audit_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["audit", *argv])


async def cli_verify(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, list[dict[str, Any]]]:
    """Run `audit verify --json ...`; its exit code and the JSON object of each workspace
    (the one JSON array it prints)."""
    capsys.readouterr()
    code = await audit_cli.run(audit_args("verify", "--json", *argv), settings)
    verdicts: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return code, verdicts


async def assert_broken_at(
    chain: Chain, capsys: pytest.CaptureFixture[str], seq: int, reasons: set[str]
) -> None:
    """Both the API and the CLI name `seq` as the first break, for one of `reasons`."""
    result = await api_verify(chain.tenant)
    assert result["ok"] is False, result
    assert result["broken_seq"] == seq, result
    assert result["reason"] in reasons, result
    assert result["events_checked"] == result["head_seq"] <= seq - 1
    code, lines = await cli_verify(chain.settings, capsys, "--workspace", chain.name)
    assert code == 1
    (line,) = lines
    assert line["workspace"] == chain.name
    assert (line["ok"], line["broken_seq"], line["reason"]) == (False, seq, result["reason"])


async def assert_intact(chain: Chain, capsys: pytest.CaptureFixture[str]) -> None:
    result = await api_verify(chain.tenant)
    assert result["ok"] is True, result
    assert result["events_checked"] == result["head_seq"] == chain.length
    code, lines = await cli_verify(chain.settings, capsys, "--workspace", chain.name)
    assert code == 0 and lines[0]["ok"] is True and lines[0]["head_hash"] == result["head_hash"]


# --- editing, deleting, swapping -------------------------------------------------------------

HASHED = {"hash_mismatch"}
EDITS: dict[str, tuple[Callable[[Any], Any], set[str]]] = {
    "id": (lambda _: uuid.uuid4(), HASHED),
    "occurred_at": (lambda v: v.replace(v[:4], "1999"), HASHED),
    "actor_type": (lambda v: "system" if v != "system" else "api_key", HASHED),
    "actor_id": (lambda v: v + "x", HASHED),
    "action": (lambda v: "contact.restored", HASHED),
    "target_type": (lambda v: (v or "") + "x", HASHED),
    "target_id": (lambda v: (v or "") + "x", HASHED),
    "job_id": (lambda v: (v or "")[:-1] + "x", HASHED),
    "request_id": (lambda v: (v or "") + "x", HASHED),
    "data": (lambda v: v.replace("}", ',"z":1}', 1) if v != "{}" else '{"z":1}', HASHED),
    "data_not_json": (lambda v: v[:-1], HASHED),  # still text, no longer JSON
    "email_hmac": (lambda v: "0" * 64 if v != "0" * 64 else "1" * 64, {"email_hmac_mismatch"}),
    "prev_hash": (lambda v: ("1" if v[0] != "1" else "2") + v[1:], {"broken_link"}),
    "hash": (lambda v: ("1" if v[0] != "1" else "2") + v[1:], HASHED),
    "seq": (lambda v: v + 1000, {"gap", "truncated"}),
    "workspace_id": (lambda _: uuid.uuid4(), {"gap", "truncated"}),
}


@pytest.mark.parametrize("field", sorted(EDITS))
async def test_editing_any_field_of_any_event_names_its_seq(
    chain: Chain, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    edit, reasons = EDITS[field]
    column = "data" if field == "data_not_json" else field
    for seq in (1, 3, 6, chain.length):
        original = await read_row(chain.db, chain.tenant.workspace_id, seq)
        changed = edit(original[column])
        assert changed != original[column]
        async with tampering(chain.db) as conn:
            await conn.execute(
                audit_events.update()
                .where(at(chain.tenant.workspace_id, seq))
                .values({column: changed})
            )
        await assert_broken_at(chain, capsys, seq, reasons)
        moved_ws = changed if column == "workspace_id" else chain.tenant.workspace_id
        moved_seq = changed if column == "seq" else seq
        await put_back(chain.db, at(moved_ws, moved_seq), original)
        await assert_intact(chain, capsys)


@pytest.mark.parametrize(("seq", "reason"), [(1, "gap"), (5, "gap"), (12, "truncated")])
async def test_deleting_an_event_names_its_seq(
    chain: Chain, capsys: pytest.CaptureFixture[str], seq: int, reason: str
) -> None:
    original = await read_row(chain.db, chain.tenant.workspace_id, seq)
    async with tampering(chain.db) as conn:
        await conn.execute(audit_events.delete().where(at(chain.tenant.workspace_id, seq)))
    await assert_broken_at(chain, capsys, seq, {reason})
    async with chain.db.begin() as conn:  # INSERT is what the trigger allows
        await conn.execute(audit_events.insert().values(**original))
    await assert_intact(chain, capsys)


@pytest.mark.parametrize(("first", "second"), [(1, 2), (4, 9), (11, 12)])
async def test_swapping_two_events_names_the_first(
    chain: Chain, capsys: pytest.CaptureFixture[str], first: int, second: int
) -> None:
    ws = chain.tenant.workspace_id
    a = await read_row(chain.db, ws, first)
    b = await read_row(chain.db, ws, second)
    content = [c for c in a if c not in ("workspace_id", "seq")]
    async with tampering(chain.db) as conn:
        # ids are unique: park one while the contents cross over.
        await conn.execute(audit_events.update().where(at(ws, first)).values(id=uuid.uuid4()))
        await conn.execute(
            audit_events.update().where(at(ws, second)).values({c: a[c] for c in content})
        )
        await conn.execute(
            audit_events.update().where(at(ws, first)).values({c: b[c] for c in content})
        )
    await assert_broken_at(chain, capsys, first, {"broken_link"})
    async with tampering(chain.db) as conn:
        await conn.execute(audit_events.update().where(at(ws, second)).values(id=uuid.uuid4()))
        await conn.execute(audit_events.update().where(at(ws, first)).values(**a))
        await conn.execute(audit_events.update().where(at(ws, second)).values(**b))
    await assert_intact(chain, capsys)


@pytest.mark.parametrize(
    ("change", "seq", "reason"),
    [
        ({"hash": "f" * 64}, 12, "head_mismatch"),  # the last event rewritten, head not
        ({"seq": 15}, 13, "truncated"),  # events cut off after the last one shown
        ({"seq": 11}, 12, "head_mismatch"),  # an event the head never covered
    ],
)
async def test_the_head_row_catches_what_the_chain_alone_cannot(
    chain: Chain, capsys: pytest.CaptureFixture[str], change: dict[str, Any], seq: int, reason: str
) -> None:
    ws = chain.tenant.workspace_id
    async with chain.db.read() as conn:
        head = (
            (await conn.execute(sa.select(audit_heads).where(audit_heads.c.workspace_id == ws)))
            .mappings()
            .one()
        )
    async with chain.db.begin() as conn:
        await conn.execute(
            audit_heads.update().where(audit_heads.c.workspace_id == ws).values(**change)
        )
    await assert_broken_at(chain, capsys, seq, {reason})
    async with chain.db.begin() as conn:
        await conn.execute(
            audit_heads.update().where(audit_heads.c.workspace_id == ws).values(**dict(head))
        )
    await assert_intact(chain, capsys)


async def test_cli_verifies_every_workspace_and_exits_1_on_a_break(
    chain: Chain, other_tenant: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = chain.tenant.workspace_id
    original = await read_row(chain.db, ws, 7)
    async with tampering(chain.db) as conn:
        await conn.execute(audit_events.update().where(at(ws, 7)).values(action="x"))
    code, lines = await cli_verify(chain.settings, capsys)
    by_id = {line["workspace_id"]: line for line in lines}
    assert code == 1
    assert (by_id[str(ws)]["ok"], by_id[str(ws)]["broken_seq"]) == (False, 7)
    assert by_id[str(other_tenant.workspace_id)]["ok"] is True
    capsys.readouterr()
    code = await audit_cli.run(audit_args("verify", "--workspace", chain.name), chain.settings)
    out = capsys.readouterr().out
    assert code == 1
    assert f"{chain.name} ({ws}): BROKEN at seq 7: hash_mismatch" in out
    await put_back(chain.db, at(ws, 7), original)
    code = await audit_cli.run(audit_args("verify", "--workspace", str(ws)), chain.settings)
    assert code == 0
    assert "ok, 12 events (seq 1..12)" in capsys.readouterr().out
    code = await audit_cli.run(audit_args("verify", "--workspace", "no-such"), chain.settings)
    assert code == 2


async def test_an_anchor_kept_elsewhere_catches_a_cut_the_head_row_was_made_to_agree_with(
    chain: Chain, capsys: pytest.CaptureFixture[str]
) -> None:
    """Events 11 and 12 deleted and the head row set back to event 10, as whoever can write
    the database can do (trial 6): the chain and the head agree, `audit verify` says ok.
    The head printed before, kept outside the service, is no longer in the chain."""
    ws = chain.tenant.workspace_id
    kept = await read_row(chain.db, ws, 12)
    anchor = f"12:{kept['hash']}"
    code, [line] = await cli_verify(chain.settings, capsys, "--workspace", chain.name)
    assert (code, line["head_seq"], line["head_hash"]) == (0, 12, kept["hash"])
    code, _ = await cli_verify(
        chain.settings, capsys, "--workspace", chain.name, "--anchor", anchor
    )
    assert code == 0

    tenth = await read_row(chain.db, ws, 10)
    async with tampering(chain.db) as conn:
        await conn.execute(
            audit_events.delete().where(audit_events.c.workspace_id == ws, audit_events.c.seq > 10)
        )
        await conn.execute(
            audit_heads.update()
            .where(audit_heads.c.workspace_id == ws)
            .values(seq=10, hash=tenth["hash"])
        )

    code, [line] = await cli_verify(chain.settings, capsys, "--workspace", chain.name)
    assert (code, line["ok"], line["head_seq"]) == (0, True, 10)  # the chain alone agrees
    code, [line] = await cli_verify(
        chain.settings, capsys, "--workspace", chain.name, "--anchor", anchor
    )
    assert code == 1
    assert (line["reason"], line["broken_seq"]) == ("anchor_missing", 11), line
    # Anchors belong to one chain: without --workspace it is a usage error.
    code = await audit_cli.run(audit_args("verify", "--anchor", anchor), chain.settings)
    assert code == 2


# --- the trigger ---------------------------------------------------------------------------


@pytest.mark.parametrize("statement", ["UPDATE", "DELETE", "TRUNCATE"])
async def test_postgresql_refuses_to_change_audit_rows(postgres_url: str, statement: str) -> None:
    """With the trigger on, UPDATE, DELETE and TRUNCATE fail (all inside a rolled-back
    transaction, so a missing trigger could not wipe the table for other tests)."""
    await upgrade(postgres_url)
    db = Database(postgres_url)
    try:
        workspace_id = uuid.uuid4()
        async with db.begin() as conn:
            await append_events(
                conn,
                db,
                [
                    AuditRecord(
                        workspace_id=workspace_id, actor=_SYSTEM, action="deletion.requested"
                    )
                ],
            )
        sql = {
            "UPDATE": "UPDATE audit_events SET action = 'x' WHERE workspace_id = :ws",
            "DELETE": "DELETE FROM audit_events WHERE workspace_id = :ws",
            "TRUNCATE": "TRUNCATE audit_events",
        }[statement]
        params = {"ws": workspace_id} if ":ws" in sql else {}
        async with db.engine.connect() as conn:
            transaction = await conn.begin()
            try:
                with pytest.raises(DBAPIError, match="append-only"):
                    await conn.execute(sa.text(sql), params)
            finally:
                await transaction.rollback()
        assert (await verify_workspace(db, workspace_id)).ok
    finally:
        await db.dispose()


_SYSTEM = {"type": "system", "id": "test"}


# --- concurrent writers --------------------------------------------------------------------


async def test_concurrent_writers_leave_no_gap_and_no_fork(services: Services) -> None:
    """8 tasks x 25 one-event transactions on a new workspace: seq 1..200, chain intact.

    On PostgreSQL the transactions really overlap (and race to create the head row); on
    SQLite the single writer connection queues them.
    """
    db = services.db
    workspace_id = uuid.uuid4()
    inside = 0
    most_inside = 0

    async def writer(n: int) -> None:
        nonlocal inside, most_inside
        for i in range(25):
            async with db.begin() as conn:
                inside += 1
                most_inside = max(most_inside, inside)
                try:
                    await asyncio.sleep(0)
                    record = AuditRecord(
                        workspace_id=workspace_id,
                        actor={"type": "system", "id": f"writer-{n}"},
                        action="deletion.requested",
                        data={"writer": n, "i": i},
                    )
                    await append_events(conn, db, [record])
                    await asyncio.sleep(0.001)  # hold the head lock while others queue
                finally:
                    inside -= 1

    await asyncio.gather(*(writer(n) for n in range(8)))
    async with db.read() as conn:
        seqs = (
            (
                await conn.execute(
                    sa.select(audit_events.c.seq)
                    .where(audit_events.c.workspace_id == workspace_id)
                    .order_by(audit_events.c.seq)
                )
            )
            .scalars()
            .all()
        )
    assert seqs == list(range(1, 201))
    result = await verify_workspace(db, workspace_id)
    assert result.ok and result.events_checked == 200, result
    if db.is_sqlite:
        assert most_inside == 1
    else:
        assert most_inside > 1, "the transactions never overlapped"


# --- the deleted contact's address ---------------------------------------------------------


@dataclass
class Running:
    services: Services
    tenant: Tenant
    logs: io.StringIO


@pytest.fixture
async def running(kafka_settings: Settings, tmp_path: Path) -> AsyncIterator[Running]:
    """API, relay and worker against the real broker, with every log line captured."""
    logs = io.StringIO()
    configure_logging("json", "DEBUG")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=logs))
    services = Services(settings=kafka_settings, db=Database(kafka_settings.database_url))
    app = create_app(services)
    server = TestServer(app, host="127.0.0.1")
    stop = asyncio.Event()
    task = asyncio.create_task(run_components(services, ["relay", "worker"], stop))
    try:
        await server.start_server()
        async with aiohttp.ClientSession() as http:
            created = await create_key(services.db, f"ws-{uuid.uuid4().hex[:12]}", list(SCOPES))
            base = str(server.make_url("")).rstrip("/")
            tenant = Tenant(base, created.key, created.key_id, created.workspace_id, http)
            yield Running(services, tenant, logs)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await server.close()
        await services.close()
        configure_logging("json", "WARNING")


def _forms(address: str) -> list[str]:
    """The address as someone might find it: clear (as given, normalised, local part) and
    as unkeyed hex SHA-256 of each."""
    clear = {address, address.strip().lower(), address.split("@")[0].lower()}
    hashed = {hashlib.sha256(c.encode()).hexdigest() for c in clear}
    return sorted(clear | hashed)


async def test_the_deleted_address_is_nowhere_in_the_trail_export_or_logs(
    running: Running, tmp_path: Path
) -> None:
    tenant = running.tenant
    db = running.services.db
    address = f"Grace.Hopper.{uuid.uuid4().hex[:8]}@Example.COM"
    status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": address})
    assert status == 201, body
    gone = body["data"]["id"]
    await tenant.call("POST", f"/v1/contacts/{gone}/notes", {"body": "met at the conference"})
    others = []
    for n in range(9):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": f"other{n}.{uuid.uuid4().hex[:6]}@example.com"}
        )
        others.append(body["data"]["id"])

    # Several deletions at once: the API and the worker append to one chain concurrently.
    async def delete(selector: dict[str, Any]) -> Any:
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts/bulk-delete", selector, {"Prefer": "wait=30"}
        )
        assert status == 200, body
        return body["data"]

    jobs = await asyncio.gather(
        delete({"emails": [address]}),
        *(delete({"contact_ids": others[i : i + 3]}) for i in range(0, 9, 3)),
    )
    assert [j["deleted_count"] for j in jobs] == [1, 3, 3, 3]
    status, body, _ = await tenant.call("GET", "/v1/audit/events?" + urlencode({"email": address}))
    assert status == 200 and [e["target"]["id"] for e in body["data"]] == [gone], body
    status, body, _ = await tenant.call("GET", "/v1/audit/verify")
    assert body["data"]["ok"] and body["data"]["events_checked"] == 1 + 4 + 10 + 4, body

    # Every column of every row of the table, as text.
    async with db.read() as conn:
        rows = (await conn.execute(sa.text("SELECT * FROM audit_events"))).all()
    table_text = "\n".join("\t".join(str(v) for v in row) for row in rows).lower()
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with tenant.http.get(tenant.url("/v1/audit/export"), headers=headers) as response:
        export = (await response.read()).decode()
    path = tmp_path / "export.ndjson"
    path.write_text(export)
    assert verify_export(path).ok
    logs = running.logs.getvalue()
    assert logs.strip(), "the log capture saw nothing"
    assert gone in table_text and gone in export  # the searches do look at the right data
    for form in _forms(address):
        assert form.lower() not in table_text, form
        assert form.lower() not in export.lower(), form
        assert form.lower() not in logs.lower(), form
