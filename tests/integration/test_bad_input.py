"""Bad input never crashes, wedges or widens a deletion (issue 9), on SQLite and PostgreSQL.

One test (or a parametrized family) per kind of fault: limits at the edge, selectors that
match everything in disguise, Unicode search, integer and cursor ranges, nullable PATCH
fields, storable text, 404/400/405 where other routes give them, and SSRF at creation.
Runs against the API alone (no broker): everything here is refused before any job exists.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from service.app import Services
from service.contacts.models import ContactCreate
from service.contacts.store import create_contact
from service.limits import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    MAX_JSON_DEPTH,
)
from service.schemas import openapi_spec
from tests.conftest import Tenant, make_settings, new_tenant, opened_services

BULK = "/v1/contacts/bulk-delete"
QUERY = "/v1/contacts/query"
DRY = {"dry_run": True}


def would_delete(dry_run: Any) -> int:
    """A dry run's count of contacts it would delete (in either answer shape)."""
    data = dry_run["data"]
    count: int = data.get("would_delete_count", data.get("total_requested"))
    return count


def assert_limit(status: int, body: Any, limit: str) -> None:
    """A 400 validation_error whose details name `limit`."""
    assert status == 400, body
    assert body["error"]["code"] == "validation_error", body
    assert any(d.get("limit") == limit for d in body["error"]["details"]), body


async def seed(services: Services, tenant: Tenant, **fields: Any) -> str:
    values = {"email": f"{uuid.uuid4().hex[:12]}@example.com", **fields}
    contact = await create_contact(services.db, tenant.workspace_id, ContactCreate(**values))
    contact_id: str = contact["id"]
    return contact_id


