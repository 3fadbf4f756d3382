"""Provable erasure (issue 12), on both databases, against the real broker.

The service runs as one real process (`contact-deletion run`) whose output goes to a log
file. Contacts whose timeline mentions their address, phone and names are deleted by ids
and by emails with `redact_timeline`; after the bounded scrub delay no byte sequence of
their addresses may remain in any file the service wrote (the database files, WAL
included; the Kafka segments of its topics; its log file), the preserved timeline must
hold none of their values, and `erasure check` must say "nowhere" for them and "found"
(with the place) for a contact that still lives.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import Database
from service.erasure import scan
from service.erasure.check import ErasureCheck
from service.erasure.scrubber import Scrubber
from service.kafka import OutMessage, Producer
from tests.components import COMMAND, Components, components, listening_port, wait_ready
from tests.conftest import Tenant, make_settings, new_tenant
from tests.logcapture import json_logs

DELAY_S = 1.0
# The scrub must be done within the delay; the rest is for a shared, noisy 2-core machine.
SLACK_S = 20.0


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """The real broker (for the in-process pipeline)."""
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)


@dataclass
class Person:
    first: str
    last: str
    email: str  # as written in the notes: mixed case
    phone: str

    @property
    def stored(self) -> str:
        return self.email.lower()

    def needles(self) -> list[bytes]:
        return [self.email.encode(), self.stored.encode()]


def person(tag: str, i: int) -> Person:
    return Person(
        first=f"Ottoline{tag}{i}",
        last=f"Quarrender{tag}{i}",
        email=f"Erase.Me.{tag}.{i}@Example.com",
        phone=f"+44 20 7{i}{int(tag[:6], 16) % 1000000:06d}",
    )


async def create_person(tenant: Tenant, p: Person) -> str:
    status, body, _ = await tenant.call(
        "POST",
        "/v1/contacts",
        {"email": p.email, "first_name": p.first, "last_name": p.last, "phone": p.phone},
    )
    assert status == 201, body
    cid: str = body["data"]["id"]
    mention = f"Call {p.first} {p.last} on {p.phone}, or write to {p.email} ({p.stored})."
    for path, payload in (
        ("notes", {"body": mention}),
        ("activities", {"type": "email", "subject": f"Mail from {p.email}", "body": mention}),
        ("tasks", {"title": f"Follow up with {p.first}", "body": mention}),
    ):
        status, body, _ = await tenant.call("POST", f"/v1/contacts/{cid}/{path}", payload)
        assert status == 201, body
    return cid


def database_files(settings: Settings, pg: dict[str, Any]) -> list[Path]:
    """Every file of the database: SQLite main + WAL, or PostgreSQL's database directory."""
    if settings.is_sqlite:
        main = sa.engine.make_url(settings.database_url).database
        assert main
        files = [Path(main), Path(main + "-wal")]
        assert files[1].exists(), "the service runs SQLite in WAL mode"
        return files
    directory = Path(pg["data_directory"]) / "base" / str(pg["oid"])
    return sorted(f for f in directory.iterdir() if f.is_file())


async def postgres_facts(db: Database) -> dict[str, Any]:
    """The data directory and database oid, after a CHECKPOINT (so the files are current)."""
    if db.is_sqlite:
        return {}
    async with db.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.exec_driver_sql("CHECKPOINT")
        data_directory = (await auto.exec_driver_sql("SHOW data_directory")).scalar_one()
        oid = (
            await auto.exec_driver_sql(
                "SELECT oid FROM pg_database WHERE datname = current_database()"
            )
        ).scalar_one()
    return {"data_directory": data_directory, "oid": oid}


def kafka_segments(log_dir: Path, prefix: str) -> list[Path]:
    """The log segments of the topics with this prefix (the service's, for this test)."""
    return sorted(
        f
        for d in log_dir.iterdir()
        if d.is_dir() and d.name.startswith(prefix)
        for f in d.iterdir()
        if f.suffix == ".log"
    )


async def hits(files: list[Path], needles: list[bytes]) -> dict[str, int]:
    """How many of the needles occur in each file that holds any. Read in a child process
    (service.erasure.scan): this process holds SQLite connections to some of the files,
    and closing a file it opened itself would drop their locks."""
    scanned = await scan.scan_apart(
        [f for f in files if f.exists()], {str(i): n for i, n in enumerate(needles)}
    )
    found: dict[str, int] = {}
    for f, counts in scanned.items():
        if isinstance(counts, OSError):
            continue  # gone meanwhile (a VACUUM FULL replaced it)
        if n := sum(counts.values()):
            found[str(f)] = n
    return found


