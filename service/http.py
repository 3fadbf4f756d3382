"""The HTTP edge: request ids, the error envelope, auth and scopes, rate limits, bodies.

Every error leaves the service as ``{"error": {"code", "message", "details"}}``; this is
the one place where the exception tree (service.errors) becomes HTTP.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import ValidationError

from service.config import Settings
from service.db import Database
from service.errors import (
    DatabaseBusy,
    DatabaseTimeout,
    ExpectationFailed,
    Forbidden,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    StorageFull,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.faults import DATABASE_BUSY, DATABASE_TIMEOUT, STORAGE_FULL, outage_cause
from service.keys import Principal, authenticate
from service.limits import parse_json
from service.logs import get_logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# What a 503 during an outage asks the client to wait, in seconds.
RETRY_AFTER_S = 2
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,200}$")

PRINCIPAL_KEY = web.RequestKey("principal", Principal)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Headers every response to this request carries (request id, rate limit), whatever
# handler made it; `edge_headers` adds them to a streamed response before its first byte.
EDGE_HEADERS_KEY = web.RequestKey("edge_headers", dict[str, str])


def encode_json(data: Any) -> bytes:
    """The API's JSON encoding: compact UTF-8."""
    return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response with the body as given (callers wrap in {"data": ...})."""
    return web.Response(
        body=encode_json(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(error: ServiceError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message, "details": error.details}}
    return json_response(body, status=error.status, headers=dict(error.headers))


@dataclass
class TokenBucket:
    """A token bucket: `rate` tokens a second, holding at most `capacity`."""

    rate: float
    capacity: int
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def seconds_until(self, tokens: float) -> float:
        return max(0.0, (tokens - self.tokens) / self.rate)


class RateLimiter:
    """Per-key token buckets (in this process), with the headers clients expect."""

    def __init__(
        self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self._buckets: dict[uuid.UUID, TokenBucket] = {}

    def check(self, key_id: uuid.UUID) -> tuple[bool, dict[str, str]]:
        """Take a token for this key; returns (allowed, rate-limit headers)."""
        now = self.clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.capacity, float(self.capacity), now)
            self._buckets[key_id] = bucket
        allowed = bucket.take(now)
        headers = {
            "X-RateLimit-Limit": str(self.capacity),
            "X-RateLimit-Remaining": str(int(bucket.tokens)),
            # Seconds until the bucket is full again.
            "X-RateLimit-Reset": str(math.ceil(bucket.seconds_until(self.capacity))),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(bucket.seconds_until(1))))
        return allowed, headers


DB_KEY = web.AppKey("db", Database)
SETTINGS_KEY = web.AppKey("settings", Settings)
RATE_LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)


def principal(request: web.Request) -> Principal:
    """The authenticated caller of this request."""
    if PRINCIPAL_KEY not in request:
        raise Unauthenticated("missing API key")
    return request[PRINCIPAL_KEY]


def require(request: web.Request, scope: str) -> Principal:
    """The caller, who must hold `scope`."""
    who = principal(request)
    if not who.allows(scope):
        raise Forbidden(f"this key lacks the {scope!r} scope", {"required_scope": scope})
    return who


def request_id(request: web.Request) -> str:
    return request[REQUEST_ID_KEY]


def new_request_id(request: web.BaseRequest) -> str:
    """The request's id: its `X-Request-ID` when that is a sane one (1-200 of
    ``A-Z a-z 0-9 . _ : -``), else a fresh ``req_<hex>``."""
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    return incoming if _REQUEST_ID_RE.match(incoming) else f"req_{uuid.uuid4().hex}"


# Pydantic's wording names Python types ("a valid dictionary or instance of
# BulkDeleteRequest"); the API speaks JSON (RFC 8259 names: object, array).
_JSON_WORDING = {
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "list_type": "must be a JSON array",
}


# The bounds pydantic names in an error's context (a length or a value range).
_BOUNDS = ("max_length", "min_length", "le", "ge", "lt", "gt")


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors as ``[{"field": "a.b", "message": ..., "type": ...}]``.

    ``field`` is the dotted path (list positions from 0; ``body`` for the whole body);
    ``type`` is pydantic's error type, stable for programs; ``limit`` is the number a
    field's own range stops at, when that is what was crossed. The message is the validator's
    own reason without pydantic's "Value error, " prefix, and JSON's names for the shapes
    instead of the Python model's (which are internal).
    """
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        kind = err["type"]
        message = _JSON_WORDING.get(kind, err["msg"])
        ctx = err.get("ctx") or {}
        if kind in ("value_error", "assertion_error"):
            cause = ctx.get("error")
            message = str(cause) if cause is not None and str(cause) else err["msg"]
        detail: dict[str, Any] = {"field": field, "message": message, "type": kind}
        bound = next((ctx[b] for b in _BOUNDS if isinstance(ctx.get(b), int | float)), None)
        if bound is not None:
            detail["limit"] = bound  # the number a field's own range stops at
        details.append(detail)
    return details


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: 400 when there is none, 415 for another media type, 400
    for malformed JSON or a body over the structural limits (`service.limits.parse_json`),
    413 over 1 MiB."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            "the body is larger than 1 MiB", {"max_bytes": request.app[SETTINGS_KEY].max_body_bytes}
        ) from None
    if not raw:
        # Before the media type: a request with no body at all also has none to label.
        raise ValidationFailed("a JSON body is required", [{"field": "body", "message": "empty"}])
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            "send the body as application/json", {"content_type": request.content_type}
        )
    return parse_json(raw)


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, logging context, auth, rate limit and the error envelope, in one place."""
    rid = new_request_id(request)
    request[REQUEST_ID_KEY] = rid
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=rid)
    extra_headers: dict[str, str] = {REQUEST_ID_HEADER: rid}
    request[EDGE_HEADERS_KEY] = extra_headers
    try:
        response = await _authenticated(request, handler, extra_headers)
    except ServiceError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        response = error_response(from_http_exception(exc, request.path))
    except RequestPayloadError:
        # The body's framing or Content-Encoding broke while the handler read it (a chunk
        # size that is not hex, a gzip body that is not gzip): the client's fault, not ours.
        response = error_response(body_unreadable())
    except Exception as exc:
        if _client_gone(request, exc):
            # The client closed the connection (mid-body, or mid-stream of an export): no
            # outage and no bug. Nobody reads this answer; /metrics counts it 499, nginx's
            # "client closed request", not a 503 that would page someone.
            log.info("client_disconnected", path=request.path, method=request.method)
            response = web.Response(status=CLIENT_CLOSED_REQUEST)
        elif (cause := outage_cause(exc)) is not None:
            # An outage, not a bug: tell the client what and when to come back (DESIGN §3).
            log.warning(
                "service_unavailable",
                path=request.path,
                method=request.method,
                cause=cause,
                error=repr(exc)[:500],
            )
            response = error_response(unavailable(cause))
        else:
            log.exception("unhandled_error", path=request.path, method=request.method)
            response = error_response(ServiceError("an unexpected error occurred"))
    finally:
        structlog.contextvars.clear_contextvars()
    response.headers.update(extra_headers)
    return response


# The 503 of each outage (service.faults.outage_cause): its class (code) and message.
_OUTAGES: dict[str, tuple[type[Unavailable], str]] = {
    DATABASE_TIMEOUT: (
        DatabaseTimeout,
        "the service's database is not answering in time right now; retry later",
    ),
    STORAGE_FULL: (
        StorageFull,
        "the service's database storage is full, so no change can be saved until an "
        "operator frees space; retry later",
    ),
    DATABASE_BUSY: (
        DatabaseBusy,
        "another process holds the service's database write lock (SQLite) right now; retry later",
    ),
}


def unavailable(cause: str) -> Unavailable:
    """The 503 for an outage of this cause (`service.faults.outage_cause`), with
    ``Retry-After``: ``database_timeout``, ``storage_full`` or ``database_busy`` by name,
    ``service_unavailable`` for a database or broker that refuses or is unreachable."""
    kind, message = _OUTAGES.get(
        cause,
        (Unavailable, "the service cannot reach its database or broker right now; retry later"),
    )
    return kind(message, headers={"Retry-After": str(RETRY_AFTER_S)})


CLIENT_CLOSED_REQUEST = 499
"""The status recorded (never sent) for a request whose client went away (nginx's 499)."""


def _client_gone(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is the request's own connection lost: a reset (aiohttp raises
    ConnectionResetError, or its ClientConnectionResetError subclass, reading a body that
    never came whole or writing to a closed socket) with this request's transport closed or
    closing. A database connection reset leaves the client's transport open: an outage."""
    transport = request.transport
    closed = transport is None or transport.is_closing()
    return isinstance(exc, ConnectionResetError) and closed


async def edge_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a streamed response (the audit export) sends its headers
    inside the handler, before the middleware sees it; they get the edge headers here."""
    if isinstance(request, web.Request) and EDGE_HEADERS_KEY in request:
        response.headers.update(request[EDGE_HEADERS_KEY])


async def _authenticated(
    request: web.Request, handler: Handler, extra_headers: dict[str, str]
) -> web.StreamResponse:
    match_info = request.match_info
    if match_info.http_exception is not None:
        raise match_info.http_exception
    # A path's catch-all (405 with Allow, OPTIONS) needs no key: it reveals only the route table.
    if not request.path.startswith("/v1/") or match_info.route.method == hdrs.METH_ANY:
        return await handler(request)
    # Two Authorization headers (RFC 9110 §11.6.2: one credential per request) could name
    # two workspaces; which one a proxy or we would pick is not for either to guess.
    auths = request.headers.getall("Authorization", [""])
    scheme, _, token = auths[0].partition(" ")
    if len(auths) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "send your API key as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    who = await authenticate(request.app[DB_KEY], token.strip())
    if who is None:
        raise Unauthenticated("unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    request[PRINCIPAL_KEY] = who
    structlog.contextvars.bind_contextvars(workspace_id=str(who.workspace_id))
    limiter = request.app[RATE_LIMITER_KEY]
    allowed, headers = limiter.check(who.key_id)
    extra_headers.update(headers)
    if not allowed:
        raise RateLimited("too many requests for this key; slow down", headers=headers)
    return await handler(request)


def body_unreadable() -> MalformedRequest:
    """The error for a body whose framing or Content-Encoding is broken."""
    return MalformedRequest(
        "the request body could not be read: its chunked encoding, length or "
        "Content-Encoding is broken",
        {"part": "body"},
    )


def from_http_exception(exc: web.HTTPException, path: str) -> ServiceError:
    """The envelope's error for an aiohttp HTTP exception (the router's 404 and 405, the
    body limit's 413, the expect handler's 417, any other by its status and reason)."""
    if isinstance(exc, web.HTTPNotFound):
        if len(path) > 1 and path.endswith("/"):
            # No route ends with "/": say so rather than only "no such resource".
            return NotFound(f"no such resource; without the trailing slash: {path.rstrip('/')}")
        return NotFound("no such resource")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return MethodNotAllowed(
            f"method {exc.method} is not allowed here",
            {"allowed_methods": allowed},
            headers={"Allow": ",".join(allowed)},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("the body is larger than allowed")
    if isinstance(exc, web.HTTPExpectationFailed):
        return ExpectationFailed(
            "the only Expect this service takes is 100-continue", {"header": "Expect"}
        )
    error = ServiceError(exc.reason or "error")
    error.status = exc.status
    error.code = (exc.reason or "error").lower().replace(" ", "_")
    return error