async def raw_post(tenant: Tenant, path: str, body: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"}
    async with tenant.http.post(tenant.url(path), data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


# --- 1. a filter that matches everything in disguise ----------------------------------------

MATCH_EVERYTHING = [
    {"$or": [{}]},
    {"$and": [{}]},
    {"$and": [{}, {"$or": [{}, {"last_name": "x"}]}]},
    {"$or": [{"phone": {"$exists": True}}, {"phone": {"$exists": False}}]},
    {"$or": [{"email": "a@example.com"}, {"email": {"$ne": "a@example.com"}}]},
    {"$or": [{"last_name": {"$ne": "a"}}, {"last_name": {"$ne": "b"}}]},
    {"$or": [{"first_name": {"$ne": "Ada"}}, {"first_name": {"$startsWith": "Ad"}}]},
    {
        "$or": [
            {"created_at": {"$gt": "2020-01-01T00:00:00Z"}},
            {"created_at": {"$lt": "2030-01-01T00:00:00Z"}},
        ]
    },
]


@pytest.mark.parametrize("filter_", MATCH_EVERYTHING)
@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_filter_that_matches_everything_is_refused_dry_or_real(
    services: Services, tenant: Tenant, filter_: dict[str, Any], dry_run: bool
) -> None:
    await seed(services, tenant, last_name="Lovelace")

    status, body, _ = await tenant.call(
        "POST", BULK, {"filter": filter_, "dry_run": dry_run}, {"Prefer": "wait=5"}
    )

    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert "match_all" in body["error"]["details"][0]["message"]
    status, contacts, _ = await tenant.call("POST", QUERY, {})
    assert len(contacts["data"]) == 1  # nothing was deleted
    status, jobs, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert jobs["data"] == []


# Selections that match every contact because of the data, not the filter's form: no
# simplification can see them, so the service counts (same rule for dry and real runs).
EVERYTHING_HERE = [
    {"search": "@"},
    {"search": "example"},
    {"filter": {"created_at": {"$gt": "1970-01-01T00:00:00Z"}}},
    {"filter": {"email": {"$startsWith": "every"}}},
    {"filter": {"last_name": "Lovelace"}},
    {"filter": {"$or": [{"last_name": "Lovelace"}, {"phone": {"$exists": True}}]}},
    {"filter": {"last_name": "Lovelace"}, "search": "every"},
]


@pytest.mark.parametrize("selector", EVERYTHING_HERE)
@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_selection_that_happens_to_match_every_contact_is_refused(
    services: Services, tenant: Tenant, selector: dict[str, Any], dry_run: bool
) -> None:
    for n in range(3):
        await seed(
            services,
            tenant,
            email=f"every{n}.{uuid.uuid4().hex[:6]}@example.com",
            last_name="Lovelace",
        )

    status, body, _ = await tenant.call(
        "POST", BULK, {**selector, "dry_run": dry_run}, {"Prefer": "wait=5"}
    )

    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert "match_all" in body["error"]["details"][0]["message"]
    status, contacts, _ = await tenant.call("POST", QUERY, {})
    assert len(contacts["data"]) == 3  # nothing was deleted
    status, jobs, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert jobs["data"] == []
    # The explicit opt-in is honoured whatever the data.
    status, body, _ = await tenant.call("POST", BULK, {**selector, "match_all": True, **DRY})
    assert (status, would_delete(body)) == (200, 3), body


async def test_the_same_selection_with_a_contact_it_leaves_is_a_deletion(
    services: Services, tenant: Tenant
) -> None:
    for _ in range(3):
        await seed(services, tenant, last_name="Lovelace")
    await seed(services, tenant, last_name="Other")  # not selected

    status, body, _ = await tenant.call("POST", BULK, {"filter": {"last_name": "Lovelace"}, **DRY})

    assert status == 200, body
    assert would_delete(body) == 3


async def test_match_all_is_the_explicit_opt_in_and_only_with_filter_or_search(
    services: Services, tenant: Tenant
) -> None:
    ids = {await seed(services, tenant) for _ in range(3)}

    alone = await tenant.call("POST", BULK, {"match_all": True, **DRY})
    with_filter = await tenant.call(
        "POST", BULK, {"filter": {"$or": [{}]}, "match_all": True, **DRY}
    )
    with_ids = await tenant.call("POST", BULK, {"contact_ids": list(ids), "match_all": True})

    for status, body, _ in (alone, with_filter):
        assert status == 200, body
        assert would_delete(body) == len(ids)
    assert with_ids[0] == 400
    assert with_ids[1]["error"]["details"][0]["field"] == "match_all"


async def test_a_narrow_filter_is_still_accepted(services: Services, tenant: Tenant) -> None:
    await seed(services, tenant, last_name="Lovelace")
    await seed(services, tenant, last_name="Hopper")

    status, body, _ = await tenant.call("POST", BULK, {"filter": {"last_name": "Hopper"}, **DRY})

    assert status == 200, body
    assert would_delete(body) == 1


# --- 2. a wide filter is refused at the edge, on every route that takes one ----------------


def wide_filter() -> dict[str, Any]:
    """The issue's filter: branches of a 1,000-value $in (about 0.8 MB, under the body limit)."""
    return {"$or": [{"email": {"$in": ["a"] * MAX_IN_VALUES}} for _ in range(200)]}


@pytest.mark.parametrize(
    ("path", "extra"),
    [(BULK, {}), (BULK, DRY), (QUERY, {"limit": 1})],
    ids=["bulk-delete", "dry-run", "query"],
)
async def test_a_filter_binding_too_many_values_is_a_400_naming_the_limit(
    tenant: Tenant, path: str, extra: dict[str, Any]
) -> None:
    status, body, _ = await tenant.call("POST", path, {"filter": wide_filter(), **extra})

    assert_limit(status, body, "max_filter_values")
    status, jobs, _ = await tenant.call("GET", "/v1/bulk-jobs")
    assert jobs["data"] == []


@pytest.mark.parametrize(
    ("filter_", "limit"),
    [
        ({"email": {"$in": ["a@example.com"] * (MAX_IN_VALUES + 1)}}, "max_in_values"),
        (
            {"$or": [{"last_name": f"n{i}"} for i in range(MAX_FILTER_NODES + 1)]},
            "max_filter_nodes",
        ),
        ({"last_name": "x" * 321}, "max_filter_string"),
    ],
    ids=["in-values", "nodes", "string"],
)
async def test_each_filter_limit_is_a_400_naming_it(
    tenant: Tenant, filter_: dict[str, Any], limit: str
) -> None:
    for path, extra in ((BULK, DRY), (QUERY, {})):
        status, body, _ = await tenant.call("POST", path, {"filter": filter_, **extra})

        assert_limit(status, body, limit)


async def test_a_filter_nested_too_deep_is_a_400_naming_the_limit(tenant: Tenant) -> None:
    nested: dict[str, Any] = {"last_name": "x"}
    for _ in range(MAX_FILTER_DEPTH + 1):
        nested = {"$and": [nested]}

    status, body, _ = await tenant.call("POST", QUERY, {"filter": nested})

    assert_limit(status, body, "max_filter_depth")


async def test_a_filter_at_every_limit_runs(services: Services, tenant: Tenant) -> None:
    """The largest filter the edge accepts is SQL both databases run."""
    target = await seed(services, tenant, email="last@example.com")
    await seed(services, tenant, email="bystander@example.com")  # so the filter is not "all"
    emails = [f"user{i}@example.com" for i in range(MAX_FILTER_VALUES - 1)]
    filter_ = {"$or": [{"email": {"$in": emails}}, {"email": "last@example.com"}]}

    status, body, _ = await tenant.call("POST", QUERY, {"filter": filter_, "limit": 1})
    dry = await tenant.call("POST", BULK, {"filter": filter_, **DRY})

    assert status == 200, body
    assert [c["id"] for c in body["data"]] == [target]
    assert dry[0] == 200, dry[1]
    assert would_delete(dry[1]) == 1


# --- 3. deep JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [QUERY, BULK, "/v1/contacts", "/v1/webhooks/endpoints"])
async def test_deep_json_is_a_400_not_a_recursion_error(tenant: Tenant, path: str) -> None:
    for depth in (977, 100_000, MAX_JSON_DEPTH + 1):
        status, body = await raw_post(tenant, path, b"[" * depth + b"]" * depth)

        assert_limit(status, body, "max_json_depth")
    status, body = await raw_post(tenant, path, b'{"a":' * 40 + b"1" + b"}" * 40)
    assert_limit(status, body, "max_json_depth")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"email": "a@example.com", "properties": {"x": NaN}}',
        b'{"email": "a@example.com", "properties": {"x": Infinity}}',
        b'{"email": "a@example.com", "properties": {"x": ' + b"9" * 5000 + b"}}",
        b'{"email": "a@example.com", "first_name": "nul\\u0000here"}',
        b'{"email": "a@example.com", "first_name": "\\ud800"}',
        b'{"email": "a@example.com", "properties": {"k\\u0000": 1}}',
        b'{"email": "a@example.com", "first_name": "\xff\xfe"}',
    ],
    ids=["nan", "infinity", "huge-int", "nul", "lone-surrogate", "nul-key", "bad-utf8"],
)
async def test_json_neither_database_can_store_is_a_400(tenant: Tenant, raw: bytes) -> None:
    status, body = await raw_post(tenant, "/v1/contacts", raw)

    assert status == 400, body
    assert body["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (BULK, '{"contact_ids": ["%s"], "dry_run": true, "dry_run": false}'),
        (BULK, '{"filter": {"id": "%s", "id": {"$exists": true}}}'),
        (BULK, '{"filter": {"$or": [{"id": "%s"}]}, "filter": {"$or": [{}]}, "match_all": true}'),
        (QUERY, '{"filter": {"id": "%s", "id": {"$exists": true}}, "limit": 10}'),
        ("/v1/contacts", '{"email": "a@example.com", "properties": {"k": 1, "k": "%s"}}'),
        ("/v1/webhooks/endpoints", '{"url": "https://h.example.com/%s", "url": "https://x.test"}'),
    ],
    ids=["dry-run-twice", "filter-field-twice", "filter-twice", "query", "nested", "webhook"],
)
async def test_a_member_named_twice_in_one_object_is_a_400_and_changes_nothing(
    services: Services, tenant: Tenant, path: str, template: str
) -> None:
    """RFC 8259 leaves a repeated name to each parser: one reads the first, we read the
    last. A request whose sender may have meant a dry run, or a narrower filter, is refused,
    never read as a real or wider deletion."""
    contact_id = await seed(services, tenant)
    status, body = await raw_post(tenant, path, (template % contact_id).encode())

    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert "appears twice" in body["error"]["details"][0]["message"], body
    assert (await tenant.call("GET", f"/v1/contacts/{contact_id}"))[0] == 200
    assert (await tenant.call("GET", "/v1/bulk-jobs"))[1]["data"] == []


