"""The audit API over HTTP after a mixed workload through the real pipeline, on both databases.

One workload per backend (module scope, it takes a few seconds through Kafka): keys made
and revoked, contacts with activities, notes and tasks, a bulk delete by ids (one contact
refused for its billing subscription) sent with an X-Request-ID, a single delete, a dry
run, and a second workspace doing its own deletions. The tests then read the trail.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from service import console
from service.app import Services, create_app, run_components
from service.audit.chain import EVENT_FIELDS, parse_time
from service.audit.export import verify_export
from service.audit.models import AUDIT_ACTIONS
from service.audit.store import AuditRecord, append_events
from service.db import Database
from service.keys import SCOPES, create_key, revoke_key
from service.migrate import upgrade
from service.pagination import encode_cursor
from tests.conftest import Tenant, make_settings

AUDIT_PATHS = (
    "/v1/audit/events",
    "/v1/audit/verify",
    "/v1/audit/export",
    f"/v1/audit/contacts/{uuid.uuid4()}/timeline",
)


def audit_app(services: Services) -> Any:
    """The app, with the audit routes added if create_app does not wire them (yet)."""
    app = create_app(services)
    return app


async def get(tenant: Tenant, path: str, **params: Any) -> tuple[int, Any]:
    """GET with query parameters (URL-encoded, so `+` in an offset survives)."""
    url = path + ("?" + urlencode(params) if params else "")
    status, body, _ = await tenant.call("GET", url)
    return status, body


async def events(tenant: Tenant, **params: Any) -> list[dict[str, Any]]:
    """Every matching event, following the cursor."""
    found: list[dict[str, Any]] = []
    params = {"limit": 1000, **params}
    while True:
        status, body = await get(tenant, "/v1/audit/events", **params)
        assert status == 200, body
        found += body["data"]
        if body["next_cursor"] is None:
            return found
        params["cursor"] = body["next_cursor"]


async def export_bytes(tenant: Tenant, **params: Any) -> tuple[int, str, bytes]:
    url = tenant.url("/v1/audit/export") + ("?" + urlencode(params) if params else "")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with tenant.http.get(url, headers=headers) as response:
        body = await response.read()
        return response.status, response.headers.get("Content-Type", ""), body


# --- the workload --------------------------------------------------------------------------


@dataclass
class Workload:
    """What the workload did, for the tests to look for in the trail."""

    tenant: Tenant
    other: Tenant
    reader: Tenant  # a live key of the same workspace without audit:read
    workspace_name: str
    request_id: str
    job_id: str
    single_job_id: str
    deleted: dict[str, Any]  # the contact with a timeline
    plain: dict[str, Any]  # deleted, no timeline
    refused: dict[str, Any]  # billing subscription: its deletion failed
    single: dict[str, Any]  # deleted with DELETE /v1/contacts/{id}
    timeline: list[dict[str, Any]] = field(default_factory=list)  # newest first
    revoked_key_id: str = ""
    other_deleted: dict[str, Any] = field(default_factory=dict)


async def _tenant(services: Services, base: str, http: aiohttp.ClientSession, name: str) -> Tenant:
    created = await create_key(services.db, name, list(SCOPES))
    return Tenant(base, created.key, created.key_id, created.workspace_id, http)


async def _contact(tenant: Tenant, email: str, **fields: Any) -> dict[str, Any]:
    status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": email, **fields})
    assert status == 201, body
    contact: dict[str, Any] = body["data"]
    return contact


async def _item(tenant: Tenant, contact_id: str, kind: str, body: dict[str, Any]) -> str:
    status, answer, _ = await tenant.call("POST", f"/v1/contacts/{contact_id}/{kind}", body)
    assert status == 201, answer
    item_id: str = answer["data"]["id"]
    return item_id


async def _run_workload(services: Services, base: str, http: aiohttp.ClientSession) -> Workload:
    name = f"audit-{uuid.uuid4().hex[:10]}"
    tenant = await _tenant(services, base, http, name)
    other = await _tenant(services, base, http, f"audit-other-{uuid.uuid4().hex[:10]}")
    reader_key = await create_key(services.db, name, ["contacts:read", "contacts:write"])
    reader = Tenant(base, reader_key.key, reader_key.key_id, reader_key.workspace_id, http)
    doomed_key = await create_key(services.db, name, ["contacts:read"])
    assert await revoke_key(services.db, doomed_key.key_id)

    tag = uuid.uuid4().hex[:8]
    deleted = await _contact(tenant, f"Ada.Gone.{tag}@Example.com", first_name="Ada")
    plain = await _contact(tenant, f"plain.{tag}@example.com")
    refused = await _contact(tenant, f"payer.{tag}@example.com", has_billing_subscription=True)
    single = await _contact(tenant, f"single.{tag}@example.com")
    survivor = await _contact(tenant, f"survivor.{tag}@example.com")
    cid = deleted["id"]
    old = await _item(
        tenant,
        cid,
        "activities",
        {
            "type": "email",
            "subject": "Welcome",
            "body": "hello",
            "occurred_at": "2024-01-01T10:00:00Z",
        },
    )
    newer = await _item(
        tenant,
        cid,
        "activities",
        {
            "type": "call",
            "subject": "Renewal",
            "body": "called",
            "occurred_at": "2024-03-01T10:00:00Z",
        },
    )
    note = await _item(tenant, cid, "notes", {"body": "prefers mornings"})
    task = await _item(tenant, cid, "tasks", {"title": "send contract", "body": "v2"})
    await _item(tenant, survivor["id"], "notes", {"body": "stays"})

    request_id = f"audit-req-{uuid.uuid4().hex[:12]}"
    status, body, headers = await tenant.call(
        "POST",
        "/v1/contacts/bulk-delete",
        {"contact_ids": [deleted["id"], plain["id"], refused["id"]]},
        {"Prefer": "wait=30", "X-Request-ID": request_id},
    )
    assert status == 200, body
    assert headers["X-Request-ID"] == request_id
    assert body["data"]["status"] == "completed_with_errors", body
    assert (body["data"]["deleted_count"], body["data"]["failed_count"]) == (2, 1)
    job_id = body["data"]["job_id"]

    status, body, _ = await tenant.call(
        "DELETE", f"/v1/contacts/{single['id']}", headers={"Prefer": "wait=30"}
    )
    assert status == 200, body
    single_job_id = body["data"]["job_id"]
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": [survivor["id"]], "dry_run": True}
    )
    assert status == 200, body

    # The other workspace has a live contact with the deleted address, and deletes its own.
    await _contact(other, deleted["email"])
    other_deleted = await _contact(other, f"other.{tag}@example.com")
    status, body, _ = await other.call(
        "POST",
        "/v1/contacts/bulk-delete",
        {"emails": [other_deleted["email"]]},
        {"Prefer": "wait=30"},
    )
    assert status == 200 and body["data"]["deleted_count"] == 1, body

    return Workload(
        tenant=tenant,
        other=other,
        reader=reader,
        workspace_name=name,
        request_id=request_id,
        job_id=job_id,
        single_job_id=single_job_id,
        deleted=deleted,
        plain=plain,
        refused=refused,
        single=single,
        timeline=[{"id": task}, {"id": note}, {"id": newer}, {"id": old}],
        revoked_key_id=str(doomed_key.key_id),
        other_deleted=other_deleted,
    )


@pytest.fixture(scope="module")
async def workload(db_url: str, kafka_bootstrap: str) -> AsyncIterator[Workload]:
    """The mixed workload, run once per backend through the API, the relay and the worker."""
    settings = make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)
    services = Services(settings=settings, db=Database(settings.database_url))
    server = TestServer(audit_app(services), host="127.0.0.1")
    await server.start_server()
    stop = asyncio.Event()
    pipeline = asyncio.create_task(run_components(services, ["relay", "worker"], stop))
    try:
        async with aiohttp.ClientSession() as http:
            base = str(server.make_url("")).rstrip("/")
            done = await _run_workload(services, base, http)
            stop.set()
            await asyncio.wait_for(pipeline, timeout=30)
            yield done
    finally:
        stop.set()
        if not pipeline.done():
            await asyncio.wait_for(pipeline, timeout=30)
        await server.close()
        await services.close()


# --- verify --------------------------------------------------------------------------------


async def test_chain_of_the_mixed_workload_verifies(workload: Workload) -> None:
    status, body = await get(workload.tenant, "/v1/audit/verify")
    assert status == 200, body
    trail = await events(workload.tenant)
    assert body["data"] == {
        "ok": True,
        "events_checked": len(trail),
        "head_seq": len(trail),
        "head_hash": trail[-1]["hash"],
        "broken_seq": None,
        "reason": None,
        "detail": None,
    }


async def test_workload_recorded_every_action_in_order(workload: Workload) -> None:
    trail = await events(workload.tenant)
    assert [e["seq"] for e in trail] == list(range(1, len(trail) + 1))
    actions = [e["action"] for e in trail]
    assert actions[:4] == ["api_key.created"] * 3 + ["api_key.revoked"]
    assert actions.count("contact.deleted") == 3
    assert actions.count("contact.deletion_failed") == 1
    assert actions.count("deletion.requested") == 2  # bulk, single
    assert actions.count("deletion.dry_run") == 1  # no job, so no deletion.requested
    assert actions.count("deletion.completed") == 2
    assert all(e["workspace_id"] == str(workload.tenant.workspace_id) for e in trail)
    for before, after in itertools.pairwise(trail):
        assert after["prev_hash"] == before["hash"]
    assert tuple(trail[0]) == EVENT_FIELDS


# --- the events query ----------------------------------------------------------------------


async def test_action_filter_returns_only_that_action(workload: Workload) -> None:
    found = await events(workload.tenant, action="contact.deleted")
    assert {e["target"]["id"] for e in found} == {
        workload.deleted["id"],
        workload.plain["id"],
        workload.single["id"],
    }


async def test_an_unknown_action_is_400_listing_the_known_ones(workload: Workload) -> None:
    """A misspelt action ("deleted") must not answer an empty 200: "was anything deleted?"
    would read "no". The refusal names every action the service writes."""
    for wrong in ("deleted", "no.such.action", "CONTACT.DELETED"):
        status, body = await get(workload.tenant, "/v1/audit/events", action=wrong)
        assert status == 400, body
        (detail,) = body["error"]["details"]
        assert detail["field"] == "action"
        assert all(f"'{action}'" in detail["message"] for action in AUDIT_ACTIONS), detail
    status, body, _ = await workload.tenant.call(
        "POST", "/v1/audit/events/query", {"action": "deleted"}
    )
    assert status == 400, body


def test_the_console_offers_every_audit_action() -> None:
    """The console's action picker (a static list in audit.js) is the service's list."""
    script = (Path(console.__file__).parent / "static" / "audit.js").read_text()
    listed = re.search(r"const ACTIONS = \[(.*?)\];", script, re.S)
    assert listed is not None
    assert tuple(re.findall(r'"([^"]+)"', listed.group(1))) == AUDIT_ACTIONS


async def test_target_filter_returns_the_events_about_one_contact(workload: Workload) -> None:
    found = await events(workload.tenant, target_id=workload.refused["id"])
    assert [e["action"] for e in found] == ["contact.deletion_failed"]
    assert found[0]["data"]["code"] == "CANNOT_DELETE_CONTACT_WITH_BILLING_SUBSCRIPTION"
    assert found[0]["target"] == {"type": "contact", "id": workload.refused["id"]}


async def test_job_filter_returns_the_whole_story_of_a_job(workload: Workload) -> None:
    found = await events(workload.tenant, job_id=workload.job_id)
    actions = [e["action"] for e in found]
    assert actions[0] == "deletion.requested" and actions[-1] == "deletion.completed"
    assert sorted(actions[1:-1]) == [
        "contact.deleted",
        "contact.deleted",
        "contact.deletion_failed",
    ]
    assert {e["request_id"] for e in found} == {workload.request_id}
    assert found[0]["data"]["selector"] == {"type": "contact_ids", "count": 3}


async def test_a_job_id_in_another_uuid_spelling_finds_the_same_job(workload: Workload) -> None:
    """A job id that could never match (``123``) is a 400 (above); the same UUID in
    capitals or without hyphens is the same job."""
    spellings = (workload.job_id.upper(), uuid.UUID(workload.job_id).hex)
    expected = await events(workload.tenant, job_id=workload.job_id)
    for spelling in spellings:
        assert await events(workload.tenant, job_id=spelling) == expected, spelling


async def test_actor_filter_returns_what_one_key_did(workload: Workload) -> None:
    key_id = str(workload.tenant.key_id)
    everything = await events(workload.tenant)
    found = await events(workload.tenant, actor_id=key_id)
    assert found == [e for e in everything if e["actor"]["id"] == key_id]
    assert {e["action"] for e in found} >= {"deletion.requested", "contact.deleted"}
    assert all(e["actor"] == {"type": "api_key", "id": key_id} for e in found)
    system = await events(workload.tenant, actor_id="worker")
    assert [e["action"] for e in system] == ["deletion.completed", "deletion.completed"]


async def test_email_finds_the_deleted_contacts_event_by_its_keyed_hash(
    workload: Workload,
) -> None:
    address = workload.deleted["email"]
    for spelling in (address, address.upper(), f"  {address}  "):
        found = await events(workload.tenant, email=spelling)
        assert [(e["action"], e["target"]["id"]) for e in found] == [
            ("contact.deleted", workload.deleted["id"])
        ]
    assert found[0]["data"]["email_hmac"] != address
    assert await events(workload.tenant, email="never.seen@example.com") == []
    # A failed deletion keeps no hash: the address was not deleted.
    assert await events(workload.tenant, email=workload.refused["email"]) == []


async def test_since_is_inclusive_and_until_exclusive_on_occurred_at(workload: Workload) -> None:
    trail = await events(workload.tenant)
    middle = trail[len(trail) // 2]
    at = parse_time(middle["occurred_at"])
    later = [e for e in trail if e["occurred_at"] >= middle["occurred_at"]]
    earlier = [e for e in trail if e["occurred_at"] < middle["occurred_at"]]
    assert middle in later and middle not in earlier
    assert await events(workload.tenant, since=at.isoformat()) == later  # +00:00, URL-encoded
    assert await events(workload.tenant, since=middle["occurred_at"]) == later  # ...Z
    assert await events(workload.tenant, until=at.isoformat()) == earlier
    shifted = at.astimezone(timezone(timedelta(hours=2)))
    assert await events(workload.tenant, since=shifted.isoformat()) == later
    window = await events(
        workload.tenant,
        since=trail[1]["occurred_at"],
        until=(parse_time(trail[-1]["occurred_at"]) + timedelta(microseconds=1)).isoformat(),
    )
    assert window == [e for e in trail if e["occurred_at"] >= trail[1]["occurred_at"]]


async def test_limit_and_cursor_page_through_every_event_once(workload: Workload) -> None:
    everything = await events(workload.tenant)
    pages: list[list[int]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        status, body = await get(workload.tenant, "/v1/audit/events", **params)
        assert status == 200, body
        pages.append([e["seq"] for e in body["data"]])
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert [s for page in pages for s in page] == [e["seq"] for e in everything]
    assert all(len(page) == 2 for page in pages[:-1]) and 1 <= len(pages[-1]) <= 2
    status, body = await get(workload.tenant, "/v1/audit/events")
    assert len(body["data"]) == min(100, len(everything))  # the default limit


async def test_filters_and_paging_combine(workload: Workload) -> None:
    status, body = await get(workload.tenant, "/v1/audit/events", job_id=workload.job_id, limit=1)
    assert status == 200 and [e["action"] for e in body["data"]] == ["deletion.requested"]
    rest = await events(workload.tenant, job_id=workload.job_id, cursor=body["next_cursor"])
    assert len(rest) == 4 and rest[-1]["action"] == "deletion.completed"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"actor": "x"}, "actor"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2024-05-01T12:00:00"}, "since"),  # no offset: not an instant
        ({"since": "1714564800"}, "since"),  # a Unix time is not ISO-8601
        ({"until": "2024-13-01T00:00:00Z"}, "until"),
        ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, "until"),
        ({"email": "not-an-address"}, "email"),
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": encode_cursor({"after_seq": "3"})}, "cursor"),
        ({"cursor": encode_cursor({"after": 3})}, "cursor"),
        ({"action": ""}, "action"),
        ({"action": "deleted"}, "action"),
        ({"target_id": "x" * 201}, "target_id"),
        ({"job_id": "123"}, "job_id"),
        ({"job_id": "not-a-job"}, "job_id"),
    ],
)
async def test_bad_query_parameters_are_400_naming_the_parameter(
    workload: Workload, params: dict[str, str], field: str
) -> None:
    status, body = await get(workload.tenant, "/v1/audit/events", **params)
    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert field in {d["field"] for d in body["error"]["details"]}


async def test_an_unencoded_plus_in_the_email_parameter_says_to_send_it_as_2b(
    workload: Workload,
) -> None:
    """``?email=ada+crm@example.com`` arrives as "ada crm@…": the 400 says why."""
    status, body, _ = await workload.tenant.call(
        "GET", "/v1/audit/events?email=ada+crm@example.com"
    )
    assert status == 400, body
    (detail,) = body["error"]["details"]
    assert detail["field"] == "email" and "%2B" in detail["message"], detail
    assert "ada" not in json.dumps(body)  # the refusal does not echo the address


async def test_a_repeated_parameter_is_400(workload: Workload) -> None:
    status, body, _ = await workload.tenant.call(
        "GET", "/v1/audit/events?action=contact.deleted&action=deletion.requested"
    )
    assert status == 400
    assert [d["field"] for d in body["error"]["details"]] == ["action"]


@pytest.mark.parametrize(
    "path", ["/v1/audit/verify?deep=1", "/v1/audit/export?since=1", "/v1/audit/export?since_seq=0"]
)
async def test_other_endpoints_refuse_unknown_or_bad_parameters(
    workload: Workload, path: str
) -> None:
    status, body, _ = await workload.tenant.call("GET", path)
    assert status == 400, body
    assert body["error"]["code"] == "validation_error"


# --- the contact timeline ------------------------------------------------------------------


async def test_timeline_of_a_deleted_contact_shows_its_former_items_and_who_asked(
    workload: Workload,
) -> None:
    status, body = await get(
        workload.tenant, f"/v1/audit/contacts/{workload.deleted['id']}/timeline"
    )
    assert status == 200, body
    data = body["data"]
    assert data["contact_id"] == workload.deleted["id"]
    assert data["deleted"] is True
    assert data["deletion"]["action"] == "contact.deleted"
    assert data["deletion"]["target"] == {"type": "contact", "id": workload.deleted["id"]}
    assert data["requested_by"] == {
        "api_key_id": str(workload.tenant.key_id),
        "job_id": workload.job_id,
        "request_id": workload.request_id,
    }
    items = data["timeline"]
    assert [i["id"] for i in items] == [i["id"] for i in workload.timeline]  # newest first
    assert [i["kind"] for i in items] == ["task", "note", "activity", "activity"]
    assert all(i["contact_id"] is None for i in items)  # the back-reference is gone
    task, note, newer, old = items
    assert (task["title"], task["body"], task["status"]) == ("send contract", "v2", "open")
    assert note["body"] == "prefers mornings"
    assert (newer["subject"], newer["body"], newer["type"]) == ("Renewal", "called", "call")
    assert (old["subject"], old["occurred_at"]) == ("Welcome", "2024-01-01T10:00:00Z")
    preserved = data["deletion"]["data"]["preserved_timeline"]
    assert {k: len(v) for k, v in preserved.items()} == {"activities": 2, "notes": 1, "tasks": 1}


async def test_timeline_of_a_deleted_contact_without_items_is_empty(workload: Workload) -> None:
    status, body = await get(workload.tenant, f"/v1/audit/contacts/{workload.plain['id']}/timeline")
    assert status == 200, body
    assert body["data"]["deleted"] is True and body["data"]["timeline"] == []
    status, body = await get(
        workload.tenant, f"/v1/audit/contacts/{workload.single['id']}/timeline"
    )
    assert body["data"]["requested_by"]["job_id"] == workload.single_job_id


async def test_timeline_of_a_contact_still_there_says_not_deleted(workload: Workload) -> None:
    """The billing contact's deletion failed: it is live, with an event but no deletion."""
    status, body = await get(
        workload.tenant, f"/v1/audit/contacts/{workload.refused['id']}/timeline"
    )
    assert status == 200, body
    assert body["data"] == {
        "contact_id": workload.refused["id"],
        "deleted": False,
        "deletion": None,
        "requested_by": None,
        "timeline": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize("limit", [1, 3, 4])
async def test_a_deleted_contacts_timeline_comes_in_pages_the_event_on_the_first(
    workload: Workload, limit: int
) -> None:
    """Like every listing: ``limit`` items after ``cursor``, newest first, ``next_cursor``
    while more follow; the deletion event (which names every item) on the first page only."""
    path = f"/v1/audit/contacts/{workload.deleted['id']}/timeline"
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, body = await get(workload.tenant, path + query)
        assert status == 200, body
        pages.append(body["data"])
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "the cursor does not move"

    assert [len(p["timeline"]) for p in pages[:-1]] == [limit] * (len(pages) - 1)
    ids = [i["id"] for p in pages for i in p["timeline"]]
    assert ids == [i["id"] for i in workload.timeline]
    assert pages[0]["deletion"]["action"] == "contact.deleted"
    assert all(p["deletion"] is None and p["deleted"] is True for p in pages[1:])
    assert all(p["requested_by"] == pages[0]["requested_by"] for p in pages)


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "cursor=nonsense", "after=1"])
async def test_a_bad_page_of_a_timeline_is_a_400(workload: Workload, query: str) -> None:
    path = f"/v1/audit/contacts/{workload.deleted['id']}/timeline?{query}"
    status, body = await get(workload.tenant, path)
    assert status == 400, body
    assert body["error"]["code"] == "validation_error"


