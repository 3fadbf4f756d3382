"""POST /v1/contacts/bulk-delete through the real pipeline (outbox -> Kafka -> worker).

Runs on SQLite and PostgreSQL against the real broker. The relay and the worker run once
per module and backend (starting a consumer group costs seconds); every test has its own
workspace, so tests do not see each other's contacts or jobs. Filter jobs expand seven
matches per page here, so any filter over more than seven contacts spans several pages.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from multidict import CIMultiDictProxy

from service import idempotency
from service.app import Services
from service.config import Settings
from service.contacts.models import ContactCreate
from service.contacts.store import create_contact
from service.db import activities, audit_events, notes, outbox, tasks
from tests.conftest import Tenant, components_running, make_settings, opened_services

BULK = "/v1/contacts/bulk-delete"
WAIT = {"Prefer": "wait=30"}
PAGE_SIZE = 7
FINISHED = {"completed", "completed_with_errors", "failed"}


# --- fixtures: one pipeline per module and backend ------------------------------------------


@pytest.fixture(scope="module")
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """The real broker, and expansion pages small enough to make filter jobs span pages."""
    return make_settings(
        db_url, kafka_bootstrap_servers=kafka_bootstrap, expand_page_size=PAGE_SIZE
    )


@pytest.fixture(scope="module")
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with opened_services(settings) as svc:
        yield svc


@pytest.fixture(scope="module")
async def pipeline(services: Services) -> AsyncIterator[Services]:
    """Relay and worker in this process for the whole module."""
    async with components_running(services, "relay", "worker"):
        yield services


# --- helpers --------------------------------------------------------------------------------


async def seed(services: Services, tenant: Tenant, **fields: Any) -> str:
    """A contact of the tenant's workspace, written straight to the store; returns its id."""
    values = {"email": f"{uuid.uuid4().hex[:12]}@example.com", **fields}
    contact = await create_contact(services.db, tenant.workspace_id, ContactCreate(**values))
    contact_id: str = contact["id"]
    return contact_id


async def seed_many(services: Services, tenant: Tenant, count: int, **fields: Any) -> list[str]:
    return [await seed(services, tenant, **fields) for _ in range(count)]


def assert_counts_add_up(job: dict[str, Any]) -> None:
    """processed = deleted + not_found + failed, and = total_requested once finished."""
    assert job["processed_count"] == (
        job["deleted_count"] + job["not_found_count"] + job["failed_count"]
    ), job
    assert job["processed_count"] <= job["total_requested"], job
    if job["status"] in FINISHED:
        assert job["processed_count"] == job["total_requested"], job
        assert len(job["not_found"]) == job["not_found_count"], job
        assert len(job["errors"]) == job["failed_count"], job
        expected = "completed_with_errors" if job["failed_count"] else "completed"
        assert job["status"] == expected, job


async def run_job(tenant: Tenant, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """Submit a bulk delete, wait for it (Prefer: wait) and return the finished job."""
    status, answer, _ = await tenant.call("POST", BULK, body, {**WAIT, **headers})
    assert status == 200, answer
    job: dict[str, Any] = answer["data"]
    assert job["status"] in FINISHED, job
    assert_counts_add_up(job)
    return job


async def poll_until_finished(tenant: Tenant, location: str) -> dict[str, Any]:
    """The job at `location` once finished (GET has no Prefer: wait, so poll briefly)."""
    for _ in range(600):
        status, body, _ = await tenant.call("GET", location)
        assert status == 200, body
        job: dict[str, Any] = body["data"]
        if job["status"] in FINISHED:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {location} did not finish in 30 s")


async def exists(tenant: Tenant, contact_id: str) -> bool:
    status, body, _ = await tenant.call("GET", f"/v1/contacts/{contact_id}")
    assert status in (200, 404), body
    return status == 200


async def jobs_of(tenant: Tenant) -> list[dict[str, Any]]:
    status, body, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["data"]
    return jobs


async def outbox_keys(services: Services, keys: Sequence[str]) -> list[tuple[str, str]]:
    """(topic, key) of every outbox row keyed by one of `keys`."""
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(outbox.c.topic, outbox.c.key).where(outbox.c.key.in_(list(keys)))
        )
        return [(r.topic, r.key) for r in rows]