@pytest.mark.parametrize(
    ("path", "raw", "field", "message"),
    [
        (BULK, b"[]", "body", "must be a JSON object"),
        (BULK, b'"everyone"', "body", "must be a JSON object"),
        (BULK, b'{"filter": []}', "filter", "must be a JSON object"),
        (BULK, b'{"emails": "a@example.com"}', "emails", "must be a JSON array"),
        (BULK, b'{"emails": ["a@example.com", "nobody"]}', "emails.1", "not a valid email"),
        (QUERY, b"[1]", "body", "must be a JSON object"),
        ("/v1/contacts", b"[]", "body", "must be a JSON object"),
        ("/v1/webhooks/endpoints", b"[]", "body", "must be a JSON object"),
        ("/v1/webhooks/endpoints", b'{"url": "ftp://h.example.com"}', "url", "scheme"),
    ],
)
async def test_error_details_speak_json_not_the_services_python(
    tenant: Tenant, path: str, raw: bytes, field: str, message: str
) -> None:
    """A detail names the JSON shape the client must send and the validator's own reason:
    never pydantic's "Value error, " prefix, a Python type ("dictionary", "list") or the
    name of an internal model."""
    status, body = await raw_post(tenant, path, raw)

    assert status == 400, body
    [detail] = body["error"]["details"]
    assert detail["field"] == field, body
    assert message in detail["message"], body
    for python in ("Value error", "dictionary", "instance of", "Request", "Create", "list"):
        assert python not in detail["message"], body


