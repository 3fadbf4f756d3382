"""Requests that are not valid HTTP, or that aiohttp answers before the app, on SQLite and
PostgreSQL: every answer is the error envelope with a request id (service.httpserver),
sent and read over a raw socket, since an HTTP client would refuse to send them."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.app import Services
from service.httpserver import MAX_HEADER_FIELD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES
from tests.conftest import Tenant
from tests.logcapture import json_logs


async def raw_exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as bytes on a new connection; (status, headers, body) of the answer,
    read until the server closes the connection."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def envelope(headers: dict[str, str], body: bytes, code: str) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"code", "message", "details"}
    assert parsed["error"]["code"] == code
    error: dict[str, Any] = parsed["error"]
    return error


HOST = b"Host: 127.0.0.1\r\n"
SECRET = "Bearer sk_live_never_in_a_log_line"


def get(headers: bytes = b"", line: bytes = b"GET /healthz HTTP/1.1") -> bytes:
    """A GET with this request line and these header lines (each ending in CRLF)."""
    return line + b"\r\n" + HOST + headers + b"\r\n"


def post(headers: bytes, body: bytes = b"") -> bytes:
    """A POST to /v1/contacts with these header lines and this body, sent as is."""
    return b"POST /v1/contacts HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


MALFORMED = (400, "malformed_request")
HEADER_TOO_LARGE = (431, "header_too_large")
LONG = b"x" * MAX_HEADER_FIELD_BYTES

# Each member of the kind: what is sent, the status and code that answer it.
CASES: dict[str, tuple[bytes, tuple[int, str]]] = {
    "header line over the limit": (
        get(b"Authorization: " + SECRET.encode() + LONG + b"\r\n"),
        HEADER_TOO_LARGE,
    ),
    "header name over the limit": (get(b"X" + LONG + b": 1\r\n"), HEADER_TOO_LARGE),
    "too many headers": (
        get(b"".join(b"X-H%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))),
        HEADER_TOO_LARGE,
    ),
    "URL over the limit": (
        get(line=b"GET /" + b"a" * MAX_REQUEST_LINE_BYTES + b" HTTP/1.1"),
        (414, "uri_too_long"),
    ),
    "invalid method": (get(line=b"G@T /healthz HTTP/1.1"), MALFORMED),
    "TLS on the plain port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n", MALFORMED),
    "unknown HTTP version": (get(line=b"GET /healthz HTTP/9.9"), MALFORMED),
    "invalid URL": (get(line=b"GET http://[::1 HTTP/1.1"), MALFORMED),
    "header without a colon": (get(b"no-colon\r\n"), MALFORMED),
    "control character in a header name": (get(b"X-A\x01: 1\r\n"), MALFORMED),
    "chunk size not hex": (
        post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
        MALFORMED,
    ),
    "Content-Length not a number": (post(b"Content-Length: abc\r\n"), MALFORMED),
    "negative Content-Length": (post(b"Content-Length: -1\r\n"), MALFORMED),
    "two Content-Lengths": (post(b"Content-Length: 1\r\nContent-Length: 2\r\n", b"ab"), MALFORMED),
    "Content-Length and Transfer-Encoding": (
        post(
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            b"3\r\nabc\r\n0\r\n\r\n",
        ),
        MALFORMED,
    ),
    "unknown Transfer-Encoding": (post(b"Transfer-Encoding: gzip\r\n"), MALFORMED),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_request_that_is_not_http_is_answered_in_the_envelope(api: str, case: str) -> None:
    request, (status, code) = CASES[case]

    got, headers, body = await raw_exchange(api, request)

    assert got == status, case
    envelope(headers, body, code)


async def test_a_protocol_error_is_one_log_line_and_one_count_without_header_values(
    api: str, services: Services
) -> None:
    request, _ = CASES["header line over the limit"]

    with json_logs() as logs:
        await raw_exchange(api, request)

    lines = logs.events("http_protocol_error")
    assert len(lines) == 1
    assert lines[0]["status"] == 431 and lines[0]["part"] == "header"
    assert "sk_live" not in logs.text
    labels = {"method": "unknown", "route": "unparsed", "status": "431"}
    assert services.metrics.registry.get_sample_value("http_requests_total", labels) == 1


async def test_a_request_that_did_not_parse_gets_a_fresh_request_id(api: str) -> None:
    """Its headers were never read, so an X-Request-ID among them cannot be trusted."""
    request = get(b"X-Request-ID: trace-42\r\nX-A\x01: 1\r\n")

    status, headers, body = await raw_exchange(api, request)

    assert status == 400
    envelope(headers, body, "malformed_request")
    assert headers["x-request-id"].startswith("req_")


async def test_an_expect_other_than_100_continue_is_a_417_envelope(api: str) -> None:
    request = post(b"Expect: teapot\r\nConnection: close\r\nContent-Length: 2\r\n", b"{}")

    status, headers, body = await raw_exchange(api, request)

    assert status == 417
    assert envelope(headers, body, "expectation_failed")["details"] == {"header": "Expect"}


async def test_a_body_whose_content_encoding_is_broken_is_a_400_not_a_500(
    tenant: Tenant,
) -> None:
    """The framing parses, the body does not: the handler's read fails, the client's fault."""
    request = post(
        f"Authorization: Bearer {tenant.key}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n",
        b"abc",
    )

    status, headers, body = await raw_exchange(tenant.base, request)

    assert status == 400
    assert envelope(headers, body, "malformed_request")["details"] == {"part": "body"}
