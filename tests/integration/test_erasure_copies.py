"""Copies of a deleted contact's data that the service kept beside its rows (both databases).

An operator's trial (trial 7) found `erasure check` answering FOUND after a deletion: the
answer kept to replay an Idempotency-Key (`POST /v1/contacts`: address, names, phone) stayed
in `idempotency_keys` for good, replayable, and the check's list of live places did not
name that table. The kind is "a copy of the contact kept by a side store": kept answers (a
created contact, a timeline item with its back-reference), a finished filter job's values,
expired keys never pruned; and the check searches every table, not a list.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import (
    Database,
    audit_events,
    deletion_jobs,
    idempotency_keys,
    outbox,
    utcnow,
    webhook_endpoints,
    workspaces,
)
from service.deployment import deployment_id, stamp_of
from service.erasure.check import ErasureCheck
from service.events import TOPIC_CONTACT_DELETED
from service.kafka import OutMessage, Producer
from service.retention import IDEMPOTENCY_GRACE, prune_once
from service.topics import create_topics
from tests.components import COMMAND
from tests.conftest import Tenant, components_running, make_settings

WAIT = {"Prefer": "wait=60"}


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)


def _key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def _live_places(settings: Settings, db: Database, email: str) -> dict[str, str]:
    places = await ErasureCheck(settings, db, email).live_rows()
    return {p.place: p.status for p in places}


async def _kept_bodies(db: Database, workspace_id: uuid.UUID) -> list[bytes]:
    c = idempotency_keys.c
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(c.response_body).where(
                c.workspace_id == workspace_id, c.response_body.is_not(None)
            )
        )
        return [bytes(r[0]) for r in rows]


async def test_a_deleted_contacts_kept_answers_are_erased_and_replay_410(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    tag = uuid.uuid4().hex[:8]
    doomed, keeper = f"Gone.{tag}@Example.com", f"kept.{tag}@example.com"
    create, note, kept_create = _key(), _key(), _key()
    body = {"email": doomed, "first_name": f"Ottoline{tag}", "phone": "+44 20 7946 0999"}
    status, created, _ = await tenant.call("POST", "/v1/contacts", body, create)
    assert status == 201, created
    cid = created["data"]["id"]
    note_body = {"body": f"Write to {doomed.lower()}"}
    status, added, _ = await tenant.call("POST", f"/v1/contacts/{cid}/notes", note_body, note)
    assert status == 201, added
    status, live, _ = await tenant.call("POST", "/v1/contacts", {"email": keeper}, kept_create)
    assert status == 201, live
    assert any(
        doomed.lower().encode() in b for b in await _kept_bodies(services.db, tenant.workspace_id)
    )

    async with components_running(services, "relay", "worker"):
        status, job, _ = await tenant.call(
            "POST",
            "/v1/contacts/bulk-delete",
            {"contact_ids": [cid], "redact_timeline": True},
            WAIT,
        )
        assert status == 200 and job["data"]["deleted_count"] == 1, job

    # No kept answer holds the deleted contact, its back-reference or its note's text.
    for kept in await _kept_bodies(services.db, tenant.workspace_id):
        assert doomed.lower().encode() not in kept and cid.encode() not in kept, kept
    # The keys still answer (a retried create must not bring the contact back): 410.
    for path, sent, key in (
        ("/v1/contacts", body, create),
        (f"/v1/contacts/{cid}/notes", note_body, note),
    ):
        status, replay, headers = await tenant.call("POST", path, sent, key)
        assert (status, replay["error"]["code"]) == (410, "answer_erased"), replay
        assert headers["Idempotent-Replayed"] == "true"
    status, _, _ = await tenant.call("GET", f"/v1/contacts/{cid}")
    assert status == 404
    # A live contact's answer is kept and replayed as it was.
    status, again, headers = await tenant.call(
        "POST", "/v1/contacts", {"email": keeper}, kept_create
    )
    assert (status, again, headers["Idempotent-Replayed"]) == (201, live, "true")

    places = await _live_places(settings, services.db, doomed)
    assert set(places.values()) == {"not found"}, places
    places = await _live_places(settings, services.db, keeper)
    assert places["live rows: contacts"] == "found", places


async def test_a_finished_filter_job_keeps_no_personal_value_it_was_given(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    tag = uuid.uuid4().hex[:8]
    doomed = f"filtered.{tag}@example.com"
    status, created, _ = await tenant.call(
        "POST", "/v1/contacts", {"email": doomed, "last_name": f"Quarrender{tag}"}
    )
    assert status == 201, created
    status, _, _ = await tenant.call("POST", "/v1/contacts", {"email": f"stays.{tag}@example.com"})
    assert status == 201
    selector = {
        "filter": {
            "$and": [
                {"email": {"$in": [doomed, f"other.{tag}@example.com"]}},
                {"last_name": {"$startsWith": "Quarrender"}},
                {"created_at": {"$lt": "2999-01-01T00:00:00Z"}},
            ]
        },
    }
    async with components_running(services, "relay", "worker"):
        status, job, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", selector, WAIT)
        assert status == 200 and job["data"]["deleted_count"] == 1, job

    status, shown, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job['data']['job_id']}")
    assert status == 200, shown
    async with services.db.read() as conn:
        stored = (
            await conn.execute(
                sa.select(deletion_jobs.c.selector).where(
                    deletion_jobs.c.id == uuid.UUID(job["data"]["job_id"])
                )
            )
        ).scalar_one()
    # The shape, the operators and non-personal values stay; the personal values do not.
    assert stored == {
        "filter": {
            "$and": [
                {"email": {"$in": ["[redacted]", "[redacted]"]}},
                {"last_name": {"$startsWith": "[redacted]"}},
                {"created_at": {"$lt": "2999-01-01T00:00:00Z"}},
            ]
        },
    }
    assert doomed not in str(shown) and "Quarrender" not in str(shown)
    places = await _live_places(settings, services.db, doomed)
    assert set(places.values()) == {"not found"}, places


async def test_the_check_finds_an_address_in_any_table(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """No list of places to keep up to date: an address written anywhere (here an
    endpoint's description) is found and its table named."""
    tag = uuid.uuid4().hex[:8]
    address = f"Planted.{tag}@Example.com"
    status, endpoint, _ = await tenant.call(
        "POST",
        "/v1/webhooks/endpoints",
        {"url": "https://hooks.example.com/x", "description": f"owner {address}"},
    )
    assert status == 201, endpoint
    report = await ErasureCheck(settings, services.db, address).run()
    other = next(p for p in report.places if p.place == "live rows: other tables")
    assert other.status == "found" and webhook_endpoints.name in other.detail, other
    assert report.exit_code == 1


async def test_expired_keys_are_pruned_and_live_ones_kept(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    kept, old = _key(), _key()
    for key in (kept, old):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": f"k{uuid.uuid4().hex[:8]}@example.com"}, key
        )
        assert status == 201, body
    c = idempotency_keys.c
    mine = c.workspace_id == tenant.workspace_id
    async with services.db.begin() as conn:
        await conn.execute(
            idempotency_keys.update()
            .where(mine, c.key == old["Idempotency-Key"])
            .values(expires_at=utcnow() - IDEMPOTENCY_GRACE - timedelta(seconds=1))
        )
    removed = await prune_once(services.db, settings)
    assert removed["idempotency_keys"] >= 1
    async with services.db.read() as conn:
        left = set((await conn.execute(sa.select(c.key).where(mine))).scalars())
    assert left == {kept["Idempotency-Key"]}


async def test_the_check_reads_bytes_that_are_not_utf8_and_finds_a_non_ascii_address(
    services: Services, settings: Settings
) -> None:
    """A bytes column may hold anything (a dead-lettered payload): one row that is not
    UTF-8 made PostgreSQL refuse the whole search (convert_from), and the check failed
    on a database other tests had used. Bytes that are not UTF-8 are read, and an address
    beyond ASCII is found in them."""
    tag = uuid.uuid4().hex[:8]
    address = f"jürgen.{tag}@bücher.example"
    published = utcnow()
    async with services.db.begin() as conn:
        for payload in (b"\xff\xfe not utf-8 \xc3", b"\xff " + address.encode() + b" \\ \x00"):
            await conn.execute(
                outbox.insert().values(
                    topic="t",
                    payload=payload,
                    headers=[],
                    created_at=published,
                    published_at=published,
                )
            )
    report = await ErasureCheck(settings, services.db, address).run()
    other = next(p for p in report.places if p.place == "live rows: other tables")
    assert other.status == "found" and "outbox" in other.detail, report.lines()


async def test_topics_of_another_deployment_are_not_checked_not_proof(
    services: Services, settings: Settings
) -> None:
    """A new user's trial (trial 9): a second setup's check, run without its
    KAFKA_BOOTSTRAP_SERVERS, read the first setup's broker and answered "not found" for
    every topic (verdict nowhere, exit 0). Topics that hold another deployment's records
    and none of this one's (the relay's ``cd-deployment`` stamp) are "not checked"; once a
    record of this deployment is there, they are searched as before."""
    ours = await deployment_id(services.db)
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    address = f"wrong.broker.{uuid.uuid4().hex[:8]}@example.com"

    async def publish(stamp: str, value: bytes) -> None:
        producer = Producer(settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_many([OutMessage(topic, None, value, stamp_of(stamp))])
        finally:
            await producer.stop()

    await publish("another-deployment", b'{"data": {}}')
    report = await ErasureCheck(settings, services.db, address).run()
    kafka = [p for p in report.places if p.place.startswith("kafka topic")]
    assert kafka and {p.status for p in kafka} == {"not checked"}, report.lines()
    assert "another deployment" in kafka[0].detail and ours in kafka[0].detail
    assert report.exit_code == 2  # nothing found, but not proven

    await publish(ours, f"leaked {address}".encode())
    report = await ErasureCheck(settings, services.db, address).run()
    place = next(p for p in report.places if p.place == f"kafka topic {topic}")
    assert place.status == "found", report.lines()
    assert report.exit_code == 1


async def test_the_check_leaves_this_processs_connections_sound_for_other_writers(
    services: Services, tenant: Tenant, settings: Settings
) -> None:
    """Reading SQLite's files with open() and close() in a process with connections to them
    drops that process's locks (POSIX): the check, run where the service's connections live
    (this test's process), then another process's commit (an operator's `keys create`),
    left those connections reading indexes with the wrong number of entries
    (`database disk image is malformed`). The check reads the files in a child process."""
    workspace = f"check-{uuid.uuid4().hex[:8]}"
    report = await ErasureCheck(settings, services.db, "nobody@example.com").run()
    assert any(p.place.startswith(("database file", "postgresql")) for p in report.places)
    for _ in range(3):  # each a commit of another process: a new key and its audit event
        made = subprocess.run(
            [COMMAND, "keys", "create", "--workspace", workspace, "--scope", "audit:read"],
            env={"DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stderr
    async with services.db.read() as conn:
        if services.db.is_sqlite:
            checked = (await conn.execute(sa.text("PRAGMA integrity_check"))).scalars().all()
            assert checked == ["ok"], checked[:3]
        joined = audit_events.join(workspaces, workspaces.c.id == audit_events.c.workspace_id)
        events = await conn.execute(
            sa.select(sa.func.count()).select_from(joined).where(workspaces.c.name == workspace)
        )
        assert events.scalar_one() == 3
    status, body, _ = await tenant.call("GET", "/v1/audit/events")
    assert status == 200, body