@pytest.mark.parametrize(
    ("path", "body", "nulls"),
    [
        (BULK, {"filter": None, "match_all": True}, ["filter"]),
        (BULK, {"search": None, "match_all": True, "dry_run": True}, ["search"]),
        (BULK, {"contact_ids": None, "emails": None, "match_all": True}, ["contact_ids", "emails"]),
        (QUERY, {"filter": None}, ["filter"]),
        (QUERY, {"search": None, "limit": 10}, ["search"]),
    ],
    ids=["delete-filter", "delete-search", "delete-ids", "query-filter", "query-search"],
)
async def test_null_for_a_selector_is_a_400_never_every_contact(
    services: Services, tenant: Tenant, path: str, body: dict[str, Any], nulls: list[str]
) -> None:
    """An empty variable sent as null read as "no condition": with match_all,
    ``{"filter": null}`` deleted the whole workspace; a query listed every contact."""
    contact_id = await seed(services, tenant)
    status, answer = await raw_post(tenant, path, json.dumps(body).encode())

    assert status == 400, answer
    assert [d["field"] for d in answer["error"]["details"]] == nulls, answer
    assert (await tenant.call("GET", f"/v1/contacts/{contact_id}"))[0] == 200
    assert (await tenant.call("GET", "/v1/bulk-jobs"))[1]["data"] == []


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("last week", "not an RFC 3339 date-time"),
        ("2026-11-30", "a date alone"),
        ("2026-11-30T06:00:00", "add a UTC offset or Z"),
        ("2026-11-30T06:00:00 02:00", "not an RFC 3339 date-time"),
        (1764482400, "RFC 3339 date-time string"),
    ],
)
async def test_every_instant_input_is_refused_in_the_same_words(
    tenant: Tenant, value: Any, says: str
) -> None:
    """The audit filters and recover's ``since`` read a time the same way (recover gave
    pydantic's "Input should be a valid datetime or date, input is too short"), and each
    refusal shows an example of what is taken."""
    status, body = await raw_post(
        tenant, "/v1/webhooks/endpoints", b'{"url": "https://h.example.com/hook"}'
    )
    assert status == 201, body
    recover = f"/v1/webhooks/endpoints/{body['data']['id']}/recover"
    answers = [
        await raw_post(tenant, recover, json.dumps({"since": value}).encode()),
        await raw_post(tenant, "/v1/audit/events/query", json.dumps({"since": value}).encode()),
    ]
    if isinstance(value, str):
        status, body, _ = await tenant.call("GET", f"/v1/audit/events?since={value}")
        answers.append((status, body))
    for status, body in answers:
        assert status == 400, body
        [detail] = body["error"]["details"]
        assert detail["field"] == "since" and says in detail["message"], body
        assert "e.g. 2024-05-01T12:00:00Z" in detail["message"], body


# Values whose '+' a query string turns into a space when it is not sent as %2B, and the
# body fields and query parameters that take them.
PLUS_AS_SPACE = {"email": "ada crm@example.com", "since": "2026-11-30T06:00:00 02:00"}
BODY_FIELDS = [
    ("/v1/contacts", {"email": PLUS_AS_SPACE["email"]}),
    ("/v1/audit/events/query", {"email": PLUS_AS_SPACE["email"]}),
    ("/v1/audit/events/query", {"since": PLUS_AS_SPACE["since"]}),
    (QUERY, {"filter": {"created_at": {"$gt": PLUS_AS_SPACE["since"]}}}),
    (BULK, {"emails": [PLUS_AS_SPACE["email"]], "dry_run": True}),
]