async def audit_count(services: Services, tenant: Tenant) -> int:
    async with services.db.read() as conn:
        count = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(audit_events)
            .where(audit_events.c.workspace_id == tenant.workspace_id)
        )
    return int(count or 0)


async def post_raw(
    tenant: Tenant, body: Any, headers: dict[str, str]
) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    """POST a bulk delete and keep the answer's exact bytes."""
    all_headers = {"Authorization": f"Bearer {tenant.key}", **headers}
    async with tenant.http.post(tenant.url(BULK), json=body, headers=all_headers) as response:
        return response.status, await response.read(), response.headers


# --- selectors ------------------------------------------------------------------------------


async def test_contact_ids_selector_deletes_exactly_the_named_contacts(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    doomed = await seed_many(services, tenant, 2)
    kept = await seed(services, tenant)

    job = await run_job(tenant, {"contact_ids": doomed})

    assert job["status"] == "completed"
    assert job["dry_run"] is False
    assert job["selector"] == {"contact_ids": doomed}
    assert (job["total_requested"], job["deleted_count"]) == (2, 2)
    assert job["not_found"] == [] and job["errors"] == []
    assert job["created_at"] and job["started_at"] and job["completed_at"]
    assert [await exists(tenant, c) for c in doomed] == [False, False]
    assert await exists(tenant, kept)


async def test_emails_match_case_insensitively_and_an_unknown_email_is_not_found(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    token = uuid.uuid4().hex[:8]
    doomed = await seed(services, tenant, email=f"Ada.{token}@Example.COM")
    kept = await seed(services, tenant)
    nobody = f"nobody.{token}@example.com"

    job = await run_job(tenant, {"emails": [f"ADA.{token}@example.com", nobody]})

    assert job["status"] == "completed"  # a not-found address is never an error
    assert job["total_requested"] == 2
    assert job["deleted_count"] == 1
    assert job["not_found_count"] == 1
    # Named by its place in the request, so the job keeps no address it did not delete.
    assert job["not_found"] == ["emails[1]"]
    assert job["failed_count"] == 0 and job["errors"] == []
    assert not await exists(tenant, doomed)
    assert await exists(tenant, kept)
    # The deleted contact's address is not kept with the job, even in the selector.
    assert job["selector"] == {"emails": {"count": 2}}
    status, stored, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job['job_id']}")
    assert status == 200
    assert token not in json.dumps(stored["data"]["selector"]).lower()
    assert stored["data"]["not_found"] == ["emails[1]"]
    assert token not in json.dumps(stored["data"]).lower()


async def test_filter_selector_deletes_every_match_of_this_workspace_only(
    services: Services, pipeline: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    smiths = await seed_many(services, tenant, 3, last_name="Smith")
    jones = await seed(services, tenant, last_name="Jones")
    other_smith = await seed(services, other_tenant, last_name="Smith")

    job = await run_job(tenant, {"filter": {"last_name": "Smith"}})

    # Finished, it keeps the filter's shape, not the personal values it was given.
    assert job["selector"] == {"filter": {"last_name": "[redacted]"}}
    assert (job["total_requested"], job["deleted_count"], job["status"]) == (3, 3, "completed")
    assert [await exists(tenant, c) for c in smiths] == [False] * 3
    assert await exists(tenant, jones)
    assert await exists(other_tenant, other_smith)


async def test_search_selector_matches_names_and_emails_case_insensitively(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    token = uuid.uuid4().hex[:8]
    by_name = await seed(services, tenant, first_name=f"Zed{token.upper()}")
    by_email = await seed(services, tenant, email=f"x{token}y@example.com")
    unrelated = await seed(services, tenant, first_name="Unrelated")

    job = await run_job(tenant, {"search": token})

    assert job["selector"] == {"search": "[redacted]"}  # finished: the text is not kept
    assert (job["total_requested"], job["deleted_count"]) == (2, 2)
    assert not await exists(tenant, by_name)
    assert not await exists(tenant, by_email)
    assert await exists(tenant, unrelated)


@pytest.mark.parametrize("needle", ["öztürk", "ÖZTÜRK"])
async def test_search_deletes_names_with_upper_case_non_ascii_letters(
    services: Services, pipeline: Services, tenant: Tenant, needle: str
) -> None:
    """Query, dry run and real run fold case the same way (Unicode, on both databases)."""
    turk = await seed(services, tenant, last_name="ÖZTÜRK")
    other = await seed(services, tenant, last_name="Ozturk")
    _, found, _ = await tenant.call("POST", "/v1/contacts/query", {"search": needle})
    _, dry, _ = await tenant.call("POST", BULK, {"search": needle, "dry_run": True})

    job = await run_job(tenant, {"search": needle})

    assert [c["id"] for c in found["data"]] == [turk]
    assert dry["data"].get("would_delete_count", dry["data"].get("total_requested")) == 1, dry
    assert (job["total_requested"], job["deleted_count"]) == (1, 1)
    assert not await exists(tenant, turk)
    assert await exists(tenant, other)


async def test_match_all_deletes_every_contact_of_the_workspace_and_no_other(
    services: Services, pipeline: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    """The explicit opt-in works end to end, and "all" is this workspace's all."""
    mine = await seed_many(services, tenant, PAGE_SIZE + 2)  # spans expansion pages
    theirs = await seed(services, other_tenant)
    status, refused, _ = await tenant.call("POST", BULK, {"filter": {"$or": [{}]}}, WAIT)
    assert status == 400, refused

    job = await run_job(tenant, {"match_all": True})

    assert job["selector"] == {"filter": {}, "match_all": True}
    assert (job["total_requested"], job["deleted_count"]) == (len(mine), len(mine))
    assert not any([await exists(tenant, c) for c in mine])
    assert await exists(other_tenant, theirs)


async def test_filter_and_search_together_delete_only_contacts_matching_both(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    token = uuid.uuid4().hex[:8]
    both = await seed(services, tenant, last_name="Smith", first_name=f"A{token}")
    filter_only = await seed(services, tenant, last_name="Smith", first_name="B")
    search_only = await seed(services, tenant, last_name="Jones", first_name=f"C{token}")

    job = await run_job(tenant, {"filter": {"last_name": "Smith"}, "search": token})

    assert job["selector"] == {"filter": {"last_name": "[redacted]"}, "search": "[redacted]"}
    assert (job["total_requested"], job["deleted_count"]) == (1, 1)
    assert not await exists(tenant, both)
    assert await exists(tenant, filter_only)
    assert await exists(tenant, search_only)


async def test_filter_job_larger_than_one_expansion_page_deletes_every_match(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    smiths = await seed_many(services, tenant, 25, last_name="Smith")  # 7 + 7 + 7 + 4
    jones = await seed_many(services, tenant, 2, last_name="Jones")

    job = await run_job(tenant, {"filter": {"last_name": "Smith"}})

    assert job["total_requested"] == 25
    assert job["processed_count"] == 25
    assert job["deleted_count"] == 25
    assert job["not_found_count"] == 0 and job["failed_count"] == 0
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job['job_id']}/items?limit=100")
    assert status == 200, body
    assert sorted(i["contact_id"] for i in body["data"]) == sorted(smiths)
    assert {i["status"] for i in body["data"]} == {"deleted"}
    assert [await exists(tenant, c) for c in jones] == [True, True]


async def test_filter_matching_a_whole_number_of_pages_completes(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    """The last expansion page is empty; the job must still finish."""
    await seed_many(services, tenant, 2 * PAGE_SIZE, last_name="Smith")
    await seed(services, tenant, last_name="Bystander")  # not selected: the filter is not "all"

    job = await run_job(tenant, {"filter": {"last_name": "Smith"}})

    assert (job["total_requested"], job["deleted_count"]) == (2 * PAGE_SIZE, 2 * PAGE_SIZE)


async def test_filter_matching_nothing_completes_with_zero_counts(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    await seed(services, tenant, last_name="Jones")

    job = await run_job(tenant, {"filter": {"last_name": "Nobody"}})

    assert job["status"] == "completed"
    assert job["total_requested"] == job["processed_count"] == job["deleted_count"] == 0


# --- per-contact outcomes -------------------------------------------------------------------


async def test_without_delete_members_members_and_billing_contacts_fail_and_survive(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    plain = await seed(services, tenant)
    member = await seed(services, tenant, member_role="member")
    owner = await seed(services, tenant, member_role="owner")
    billing = await seed(services, tenant, has_billing_subscription=True)
    unknown = str(uuid.uuid4())

    job = await run_job(tenant, {"contact_ids": [plain, member, owner, billing, unknown]})

    assert job["status"] == "completed_with_errors"
    assert job["failure"] is None  # per-contact errors are not the job's failure
    assert job["total_requested"] == 5
    assert (job["deleted_count"], job["not_found_count"], job["failed_count"]) == (1, 1, 3)
    assert job["not_found"] == [unknown]
    for error in job["errors"]:
        assert set(error) == {"contact_id", "code", "message"}
        assert isinstance(error["message"], str) and error["message"]
    assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
        (member, "CANNOT_DELETE_SITE_MEMBERS"),
        (owner, "CANNOT_DELETE_SITE_MEMBERS"),
        (billing, "CANNOT_DELETE_CONTACT_WITH_BILLING_SUBSCRIPTION"),
    ]
    # each message's remedy applies to its contact: delete_members deletes a member only
    advice = ["set delete_members" in e["message"] for e in job["errors"]]
    assert advice == [True, False, False], job["errors"]
    assert not await exists(tenant, plain)
    assert [await exists(tenant, c) for c in (member, owner, billing)] == [True] * 3


async def test_delete_members_deletes_members_but_not_owners_contributors_or_billing(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    member = await seed(services, tenant, member_role="member")
    owner = await seed(services, tenant, member_role="owner")
    contributor = await seed(services, tenant, member_role="contributor")
    paying_member = await seed(
        services, tenant, member_role="member", has_billing_subscription=True
    )

    job = await run_job(
        tenant,
        {"contact_ids": [member, owner, contributor, paying_member], "delete_members": True},
    )

    assert job["status"] == "completed_with_errors"
    assert (job["deleted_count"], job["not_found_count"], job["failed_count"]) == (1, 0, 3)
    assert [(e["contact_id"], e["code"]) for e in job["errors"]] == [
        (owner, "CANNOT_DELETE_MEMBER_OWNER_OR_CONTRIBUTOR"),
        (contributor, "CANNOT_DELETE_MEMBER_OWNER_OR_CONTRIBUTOR"),
        (paying_member, "CANNOT_DELETE_CONTACT_WITH_BILLING_SUBSCRIPTION"),
    ]
    assert not await exists(tenant, member)
    assert [await exists(tenant, c) for c in (owner, contributor, paying_member)] == [True] * 3


async def test_deleted_contact_is_404_and_its_timeline_stays_without_back_reference(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    doomed = await seed(services, tenant)
    kept = await seed(services, tenant)
    timeline: dict[str, str] = {}
    for contact_id in (doomed, kept):
        for path, body in (
            ("activities", {"type": "call", "subject": "hello"}),
            ("notes", {"body": "a note"}),
            ("tasks", {"title": "a task"}),
        ):
            status, answer, _ = await tenant.call("POST", f"/v1/contacts/{contact_id}/{path}", body)
            assert status == 201, answer
            timeline[answer["data"]["id"]] = contact_id

    job = await run_job(tenant, {"contact_ids": [doomed]})

    assert job["deleted_count"] == 1
    assert not await exists(tenant, doomed)
    status, _, _ = await tenant.call("GET", f"/v1/contacts/{doomed}/timeline")
    assert status == 404
    found: dict[str, str | None] = {}
    async with services.db.read() as conn:
        for table in (activities, notes, tasks):
            rows = await conn.execute(
                sa.select(table.c.id, table.c.contact_id).where(
                    table.c.id.in_([uuid.UUID(i) for i in timeline])
                )
            )
            found |= {str(r.id): str(r.contact_id) if r.contact_id else None for r in rows}
    assert found == {item: (None if owner == doomed else owner) for item, owner in timeline.items()}


# --- workspaces and duplicates --------------------------------------------------------------


async def test_another_workspaces_contact_is_not_found_for_me_and_survives(
    services: Services, pipeline: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await seed(services, tenant)
    theirs = await seed(services, other_tenant, email=f"theirs.{uuid.uuid4().hex[:8]}@x.io")
    status, their_contact, _ = await other_tenant.call("GET", f"/v1/contacts/{theirs}")
    assert status == 200
    their_email = their_contact["data"]["email"]

    by_id = await run_job(tenant, {"contact_ids": [theirs, mine]})
    by_email = await run_job(tenant, {"emails": [their_email]})

    assert (by_id["deleted_count"], by_id["not_found"]) == (1, [theirs])
    assert by_id["errors"] == []
    assert (by_email["deleted_count"], by_email["not_found"]) == (0, ["emails[0]"])
    assert not await exists(tenant, mine)
    assert await exists(other_tenant, theirs)


async def test_duplicate_contact_ids_are_counted_once(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    first, second = await seed_many(services, tenant, 2)

    job = await run_job(tenant, {"contact_ids": [first, second, first, first.upper()]})

    assert job["selector"] == {"contact_ids": [first, second]}
    assert job["total_requested"] == 2
    assert (job["processed_count"], job["deleted_count"]) == (2, 2)


async def test_duplicate_emails_are_counted_once_whatever_their_case(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    token = uuid.uuid4().hex[:8]
    await seed(services, tenant, email=f"dup.{token}@example.com")
    missing = f"missing.{token}@example.com"

    job = await run_job(
        tenant,
        {
            "emails": [
                f"dup.{token}@example.com",
                f"DUP.{token}@Example.com",
                missing,
                missing.upper(),
            ]
        },
    )

    assert job["total_requested"] == 2
    assert (job["deleted_count"], job["not_found_count"]) == (1, 1)
    assert job["not_found"] == ["emails[2]"]  # the first place the address was given


# --- dry run ---------------------------------------------------------------------------------


DRY_RUN_FIELDS = {
    "dry_run",
    "selector",
    "would_delete_count",
    "would_fail_count",
    "not_found_count",
    "not_found",
    "errors",
    "orphaned_timeline",
    "would_redact_count",
    "contact_ids",
    "next_cursor",
}


async def test_dry_run_by_ids_predicts_the_real_run_and_changes_nothing(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    """The answer has no job id and no job-status fields; its counts are the real run's."""
    plain = await seed(services, tenant)
    member = await seed(services, tenant, member_role="member")
    billing = await seed(services, tenant, has_billing_subscription=True)
    unknown = str(uuid.uuid4())
    ids = [plain, member, billing, unknown, plain]
    status, _, _ = await tenant.call(
        "POST", f"/v1/contacts/{plain}/notes", {"body": "kept after the deletion"}
    )
    assert status == 201
    audit_before = await audit_count(services, tenant)

    status, answer, _ = await tenant.call("POST", BULK, {"contact_ids": ids, "dry_run": True})

    assert status == 200, answer
    dry = answer["data"]
    assert set(dry) == DRY_RUN_FIELDS
    assert dry["dry_run"] is True
    assert (dry["would_delete_count"], dry["would_fail_count"], dry["not_found_count"]) == (
        1,
        2,
        1,
    )
    assert dry["contact_ids"] == [plain] and dry["next_cursor"] is None
    assert dry["orphaned_timeline"] == {"activities": 0, "notes": 1, "tasks": 0}
    assert dry["would_redact_count"] == 0
    # Nothing changed: the contacts are there, no job, no outbox row; the audit trail notes
    # the dry run itself (without a job id).
    assert [await exists(tenant, c) for c in (plain, member, billing)] == [True] * 3
    assert await jobs_of(tenant) == []
    assert await outbox_keys(services, [plain, member, billing, unknown]) == []
    assert await audit_count(services, tenant) == audit_before + 1
    async with services.db.read() as conn:
        last = (
            await conn.execute(
                sa.select(audit_events.c.action, audit_events.c.job_id)
                .where(audit_events.c.workspace_id == tenant.workspace_id)
                .order_by(audit_events.c.seq.desc())
                .limit(1)
            )
        ).one()
    assert (last.action, last.job_id) == ("deletion.dry_run", None)

    real = await run_job(tenant, {"contact_ids": ids})

    assert (real["deleted_count"], real["failed_count"], real["not_found_count"]) == (
        dry["would_delete_count"],
        dry["would_fail_count"],
        dry["not_found_count"],
    )
    for field in ("not_found", "errors", "selector"):
        assert dry[field] == real[field], field
    assert (real["deleted_count"], real["not_found_count"], real["failed_count"]) == (1, 1, 2)
    assert not await exists(tenant, plain)


async def test_dry_run_of_a_filter_predicts_the_real_run_and_changes_nothing(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    smiths = await seed_many(services, tenant, 9, last_name="Smith")
    owner = await seed(services, tenant, last_name="Smith", member_role="owner")
    member = await seed(services, tenant, last_name="Smith", member_role="member")
    await seed(services, tenant, last_name="Bystander")  # not selected: the filter is not "all"
    body = {"filter": {"last_name": "Smith"}, "delete_members": True}

    status, answer, _ = await tenant.call("POST", BULK, {**body, "dry_run": True})

    assert status == 200, answer
    dry = answer["data"]
    assert "job_id" not in dry and "status" not in dry
    assert (dry["would_delete_count"], dry["would_fail_count"]) == (10, 1)
    assert dry["contact_ids"] == sorted([*smiths, member])
    assert dry["errors"] == [
        {
            "contact_id": owner,
            "code": "CANNOT_DELETE_MEMBER_OWNER_OR_CONTRIBUTOR",
            "message": dry["errors"][0]["message"],
        }
    ]
    assert [await exists(tenant, c) for c in [*smiths, owner, member]] == [True] * 11
    assert await jobs_of(tenant) == []
    assert await outbox_keys(services, [*smiths, owner, member]) == []

    real = await run_job(tenant, body)

    assert (real["deleted_count"], real["failed_count"]) == (10, 1)
    assert dry["errors"] == real["errors"]
    assert not await exists(tenant, member)


async def test_dry_run_pages_the_ids_it_would_delete_with_a_cursor(
    services: Services, tenant: Tenant
) -> None:
    """dry_run_limit ids per page, sorted; next_cursor as dry_run_cursor gives the next
    page; the counts cover the whole selection on every page."""
    ids = await seed_many(services, tenant, 5, last_name="Pager")
    await seed(services, tenant, last_name="Bystander")  # not selected: the filter is not "all"
    body = {"filter": {"last_name": "Pager"}, "dry_run": True, "dry_run_limit": 2}
    pages: list[list[str]] = []
    cursor = None
    while True:
        status, answer, _ = await tenant.call(
            "POST", BULK, {**body, **({"dry_run_cursor": cursor} if cursor else {})}
        )
        assert status == 200, answer
        assert answer["data"]["would_delete_count"] == 5
        pages.append(answer["data"]["contact_ids"])
        cursor = answer["data"]["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == sorted(ids)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"dry_run_limit": 10}, "dry_run_limit"),
        ({"dry_run_cursor": "abc"}, "dry_run_cursor"),
        ({"dry_run": True, "dry_run_limit": 0}, "dry_run_limit"),
        ({"dry_run": True, "dry_run_limit": 1001}, "dry_run_limit"),
        ({"dry_run": True, "dry_run_cursor": "not-a-cursor"}, "dry_run_cursor"),
    ],
)
async def test_dry_run_paging_fields_are_refused_without_dry_run_or_out_of_range(
    services: Services, tenant: Tenant, extra: dict[str, Any], field: str
) -> None:
    contact = await seed(services, tenant)
    status, answer, _ = await tenant.call("POST", BULK, {"contact_ids": [contact], **extra})
    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error"
    assert any(field == d["field"] for d in answer["error"]["details"]), answer
    assert await exists(tenant, contact)


# --- idempotency -----------------------------------------------------------------------------


async def test_same_key_and_body_replays_the_first_answer_byte_for_byte_and_makes_one_job(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    ids = await seed_many(services, tenant, 2)
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}", **WAIT}

    first = await post_raw(tenant, {"contact_ids": ids}, headers)
    again = await post_raw(tenant, {"contact_ids": ids}, headers)

    assert first[0] == 200, first[1]
    assert "Idempotent-Replayed" not in first[2]
    assert again[0] == first[0]
    assert again[1] == first[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    assert len(await jobs_of(tenant)) == 1
    assert sorted(await outbox_keys(services, ids)) == sorted(
        [(services.settings.topic("contact.deletion-requested"), i) for i in ids]
        + [(services.settings.topic("contact.deleted"), i) for i in ids]
    )


async def test_replayed_202_answer_keeps_its_status_body_and_location(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    ids = await seed_many(services, tenant, 1)
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}"}

    first = await post_raw(tenant, {"contact_ids": ids}, headers)
    assert first[0] == 202, first[1]
    finished = await poll_until_finished(tenant, first[2]["Location"])
    again = await post_raw(tenant, {"contact_ids": ids}, headers)

    assert again[0] == 202
    assert again[1] == first[1]  # the first answer, not the job as it stands now
    assert again[2]["Location"] == first[2]["Location"]
    assert again[2]["Idempotent-Replayed"] == "true"
    assert finished["deleted_count"] == 1
    assert len(await jobs_of(tenant)) == 1


async def test_same_key_with_another_body_is_409_idempotency_conflict(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    first_ids = await seed_many(services, tenant, 1)
    other_ids = await seed_many(services, tenant, 1)
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}", **WAIT}

    status, _, _ = await tenant.call("POST", BULK, {"contact_ids": first_ids}, headers)
    assert status == 200
    status, body, _ = await tenant.call("POST", BULK, {"contact_ids": other_ids}, headers)

    assert status == 409, body
    assert body["error"]["code"] == "idempotency_conflict"
    assert len(await jobs_of(tenant)) == 1
    assert await exists(tenant, other_ids[0])


async def test_same_key_in_another_workspace_is_independent(
    services: Services, pipeline: Services, tenant: Tenant, other_tenant: Tenant
) -> None:
    key = f"shared-{uuid.uuid4()}"
    mine = await seed(services, tenant)
    theirs = await seed(services, other_tenant)

    status_a, body_a, headers_a = await tenant.call(
        "POST", BULK, {"contact_ids": [mine]}, {"Idempotency-Key": key, **WAIT}
    )
    status_b, body_b, headers_b = await other_tenant.call(
        "POST", BULK, {"contact_ids": [theirs]}, {"Idempotency-Key": key, **WAIT}
    )

    assert (status_a, status_b) == (200, 200), (body_a, body_b)
    assert "Idempotent-Replayed" not in headers_a and "Idempotent-Replayed" not in headers_b
    assert body_a["data"]["job_id"] != body_b["data"]["job_id"]
    assert not await exists(tenant, mine)
    assert not await exists(other_tenant, theirs)


async def test_idempotency_key_over_255_chars_is_400_and_255_is_accepted(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    ids = await seed_many(services, tenant, 1)

    status, body, _ = await tenant.call(
        "POST", BULK, {"contact_ids": ids}, {"Idempotency-Key": "k" * 256}
    )
    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert {d["field"] for d in body["error"]["details"]} == {"Idempotency-Key"}
    assert await jobs_of(tenant) == []

    status, body, _ = await tenant.call(
        "POST", BULK, {"contact_ids": ids}, {"Idempotency-Key": "k" * 255, **WAIT}
    )
    assert status == 200, body


async def test_repeat_while_the_first_request_is_running_is_409_with_retry_after(
    services: Services, tenant: Tenant
) -> None:
    body = {"contact_ids": [str(uuid.uuid4())]}
    key = f"key-{uuid.uuid4()}"
    print_ = idempotency.fingerprint("POST", BULK, body)
    claim = await idempotency.claim(services.db, tenant.workspace_id, key, print_, 3600)
    assert claim == idempotency.Claim()  # the "first request" now holds the key

    status, answer, headers = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})

    assert status == 409, answer
    assert answer["error"]["code"] == "idempotency_conflict"
    assert headers["Retry-After"]
    assert await jobs_of(tenant) == []


async def test_a_rejected_request_does_not_use_up_its_idempotency_key(
    services: Services, pipeline: Services, tenant: Tenant
) -> None:
    ids = await seed_many(services, tenant, 1)
    headers = {"Idempotency-Key": f"key-{uuid.uuid4()}", **WAIT}

    status, _, _ = await tenant.call("POST", BULK, {"contact_ids": ["nope"]}, headers)
    assert status == 400
    status, body, answer_headers = await tenant.call("POST", BULK, {"contact_ids": ids}, headers)

    assert status == 200, body
    assert "Idempotent-Replayed" not in answer_headers


# --- validation -----------------------------------------------------------------------------

ONE_ID = "00000000-0000-4000-8000-000000000001"


def case(name: str, body: Any, *fields: str) -> Any:
    return pytest.param(body, set(fields), id=name)


INVALID = [
    case("no selector", {"dry_run": True}, "contact_ids", "emails", "filter", "search"),
    case(
        "ids and emails", {"contact_ids": [ONE_ID], "emails": ["a@x.io"]}, "contact_ids", "emails"
    ),
    case("emails and filter", {"emails": ["a@x.io"], "filter": {"x": 1}}, "emails", "filter"),
    case("ids and search", {"contact_ids": [ONE_ID], "search": "ann"}, "contact_ids", "search"),
    case(
        "501 ids", {"contact_ids": [str(uuid.UUID(int=i + 1)) for i in range(501)]}, "contact_ids"
    ),
    case("1001 emails", {"emails": [f"u{i}@example.com" for i in range(1001)]}, "emails"),
    case("malformed uuid", {"contact_ids": [ONE_ID, "not-a-uuid"]}, "contact_ids.1"),
    case("malformed email", {"emails": ["a@x.io", "not-an-email"]}, "emails.1"),
    case("unknown field", {"contact_ids": [ONE_ID], "hard_delete": True}, "hard_delete"),
    case("unknown filter field", {"filter": {"nickname": "Al"}}, "filter.nickname"),
    case("unknown operator", {"filter": {"last_name": {"$regex": "S"}}}, "filter.last_name.$regex"),
    case("unknown combinator", {"filter": {"$not": [{"last_name": "S"}]}}, "filter.$not"),
    case("empty contact_ids", {"contact_ids": []}, "contact_ids"),
    case("empty emails", {"emails": []}, "emails"),
    case("empty search", {"search": ""}, "search"),
    case("not an object", [ONE_ID], "body"),
]


@pytest.mark.parametrize(("body", "fields"), INVALID)
async def test_invalid_request_is_400_naming_the_field_and_writes_nothing(
    services: Services, tenant: Tenant, body: Any, fields: set[str]
) -> None:
    audit_before = await audit_count(services, tenant)

    status, answer, _ = await tenant.call("POST", BULK, body)

    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error"
    assert {d["field"] for d in answer["error"]["details"]} == fields
    assert await jobs_of(tenant) == []
    assert await audit_count(services, tenant) == audit_before
