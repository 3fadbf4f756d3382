"""The HTTP edge on SQLite and PostgreSQL: error envelope, bodies, auth, scopes, rate limits,
request ids and the operational routes."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from service.app import Services, create_app
from service.config import Settings
from service.db import Database
from service.keys import revoke_key
from service.schemas import openapi_spec
from tests.conftest import Tenant, make_settings, new_tenant
from tests.logcapture import json_logs

ServeApp = Callable[[Settings], Coroutine[Any, Any, tuple[Services, str]]]


def assert_error(body: Any, code: str) -> dict[str, Any]:
    """The error of an envelope, which always has code, message and details."""
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: bytes | io.BytesIO | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """A raw request: (status, JSON body or None, headers)."""
    async with http.request(method, url, data=data, headers=headers) as response:
        raw = await response.read()
        body = json.loads(raw) if raw and response.content_type == "application/json" else None
        return response.status, body, response.headers


async def call(
    tenant: Tenant,
    method: str,
    path: str,
    json: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, CIMultiDict[str]]:
    """`tenant.call`, with the headers as a case-insensitive mapping."""
    status, body, response_headers = await tenant.call(method, path, json=json, headers=headers)
    return status, body, CIMultiDict(response_headers)


def bearer(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.key}"}


@pytest.fixture
async def serve_app() -> AsyncIterator[ServeApp]:
    """Serve an extra app with its own settings; everything is closed at teardown."""
    opened: list[tuple[Services, TestServer]] = []

    async def serve(settings: Settings) -> tuple[Services, str]:
        services = Services(settings=settings, db=Database(settings.database_url))
        server = TestServer(create_app(services), host="127.0.0.1")
        await server.start_server()
        opened.append((services, server))
        return services, str(server.make_url("")).rstrip("/")

    yield serve
    for services, server in opened:
        await server.close()
        await services.close()


# --- routing and bodies -------------------------------------------------------------------


async def test_an_unknown_route_is_a_404_envelope(tenant: Tenant) -> None:
    for path in ("/v1/nothing-here", "/nothing-here"):
        status, body, _ = await call(tenant, "GET", path)

        assert status == 404, path
        assert_error(body, "not_found")


async def test_a_wrong_method_is_a_405_envelope_with_allow(tenant: Tenant) -> None:
    status, body, headers = await call(tenant, "PUT", "/v1/contacts", json={})

    assert status == 405
    allowed = assert_error(body, "method_not_allowed")["details"]["allowed_methods"]
    assert "POST" in allowed
    assert "PUT" not in allowed
    assert headers["Allow"] == ",".join(allowed)


async def test_malformed_json_is_a_400(tenant: Tenant) -> None:
    status, body, _ = await send(
        tenant.http,
        "POST",
        tenant.url("/v1/contacts"),
        data=b'{"email": "a@example.com",',
        headers={**bearer(tenant), "Content-Type": "application/json"},
    )

    assert status == 400
    assert assert_error(body, "validation_error")["details"][0]["field"] == "body"


async def test_an_empty_json_body_is_a_400(tenant: Tenant) -> None:
    status, body, _ = await send(
        tenant.http,
        "POST",
        tenant.url("/v1/contacts"),
        data=b"",
        headers={**bearer(tenant), "Content-Type": "application/json"},
    )

    assert status == 400
    assert_error(body, "validation_error")


async def test_a_body_that_is_not_an_object_is_a_400(tenant: Tenant) -> None:
    status, body, _ = await call(tenant, "POST", "/v1/contacts", json=["a@example.com"])

    assert status == 400
    assert_error(body, "validation_error")


async def test_a_non_json_content_type_is_a_415(tenant: Tenant) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, body, _ = await send(
            tenant.http,
            "POST",
            tenant.url("/v1/contacts"),
            data=b'{"email": "a@example.com"}',
            headers={**bearer(tenant), "Content-Type": content_type},
        )

        assert status == 415, content_type
        assert_error(body, "unsupported_media_type")


async def test_a_body_over_one_mib_is_a_413_envelope(tenant: Tenant) -> None:
    padding = "x" * (1024 * 1024)
    data = json.dumps({"email": "a@example.com", "properties": {"pad": padding}}).encode()

    status, body, _ = await send(
        tenant.http,
        "POST",
        tenant.url("/v1/contacts"),
        data=io.BytesIO(data),  # aiohttp warns about large raw bytes bodies
        headers={**bearer(tenant), "Content-Type": "application/json"},
    )

    assert status == 413
    assert_error(body, "payload_too_large")


async def test_a_body_just_under_one_mib_is_accepted(tenant: Tenant) -> None:
    # Padded with whitespace: the body limit is what is tested, not a field's own limit.
    envelope = json.dumps({"email": "a@example.com"}).encode()
    data = envelope[:-1] + b" " * (1024 * 1024 - len(envelope)) + b"}"
    assert len(data) == 1024 * 1024

    status, body, _ = await send(
        tenant.http,
        "POST",
        tenant.url("/v1/contacts"),
        data=io.BytesIO(data),  # aiohttp warns about large raw bytes bodies
        headers={**bearer(tenant), "Content-Type": "application/json"},
    )

    assert status == 201, body


# --- authentication and scopes ------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token cdk_abc"],
)
async def test_a_missing_key_is_a_401_invalid_key(
    api: str, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    status, body, response_headers = await send(
        http, "GET", f"{api}/v1/contacts/{uuid.uuid4()}", headers=headers
    )

    assert status == 401
    assert_error(body, "invalid_key")
    assert response_headers["WWW-Authenticate"] == "Bearer"


async def test_an_unknown_key_is_a_401_invalid_key(api: str, http: aiohttp.ClientSession) -> None:
    status, body, _ = await send(
        http,
        "GET",
        f"{api}/v1/contacts/{uuid.uuid4()}",
        headers={"Authorization": "Bearer cdk_this-key-was-never-issued"},
    )

    assert status == 401
    assert_error(body, "invalid_key")


async def test_two_authorization_headers_are_a_401_even_if_both_are_valid(
    services: Services, tenant: Tenant, api: str, http: aiohttp.ClientSession
) -> None:
    """One credential per request (RFC 9110 §11.6.2): two keys, perhaps of two workspaces,
    are refused rather than one of them picked."""
    other = await new_tenant(services, api, http)
    for second in (tenant.key, other.key):
        headers = CIMultiDict(
            [("Authorization", f"Bearer {tenant.key}"), ("Authorization", f"Bearer {second}")]
        )
        async with http.get(f"{api}/v1/bulk-jobs", headers=headers) as response:
            assert response.status == 401
            assert_error(await response.json(), "invalid_key")
            assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_a_revoked_key_is_a_401_invalid_key(services: Services, tenant: Tenant) -> None:
    status, _, _ = await call(tenant, "POST", "/v1/contacts/query", json={})
    assert status == 200

    assert await revoke_key(services.db, tenant.key_id)
    status, body, _ = await call(tenant, "POST", "/v1/contacts/query", json={})

    assert status == 401
    assert_error(body, "invalid_key")
    assert not await revoke_key(services.db, tenant.key_id)


async def test_a_read_only_key_cannot_write(
    services: Services, api: str, http: aiohttp.ClientSession
) -> None:
    reader = await new_tenant(services, api, http, scopes=["contacts:read"])

    status, body, _ = await call(reader, "POST", "/v1/contacts", json={"email": "a@example.com"})
    read_status, _, _ = await call(reader, "POST", "/v1/contacts/query", json={})

    assert status == 403
    error = assert_error(body, "insufficient_permissions")
    assert error["details"] == {"required_scope": "contacts:write"}
    assert read_status == 200


async def test_a_key_without_contacts_read_cannot_read(
    services: Services, api: str, http: aiohttp.ClientSession
) -> None:
    writer = await new_tenant(services, api, http, scopes=["contacts:write"])
    status, created, _ = await call(writer, "POST", "/v1/contacts", json={"email": "a@example.com"})
    assert status == 201
    contact_id = created["data"]["id"]

    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/v1/contacts/{contact_id}", None),
        ("POST", "/v1/contacts/query", {}),
        ("GET", f"/v1/contacts/{contact_id}/timeline", None),
    ]
    for method, path, payload in requests:
        status, body, _ = await call(writer, method, path, json=payload)

        assert status == 403, path
        error = assert_error(body, "insufficient_permissions")
        assert error["details"] == {"required_scope": "contacts:read"}


# --- request ids and rate limits ----------------------------------------------------------


async def test_the_clients_request_id_is_echoed(tenant: Tenant) -> None:
    ok_status, _, ok_headers = await call(
        tenant, "POST", "/v1/contacts/query", json={}, headers={"X-Request-ID": "client-req.42"}
    )
    err_status, _, err_headers = await call(
        tenant, "GET", "/v1/nothing-here", headers={"X-Request-ID": "client-req.43"}
    )

    assert (ok_status, err_status) == (200, 404)
    assert ok_headers["X-Request-ID"] == "client-req.42"
    assert err_headers["X-Request-ID"] == "client-req.43"


async def test_a_request_id_is_generated_when_absent_even_on_errors(
    tenant: Tenant, api: str, http: aiohttp.ClientSession
) -> None:
    answers = [
        await call(tenant, "POST", "/v1/contacts/query", json={}),
        await call(tenant, "GET", f"/v1/contacts/{uuid.uuid4()}"),
        await call(tenant, "POST", "/v1/contacts", json={}),
        await send(http, "GET", f"{api}/v1/contacts/{uuid.uuid4()}"),
        await send(http, "GET", f"{api}/healthz"),
    ]

    ids = [headers["X-Request-ID"] for _, _, headers in answers]
    assert [status for status, _, _ in answers] == [200, 404, 400, 401, 200]
    assert all(rid.startswith("req_") for rid in ids)
    assert len(set(ids)) == len(ids)


async def test_an_unsafe_request_id_is_replaced(tenant: Tenant) -> None:
    _, _, headers = await call(
        tenant,
        "POST",
        "/v1/contacts/query",
        json={},
        headers={"X-Request-ID": "evil id\twith spaces"},
    )

    assert headers["X-Request-ID"].startswith("req_")


async def test_authenticated_responses_carry_rate_limit_headers(tenant: Tenant) -> None:
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/v1/contacts/query", {}),
        ("GET", f"/v1/contacts/{uuid.uuid4()}", None),
    ]
    for method, path, payload in requests:
        _, _, headers = await call(tenant, method, path, json=payload)

        assert int(headers["X-RateLimit-Limit"]) == 10_000
        assert 0 <= int(headers["X-RateLimit-Remaining"]) < 10_000
        assert int(headers["X-RateLimit-Reset"]) >= 0
        assert "Retry-After" not in headers


async def test_exceeding_the_rate_limit_is_a_429_with_retry_after(
    db_url: str, serve_app: ServeApp, http: aiohttp.ClientSession
) -> None:
    services, base = await serve_app(
        make_settings(db_url, rate_limit_per_s=0.001, rate_limit_burst=2)
    )
    caller = await new_tenant(services, base, http)
    other = await new_tenant(services, base, http)

    first = await call(caller, "POST", "/v1/contacts/query", json={})
    second = await call(caller, "POST", "/v1/contacts/query", json={})
    status, body, headers = await call(
        caller, "POST", "/v1/contacts/query", json={}, headers={"X-Request-ID": "throttled-1"}
    )
    other_status, _, _ = await call(other, "POST", "/v1/contacts/query", json={})

    assert (first[0], second[0]) == (200, 200)
    assert (first[2]["X-RateLimit-Remaining"], second[2]["X-RateLimit-Remaining"]) == ("1", "0")
    assert status == 429
    assert_error(body, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    assert headers["X-RateLimit-Limit"] == "2"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-Request-ID"] == "throttled-1"
    assert other_status == 200


# --- operational routes -------------------------------------------------------------------


async def test_healthz_is_200_without_a_key(api: str, http: aiohttp.ClientSession) -> None:
    status, body, _ = await send(http, "GET", f"{api}/healthz")

    assert status == 200
    assert body == {"data": {"status": "ok"}}


async def test_metrics_is_prometheus_text_with_request_counts(
    api: str, http: aiohttp.ClientSession
) -> None:
    await send(http, "GET", f"{api}/healthz")

    async with http.get(f"{api}/metrics") as response:
        text = await response.text()
        status, content_type = response.status, response.headers["Content-Type"]

    assert status == 200
    assert content_type.startswith("text/plain")
    assert "# TYPE http_requests_total counter" in text
    assert 'http_requests_total{method="GET",route="/healthz",status="200"}' in text


async def test_readyz_is_503_when_kafka_is_unreachable(
    api: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    assert settings.kafka_bootstrap_servers == "127.0.0.1:1"

    status, body, _ = await send(http, "GET", f"{api}/readyz")

    assert status == 503
    error = assert_error(body, "not_ready")
    assert error["details"] == {"database": "ok", "kafka": "unreachable"}


async def test_readyz_is_200_when_the_database_and_kafka_answer(
    db_url: str, kafka_bootstrap: str, serve_app: ServeApp, http: aiohttp.ClientSession
) -> None:
    _, base = await serve_app(make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap))

    status, body, _ = await send(http, "GET", f"{base}/readyz")

    assert status == 200
    assert body == {"data": {"status": "ready", "checks": {"database": "ok", "kafka": "ok"}}}


async def test_a_malformed_id_and_an_unknown_one_get_the_same_404_on_every_route(
    tenant: Tenant,
) -> None:
    """An id that cannot exist (not a UUID) and one that does not exist are one answer:
    the same 404 envelope and message, whichever route reads them (GET routes with one
    path id, from the OpenAPI document)."""

    paths = [p for p, ops in openapi_spec()["paths"].items() if "get" in ops and "{" in p]
    assert len(paths) >= 6, paths
    for path in paths:
        name = path[path.index("{") : path.index("}") + 1]
        answers = []
        for bad in ("not-a-uuid", str(uuid.uuid4())):
            status, body, _ = await tenant.call("GET", path.replace(name, bad))
            assert status == 404, (path, bad, body)
            answers.append(assert_error(body, "not_found")["message"])
        assert answers[0] == answers[1], (path, answers)


async def test_an_operation_without_a_body_refuses_one_and_one_with_a_body_asks_for_it(
    tenant: Tenant,
) -> None:
    """`{"foo": 1}` on …/test passed silently (every route with a body refuses unknown
    fields); a recover sent with no body at all was told to use application/json."""
    status, body, _ = await tenant.call(
        "POST", "/v1/webhooks/endpoints", {"url": "https://h.example.com/hook"}
    )
    assert status == 201, body
    base = f"/v1/webhooks/endpoints/{body['data']['id']}"
    for path in (f"{base}/test", f"{base}/rotate-secret", f"{base}/enable"):
        status, body, _ = await tenant.call("POST", path, {"foo": 1})
        assert status == 400, (path, body)
        assert assert_error(body, "validation_error")["details"][0]["field"] == "body"
    sent: dict[str, Any] | None
    for sent in (None, {}):
        status, body, _ = await tenant.call("POST", f"{base}/rotate-secret", sent)
        assert status == 200, (sent, body)

    url = tenant.url(f"{base}/recover")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with tenant.http.post(url, headers=headers) as response:
        status, body = response.status, await response.json()
    assert status == 400, body
    assert assert_error(body, "validation_error")["message"] == "a JSON body is required"


async def test_a_trailing_slash_is_a_404_that_says_to_drop_it(tenant: Tenant) -> None:
    status, body, _ = await tenant.call("GET", "/v1/webhooks/endpoints/")
    assert status == 404, body
    message = assert_error(body, "not_found")["message"]
    assert message.endswith("without the trailing slash: /v1/webhooks/endpoints"), message
    status, body, _ = await tenant.call("GET", "/v1/no-such-thing")
    assert assert_error(body, "not_found")["message"] == "no such resource"


async def test_an_unknown_name_is_answered_with_the_names_the_operation_takes(
    tenant: Tenant,
) -> None:
    """`?email=` on the contacts list and a misspelt body field got only "Extra inputs are
    not permitted": the detail lists the known names, and where a filter goes instead."""
    status, body, _ = await tenant.call("GET", "/v1/contacts?email=a%40example.com")
    assert status == 400, body
    [detail] = assert_error(body, "validation_error")["details"]
    assert detail["field"] == "email" and "limit, cursor" in detail["message"], detail
    assert "POST /v1/contacts/query" in detail["message"], detail

    bulk = {"contact_id": [str(uuid.uuid4())], "dry_run": True}
    status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", bulk)
    assert status == 400, body
    [detail] = assert_error(body, "validation_error")["details"]
    assert detail["field"] == "contact_id" and "contact_ids" in detail["message"], detail


async def test_a_client_that_goes_away_mid_body_is_no_outage(
    tenant: Tenant, http: aiohttp.ClientSession
) -> None:
    """A client closing its connection before its body arrived was logged
    `service_unavailable` and counted 503 (a 5xx alert for a client's abort; trial 6): it is
    `client_disconnected`, counted 499, and the service answers the next request."""
    host, port = tenant.base.removeprefix("http://").split(":")
    with json_logs() as logs:
        for path in ("/v1/contacts", "/v1/contacts/bulk-delete"):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant.key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                '{"email":'.encode()
            )
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await logs.wait_for("client_disconnected", timeout_s=10, path=path)
    assert not logs.events("service_unavailable"), logs.events("service_unavailable")
    async with http.get(f"{tenant.base}/metrics") as response:
        metrics = await response.text()
    for route in ("/v1/contacts", "/v1/contacts/bulk-delete"):
        assert f'http_requests_total{{method="POST",route="{route}",status="499"}} 1.0' in metrics
    assert 'status="503"' not in metrics
    status, _, _ = await tenant.call("GET", "/v1/contacts")
    assert status == 200