@pytest.mark.parametrize(("path", "body"), BODY_FIELDS)
async def test_a_space_in_a_body_value_is_refused_without_query_string_advice(
    tenant: Tenant, path: str, body: dict[str, Any]
) -> None:
    """A JSON body carries '+' as it is: "ada crm@…" there is an address with a space,
    and the 400 says so plainly; the audit query answered "…in a query string an
    unencoded '+' arrives as a space: send it as %2B", advice for another place."""
    status, answer = await raw_post(tenant, path, json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error", answer
    text = json.dumps(answer["error"])
    assert "%2B" not in text and "query string" not in text, answer
    assert "ada" not in text, answer  # the refusal does not echo the address


@pytest.mark.parametrize("name", sorted(PLUS_AS_SPACE))
async def test_a_space_that_was_a_plus_in_a_query_string_says_to_send_it_as_2b(
    tenant: Tenant, name: str
) -> None:
    """``?email=ada+crm@…`` and ``?since=…+02:00`` arrive with a space: there, and only
    there, the 400 says to send '+' as %2B."""
    unencoded = PLUS_AS_SPACE[name].replace(" ", "+")
    status, answer, _ = await tenant.call("GET", f"/v1/audit/events?{name}={unencoded}")
    assert status == 400, answer
    [detail] = answer["error"]["details"]
    assert detail["field"] == name and "send it as %2B" in detail["message"], answer


async def test_a_space_in_a_query_string_gets_no_plus_advice_where_a_plus_would_not_do(
    tenant: Tenant,
) -> None:
    """The advice is given only where the value with '+' for its spaces would be taken:
    ``since=last+week`` is no time either way."""
    status, answer, _ = await tenant.call("GET", "/v1/audit/events?since=last+week")
    assert status == 400, answer
    [detail] = answer["error"]["details"]
    assert detail["field"] == "since" and "%2B" not in detail["message"], answer


@pytest.mark.parametrize(
    ("path", "template", "field"),
    [
        (BULK, '{"contact_ids": ["%s"], "dry_run": "false"}', "dry_run"),
        (BULK, '{"contact_ids": ["%s"], "dry_run": 0}', "dry_run"),
        (BULK, '{"contact_ids": ["%s"], "dry_run": "no"}', "dry_run"),
        (BULK, '{"contact_ids": ["%s"], "delete_members": "true"}', "delete_members"),
        (BULK, '{"contact_ids": ["%s"], "dry_run": true, "dry_run_limit": "5"}', "dry_run_limit"),
        (BULK, '{"contact_ids": ["%s"], "dry_run": true, "dry_run_limit": true}', "dry_run_limit"),
        (QUERY, '{"filter": {"id": "%s"}, "limit": 1e2}', "limit"),
        ("/v1/contacts", '{"email": "a@example.com", "has_billing_subscription": "yes"}', None),
    ],
    ids=[
        "false-string",
        "zero",
        "no",
        "members-string",
        "limit-string",
        "limit-bool",
        "1e2",
        "yes",
    ],
)
async def test_a_boolean_or_count_of_another_json_type_is_a_400_and_changes_nothing(
    services: Services, tenant: Tenant, path: str, template: str, field: str | None
) -> None:
    """`"dry_run": "false"`, `0` or `"no"` was read as false: a real deletion for a client
    library that sends its switches as strings. A JSON body's booleans are true or false and
    its counts integers, as the document says; nothing is deleted or created."""
    contact_id = await seed(services, tenant)
    raw = template % contact_id if "%s" in template else template
    status, body = await raw_post(tenant, path, raw.encode())

    assert status == 400, body
    fields = [d["field"] for d in body["error"]["details"]]
    assert fields == [field or "has_billing_subscription"], body
    assert (await tenant.call("GET", f"/v1/contacts/{contact_id}"))[0] == 200
    assert (await tenant.call("GET", "/v1/bulk-jobs"))[1]["data"] == []


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({"contact_ids": [str(uuid.UUID(int=i)) for i in range(501)]}, "contact_ids", 500),
        ({"emails": [f"a{i}@example.com" for i in range(1001)]}, "emails", 1000),
        ({"search": "x" * 201, "dry_run": True}, "search", 200),
        ({"search": "x", "dry_run": True, "dry_run_limit": 1001}, "dry_run_limit", 1000),
    ],
    ids=["ids", "emails", "search", "dry-run-limit"],
)
async def test_a_fields_own_range_is_named_as_its_limit(
    tenant: Tenant, body: dict[str, Any], field: str, limit: int
) -> None:
    """The README promises that the details name the limit: the structural limits did, a
    field's own range (500 ids, 1000 emails) gave only pydantic's type."""
    status, answer = await raw_post(tenant, BULK, json.dumps(body).encode())
    assert status == 400, answer
    [detail] = answer["error"]["details"]
    assert (detail["field"], detail["limit"]) == (field, limit), detail
    status, answer, _ = await tenant.call("GET", "/v1/bulk-jobs?limit=501")
    assert answer["error"]["details"][0]["limit"] == 500, answer


async def test_a_nul_in_a_query_parameter_is_a_400(tenant: Tenant) -> None:
    for query in ("action=%00", "target_id=a%00b", "job_id=%00"):
        status, body, _ = await tenant.call("GET", f"/v1/audit/events?{query}")

        assert status == 400, (query, body)


async def test_oversized_properties_are_a_400(tenant: Tenant) -> None:
    many = {f"k{i}": i for i in range(101)}
    big = {"k": "x" * 20_000}
    for properties in (many, big):
        status, body, _ = await tenant.call(
            "POST", "/v1/contacts", {"email": "a@example.com", "properties": properties}
        )

        assert status == 400, body


# --- 4. Unicode-aware search (query and dry run here; the real run in test_bulk_delete) ---


