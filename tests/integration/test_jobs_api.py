"""Deletion jobs: the jobs API, DELETE /v1/contacts/{id}, and what a deletion records.

Runs on SQLite and PostgreSQL against the real broker, with the relay and the worker
running once per module and backend. Tests that need a job to stay `pending` use an
"idle" API over the same database whose jobs no worker consumes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer

from service.app import Services, create_app
from service.config import Settings
from service.contacts.models import ContactCreate
from service.contacts.store import create_contact
from service.db import Database, audit_events, deletion_job_items, outbox
from service.deletion.worker import DeletionWorker
from service.events import (
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
    TOPIC_JOB_COMPLETED,
    DeletionRequested,
    JobExpand,
)
from tests.conftest import Tenant, components_running, make_settings, new_tenant, opened_services
from tests.logcapture import json_logs

BULK = "/v1/contacts/bulk-delete"
WAIT = {"Prefer": "wait=30"}
FINISHED = {"completed", "completed_with_errors", "failed"}
JOB_FIELDS = {
    "job_id",
    "status",
    "dry_run",
    "phase",
    "estimated_total",
    "delete_members",
    "redact_timeline",
    "selector",
    "total_requested",
    "processed_count",
    "deleted_count",
    "not_found_count",
    "failed_count",
    "not_found",
    "errors",
    "created_at",
    "started_at",
    "completed_at",
    "failure",
}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture(scope="module")
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with opened_services(settings) as svc:
        yield svc


@pytest.fixture(scope="module")
async def pipeline(services: Services) -> AsyncIterator[Services]:
    """Relay and worker in this process for the whole module."""
    async with components_running(services, "relay", "worker"):
        yield services


@pytest.fixture
async def idle_tenant(db_url: str, http: aiohttp.ClientSession) -> AsyncIterator[Tenant]:
    """A tenant of an API whose jobs nobody works on (their topics have no consumer)."""
    idle = Services(settings=make_settings(db_url), db=Database(db_url))
    server = TestServer(create_app(idle), host="127.0.0.1")
    await server.start_server()
    try:
        yield await new_tenant(idle, str(server.make_url("")).rstrip("/"), http)
    finally:
        await server.close()
        await idle.close()


# --- helpers --------------------------------------------------------------------------------


async def seed(services: Services, tenant: Tenant, **fields: Any) -> str:
    """A contact of the tenant's workspace, written straight to the store; returns its id."""
    values = {"email": f"{uuid.uuid4().hex[:12]}@example.com", **fields}
    contact = await create_contact(services.db, tenant.workspace_id, ContactCreate(**values))
    contact_id: str = contact["id"]
    return contact_id


def assert_counts_add_up(job: dict[str, Any]) -> None:
    """processed = deleted + not_found + failed, and = total_requested once finished."""
    assert job["processed_count"] == (
        job["deleted_count"] + job["not_found_count"] + job["failed_count"]
    ), job
    if job["status"] in FINISHED:
        assert job["processed_count"] == job["total_requested"], job


