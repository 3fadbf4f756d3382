"""The service's exception tree, turned into HTTP only at the API edge (service.http).

    ServiceError
    ├── ValidationFailed        400 validation_error
    ├── MalformedRequest        400 malformed_request (not valid HTTP/1.1: service.httpserver)
    ├── Unauthenticated         401 invalid_key
    ├── Forbidden               403 insufficient_permissions
    ├── NotFound                404 not_found
    ├── Conflict                409 idempotency_conflict (and other conflicts)
    ├── PayloadTooLarge         413 payload_too_large
    ├── UriTooLong              414 uri_too_long
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── ExpectationFailed       417 expectation_failed
    ├── RateLimited             429 rate_limited
    ├── HeaderTooLarge          431 header_too_large
    └── Unavailable             503 service_unavailable (the database or broker is down)
        ├── DatabaseTimeout     503 database_timeout (the database did not answer in time)
        ├── StorageFull         503 storage_full (the database's storage is full)
        └── DatabaseBusy        503 database_busy (another process holds SQLite's write lock)

Consumers use a second pair: ``RetryLater`` (transient; back off and try again, never
skip) and ``PoisonMessage`` (never retry; dead-letter it and commit).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        details: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class ValidationFailed(ServiceError):
    status = 400
    code = "validation_error"


class Unauthenticated(ServiceError):
    status = 401
    code = "invalid_key"


class Forbidden(ServiceError):
    status = 403
    code = "insufficient_permissions"


class MalformedRequest(ServiceError):
    """The request is not valid HTTP/1.1 (request line, headers or body framing)."""

    status = 400
    code = "malformed_request"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class Conflict(ServiceError):
    status = 409
    code = "conflict"


class EndpointDisabled(Conflict):
    """An action that sends to a webhook endpoint while it is disabled."""

    code = "endpoint_disabled"


class EndpointDeleted(Conflict):
    """A send asked for a delivery whose webhook endpoint was deleted: its unsent
    deliveries failed with it and are never sent again (there is nowhere to send them)."""

    code = "endpoint_deleted"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UriTooLong(ServiceError):
    status = 414
    code = "uri_too_long"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class ExpectationFailed(ServiceError):
    status = 417
    code = "expectation_failed"


class HeaderTooLarge(ServiceError):
    """A header field over its limit, or more header fields than allowed (RFC 6585 §5)."""

    status = 431
    code = "header_too_large"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"


class Unavailable(ServiceError):
    """A dependency is not answering right now (service.faults says which errors mean it)."""

    status = 503
    code = "service_unavailable"


class DatabaseTimeout(Unavailable):
    """The database did not answer within its bound (connect, statement or pool wait):
    paused, overloaded, or behind a network that drops packets."""

    code = "database_timeout"


class StorageFull(Unavailable):
    """The database's storage is full: every write fails until an operator frees space."""

    code = "storage_full"


class DatabaseBusy(Unavailable):
    """Another process holds SQLite's write lock past the busy timeout."""

    code = "database_busy"


class RetryLater(Exception):
    """A transient failure in a consumer: back off and retry; never skip the message."""


class PoisonMessage(Exception):
    """A message that can never be processed: dead-letter it and commit its offset."""