@pytest.mark.parametrize("contact", ["unknown", "malformed"])
async def test_timeline_of_a_contact_never_had_is_404(workload: Workload, contact: str) -> None:
    cid = str(uuid.uuid4()) if contact == "unknown" else "not-a-uuid"
    status, body = await get(workload.tenant, f"/v1/audit/contacts/{cid}/timeline")
    assert status == 404, body
    assert body["error"]["code"] == "not_found"


# --- another workspace ---------------------------------------------------------------------


async def test_another_workspace_sees_none_of_it(workload: Workload) -> None:
    other = workload.other
    mine = await events(workload.tenant)
    theirs = await events(other)
    assert {e["id"] for e in mine}.isdisjoint(e["id"] for e in theirs)
    assert all(e["workspace_id"] == str(other.workspace_id) for e in theirs)
    assert [e["seq"] for e in theirs] == list(range(1, len(theirs) + 1))
    for cid in (workload.deleted["id"], workload.refused["id"]):
        status, _ = await get(other, f"/v1/audit/contacts/{cid}/timeline")
        assert status == 404
        assert await events(other, target_id=cid) == []
    assert await events(other, job_id=workload.job_id) == []
    assert await events(other, actor_id=str(workload.tenant.key_id)) == []
    # The same address is a live contact there: nothing was deleted under it.
    assert await events(other, email=workload.deleted["email"]) == []
    found = await events(other, email=workload.other_deleted["email"])
    assert [e["action"] for e in found] == ["contact.deleted"]
    assert await events(workload.tenant, email=workload.other_deleted["email"]) == []