@pytest.mark.parametrize("needle", ["ÖZTÜRK", "öztürk", "Öz", "türk", "ZTÜ"])
async def test_search_finds_upper_case_non_ascii_names(
    services: Services, tenant: Tenant, needle: str
) -> None:
    turk = await seed(services, tenant, last_name="ÖZTÜRK")
    await seed(services, tenant, last_name="Ozturk")  # not the same letters

    status, body, _ = await tenant.call("POST", QUERY, {"search": needle})
    dry = await tenant.call("POST", BULK, {"search": needle, **DRY})

    assert status == 200, body
    assert [c["id"] for c in body["data"]] == [turk]
    assert would_delete(dry[1]) == 1, dry


async def test_search_lowercases_greek_and_cyrillic_too(services: Services, tenant: Tenant) -> None:
    greek = await seed(services, tenant, first_name="ΣΩΚΡΆΤΗΣ")
    cyrillic = await seed(services, tenant, last_name="ДОСТОЕВСКИЙ")

    found = {}
    for needle in ("σωκράτ", "достоевский"):
        status, body, _ = await tenant.call("POST", QUERY, {"search": needle})
        assert status == 200, body
        found[needle] = [c["id"] for c in body["data"]]

    assert found == {"σωκράτ": [greek], "достоевский": [cyrillic]}


# --- 5. integer ranges, cursor contents, nullable PATCH fields ------------------------------


def cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audit/export?since_seq=9223372036854775808",
        "/v1/audit/export?since_seq=99999999999999999999999",
        "/v1/audit/events?limit=9223372036854775808",
        "/v1/bulk-jobs?limit=0",
        "/v1/audit/events?cursor=" + cursor({"after_seq": 18446744073709551616}),
        "/v1/audit/events?cursor=" + cursor({"after_seq": -1}),
        "/v1/audit/events?cursor=" + cursor({"after_seq": "1"}),
        "/v1/audit/events?cursor=" + cursor([1]),
        "/v1/audit/events?cursor=" + "A" * 600,
        "/v1/audit/events?cursor=%F0%9F%98%80",
        "/v1/bulk-jobs?cursor=" + cursor({"at": "2024-01-01T00:00:00", "id": str(uuid.uuid4())}),
        "/v1/bulk-jobs?cursor="
        + cursor({"at": "0001-01-01T00:00:00+14:00", "id": str(uuid.uuid4())}),
        "/v1/bulk-jobs?cursor=" + cursor({"at": 5, "id": "x"}),
        f"/v1/bulk-jobs/{uuid.uuid4()}/items?cursor=" + cursor({"after": 2**70}),
    ],
)
async def test_out_of_range_integers_and_crafted_cursors_are_400s(
    tenant: Tenant, path: str
) -> None:
    status, body, _ = await tenant.call("GET", path)

    assert status == 400, (path, status, body)
    assert body["error"]["code"] == "validation_error"


EDGE_OF_TIME = "0001-01-01T00:00:00+14:00"  # exists, but not in UTC


async def test_times_that_overflow_in_utc_are_400s_everywhere(
    services: Services, tenant: Tenant
) -> None:
    contact_id = await seed(services, tenant)
    status, endpoint, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "https://hooks.example.com/t"}
    )
    assert status == 201, endpoint
    calls = [
        ("GET", f"/v1/audit/events?since={EDGE_OF_TIME.replace('+', '%2B')}", None),
        ("POST", QUERY, {"filter": {"created_at": {"$gt": EDGE_OF_TIME}}}),
        ("POST", BULK, {"filter": {"created_at": {"$lt": EDGE_OF_TIME}}, **DRY}),
        ("POST", f"/v1/contacts/{contact_id}/activities", {"occurred_at": EDGE_OF_TIME}),
        ("POST", f"/v1/contacts/{contact_id}/tasks", {"title": "t", "due_at": EDGE_OF_TIME}),
        (
            "POST",
            f"/v1/webhooks/endpoints/{endpoint['data']['id']}/recover",
            {"since": EDGE_OF_TIME},
        ),
    ]
    for method, path, body in calls:
        status, answer, _ = await tenant.call(method, path, body)

        assert status == 400, (path, answer)


async def test_the_largest_since_seq_is_an_empty_export(tenant: Tenant) -> None:
    async with tenant.http.get(
        tenant.url("/v1/audit/export?since_seq=9223372036854775807"),
        headers={"Authorization": f"Bearer {tenant.key}"},
    ) as response:
        assert response.status == 200
        assert await response.read() == b""


async def test_null_for_a_required_endpoint_field_is_a_400_and_null_clears_the_optional(
    tenant: Tenant,
) -> None:
    status, endpoint, _ = await tenant.call(
        "POST",
        "/v1/webhooks/endpoints",
        {"url": "https://hooks.example.com/x", "description": "d", "rate_limit_per_s": 5},
    )
    assert status == 201, endpoint
    one = f"/v1/webhooks/endpoints/{endpoint['data']['id']}"

    for field in ("url", "event_types"):
        status, body, _ = await tenant.call("PATCH", one, {field: None})
        assert status == 400, (field, body)
        assert body["error"]["details"][0]["field"] == field
    status, body, _ = await tenant.call(
        "PATCH", one, {"description": None, "rate_limit_per_s": None}
    )

    assert status == 200, body
    assert (body["data"]["description"], body["data"]["rate_limit_per_s"]) == (None, None)
    assert body["data"]["url"] == "https://hooks.example.com/x"


