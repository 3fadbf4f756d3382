"""`Idempotency-Key` on every POST that creates or changes something, as Stripe and Svix
honour it: before, only deletions read it, and two POST /v1/contacts with one key made two
contacts (trial 6). Replays answer byte for byte with `Idempotent-Replayed: true`; another
body is 409; a failed request leaves nothing behind; read-only POSTs (queries) ignore it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.conftest import Tenant


def _key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4()}"}


async def test_a_contact_posted_twice_with_one_key_is_created_once(tenant: Tenant) -> None:
    key = _key()
    email = f"once-{uuid.uuid4().hex[:8]}@example.com"
    first = await tenant.call("POST", "/v1/contacts", {"email": email}, key)
    again = await tenant.call("POST", "/v1/contacts", {"email": email}, key)

    assert first[0] == 201, first[1]
    assert again[:2] == first[:2]
    assert again[2].get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first[2]
    status, body, _ = await tenant.call("POST", "/v1/contacts/query", {"filter": {"email": email}})
    assert status == 200 and len(body["data"]) == 1, body

    other = await tenant.call("POST", "/v1/contacts", {"email": "x" + email}, key)
    assert other[0] == 409 and other[1]["error"]["code"] == "idempotency_conflict", other[1]


async def test_concurrent_endpoint_creations_with_one_key_make_one_endpoint(
    tenant: Tenant,
) -> None:
    key = _key()
    body = {"url": "http://127.0.0.1:9/hook", "description": f"once {uuid.uuid4().hex[:6]}"}
    answers = await asyncio.gather(
        *(tenant.call("POST", "/v1/webhooks/endpoints", body, key) for _ in range(4))
    )
    statuses = sorted(a[0] for a in answers)
    assert set(statuses) <= {201, 409} and 201 in statuses, statuses
    ids = {a[1]["data"]["id"] for a in answers if a[0] == 201}
    assert len(ids) == 1, ids  # every 201 is the one endpoint (first or replayed)
    status, page, _ = await tenant.call("GET", "/v1/webhooks/endpoints?limit=100")
    assert status == 200
    mine = [e for e in page["data"] if e["description"] == body["description"]]
    assert [e["id"] for e in mine] == list(ids)


async def test_a_failed_request_leaves_its_key_free_for_the_retry(tenant: Tenant) -> None:
    key = _key()
    missing = f"/v1/contacts/{uuid.uuid4()}/notes"
    status, body, _ = await tenant.call("POST", missing, {"body": "hello"}, key)
    assert status == 404, body
    status, created, _ = await tenant.call(
        "POST", "/v1/contacts", {"email": f"free-{uuid.uuid4().hex[:8]}@example.com"}, _key()
    )
    assert status == 201
    # Nothing was kept under the key: it is free for the next request, whatever it is.
    notes = f"/v1/contacts/{created['data']['id']}/notes"
    status, body, headers = await tenant.call("POST", notes, {"body": "hello"}, key)
    assert status == 201 and "Idempotent-Replayed" not in headers, body
    fresh = _key()
    status, body, _ = await tenant.call("POST", missing, {"body": "hello"}, fresh)
    assert status == 404
    status, body, headers = await tenant.call("POST", missing, {"body": "hello"}, fresh)
    assert status == 404 and "Idempotent-Replayed" not in headers  # ran again, not replayed


async def test_a_query_sent_as_post_is_never_replayed(tenant: Tenant) -> None:
    key = _key()
    tag = uuid.uuid4().hex[:8]
    query: dict[str, Any] = {"filter": {"last_name": f"Q{tag}"}}
    status, before, headers = await tenant.call("POST", "/v1/contacts/query", query, key)
    assert status == 200 and before["data"] == []
    created = await tenant.call(
        "POST", "/v1/contacts", {"email": f"q-{tag}@example.com", "last_name": f"Q{tag}"}
    )
    assert created[0] == 201
    status, after, headers = await tenant.call("POST", "/v1/contacts/query", query, key)
    assert status == 200 and len(after["data"]) == 1 and "Idempotent-Replayed" not in headers