async def test_each_workspace_verifies_its_own_chain(workload: Workload) -> None:
    theirs = await events(workload.other)
    status, body = await get(workload.other, "/v1/audit/verify")
    assert status == 200
    assert body["data"]["ok"] is True
    assert body["data"]["events_checked"] == len(theirs)
    assert body["data"]["head_hash"] == theirs[-1]["hash"]
    status, mine = await get(workload.tenant, "/v1/audit/verify")
    assert mine["data"]["head_hash"] != body["data"]["head_hash"]


# --- export --------------------------------------------------------------------------------


async def test_export_streams_ndjson_that_verifies_offline(
    workload: Workload, tmp_path: Path
) -> None:
    status, content_type, body = await export_bytes(workload.tenant)
    assert status == 200
    assert content_type == "application/x-ndjson"
    path = tmp_path / "audit.ndjson"
    path.write_bytes(body)
    result = verify_export(path)
    trail = await events(workload.tenant)
    assert result.ok, result
    assert (result.events_checked, result.head_seq, result.head_hash) == (
        len(trail),
        len(trail),
        trail[-1]["hash"],
    )
    lines = body.splitlines()
    assert [json.loads(line) for line in lines] == trail


async def test_export_since_seq_starts_there_and_still_verifies(
    workload: Workload, tmp_path: Path
) -> None:
    trail = await events(workload.tenant)
    status, _, body = await export_bytes(workload.tenant, since_seq=5)
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines == trail[4:]
    path = tmp_path / "tail.ndjson"
    path.write_bytes(body)
    result = verify_export(path)
    assert result.ok and result.head_hash == trail[-1]["hash"]
    status, _, body = await export_bytes(workload.tenant, since_seq=len(trail) + 1)
    assert (status, body) == (200, b"")