async def run_job(tenant: Tenant, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """Submit a bulk delete, wait for it (Prefer: wait) and return the finished job."""
    status, answer, _ = await tenant.call("POST", BULK, body, {**WAIT, **headers})
    assert status == 200, answer
    job: dict[str, Any] = answer["data"]
    assert job["status"] in FINISHED, job
    assert_counts_add_up(job)
    return job


async def get_job(tenant: Tenant, job_id: str) -> dict[str, Any]:
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200, body
    job: dict[str, Any] = body["data"]
    return job


async def pages(tenant: Tenant, path: str) -> list[list[dict[str, Any]]]:
    """Every page of a cursor-paged listing (path already has its query string)."""
    result: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        status, body, _ = await tenant.call("GET", path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        result.append(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return result
        assert len(result) < 50, "the listing does not end"


async def audit_rows(services: Services, tenant: Tenant) -> list[dict[str, Any]]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(audit_events)
            .where(audit_events.c.workspace_id == tenant.workspace_id)
            .order_by(audit_events.c.seq)
        )
        return [dict(r) for r in rows.mappings()]


async def outbox_rows(services: Services, keys: list[str]) -> list[dict[str, Any]]:
    """Outbox rows keyed by one of `keys` (without `published_at`, which the relay moves)."""
    c = outbox.c
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(c.id, c.topic, c.key, c.payload).where(c.key.in_(keys)).order_by(c.id)
        )
        return [dict(r) for r in rows.mappings()]


# --- answers: 202, Prefer: wait, DELETE -----------------------------------------------------


async def test_default_answer_is_202_pending_with_the_jobs_location(
    services: Services, idle_tenant: Tenant
) -> None:
    contact_id = await seed(services, idle_tenant)

    status, body, headers = await idle_tenant.call("POST", BULK, {"contact_ids": [contact_id]})

    assert status == 202, body
    job = body["data"]
    assert set(job) == JOB_FIELDS
    assert job["status"] == "pending"
    assert (job["total_requested"], job["processed_count"]) == (1, 0)
    assert job["started_at"] is None and job["completed_at"] is None
    assert headers["Location"] == f"/v1/bulk-jobs/{job['job_id']}"
    assert await get_job(idle_tenant, job["job_id"]) == job


async def test_prefer_wait_on_a_job_that_does_not_finish_answers_202_after_the_wait(
    services: Services, idle_tenant: Tenant
) -> None:
    contact_id = await seed(services, idle_tenant)
    started = time.monotonic()

    status, body, headers = await idle_tenant.call(
        "POST", BULK, {"contact_ids": [contact_id]}, {"Prefer": "wait=1"}
    )

    assert time.monotonic() - started >= 0.9
    assert status == 202, body
    assert body["data"]["status"] == "pending"
    assert headers["Location"] == f"/v1/bulk-jobs/{body['data']['job_id']}"


async def test_prefer_wait_answers_200_with_the_finished_job_and_its_counts(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    ids = [await seed(services, tenant) for _ in range(3)]

    status, body, _ = await tenant.call("POST", BULK, {"contact_ids": ids}, WAIT)

    assert status == 200, body
    job = body["data"]
    assert set(job) == JOB_FIELDS
    assert job["status"] == "completed"
    assert (job["total_requested"], job["processed_count"], job["deleted_count"]) == (3, 3, 3)
    assert job["started_at"] and job["completed_at"]
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]
    assert await get_job(tenant, job["job_id"]) == job


async def test_delete_contact_is_a_job_of_one_that_honours_prefer_wait(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    contact_id = await seed(services, tenant)

    status, body, _ = await tenant.call("DELETE", f"/v1/contacts/{contact_id}", None, WAIT)

    assert status == 200, body
    job = body["data"]
    assert job["selector"] == {"contact_ids": [contact_id]}
    assert (job["status"], job["total_requested"], job["deleted_count"]) == ("completed", 1, 1)
    assert_counts_add_up(job)
    status, _, _ = await tenant.call("GET", f"/v1/contacts/{contact_id}")
    assert status == 404
    status, listed, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert [j["job_id"] for j in listed["data"]] == [job["job_id"]]


async def test_delete_contact_takes_bulk_deletes_options_as_query_parameters(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    """A site member could not be deleted through DELETE /v1/contacts/{id}: the failure
    said "set delete_members", which the route had no way to take. Its options are query
    parameters; the same Idempotency-Key with other options is another request."""
    member = await seed(services, tenant, member_role="member")
    path = f"/v1/contacts/{member}"
    status, body, _ = await tenant.call("DELETE", path, None, WAIT)
    assert status == 200, body
    assert [e["code"] for e in body["data"]["errors"]] == ["CANNOT_DELETE_SITE_MEMBERS"]

    key = {"Idempotency-Key": str(uuid.uuid4()), **WAIT}
    status, body, _ = await tenant.call(
        "DELETE", f"{path}?delete_members=true&redact_timeline=true", None, key
    )
    assert status == 200, body
    assert (body["data"]["deleted_count"], body["data"]["errors"]) == (1, []), body
    status, body, _ = await tenant.call("DELETE", f"{path}?delete_members=true", None, key)
    assert (status, body["error"]["code"]) == (409, "idempotency_conflict"), body
    status, body, _ = await tenant.call("DELETE", f"{path}?delete_member=true", None, WAIT)
    assert status == 400, body
    # A query string's boolean is true or false, as a body's is (yes, on, 1 were read as
    # true: trial 6), before anything is deleted.
    other = await seed(services, tenant, member_role="member")
    for loose in ("yes", "on", "1", "True", "t"):
        status, body, _ = await tenant.call(
            "DELETE", f"/v1/contacts/{other}?delete_members={loose}", None, WAIT
        )
        assert status == 400, (loose, body)
        [detail] = body["error"]["details"]
        assert detail["field"] == "delete_members" and "true or false" in detail["message"]
    status, _, _ = await tenant.call("GET", f"/v1/contacts/{other}")
    assert status == 200


async def test_delete_of_a_contact_the_workspace_does_not_have_is_404_and_no_job(
    pipeline: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    """Unknown, another workspace's, or already deleted: 404 like every other route."""
    theirs = await seed(pipeline, other_tenant)
    mine = await seed(pipeline, tenant)
    status, body, _ = await tenant.call("DELETE", f"/v1/contacts/{mine}", None, WAIT)
    assert (status, body["data"]["deleted_count"]) == (200, 1), body

    for contact_id in (str(uuid.uuid4()), theirs, mine):
        status, body, _ = await tenant.call("DELETE", f"/v1/contacts/{contact_id}", None, WAIT)

        assert status == 404, (contact_id, body)
        assert body["error"]["code"] == "not_found"
    status, listed, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert len(listed["data"]) == 1  # only the deletion that had a contact to delete
    status, _, _ = await other_tenant.call("GET", f"/v1/contacts/{theirs}")
    assert status == 200


async def test_delete_without_prefer_answers_202_with_the_jobs_location(
    services: Services, idle_tenant: Tenant
) -> None:
    contact_id = await seed(services, idle_tenant)

    status, body, headers = await idle_tenant.call("DELETE", f"/v1/contacts/{contact_id}")

    assert status == 202, body
    assert body["data"]["status"] == "pending"
    assert headers["Location"] == f"/v1/bulk-jobs/{body['data']['job_id']}"


# --- GET /v1/bulk-jobs/{id} and the listing ---------------------------------------------------


async def test_another_workspaces_job_and_a_malformed_job_id_are_404(
    services: Services, idle_tenant: Tenant, other_tenant: Tenant
) -> None:
    contact_id = await seed(services, idle_tenant)
    status, body, _ = await idle_tenant.call("POST", BULK, {"contact_ids": [contact_id]})
    assert status == 202, body
    job_id = body["data"]["job_id"]

    for path in (f"/v1/bulk-jobs/{job_id}", f"/v1/bulk-jobs/{job_id}/items"):
        status, answer, _ = await other_tenant.call("GET", path)
        assert status == 404, (path, answer)
        assert answer["error"]["code"] == "not_found"
    for path in ("/v1/bulk-jobs/not-a-uuid", "/v1/bulk-jobs/not-a-uuid/items"):
        status, answer, _ = await idle_tenant.call("GET", path)
        assert status == 404, (path, answer)
    status, listed, _ = await other_tenant.call("GET", "/v1/bulk-jobs")
    assert listed["data"] == []


async def test_jobs_list_newest_first_and_pages_with_a_cursor(
    services: Services, idle_tenant: Tenant, other_tenant: Tenant
) -> None:
    created = []
    for _ in range(5):
        contact_id = await seed(services, idle_tenant)
        status, body, _ = await idle_tenant.call("POST", BULK, {"contact_ids": [contact_id]})
        assert status == 202, body
        created.append(body["data"]["job_id"])
    theirs = await seed(services, other_tenant)
    status, _, _ = await other_tenant.call("DELETE", f"/v1/contacts/{theirs}")
    assert status == 202

    listing = await pages(idle_tenant, "/v1/bulk-jobs?limit=2")

    assert [len(p) for p in listing] == [2, 2, 1]
    assert [j["job_id"] for p in listing for j in p] == created[::-1]
    status, body, _ = await idle_tenant.call("GET", "/v1/bulk-jobs")
    assert [j["job_id"] for j in body["data"]] == created[::-1]
    assert body["next_cursor"] is None


async def test_jobs_list_refuses_a_bad_cursor_or_limit(idle_tenant: Tenant) -> None:
    for query, field in (("cursor=garbage", "cursor"), ("limit=0", "limit"), ("limit=x", "limit")):
        status, body, _ = await idle_tenant.call("GET", f"/v1/bulk-jobs?{query}")
        assert status == 400, (query, body)
        assert body["error"]["code"] == "validation_error"
        assert field in {d["field"] for d in body["error"]["details"]}, (query, body)


# --- items ------------------------------------------------------------------------------------


async def test_items_filter_by_status_and_page_in_request_order(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    deleted = [await seed(services, tenant) for _ in range(3)]
    member = await seed(services, tenant, member_role="member")
    billing = await seed(services, tenant, has_billing_subscription=True)
    missing = [str(uuid.uuid4()) for _ in range(2)]
    order = [deleted[0], missing[0], member, deleted[1], billing, missing[1], deleted[2]]
    job = await run_job(tenant, {"contact_ids": order})
    items = f"/v1/bulk-jobs/{job['job_id']}/items"

    everything = await pages(tenant, f"{items}?limit=2")
    assert [len(p) for p in everything] == [2, 2, 2, 1]
    assert [i["ref"] for p in everything for i in p] == order

    failed = [i for p in await pages(tenant, f"{items}?status=failed&limit=1") for i in p]
    assert [(i["contact_id"], i["error_code"]) for i in failed] == [
        (member, "CANNOT_DELETE_SITE_MEMBERS"),
        (billing, "CANNOT_DELETE_CONTACT_WITH_BILLING_SUBSCRIPTION"),
    ]
    assert all(i["status"] == "failed" and i["error_message"] for i in failed)

    not_found = [i for p in await pages(tenant, f"{items}?status=not_found&limit=1") for i in p]
    assert [i["ref"] for i in not_found] == missing
    assert all(i["status"] == "not_found" and i["error_code"] is None for i in not_found)

    done = [i for p in await pages(tenant, f"{items}?status=deleted&limit=2") for i in p]
    assert [i["contact_id"] for i in done] == deleted
    assert all(i["processed_at"] and i["error_code"] is None for i in done)

    status, body, _ = await tenant.call("GET", f"{items}?status=pending")
    assert (status, body["data"], body["next_cursor"]) == (200, [], None)


async def test_items_refuse_a_bad_status_cursor_or_unknown_parameter(
    services: Services, idle_tenant: Tenant
) -> None:
    contact_id = await seed(services, idle_tenant)
    status, body, _ = await idle_tenant.call("POST", BULK, {"contact_ids": [contact_id]})
    assert status == 202, body
    items = f"/v1/bulk-jobs/{body['data']['job_id']}/items"

    for query, field in (
        ("status=exploded", "status"),
        ("cursor=garbage", "cursor"),
        ("limit=501", "limit"),
        ("colour=red", "colour"),
    ):
        status, answer, _ = await idle_tenant.call("GET", f"{items}?{query}")
        assert status == 400, (query, answer)
        assert answer["error"]["code"] == "validation_error"
        assert field in {d["field"] for d in answer["error"]["details"]}, (query, answer)


# --- what a deletion records ------------------------------------------------------------------


async def test_deletion_writes_one_audit_event_and_one_outbox_row_per_deleted_contact(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    settings = services.settings
    deleted = [await seed(services, tenant) for _ in range(3)]
    member = await seed(services, tenant, member_role="member")
    missing = str(uuid.uuid4())

    job = await run_job(tenant, {"contact_ids": [*deleted, member, missing]})

    assert (job["deleted_count"], job["failed_count"], job["not_found_count"]) == (3, 1, 1)
    events = [e for e in await audit_rows(services, tenant) if e["job_id"] == job["job_id"]]
    by_action: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_action.setdefault(event["action"], []).append(event)
    assert sorted(e["target_id"] for e in by_action["contact.deleted"]) == sorted(deleted)
    assert [e["target_id"] for e in by_action["contact.deletion_failed"]] == [member]
    assert [e["target_id"] for e in by_action["deletion.requested"]] == [job["job_id"]]
    assert [e["target_id"] for e in by_action["deletion.completed"]] == [job["job_id"]]
    assert set(by_action) == {
        "deletion.requested",
        "contact.deleted",
        "contact.deletion_failed",
        "deletion.completed",
    }
    completed = json.loads(by_action["deletion.completed"][0]["data"])
    assert completed["status"] == "completed_with_errors"
    assert (completed["deleted_count"], completed["failed_count"]) == (3, 1)

    rows = await outbox_rows(services, [*deleted, member, missing, job["job_id"]])
    facts = [
        (r["topic"], r["key"])
        for r in rows
        if r["topic"] != settings.topic(TOPIC_DELETION_REQUESTED)
    ]
    assert sorted(facts) == sorted(
        [(settings.topic(TOPIC_CONTACT_DELETED), c) for c in deleted]
        + [(settings.topic(TOPIC_JOB_COMPLETED), job["job_id"])]
    )
    completed_event = json.loads(
        next(r["payload"] for r in rows if r["topic"] == settings.topic(TOPIC_JOB_COMPLETED))
    )
    assert completed_event["data"]["job_id"] == job["job_id"]
    assert completed_event["data"]["deleted_count"] == 3


async def test_contact_deleted_event_keeps_the_timeline_ids_and_who_asked_but_not_the_email(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    email = f"kept.{uuid.uuid4().hex[:8]}@example.com"
    contact_id = await seed(services, tenant, email=email)
    timeline: dict[str, list[str]] = {"activities": [], "notes": [], "tasks": []}
    for kind, body in (
        ("activities", {"type": "call"}),
        ("activities", {"type": "meeting"}),
        ("notes", {"body": "hello"}),
        ("tasks", {"title": "follow up"}),
    ):
        status, answer, _ = await tenant.call("POST", f"/v1/contacts/{contact_id}/{kind}", body)
        assert status == 201, answer
        timeline[kind].append(answer["data"]["id"])
    request_id = f"req-{uuid.uuid4().hex}"

    job = await run_job(tenant, {"contact_ids": [contact_id]}, **{"X-Request-ID": request_id})

    [event] = [e for e in await audit_rows(services, tenant) if e["action"] == "contact.deleted"]
    assert (event["target_type"], event["target_id"]) == ("contact", contact_id)
    assert event["job_id"] == job["job_id"]
    assert event["request_id"] == request_id
    assert (event["actor_type"], event["actor_id"]) == ("api_key", str(tenant.key_id))
    data = json.loads(event["data"])
    assert data["api_key_id"] == str(tenant.key_id)
    preserved = data["preserved_timeline"]
    assert {k: sorted(i["id"] for i in v) for k, v in preserved.items()} == {
        k: sorted(v) for k, v in timeline.items()
    }
    assert email not in event["data"]
    [row] = [
        r
        for r in await outbox_rows(services, [contact_id])
        if r["topic"] == services.settings.topic(TOPIC_CONTACT_DELETED)
    ]
    payload = json.loads(row["payload"])
    assert payload["data"]["orphaned_timeline"] == {"activities": 2, "notes": 1, "tasks": 1}
    assert email.encode() not in bytes(row["payload"])


async def test_each_contact_of_a_batch_keeps_only_its_own_timeline_in_id_order(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    """The worker reads a whole batch's timelines at once; none may leak to a neighbour."""
    mine: dict[str, dict[str, list[str]]] = {}
    for n in range(3):
        contact_id = await seed(services, tenant, email=f"batch{n}.{uuid.uuid4().hex[:6]}@x.io")
        mine[contact_id] = {"activities": [], "notes": [], "tasks": []}
        for kind, body in (
            ("activities", {"type": "call"}),
            ("notes", {"body": "one"}),
            ("notes", {"body": "two"}),
            ("tasks", {"title": "follow up"}),
        )[n:]:
            status, answer, _ = await tenant.call("POST", f"/v1/contacts/{contact_id}/{kind}", body)
            assert status == 201, answer
            mine[contact_id][kind].append(answer["data"]["id"])

    await run_job(tenant, {"contact_ids": list(mine)})

    events = [e for e in await audit_rows(services, tenant) if e["action"] == "contact.deleted"]
    assert sorted(e["target_id"] for e in events) == sorted(mine)
    for event in events:
        preserved = json.loads(event["data"])["preserved_timeline"]
        expected = mine[event["target_id"]]
        assert {k: [i["id"] for i in v] for k, v in preserved.items()} == {
            k: sorted(ids, key=uuid.UUID) for k, ids in expected.items()
        }
        singular = {"activities": "activity", "notes": "note", "tasks": "task"}
        assert all(i["kind"] == singular[k] for k, v in preserved.items() for i in v)
        assert all(i["at"].endswith("Z") for v in preserved.values() for i in v)


async def test_a_repeated_deletion_requested_message_changes_nothing_and_emits_nothing(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    deleted = await seed(services, tenant)
    member = await seed(services, tenant, member_role="member")
    missing = str(uuid.uuid4())
    job = await run_job(tenant, {"contact_ids": [deleted, member, missing]})
    keys = [deleted, member, missing, job["job_id"]]
    audit_before = await audit_rows(services, tenant)
    outbox_before = await outbox_rows(services, keys)
    async with services.db.read() as conn:
        items_before = (
            await conn.execute(
                sa.select(deletion_job_items).where(
                    deletion_job_items.c.job_id == uuid.UUID(job["job_id"])
                )
            )
        ).all()

    worker = DeletionWorker(services.settings, services.db, services.metrics)
    result = await worker.process(
        [
            DeletionRequested(
                job_id=uuid.UUID(job["job_id"]),
                workspace_id=tenant.workspace_id,
                ref=ref,
                contact_id=uuid.UUID(ref),
            )
            for ref in (deleted, member, missing, deleted)
        ]
    )

    assert (result.deleted, result.finished_jobs) == (0, [])
    assert await audit_rows(services, tenant) == audit_before
    assert await outbox_rows(services, keys) == outbox_before
    assert await get_job(tenant, job["job_id"]) == job
    async with services.db.read() as conn:
        items_after = (
            await conn.execute(
                sa.select(deletion_job_items).where(
                    deletion_job_items.c.job_id == uuid.UUID(job["job_id"])
                )
            )
        ).all()
    assert items_after == items_before


async def test_a_repeated_expansion_message_of_a_finished_filter_job_changes_nothing(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    for _ in range(3):
        await seed(services, tenant, last_name="Smith")
    await seed(services, tenant, last_name="Bystander")  # not selected: the filter is not "all"
    job = await run_job(tenant, {"filter": {"last_name": "Smith"}})
    assert job["deleted_count"] == 3
    late = await seed(services, tenant, last_name="Smith")  # would match if re-expanded
    audit_before = await audit_rows(services, tenant)
    outbox_before = await outbox_rows(services, [job["job_id"], late])

    worker = DeletionWorker(services.settings, services.db, services.metrics)
    result = await worker.process(
        [JobExpand(job_id=uuid.UUID(job["job_id"]), workspace_id=tenant.workspace_id)]
    )

    assert (result.deleted, result.finished_jobs) == (0, [])
    assert await get_job(tenant, job["job_id"]) == job
    assert await audit_rows(services, tenant) == audit_before
    assert await outbox_rows(services, [job["job_id"], late]) == outbox_before
    status, _, _ = await tenant.call("GET", f"/v1/contacts/{late}")
    assert status == 200


# --- what a job says while it runs, and what the logs say -----------------------------------


async def test_a_filter_job_says_it_is_still_finding_contacts_with_an_estimate(
    services: Services, idle_tenant: Tenant
) -> None:
    """phase `finding_contacts` while the matches are being expanded (total_requested is
    what was found so far), with `estimated_total` counted at acceptance; then `deleting`."""
    for _ in range(5):
        await seed(services, idle_tenant, last_name="Expando")
    await seed(services, idle_tenant, last_name="Bystander")  # the filter is not "all"
    status, body, _ = await idle_tenant.call("POST", BULK, {"filter": {"last_name": "Expando"}})
    assert status == 202, body
    job = body["data"]
    assert (job["phase"], job["estimated_total"], job["total_requested"]) == (
        "finding_contacts",
        5,
        0,
    )
    worker = DeletionWorker(
        make_settings(services.settings.database_url, expand_page_size=2),
        services.db,
        services.metrics,
    )
    job_id = uuid.UUID(job["job_id"])
    await worker.process([JobExpand(job_id=job_id, workspace_id=idle_tenant.workspace_id)])
    job = await get_job(idle_tenant, str(job_id))
    assert (job["phase"], job["status"], job["total_requested"], job["processed_count"]) == (
        "finding_contacts",
        "in_progress",
        2,
        0,
    )
    async with services.db.read() as conn:
        after = (
            await conn.execute(
                sa.select(deletion_job_items.c.contact_id)
                .where(deletion_job_items.c.job_id == job_id)
                .order_by(deletion_job_items.c.position.desc())
                .limit(1)
            )
        ).scalar_one()
    for _ in range(2):
        await worker.process(
            [JobExpand(job_id=job_id, workspace_id=idle_tenant.workspace_id, after=after)]
        )
        job = await get_job(idle_tenant, str(job_id))
        async with services.db.read() as conn:
            after = (
                await conn.execute(
                    sa.select(deletion_job_items.c.contact_id)
                    .where(deletion_job_items.c.job_id == job_id)
                    .order_by(deletion_job_items.c.position.desc())
                    .limit(1)
                )
            ).scalar_one()
    assert (job["phase"], job["total_requested"], job["estimated_total"]) == ("deleting", 5, 5)


async def test_an_ids_job_has_no_estimate_and_is_done_when_finished(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    contact_id = await seed(services, tenant)
    status, body, _ = await tenant.call("POST", BULK, {"contact_ids": [contact_id]})
    assert status == 202, body
    assert (body["data"]["phase"], body["data"]["estimated_total"]) == ("deleting", None)
    job = await run_job(tenant, {"contact_ids": [contact_id, str(uuid.uuid4())]})
    assert job["phase"] == "done"


async def test_job_lifecycle_and_deletion_batches_leave_log_lines_without_addresses(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    """accepted, started, batch, expansion, finished: one JSON line each with the job id
    and counts; no email address (an emails job) anywhere in the logs."""
    emails = [f"log.{uuid.uuid4().hex[:8]}@example.com" for _ in range(3)]
    for email in emails:
        await seed(services, tenant, email=email, last_name="Logline")
    await seed(services, tenant, last_name="Bystander")  # not selected: the filter is not "all"
    with json_logs() as logs:
        by_email = await run_job(tenant, {"emails": [*emails[:2], "nobody.logs@example.com"]})
        by_filter = await run_job(tenant, {"filter": {"last_name": "Logline"}})
        for job in (by_email, by_filter):  # the lines follow the commit the API reads
            await logs.wait_for("deletion_job_finished", job_id=job["job_id"])

    for job in (by_email, by_filter):
        jid = job["job_id"]
        assert len(logs.events("deletion_job_accepted", job_id=jid)) == 1
        assert len(logs.events("deletion_job_started", job_id=jid)) == 1
        batches = logs.events("deletion_batch", job_id=jid)
        assert sum(b["deleted"] for b in batches) == job["deleted_count"]
        finished = logs.events("deletion_job_finished", job_id=jid)
        assert [(f["status"], f["deleted_count"]) for f in finished] == [
            (job["status"], job["deleted_count"])
        ]
    assert by_email["selector"] == {"emails": {"count": 3}}
    accepted = logs.events("deletion_job_accepted", job_id=by_email["job_id"])[0]
    assert accepted["selector"] == {"type": "emails", "count": 3}
    expansion = logs.events("deletion_job_expansion_done", job_id=by_filter["job_id"])
    assert [e["found"] for e in expansion] == [1]
    assert "@" not in logs.text