def erasure_check(
    procs: Components, email: str, log_file: Path
) -> subprocess.CompletedProcess[str]:
    """`contact-deletion erasure check` as an operator runs it, with the service's settings."""
    return subprocess.run(
        [COMMAND, "erasure", "check", "--email", email, "--log-file", str(log_file)],
        env=procs.env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_deleted_addresses_leave_no_byte_in_any_file_the_service_wrote(
    kafka_settings: Settings,
    kafka_log_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    settings = kafka_settings.model_copy(update={"erasure_delay_s": DELAY_S, "http_port": 0})
    monkeypatch.setenv("ERASURE_DELAY_S", str(DELAY_S))
    monkeypatch.setenv("HTTP_PORT", "0")
    tag = uuid.uuid4().hex[:8]
    doomed = [person(tag, i) for i in range(6)]
    keeper = person(tag, 9)
    db = Database(settings.database_url)
    try:
        with components(settings, tmp_path) as procs:
            service = procs.start("run")
            base = f"http://127.0.0.1:{await listening_port(service)}"
            await wait_ready(base, service.exited, timeout_s=90)
            tenant = await new_tenant(Services(settings=settings, db=db), base, http)
            ids = [await create_person(tenant, p) for p in doomed]
            await create_person(tenant, keeper)
            all_needles = [n for p in doomed for n in p.needles()]

            # Before: the addresses are in the database files (so the search can fail).
            before = await hits(database_files(settings, await postgres_facts(db)), all_needles)
            assert before, "the addresses should be in the database files before deletion"
            print("database files before deletion:", json.dumps(before))

            # The dry run counts the items redaction would rewrite: 3 per contact.
            dry = {"contact_ids": ids[:3], "dry_run": True}
            status, body, _ = await tenant.call(
                "POST", "/v1/contacts/bulk-delete", dry | {"redact_timeline": True}
            )
            assert status == 200, body
            assert body["data"]["would_redact_count"] == 9
            status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", dry)
            assert body["data"]["would_redact_count"] == 0

            wait = {"Prefer": "wait=60"}
            for selector in (
                {"contact_ids": ids[:3]},
                {"emails": [p.email for p in doomed[3:]]},
            ):
                status, body, _ = await tenant.call(
                    "POST",
                    "/v1/contacts/bulk-delete",
                    selector | {"redact_timeline": True},
                    headers=wait,
                )
                assert status == 200, body
                assert body["data"]["deleted_count"] == 3, body
                assert body["data"]["redact_timeline"] is True
            deleted_at = time.monotonic()

            # The preserved timeline survives, with none of the contact's values in it.
            for cid, p in zip(ids, doomed, strict=True):
                status, body, _ = await tenant.call("GET", f"/v1/audit/contacts/{cid}/timeline")
                assert status == 200, body
                text = json.dumps(body)
                assert len(body["data"]["timeline"]) == 3, body
                assert "[redacted email]" in text and "[redacted phone]" in text
                for value in (p.email, p.stored, p.first, p.last, p.phone):
                    assert value.lower() not in text.lower(), (value, text)
                event = body["data"]["deletion"]
                assert event["data"]["timeline_redaction"] == {
                    "items_redacted": 3,
                    "values": ["email", "first_name", "last_name", "phone"],
                    "fields": {
                        "activities.body": 1,
                        "activities.subject": 1,
                        "notes.body": 1,
                        "tasks.body": 1,
                        "tasks.title": 1,
                    },
                }

            # Within the bounded delay, no byte of the addresses is left in any file.
            log_file = service.log_path
            prefix = settings.kafka_topic_prefix
            deadline = deleted_at + DELAY_S + SLACK_S
            while True:
                files = database_files(settings, await postgres_facts(db))
                places = files + kafka_segments(kafka_log_dir, prefix) + [log_file]
                left = await hits(places, all_needles)
                if not left or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            elapsed = time.monotonic() - deleted_at
            print(f"files clean {elapsed:.2f} s after the deletions committed")
            assert not left, f"addresses still on disk after {elapsed:.1f} s: {left}"
            assert kafka_segments(kafka_log_dir, prefix), "the service's topics have segments"
            assert b"contact_deleted" in log_file.read_bytes() or log_file.stat().st_size > 0
            # Listed afresh: a VACUUM FULL between listing and reading replaces the files, so
            # a stale list could hold nothing. The deleted are still nowhere; the keeper's
            # address was not deleted and is still there: the search works.
            files = database_files(settings, await postgres_facts(db))
            assert not await hits(files, all_needles)
            assert await hits(files, keeper.needles())

            # erasure check, as an operator runs it: nowhere for the deleted, found for a live one.
            for p in (doomed[0], doomed[4]):
                run = erasure_check(procs, p.email, log_file)
                assert run.returncode == 0, run.stdout + run.stderr
                assert "verdict: nowhere" in run.stdout
                assert "audit trail: deleted at" in run.stdout
                assert p.stored not in run.stdout and p.email not in run.stdout
            run = erasure_check(procs, keeper.email, log_file)
            assert run.returncode == 1, run.stdout + run.stderr
            assert "live rows: contacts: found" in run.stdout
            assert "live rows: timeline content: found" in run.stdout
            # ... and in the database files themselves (SQLite file/WAL, PostgreSQL relations).
            file_place = r"^(database file \S+|postgresql relation files .*): found \("
            assert re.search(file_place, run.stdout, re.MULTILINE), run.stdout
            assert "verdict: FOUND" in run.stdout
            assert "audit trail: no deletion of this address recorded" in run.stdout
            for p in doomed[1:]:
                report = await ErasureCheck(settings, db, p.email, log_files=[log_file]).run()
                assert report.exit_code == 0, report.lines()
                assert len(report.deletions) == 1
                # Its plain hash is where the design puts it (the webhook's email_sha256),
                # reported, and not counted as a finding.
                topic = f"kafka topic {settings.topic('contact.deleted')}"
                place = next(x for x in report.places if x.place == topic)
                assert (place.status, place.forms) == ("not found", {"sha256": 1})
                assert "by design" in place.detail

            # A topic that did carry an address is a finding, with the place named.
            leaked = doomed[5]
            dlq = settings.topic("contact.deleted.dlq")
            producer = Producer(settings.kafka_bootstrap_servers)
            await producer.start()
            try:
                await producer.send_many([OutMessage(dlq, None, f"oops {leaked.stored}".encode())])
            finally:
                await producer.stop()
            report = await ErasureCheck(settings, db, leaked.email).run()
            assert report.exit_code == 1
            found = [x for x in report.places if x.status == "found"]
            assert [(x.place, x.forms) for x in found] == [
                (f"kafka topic {dlq}", {"lower-cased": 1})
            ]
    finally:
        await db.dispose()


async def test_without_redaction_the_timeline_keeps_its_text(
    services: Services, tenant: Tenant, pipeline: Services
) -> None:
    """redact_timeline defaults to off: the preserved items keep their content as written."""
    p = person(uuid.uuid4().hex[:8], 1)
    cid = await create_person(tenant, p)
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": [cid]}, headers={"Prefer": "wait=30"}
    )
    assert status == 200, body
    assert body["data"]["redact_timeline"] is False
    status, body, _ = await tenant.call("GET", f"/v1/audit/contacts/{cid}/timeline")
    text = json.dumps(body)
    assert p.email in text and p.phone in text and "[redacted" not in text
    assert "timeline_redaction" not in body["data"]["deletion"]["data"]


async def test_a_scrub_the_database_refuses_is_an_error_not_an_outage_and_stays_pending(
    services: Services,
) -> None:
    """A scrub refused for good (PostgreSQL: a table VACUUM cannot find, a real refusal
    like one the service's role is not allowed) was logged as a failure like an outage's;
    now ``erasure_scrub_refused``, an error that says so. The scrubber still keeps the
    tables pending (giving up would leave erased values in the files). SQLite's checkpoint
    takes no table name: it goes through."""
    scrubber = Scrubber(services.settings, services.db)
    scrubber.pg_mode = "plain"
    scrubber.note({"no_such_table"})
    with json_logs() as lines:
        done = await scrubber.scrub()
    assert lines.events("erasure_scrub_failed") == []
    if services.db.is_sqlite:
        assert done and scrubber.due_at() is None
        return
    assert not done and scrubber.due_at() is not None
    [line] = lines.events("erasure_scrub_refused")
    assert line["level"] == "error" and line["tables"] == ["no_such_table"]
    assert "SQLSTATE 42P01" in line["error"]
