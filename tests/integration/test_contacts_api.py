"""The contacts API over HTTP, on SQLite and PostgreSQL: create, read, query, timeline."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from service.app import Services
from service.contacts.store import timeline_items
from service.db import notes
from service.pagination import encode_cursor
from tests.conftest import Tenant


def assert_error(body: Any, code: str) -> dict[str, Any]:
    """The error of an envelope, which always has code, message and details."""
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def fields_named(error: dict[str, Any]) -> set[str]:
    return {d["field"] for d in error["details"]}


_NO_SEARCH_WORDS = str.maketrans("0123456789abcdef", "ghijklmnopqrstuv")


async def create(tenant: Tenant, **fields: Any) -> dict[str, Any]:
    # Letters g-v only: a random local part never contains a name a test searches for
    # (hex did: "ada" in one email in a few hundred made a search test fail by chance).
    local = uuid.uuid4().hex[:10].translate(_NO_SEARCH_WORDS)
    body = {"email": f"{local}@example.com", **fields}
    status, answer, _ = await tenant.call("POST", "/v1/contacts", json=body)
    assert status == 201, answer
    contact: dict[str, Any] = answer["data"]
    return contact


async def query(tenant: Tenant, **body: Any) -> tuple[int, Any]:
    status, answer, _ = await tenant.call("POST", "/v1/contacts/query", json=body)
    return status, answer


async def matching_ids(tenant: Tenant, **body: Any) -> set[str]:
    status, answer = await query(tenant, **body)
    assert status == 200, answer
    return {c["id"] for c in answer["data"]}


# --- create and read ----------------------------------------------------------------------


async def test_create_returns_201_with_an_id_and_the_email_lowercased(tenant: Tenant) -> None:
    status, body, _ = await tenant.call(
        "POST",
        "/v1/contacts",
        json={
            "email": "  Ada.Lovelace@Example.COM ",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "phone": "+44 20 7946 0000",
            "member_role": "owner",
            "properties": {"source": "import"},
        },
    )

    assert status == 201
    contact = body["data"]
    uuid.UUID(contact["id"])
    assert contact["email"] == "ada.lovelace@example.com"
    assert contact["first_name"] == "Ada"
    assert contact["member_role"] == "owner"
    assert contact["properties"] == {"source": "import"}
    assert contact["has_billing_subscription"] is False
    assert contact["created_at"].endswith("Z")


async def test_create_without_email_is_a_400_naming_email(tenant: Tenant) -> None:
    status, body, _ = await tenant.call("POST", "/v1/contacts", json={"first_name": "Ada"})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"email"}


async def test_create_with_a_bad_email_is_a_400_naming_email(tenant: Tenant) -> None:
    status, body, _ = await tenant.call("POST", "/v1/contacts", json={"email": "not-an-email"})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"email"}


async def test_create_with_an_unknown_field_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts", json={"email": "a@example.com", "nickname": "Ace"}
    )

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"nickname"}


async def test_create_with_a_bad_member_role_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts", json={"email": "a@example.com", "member_role": "admin"}
    )

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"member_role"}


async def test_get_returns_the_created_contact(tenant: Tenant) -> None:
    created = await create(tenant, first_name="Grace", has_billing_subscription=True)

    status, body, _ = await tenant.call("GET", f"/v1/contacts/{created['id']}")

    assert status == 200
    assert body["data"] == created


async def test_another_workspaces_contact_is_404_exactly_like_a_missing_one(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = await create(other_tenant)

    status, body, _ = await tenant.call("GET", f"/v1/contacts/{theirs['id']}")
    missing_status, missing_body, _ = await tenant.call("GET", f"/v1/contacts/{uuid.uuid4()}")

    assert (status, missing_status) == (404, 404)
    assert_error(body, "not_found")
    assert body == missing_body


async def test_a_malformed_contact_id_is_404_not_500(tenant: Tenant) -> None:
    for bad in ("not-a-uuid", "123", "%27%20OR%201=1"):
        status, body, _ = await tenant.call("GET", f"/v1/contacts/{bad}")

        assert status == 404, bad
        assert_error(body, "not_found")


# --- query --------------------------------------------------------------------------------


async def test_query_filters_by_equality_in_starts_with_and_or(tenant: Tenant) -> None:
    smith = await create(tenant, first_name="Ann", last_name="Smith")
    smythe = await create(tenant, first_name="Bob", last_name="Smythe")
    jones = await create(tenant, first_name="Cid", last_name="Jones", email="CID@Jones.io")

    assert await matching_ids(tenant, filter={"last_name": "Smith"}) == {smith["id"]}
    assert await matching_ids(tenant, filter={"last_name": {"$eq": "Jones"}}) == {jones["id"]}
    assert await matching_ids(
        tenant, filter={"email": {"$in": [smythe["email"].upper(), "cid@jones.io"]}}
    ) == {smythe["id"], jones["id"]}
    assert await matching_ids(tenant, filter={"last_name": {"$startsWith": "Sm"}}) == {
        smith["id"],
        smythe["id"],
    }
    assert await matching_ids(
        tenant, filter={"$or": [{"first_name": "Ann"}, {"last_name": "Jones"}]}
    ) == {smith["id"], jones["id"]}
    assert await matching_ids(tenant, filter={"last_name": {"$ne": "Smith"}}) == {
        smythe["id"],
        jones["id"],
    }


async def test_query_filters_on_exists(tenant: Tenant) -> None:
    with_phone = await create(tenant, phone="555-0100")
    without_phone = await create(tenant)

    assert await matching_ids(tenant, filter={"phone": {"$exists": True}}) == {with_phone["id"]}
    assert await matching_ids(tenant, filter={"phone": {"$exists": False}}) == {without_phone["id"]}


async def test_query_filters_on_created_at(tenant: Tenant) -> None:
    made = []
    for _ in range(4):
        made.append(await create(tenant))
        await asyncio.sleep(0.01)  # distinct timestamps on every backend
    pivot = made[1]["created_at"]

    later = await matching_ids(tenant, filter={"created_at": {"$gt": pivot}})
    earlier = await matching_ids(tenant, filter={"created_at": {"$lt": pivot}})

    assert later == {made[2]["id"], made[3]["id"]}
    assert earlier == {made[0]["id"]}


async def test_search_is_a_case_insensitive_substring_over_name_email_and_phone(
    tenant: Tenant,
) -> None:
    by_name = await create(tenant, first_name="Marguerite", last_name="Yourcenar")
    by_email = await create(tenant, email="Hadrian.Memoirs@Example.com")
    by_phone = await create(tenant, phone="+33 1 555 0199")
    await create(tenant, first_name="Nobody")

    assert await matching_ids(tenant, search="YOURCEN") == {by_name["id"]}
    assert await matching_ids(tenant, search="guer") == {by_name["id"]}
    assert await matching_ids(tenant, search="hadrian.MEM") == {by_email["id"]}
    assert await matching_ids(tenant, search="555 0199") == {by_phone["id"]}
    assert await matching_ids(tenant, search="100%") == set()


async def test_search_and_filter_must_both_match(tenant: Tenant) -> None:
    wanted = await create(tenant, first_name="Ada", last_name="Smith")
    await create(tenant, first_name="Ada", last_name="Jones")
    await create(tenant, first_name="Bea", last_name="Smith")

    assert await matching_ids(tenant, filter={"last_name": "Smith"}, search="ada") == {wanted["id"]}


async def test_pagination_walks_every_contact_once(tenant: Tenant) -> None:
    created = {(await create(tenant))["id"] for _ in range(5)}
    seen: list[str] = []
    page_sizes = []
    cursor = None

    for _ in range(10):
        body: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            body["cursor"] = cursor
        status, answer = await query(tenant, **body)
        assert status == 200, answer
        page_sizes.append(len(answer["data"]))
        seen.extend(c["id"] for c in answer["data"])
        cursor = answer["next_cursor"]
        if cursor is None:
            break

    assert page_sizes == [2, 2, 1]
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == created


async def test_a_bad_cursor_is_a_400_naming_the_cursor(tenant: Tenant) -> None:
    await create(tenant)
    bad_cursors = [
        "garbage!",
        "eyJub3QiOiJhIGN1cnNvciJ9",  # valid base64 of JSON without the position
        encode_cursor({"before": str(uuid.uuid4())}),
    ]

    for cursor in bad_cursors:
        status, body = await query(tenant, cursor=cursor)

        assert status == 400, (cursor, body)
        assert fields_named(assert_error(body, "validation_error")) == {"cursor"}


async def test_a_cursor_with_a_malformed_position_is_a_400_not_a_500(tenant: Tenant) -> None:
    for position in ("not-a-uuid", 42, None):
        status, body = await query(tenant, cursor=encode_cursor({"after": position}))

        assert status == 400, (position, body)
        assert fields_named(assert_error(body, "validation_error")) == {"cursor"}


async def test_an_unknown_filter_field_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body = await query(tenant, filter={"$or": [{"last_name": "A"}, {"nickname": "B"}]})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"filter.$or[1].nickname"}


async def test_an_unknown_filter_operator_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body = await query(tenant, filter={"email": {"$regex": ".*"}})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"filter.email.$regex"}


async def test_a_bad_filter_value_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body = await query(tenant, filter={"id": {"$in": ["nope"]}})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"filter.id.$in[0]"}


async def test_an_unknown_query_field_is_a_400_naming_it(tenant: Tenant) -> None:
    status, body = await query(tenant, filters={"last_name": "A"})

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"filters"}


async def test_query_sees_only_the_callers_workspace(tenant: Tenant, other_tenant: Tenant) -> None:
    mine = await create(tenant, last_name="Shared")
    theirs = await create(other_tenant, last_name="Shared")

    assert await matching_ids(tenant, filter={"last_name": "Shared"}) == {mine["id"]}
    assert await matching_ids(tenant) == {mine["id"]}
    assert await matching_ids(tenant, filter={"id": theirs["id"]}) == set()
    assert await matching_ids(tenant, search=theirs["email"]) == set()
    assert await matching_ids(other_tenant) == {theirs["id"]}


# --- timeline -----------------------------------------------------------------------------


async def test_activities_notes_and_tasks_are_created_with_id_and_kind(tenant: Tenant) -> None:
    contact = await create(tenant)
    base = f"/v1/contacts/{contact['id']}"
    posts = [
        ("activities", {"type": "call", "subject": "Intro call"}, "activity"),
        ("notes", {"body": "Prefers email"}, "note"),
        ("tasks", {"title": "Send the contract", "due_at": "2030-01-01T09:00:00Z"}, "task"),
    ]

    for path, body, kind in posts:
        status, answer, _ = await tenant.call("POST", f"{base}/{path}", json=body)

        assert status == 201, answer
        uuid.UUID(answer["data"]["id"])
        assert answer["data"]["kind"] == kind
        assert answer["data"]["contact_id"] == contact["id"]


async def test_a_timeline_item_with_an_unknown_field_is_a_400(tenant: Tenant) -> None:
    contact = await create(tenant)

    status, body, _ = await tenant.call(
        "POST", f"/v1/contacts/{contact['id']}/notes", json={"body": "x", "pinned": True}
    )

    assert status == 400
    assert fields_named(assert_error(body, "validation_error")) == {"pinned"}


async def test_timeline_items_for_an_unknown_contact_are_404(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    theirs = await create(other_tenant)
    targets = [str(uuid.uuid4()), theirs["id"], "not-a-uuid"]
    posts = [("activities", {"type": "call"}), ("notes", {"body": "x"}), ("tasks", {"title": "t"})]

    for target in targets:
        for path, body in posts:
            status, answer, _ = await tenant.call(
                "POST", f"/v1/contacts/{target}/{path}", json=body
            )

            assert status == 404, (target, path, answer)
            assert_error(answer, "not_found")
        status, answer, _ = await tenant.call("GET", f"/v1/contacts/{target}/timeline")
        assert status == 404
        assert_error(answer, "not_found")


async def test_timeline_lists_the_contacts_items_newest_first_with_kinds(
    tenant: Tenant,
) -> None:
    contact = await create(tenant)
    other = await create(tenant)
    base = f"/v1/contacts/{contact['id']}"
    made = []
    for path, body in [
        ("activities", {"type": "email", "subject": "Hello"}),
        ("notes", {"body": "Met at the fair"}),
        ("tasks", {"title": "Follow up"}),
    ]:
        status, answer, _ = await tenant.call("POST", f"{base}/{path}", json=body)
        assert status == 201
        made.append(answer["data"])
        await asyncio.sleep(0.01)
    await tenant.call("POST", f"/v1/contacts/{other['id']}/notes", json={"body": "not mine"})

    status, body, _ = await tenant.call("GET", f"{base}/timeline")

    assert status == 200
    items = body["data"]  # a page like every listing: {"data": [...], "next_cursor"}
    assert body["next_cursor"] is None
    assert [(i["id"], i["kind"]) for i in items] == [
        (made[2]["id"], "task"),
        (made[1]["id"], "note"),
        (made[0]["id"], "activity"),
    ]


async def test_an_activity_sorts_by_when_it_occurred(tenant: Tenant) -> None:
    contact = await create(tenant)
    base = f"/v1/contacts/{contact['id']}"
    _, note, _ = await tenant.call("POST", f"{base}/notes", json={"body": "today"})
    _, old, _ = await tenant.call(
        "POST",
        f"{base}/activities",
        json={"type": "meeting", "occurred_at": "2001-02-03T04:05:06Z"},
    )

    status, body, _ = await tenant.call("GET", f"{base}/timeline")

    assert status == 200
    assert [i["id"] for i in body["data"]] == [note["data"]["id"], old["data"]["id"]]


async def test_the_timeline_comes_a_page_at_a_time_even_through_ties(tenant: Tenant) -> None:
    """A contact with 33,000 notes answered 5.8 MB at once: the timeline is paged like
    every listing (limit, cursor), newest first, each item once, ties in time (three
    activities at one instant) broken by id across pages."""
    contact = await create(tenant)
    base = f"/v1/contacts/{contact['id']}"
    same = {"type": "call", "occurred_at": "2020-01-01T00:00:00Z"}
    for _ in range(3):
        await tenant.call("POST", f"{base}/activities", json=same)
    for n in range(3):
        await tenant.call("POST", f"{base}/notes", json={"body": f"note {n}"})
    status, whole, _ = await tenant.call("GET", f"{base}/timeline?limit=500")
    assert status == 200 and whole["next_cursor"] is None, whole
    everything = [i["id"] for i in whole["data"]]
    assert len(everything) == 6

    paged: list[str] = []
    cursor = ""
    while True:
        status, body, _ = await tenant.call("GET", f"{base}/timeline?limit=2{cursor}")
        assert status == 200, body
        paged += [i["id"] for i in body["data"]]
        if body["next_cursor"] is None:
            break
        cursor = f"&cursor={body['next_cursor']}"
    assert paged == everything
    status, body, _ = await tenant.call("GET", f"{base}/timeline?limit=501")
    assert status == 400, body


async def test_tens_of_thousands_of_items_are_read_by_id_in_bounded_statements(
    services: Services, tenant: Tenant
) -> None:
    """A deleted contact's audit timeline reads its items by the ids its deletion event
    names: 33,000 of them in one IN list is over PostgreSQL's 32,767 bound parameters (a
    500). They are read a bounded number at a time, every one of them."""
    contact = await create(tenant)
    now = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(33_000)]
    rows = [
        {
            "id": i,
            "workspace_id": tenant.workspace_id,
            "contact_id": uuid.UUID(contact["id"]),
            "body": "n",
            "created_at": now,
        }
        for i in ids
    ]
    async with services.db.begin() as conn:
        await conn.execute(notes.insert(), rows)

    items = await timeline_items(services.db, tenant.workspace_id, ids={"note": ids})
    assert len(items) == len(ids)
    assert {i["id"] for i in items} == {str(i) for i in ids}


# --- list, and the addresses a CRM holds ------------------------------------------------------


async def test_list_contacts_pages_every_contact_of_the_workspace_once(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """GET /v1/contacts?limit=&cursor=: the same page shape as the other listings."""
    created = {(await create(tenant))["id"] for _ in range(5)}
    await create(other_tenant)
    seen: list[str] = []
    sizes = []
    path = "/v1/contacts?limit=2"
    while True:
        status, answer, _ = await tenant.call("GET", path)
        assert status == 200, answer
        assert set(answer) == {"data", "next_cursor"}
        sizes.append(len(answer["data"]))
        seen.extend(c["id"] for c in answer["data"])
        if answer["next_cursor"] is None:
            break
        path = f"/v1/contacts?limit=2&cursor={answer['next_cursor']}"
        assert len(sizes) < 10
    assert sizes == [2, 2, 1]
    assert seen == sorted(seen) and set(seen) == created


async def test_list_contacts_refuses_a_bad_limit_cursor_or_parameter(tenant: Tenant) -> None:
    for query, field in (
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=nope", "cursor"),
        ("email=a@example.com", "email"),
    ):
        status, body, _ = await tenant.call("GET", f"/v1/contacts?{query}")
        assert status == 400, (query, body)
        assert field in fields_named(assert_error(body, "validation_error")), query


async def test_addresses_on_special_use_names_are_accepted_and_deletable(
    tenant: Tenant,
) -> None:
    """A CRM holds addresses such as bulk1@load.test or a@host.local: they are valid
    syntax, so they are accepted (lowercased), found by emails, and deleted."""
    addresses = ["Bulk1@Load.TEST", "printer@office.local", "old@shop.invalid", "x@host.onion"]
    made = [await create(tenant, email=a) for a in addresses]
    assert [c["email"] for c in made] == [a.lower() for a in addresses]
    status, answer, _ = await tenant.call(
        "POST",
        "/v1/contacts/bulk-delete",
        json={"emails": [a.lower() for a in addresses], "dry_run": True},
    )
    assert status == 200, answer
    assert answer["data"]["would_delete_count"] == len(addresses)
    assert answer["data"]["contact_ids"] == sorted(c["id"] for c in made)


async def test_still_refused_what_is_not_an_address(tenant: Tenant) -> None:
    for bad in ("a@b@c.test", "no-at-sign.test", "a@nodot", "a b@example.com", "@example.com"):
        status, body, _ = await tenant.call("POST", "/v1/contacts", json={"email": bad})
        assert status == 400, (bad, body)
        assert fields_named(assert_error(body, "validation_error")) == {"email"}