# --- 8. Idempotency-Key ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", " ", "\t "])
async def test_an_empty_or_blank_idempotency_key_is_a_400(
    services: Services, tenant: Tenant, key: str
) -> None:
    contact_id = await seed(services, tenant)
    headers = {"Idempotency-Key": key}

    bulk = await tenant.call("POST", BULK, {"contact_ids": [contact_id], **DRY}, headers)
    single = await tenant.call("DELETE", f"/v1/contacts/{contact_id}", None, headers)

    for status, body, _ in (bulk, single):
        assert status == 400, body
        assert body["error"]["details"][0]["field"] == "Idempotency-Key"


async def test_two_idempotency_keys_are_a_400_and_delete_nothing(
    services: Services, tenant: Tenant
) -> None:
    """Which of two keys makes a retry "the same"? Neither is guessed: refused, no job."""
    contact_id = await seed(services, tenant)
    headers = CIMultiDict(
        [
            ("Authorization", f"Bearer {tenant.key}"),
            ("Idempotency-Key", "k1"),
            ("Idempotency-Key", "k2"),
        ]
    )
    for method, path, body in (
        ("POST", BULK, {"contact_ids": [contact_id]}),
        ("DELETE", f"/v1/contacts/{contact_id}", None),
    ):
        async with tenant.http.request(
            method, tenant.url(path), json=body, headers=headers
        ) as response:
            answer = await response.json()
            assert response.status == 400, answer
            assert answer["error"]["details"][0]["field"] == "Idempotency-Key"
    assert (await tenant.call("GET", f"/v1/contacts/{contact_id}"))[0] == 200
    assert (await tenant.call("GET", "/v1/bulk-jobs"))[1]["data"] == []


# --- 9. the spec and the service agree; 405 with Allow on every route ------------------------


def test_the_audit_events_parameters_are_the_ones_the_service_takes() -> None:
    op = openapi_spec()["paths"]["/v1/audit/events"]["get"]
    names = {p["name"] for p in op["parameters"] if p.get("in") == "query"}

    assert names == {
        "target_id",
        "job_id",
        "action",
        "actor_id",
        "email",
        "since",
        "until",
        "limit",
        "cursor",
    }


async def test_every_documented_query_parameter_is_accepted(tenant: Tenant) -> None:
    """A documented parameter the service refuses (or the reverse) cannot happen."""
    samples = {
        "string": "x",
        "integer": "1",
        "date-time": "2024-01-01T00:00:00Z",
        "uuid": "00000000-0000-4000-8000-000000000001",
    }
    for path, item in openapi_spec()["paths"].items():
        for method, op in item.items():
            if method != "get" or "{" in path or not path.startswith("/v1/"):
                continue
            for param in op["parameters"]:
                if param.get("in") != "query" or param["name"] in ("cursor", "email"):
                    continue
                schema = param["schema"]
                value = (
                    schema["enum"][0]
                    if "enum" in schema
                    else samples.get(schema.get("format", schema.get("type", "string")), "x")
                )
                if "$ref" in schema:
                    value = "pending"
                status, body, _ = await tenant.call("GET", f"{path}?{param['name']}={value}")
                assert status == 200, (path, param["name"], body)


async def test_a_wrong_method_is_405_with_allow_on_every_route(tenant: Tenant) -> None:
    methods = {"GET", "POST", "PATCH", "DELETE", "PUT"}
    for path, item in openapi_spec()["paths"].items():
        concrete = path.replace("{", "").replace("}", "")
        for name in ("contact_id", "job_id", "endpoint_id", "delivery_id"):
            concrete = concrete.replace(name, str(uuid.uuid4()))
        allowed = {m.upper() for m in item}
        for method in sorted(methods - allowed):
            status, body, headers = await tenant.call(method, concrete)

            assert status == 405, (method, path, body)
            assert set(headers["Allow"].split(",")) >= allowed, (method, path)
            assert method not in headers["Allow"].split(",")
        async with tenant.http.options(tenant.url(concrete)) as response:
            assert response.status == 204
            assert set(response.headers["Allow"].split(",")) >= allowed


async def test_get_on_post_only_routes_is_405_not_404(tenant: Tenant) -> None:
    for path in (QUERY, BULK):
        status, body, headers = await tenant.call("GET", path)

        assert status == 405, body
        assert headers["Allow"].split(",") == ["OPTIONS", "POST"]