async def test_export_is_chunked_and_carries_the_request_id(workload: Workload) -> None:
    headers = {"Authorization": f"Bearer {workload.tenant.key}", "X-Request-ID": "export-1"}
    async with workload.tenant.http.get(
        workload.tenant.url("/v1/audit/export"), headers=headers
    ) as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert response.headers["X-Request-ID"] == "export-1"
        await response.read()


# --- scope ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", AUDIT_PATHS)
async def test_a_key_without_audit_read_is_403(workload: Workload, path: str) -> None:
    status, body, _ = await workload.reader.call("GET", path)
    assert status == 403, body
    assert body["error"]["code"] == "insufficient_permissions"
    assert body["error"]["details"] == {"required_scope": "audit:read"}


async def test_the_revoked_key_is_in_the_trail(workload: Workload) -> None:
    found = await events(workload.tenant, target_id=workload.revoked_key_id)
    assert [e["action"] for e in found] == ["api_key.created", "api_key.revoked"]
    assert found[0]["data"] == {"scopes": ["contacts:read"]}


# --- memory --------------------------------------------------------------------------------

EXPORT_EVENTS = 100_000
BATCH = 5_000


@pytest.fixture
async def big_chain(tmp_path: Path) -> AsyncIterator[Tenant]:
    """A workspace with 100,000 events (~1 KB each), in a SQLite database of its own.

    SQLite only, to stay within a minute: the same append takes longer on PostgreSQL,
    and the streaming code is the same on both. Its own database keeps the shared one
    (walked whole by the CLI tests) small.
    """
    url = f"sqlite+aiosqlite:///{tmp_path / 'big.db'}"
    await upgrade(url)
    services = Services(settings=make_settings(url), db=Database(url))
    server = TestServer(audit_app(services), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            base = str(server.make_url("")).rstrip("/")
            tenant = await _tenant(services, base, http, f"big-{uuid.uuid4().hex[:8]}")
            padding = "x" * 800
            for start in range(0, EXPORT_EVENTS, BATCH):
                records = [
                    AuditRecord(
                        workspace_id=tenant.workspace_id,
                        actor={"type": "system", "id": "bench"},
                        action="contact.deleted",
                        target={"type": "contact", "id": str(uuid.uuid4())},
                        data={"n": start + n, "padding": padding},
                    )
                    for n in range(BATCH)
                ]
                async with services.db.begin() as conn:
                    await append_events(conn, services.db, records)
            yield tenant
    finally:
        await server.close()
        await services.close()


@pytest.mark.slow
async def test_export_of_100k_events_streams_in_flat_memory(big_chain: Tenant) -> None:
    """~100 MB of export while the process never holds more than a few pages of it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        total = lines = 0
        headers = {"Authorization": f"Bearer {big_chain.key}"}
        async with big_chain.http.get(
            big_chain.url("/v1/audit/export"), headers=headers
        ) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(64 * 1024):
                total += len(chunk)
                lines += chunk.count(b"\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == EXPORT_EVENTS + 1  # and the key's api_key.created
    assert total > 80 * 2**20
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.1f} MiB for {total / 2**20:.0f} MiB"


# --- the lookup without the address in the URL, and the export's headers ----------------------


async def post_query(tenant: Tenant, **body: Any) -> tuple[int, Any]:
    status, answer, _ = await tenant.call("POST", "/v1/audit/events/query", body)
    return status, answer


@pytest.mark.parametrize(
    "field", ["email", "target_id", "job_id", "action", "actor_id", "since", "until"]
)
async def test_null_for_a_filter_is_a_400_not_every_event(workload: Workload, field: str) -> None:
    """``{"email": null}`` answered every event, as if no filter had been sent: "was this
    address deleted?" asked with an empty variable read "yes, here are the events"."""
    status, body = await post_query(workload.tenant, **{field: None})
    assert status == 400, body
    assert [d["field"] for d in body["error"]["details"]] == [field]
    assert "null" in body["error"]["details"][0]["message"]


async def test_post_query_answers_like_get_and_keeps_the_address_out_of_the_url(
    workload: Workload,
) -> None:
    """POST /v1/audit/events/query takes the GET filters in a JSON body: same answer, and
    an address with `+` needs no URL-encoding."""
    address = workload.deleted["email"]
    status, body = await post_query(workload.tenant, email=address.upper())
    assert status == 200, body
    assert [(e["action"], e["target"]["id"]) for e in body["data"]] == [
        ("contact.deleted", workload.deleted["id"])
    ]
    for filters in (
        {"action": "contact.deleted"},
        {"job_id": workload.job_id},
        {"target_id": workload.deleted["id"]},
    ):
        status, posted = await post_query(workload.tenant, **filters, limit=1000)
        assert status == 200, posted
        assert posted["data"] == await events(workload.tenant, **filters), filters
    status, body = await post_query(workload.tenant, email="ada+crm@example.com")
    assert (status, body["data"]) == (200, [])

    status, first = await post_query(workload.tenant, limit=2)
    assert status == 200 and len(first["data"]) == 2 and first["next_cursor"]
    status, second = await post_query(workload.tenant, limit=2, cursor=first["next_cursor"])
    assert status == 200, second
    assert second["data"][0]["seq"] == first["data"][-1]["seq"] + 1


async def test_post_query_refuses_bad_fields_and_needs_audit_read(workload: Workload) -> None:
    for body, name in (
        ({"email": "not-an-address"}, "email"),
        ({"limit": 0}, "limit"),
        ({"since": "yesterday"}, "since"),
        ({"colour": "red"}, "colour"),
    ):
        status, answer = await post_query(workload.tenant, **body)
        assert status == 400, (body, answer)
        assert name in {d["field"] for d in answer["error"]["details"]}, answer
    status, answer = await post_query(workload.reader, action="contact.deleted")
    assert (status, answer["error"]["code"]) == (403, "insufficient_permissions")


async def test_export_carries_the_rate_limit_headers_like_every_authenticated_answer(
    workload: Workload,
) -> None:
    headers = {"Authorization": f"Bearer {workload.tenant.key}"}
    async with workload.tenant.http.get(
        workload.tenant.url("/v1/audit/export"), headers=headers
    ) as response:
        await response.read()
        assert response.status == 200
        for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            assert response.headers.get(name), name
        assert response.headers["X-Request-ID"]