def test_a_deleted_contacts_requester_may_be_null_in_the_spec() -> None:
    schemas = openapi_spec()["components"]["schemas"]
    requested_by = schemas["AuditContactTimeline"]["properties"]["requested_by"]

    assert {"type": "null"} in requested_by["anyOf"]


def test_bulk_delete_documents_the_selector_rule_and_the_limits() -> None:
    schema = openapi_spec()["components"]["schemas"]["BulkDeleteRequest"]

    assert "match_all" in schema["properties"]
    assert str(MAX_FILTER_VALUES) in schema["properties"]["filter"]["description"]
    assert schema["properties"]["contact_ids"]["maxItems"] == 500
    assert len(schema["oneOf"]) == 3  # exactly one selector


# --- 10. SSRF at creation and on PATCH ---------------------------------------------------------

PRIVATE_URLS = [
    "http://127.0.0.1/",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.1:8080/hook",
    "http://[::ffff:127.0.0.1]/",
    "http://localhost:9/hook",
]
# IPv4 shorthands of 127.0.0.1 (WHATWG's "ends in a number"): refused for their form before
# any address is looked at, private or not (service.webhooks.ssrf.validate_endpoint_url).
SHORTHAND_URLS = ["http://2130706433/", "http://0x7f.0.0.1/", "http://127.1/", "http://0177.0.0.1/"]


@pytest.fixture
async def guarded(db_url: str, http: aiohttp.ClientSession) -> Any:
    """A tenant of an API that does not allow private destinations (the production default)."""
    from aiohttp.test_utils import TestServer

    from service.app import create_app

    settings = make_settings(db_url, webhook_allow_private_networks=False)
    async with opened_services(settings) as services:
        server = TestServer(create_app(services), host="127.0.0.1")
        await server.start_server()
        try:
            yield await new_tenant(services, str(server.make_url("")).rstrip("/"), http)
        finally:
            await server.close()


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_a_private_destination_is_refused_at_creation_without_naming_the_address(
    guarded: Tenant, url: str
) -> None:
    status, body, _ = await guarded.call("POST", "/v1/webhooks/endpoints", {"url": url})

    assert status == 400, body
    detail = body["error"]["details"][0]
    assert detail["field"] == "url"
    assert "not allowed" in detail["message"]
    if "localhost" in url:
        assert "127.0.0.1" not in json.dumps(body)


@pytest.mark.parametrize("url", SHORTHAND_URLS)
async def test_an_ipv4_shorthand_is_refused_at_creation_and_on_patch(
    tenant: Tenant, url: str
) -> None:
    """Even where private destinations are allowed: the webhook client never connects to
    such a host, so every attempt failed until the endpoint was disabled (trial 6)."""
    status, body, _ = await tenant.call("POST", "/v1/webhooks/endpoints", {"url": url})
    assert status == 400, body
    [detail] = body["error"]["details"]
    assert detail["field"] == "url" and "shorthand" in detail["message"], detail

    status, created, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, created
    one = f"/v1/webhooks/endpoints/{created['data']['id']}"
    status, body, _ = await tenant.call("PATCH", one, {"url": url})
    assert status == 400, body


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:9001/x", "missing scheme: use http://127.0.0.1:9001/…"),
        ("localhost:8000", "missing scheme: use http://localhost:8000"),
        ("//127.0.0.1:9001/x", "missing scheme: use http://127.0.0.1:9001/…"),
        ("http:/127.0.0.1:9001/x", "missing // after 'http:'"),
    ],
)
async def test_a_url_without_its_scheme_is_refused_saying_so_at_creation_and_on_patch(
    tenant: Tenant, url: str, says: str
) -> None:
    """``127.0.0.1:9001/x`` was refused as "the URL scheme must be http or https, not
    '127.0.0.1'": a parser's reading, not what the URL lacks."""
    status, created, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"}
    )
    assert status == 201, created
    one = f"/v1/webhooks/endpoints/{created['data']['id']}"
    for method, path in (("POST", "/v1/webhooks/endpoints"), ("PATCH", one)):
        status, body, _ = await tenant.call(method, path, {"url": url})
        assert status == 400, body
        [detail] = body["error"]["details"]
        assert detail["field"] == "url" and detail["message"].startswith(says), detail


async def test_a_private_destination_is_refused_on_patch(guarded: Tenant) -> None:
    status, created, _ = await guarded.call(
        "POST", "/v1/webhooks/endpoints", {"url": "https://203.0.114.7/hook"}
    )
    assert status == 201, created
    one = f"/v1/webhooks/endpoints/{created['data']['id']}"

    for url in PRIVATE_URLS:
        status, body, _ = await guarded.call("PATCH", one, {"url": url})
        assert status == 400, (url, body)
    status, body, _ = await guarded.call("GET", one)
    assert body["data"]["url"] == "https://203.0.114.7/hook"
