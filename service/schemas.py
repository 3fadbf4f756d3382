"""The published contracts: JSON Schemas of events and webhook bodies, and the OpenAPI document.

Everything under ``schemas/`` is generated from here, so the files never drift from the
code (a unit test checks that they do not)::

    python -m service.schemas

writes

- ``schemas/events/<type>.schema.json`` — the CloudEvents envelope (``cloudevent``) and
  the ``data`` of each event type on Kafka (``contact.deleted`` …);
- ``schemas/webhooks/<type>.schema.json`` — the whole body a webhook receiver gets for
  each event type, and ``payload`` for the shape common to all of them;
- ``schemas/openapi.json`` — the OpenAPI 3.1 document of the HTTP API (DESIGN §3), which
  ``GET /openapi.json`` serves. Request bodies come from the pydantic models the API
  validates with; response shapes are written here, next to the routes they describe.

Pure: building the documents does no I/O; only `write_all` touches the disk.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from service.audit.chain import VerifyResult
from service.contacts.models import (
    ActivityCreate,
    ContactCreate,
    ContactQuery,
    NoteCreate,
    TaskCreate,
)
from service.deletion.models import BulkDeleteRequest, ErrorCode, ItemStatus, JobStatus
from service.events import (
    TYPE_CONTACT_DELETED,
    TYPE_DELETION_REQUESTED,
    TYPE_JOB_COMPLETED,
    TYPE_JOB_EXPAND,
    CloudEvent,
    ContactDeleted,
    DeletionJobCompleted,
    DeletionRequested,
    JobExpand,
)
from service.webhooks.payloads import (
    TYPE_WEBHOOK_TEST,
    ContactDeletedWebhook,
    DeletionJobCompletedWebhook,
    WebhookPayload,
    WebhookTestWebhook,
)

Schema = dict[str, Any]

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
"""Where the generated files live in the repository."""

OPENAPI_FILE = "openapi.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_COMPONENT_REF = "#/components/schemas/{model}"

_EVENT_MODELS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("events/cloudevent", CloudEvent),
    (f"events/{TYPE_DELETION_REQUESTED}", DeletionRequested),
    (f"events/{TYPE_JOB_EXPAND}", JobExpand),
    (f"events/{TYPE_CONTACT_DELETED}", ContactDeleted),
    (f"events/{TYPE_JOB_COMPLETED}", DeletionJobCompleted),
    ("webhooks/payload", WebhookPayload),
    (f"webhooks/{TYPE_CONTACT_DELETED}", ContactDeletedWebhook),
    (f"webhooks/{TYPE_JOB_COMPLETED}", DeletionJobCompletedWebhook),
    (f"webhooks/{TYPE_WEBHOOK_TEST}", WebhookTestWebhook),
)

_WEBHOOK_MODELS: tuple[tuple[str, type[BaseModel]], ...] = (
    (TYPE_CONTACT_DELETED, ContactDeletedWebhook),
    (TYPE_JOB_COMPLETED, DeletionJobCompletedWebhook),
    (TYPE_WEBHOOK_TEST, WebhookTestWebhook),
)


def event_schemas() -> dict[str, Schema]:
    """Standalone JSON Schemas of the events and webhook bodies, by path under schemas/."""
    return {
        f"{name}.schema.json": {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}
        for name, model in _EVENT_MODELS
    }


# --- OpenAPI: small builders -------------------------------------------------------------


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(type_: str, **extra: Any) -> Schema:
    return {"type": [type_, "null"], **extra}


def _object(properties: dict[str, Schema], required: Iterable[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    required = list(required)
    if required:
        schema["required"] = required
    return schema


def _enum(values: Iterable[str], *, nullable: bool = False) -> Schema:
    names: list[str | None] = [str(v) for v in values]
    if nullable:
        return {"type": ["string", "null"], "enum": [*names, None]}
    return {"type": "string", "enum": names}


_UUID: Schema = {"type": "string", "format": "uuid"}
_TIME: Schema = {"type": "string", "format": "date-time"}
_TIME_OR_NULL: Schema = _nullable("string", format="date-time")
_HASH: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _data(schema: Schema) -> Schema:
    """The success envelope `{"data": …}`."""
    return _object({"data": schema}, ["data"])


def _page(item: Schema) -> Schema:
    """A page of a list: `{"data": [...], "next_cursor": …}`."""
    return _object(
        {
            "data": {"type": "array", "items": item},
            "next_cursor": _nullable(
                "string", description="Pass as `cursor` for the next page; null on the last"
            ),
        },
        ["data", "next_cursor"],
    )


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


class _Components:
    """The `components.schemas` being built; refuses two different schemas of one name."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def add(self, name: str, schema: Schema) -> Schema:
        existing = self.schemas.setdefault(name, schema)
        if existing != schema:
            raise ValueError(f"two different schemas are named {name!r}")
        return _ref("schemas", name)

    def model(self, model: type[BaseModel]) -> Schema:
        """A pydantic model's schema, with its `$defs` hoisted into the components."""
        return self._hoisted(model.__name__, model.model_json_schema(ref_template=_COMPONENT_REF))

    def adapted(self, name: str, type_: Any) -> Schema:
        """The schema of a type pydantic can describe (a dataclass, say)."""
        adapter: TypeAdapter[Any] = TypeAdapter(type_)
        return self._hoisted(name, adapter.json_schema(ref_template=_COMPONENT_REF))

    def _hoisted(self, name: str, schema: Schema) -> Schema:
        for def_name, definition in schema.pop("$defs", {}).items():
            self.add(def_name, definition)
        return self.add(name, schema)


# --- OpenAPI: the shared parts ------------------------------------------------------------

_API_HEADERS = ("X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
"""Headers on every response under /v1/ once the key is known."""

_OPS_HEADERS = ("X-Request-ID",)

_HEADERS: dict[str, Schema] = {
    "X-Request-ID": {
        "description": "The request id: the client's own if it sent a valid one, else a new one",
        "schema": {"type": "string"},
    },
    "X-RateLimit-Limit": {
        "description": "Requests this key may burst (the token bucket's capacity)",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the bucket now",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Reset": {
        "description": "Seconds until the bucket is full again",
        "schema": {"type": "integer"},
    },
    "Retry-After": {
        "description": "Seconds to wait before the next request",
        "schema": {"type": "integer"},
    },
    "Idempotent-Replayed": {
        "description": "Present on a stored answer replayed for a repeated Idempotency-Key",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Location": {
        "description": "Where the job can be polled: /v1/bulk-jobs/{job_id}",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}},
}

_ERRORS: dict[int, tuple[str, str, tuple[str, ...]]] = {
    400: (
        "BadRequest",
        "`validation_error`: malformed JSON, unknown fields, too many ids or emails, no "
        "selector, a bad UUID or email, invalid query parameters or Idempotency-Key",
        _API_HEADERS,
    ),
    401: (
        "Unauthorized",
        "`invalid_key`: the API key is missing, unknown or revoked",
        ("X-Request-ID", "WWW-Authenticate"),
    ),
    403: ("Forbidden", "`insufficient_permissions`: the key lacks the scope", _API_HEADERS),
    404: (
        "NotFound",
        "`not_found`: no such resource in this workspace (the API never says which)",
        _API_HEADERS,
    ),
    409: (
        "IdempotencyConflict",
        "`idempotency_conflict`: this Idempotency-Key was used with another body, or its "
        "first request is still running",
        _API_HEADERS,
    ),
    413: ("PayloadTooLarge", "`payload_too_large`: the body is over 1 MiB", _API_HEADERS),
    415: (
        "UnsupportedMediaType",
        "`unsupported_media_type`: the body is not application/json",
        _API_HEADERS,
    ),
    429: (
        "RateLimited",
        "`rate_limited`: the key's rate limit is exceeded; wait Retry-After seconds",
        (*_API_HEADERS, "Retry-After"),
    ),
}

_ERROR_SCHEMA: Schema = _object(
    {
        "error": _object(
            {
                "code": {
                    "type": "string",
                    "description": "Stable, machine-readable: validation_error, invalid_key, "
                    "insufficient_permissions, not_found, idempotency_conflict, "
                    "payload_too_large, unsupported_media_type, rate_limited, …",
                },
                "message": {"type": "string", "description": "For people; may change"},
                "details": {
                    "description": "More about the error, or null. For validation_error a "
                    "list of {field, message, type}."
                },
            },
            ["code", "message", "details"],
        )
    },
    ["error"],
    additionalProperties=False,
)

_PARAMETERS: dict[str, Schema] = {
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes the request safe to retry: the same key with the same body "
        "within 24 h gets the original answer again (with Idempotent-Replayed: true); with "
        "another body, 409. Strongly recommended.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    },
    "Prefer": {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait=N` (N ≤ 60): wait up to N seconds for the job and answer 200 "
        "with the finished job if it finished in time (RFC 7240)",
        "schema": {"type": "string", "examples": ["wait=10"]},
    },
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Your id for this request; echoed back and logged",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:\\-]{1,200}$"},
    },
    "Cursor": {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "The `next_cursor` of the previous page",
        "schema": {"type": "string"},
    },
    "ContactId": {"name": "contact_id", "in": "path", "required": True, "schema": _UUID},
    "JobId": {"name": "job_id", "in": "path", "required": True, "schema": _UUID},
    "EndpointId": {"name": "endpoint_id", "in": "path", "required": True, "schema": _UUID},
    "DeliveryId": {"name": "delivery_id", "in": "path", "required": True, "schema": _UUID},
}


def _query(name: str, schema: Schema, description: str | None = None) -> Schema:
    param: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description is not None:
        param["description"] = description
    return param


def _limit(default: int, maximum: int) -> Schema:
    return _query(
        "limit", {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    )


def _headers(names: Iterable[str]) -> Schema:
    return {name: _ref("headers", name) for name in names}


def _response(
    description: str,
    schema: Schema | None = None,
    *,
    headers: Sequence[str] = _API_HEADERS,
    media_type: str = "application/json",
) -> Schema:
    response: Schema = {"description": description, "headers": _headers(headers)}
    if schema is not None:
        response["content"] = {media_type: {"schema": schema}}
    return response


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    *,
    scope: str | None,
    responses: dict[str, Schema],
    path: Sequence[str] = (),
    query: Sequence[Schema] = (),
    headers: Sequence[str] = (),
    body: Schema | None = None,
    errors: Sequence[int] = (),
    description: str | None = None,
) -> Schema:
    """One operation; the error responses that always apply are added from what it takes.

    A scope means auth and a rate limit (401, 403, 429); a JSON body can be malformed, too
    large or not JSON (400, 413, 415); a query or header parameter can be invalid (400); a
    path id can name nothing (404).
    """
    codes = set(errors)
    if scope is not None:
        codes |= {401, 403, 429}
    if body is not None:
        codes |= {400, 413, 415}
    if query or headers:
        codes.add(400)
    if path:
        codes.add(404)
    op: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "parameters": [
            *(_ref("parameters", p) for p in path),
            *query,
            *(_ref("parameters", h) for h in headers),
            _ref("parameters", "RequestId"),
        ],
        "responses": {
            **responses,
            **{str(c): _ref("responses", _ERRORS[c][0]) for c in sorted(codes)},
        },
        "security": [{"bearer": [scope]}] if scope is not None else [],
    }
    if description is not None:
        op["description"] = description
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    return op


# --- OpenAPI: the resources ---------------------------------------------------------------


def _resource_schemas(c: _Components) -> dict[str, Schema]:
    """The hand-written response (and webhook endpoint request) shapes, as refs."""
    actor = _object({"type": {"type": "string"}, "id": {"type": "string"}}, ["type", "id"])
    timeline_item = c.add(
        "TimelineItem",
        _object(
            {
                "id": _UUID,
                "kind": _enum(["activity", "note", "task"]),
                "contact_id": _nullable(
                    "string", format="uuid", description="null once the contact is deleted"
                ),
                "created_at": _TIME,
                "type": {"type": "string", "description": "activity only"},
                "subject": _nullable("string", description="activity only"),
                "occurred_at": _nullable("string", format="date-time", description="activity only"),
                "title": {"type": "string", "description": "task only"},
                "status": {**_enum(["open", "completed"]), "description": "task only"},
                "due_at": _nullable("string", format="date-time", description="task only"),
                "body": _nullable("string"),
            },
            ["id", "kind", "contact_id", "created_at"],
        ),
    )
    job_error = c.add(
        "JobError",
        _object(
            {
                "contact_id": {"type": "string"},
                "code": _enum(ErrorCode),
                "message": {"type": "string"},
            },
            ["contact_id", "code", "message"],
        ),
    )
    counts = ("total_requested", "processed_count", "deleted_count", "not_found_count")
    endpoint_fields: dict[str, Schema] = {
        "url": {"type": "string", "format": "uri", "maxLength": 2048},
        "event_types": {
            "type": "array",
            "items": _enum([TYPE_CONTACT_DELETED, TYPE_JOB_COMPLETED, TYPE_WEBHOOK_TEST]),
            "description": "The event types to send; empty or omitted: all of them",
        },
        "description": _nullable("string", maxLength=500),
        "rate_limit_per_s": _nullable(
            "number",
            exclusiveMinimum=0,
            maximum=10_000,
            description="At most this many deliveries a second to this endpoint",
        ),
    }
    endpoint = c.add(
        "WebhookEndpoint",
        _object(
            {
                "id": _UUID,
                **endpoint_fields,
                "status": _enum(["enabled", "disabled"]),
                "disabled_reason": _nullable("string"),
                "created_at": _TIME,
                "updated_at": _TIME,
            },
            ["id", "url", "event_types", "status", "created_at", "updated_at"],
        ),
    )
    delivery = c.add(
        "WebhookDelivery",
        _object(
            {
                "id": _UUID,
                "endpoint_id": _UUID,
                "event_id": {"type": "string", "description": "The webhook-id header"},
                "event_type": {"type": "string"},
                "status": _enum(["pending", "succeeded", "failed", "cancelled"]),
                "attempt_count": {"type": "integer", "minimum": 0},
                "next_attempt_at": _TIME_OR_NULL,
                "last_attempt_at": _TIME_OR_NULL,
                "created_at": _TIME,
                "completed_at": _TIME_OR_NULL,
            },
            ["id", "endpoint_id", "event_id", "event_type", "status", "attempt_count"],
        ),
    )
    attempt = c.add(
        "WebhookAttempt",
        _object(
            {
                "id": _UUID,
                "attempted_at": _TIME,
                "status_code": _nullable("integer", description="null when no answer came"),
                "latency_ms": {"type": "number"},
                "error": _nullable("string"),
                "response_body": _nullable("string", description="The start of the answer"),
            },
            ["attempted_at", "status_code", "latency_ms", "error"],
        ),
    )
    audit_event = c.add(
        "AuditEvent",
        _object(
            {
                "seq": {"type": "integer", "minimum": 1, "description": "Gap-free per workspace"},
                "id": _UUID,
                "workspace_id": _UUID,
                "occurred_at": _TIME,
                "actor": actor,
                "action": {"type": "string", "examples": ["contact.deleted"]},
                "target": {
                    "anyOf": [
                        _object({"type": {"type": "string"}, "id": {"type": "string"}}),
                        {"type": "null"},
                    ]
                },
                "job_id": _nullable("string"),
                "request_id": _nullable("string"),
                "data": {"type": "object"},
                "prev_hash": _HASH,
                "hash": {
                    **_HASH,
                    "description": "SHA-256(prev_hash ‖ canonical JSON of the event)",
                },
            },
            ["seq", "id", "occurred_at", "actor", "action", "data", "prev_hash", "hash"],
        ),
    )
    return {
        "Contact": c.add(
            "Contact",
            _object(
                {
                    "id": _UUID,
                    "email": {"type": "string", "format": "email"},
                    "first_name": _nullable("string"),
                    "last_name": _nullable("string"),
                    "phone": _nullable("string"),
                    "properties": {"type": "object"},
                    "member_role": _enum(["member", "owner", "contributor"], nullable=True),
                    "has_billing_subscription": {"type": "boolean"},
                    "created_at": _TIME,
                    "updated_at": _TIME,
                },
                ["id", "email", "member_role", "has_billing_subscription", "created_at"],
            ),
        ),
        "TimelineItem": timeline_item,
        "Timeline": _object({"items": {"type": "array", "items": timeline_item}}, ["items"]),
        "Job": c.add(
            "Job",
            _object(
                {
                    "job_id": _UUID,
                    "status": _enum(JobStatus),
                    "dry_run": {"type": "boolean"},
                    "delete_members": {"type": "boolean"},
                    "selector": {
                        "type": "object",
                        "description": "contact_ids, emails, or filter and/or search",
                    },
                    **{name: {"type": "integer", "minimum": 0} for name in counts},
                    "failed_count": {"type": "integer", "minimum": 0},
                    "not_found": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Ids or emails that matched nothing (the first ones)",
                    },
                    "errors": {"type": "array", "items": job_error},
                    "created_at": _TIME,
                    "started_at": _TIME_OR_NULL,
                    "completed_at": _TIME_OR_NULL,
                },
                ["job_id", "status", "dry_run", "selector", *counts, "failed_count"],
            ),
        ),
        "JobItem": c.add(
            "JobItem",
            _object(
                {
                    "ref": {"type": "string", "description": "The contact id or email asked for"},
                    "contact_id": _nullable("string", format="uuid"),
                    "status": _enum(ItemStatus),
                    "error_code": _enum(ErrorCode, nullable=True),
                    "error_message": _nullable("string"),
                    "processed_at": _TIME_OR_NULL,
                },
                ["ref", "contact_id", "status"],
            ),
        ),
        "WebhookEndpointCreate": c.add(
            "WebhookEndpointCreate",
            _object(endpoint_fields, ["url"], additionalProperties=False),
        ),
        "WebhookEndpointUpdate": c.add(
            "WebhookEndpointUpdate",
            _object(
                {**endpoint_fields, "url": _nullable("string", format="uri", maxLength=2048)},
                additionalProperties=False,
                minProperties=1,
            ),
        ),
        "WebhookEndpoint": endpoint,
        "WebhookEndpointWithSecret": c.add(
            "WebhookEndpointWithSecret",
            {
                "allOf": [
                    endpoint,
                    _object(
                        {
                            "secret": {
                                "type": "string",
                                "pattern": "^whsec_[A-Za-z0-9+/]+=*$",
                                "description": "The signing secret; shown only here",
                            }
                        },
                        ["secret"],
                    ),
                ]
            },
        ),
        "WebhookDelivery": delivery,
        "WebhookDeliveryWithAttempts": c.add(
            "WebhookDeliveryWithAttempts",
            {
                "allOf": [
                    delivery,
                    _object({"attempts": {"type": "array", "items": attempt}}, ["attempts"]),
                ]
            },
        ),
        "WebhookRecover": c.add(
            "WebhookRecover",
            _object(
                {"since": {**_TIME, "description": "With a timezone, e.g. …Z"}},
                ["since"],
                additionalProperties=False,
            ),
        ),
        "AuditEvent": audit_event,
        "AuditContactTimeline": c.add(
            "AuditContactTimeline",
            _object(
                {
                    "contact_id": _UUID,
                    "deletion": {
                        "anyOf": [audit_event, {"type": "null"}],
                        "description": "The contact.deleted event",
                    },
                    "requested_by": _object(
                        {
                            "actor": actor,
                            "job_id": _nullable("string"),
                            "request_id": _nullable("string"),
                        },
                        description="Who asked for the deletion: the key, job and request",
                    ),
                    "timeline": {
                        "type": "array",
                        "items": timeline_item,
                        "description": "The items that lost their back-reference, as now",
                    },
                },
                ["contact_id"],
            ),
        ),
        "VerifyResult": c.adapted("VerifyResult", VerifyResult),
    }


def _job_answers(job: Schema) -> dict[str, Schema]:
    replayed = (*_API_HEADERS, "Idempotent-Replayed")
    return {
        "200": _response(
            "A dry run, or the job finished within `Prefer: wait`",
            _data(job),
            headers=replayed,
        ),
        "202": _response(
            "Accepted; poll the job at Location",
            _data(job),
            headers=(*replayed, "Location"),
        ),
    }


def _contact_paths(c: _Components, r: dict[str, Schema]) -> dict[str, Schema]:
    read, write, tag = "contacts:read", "contacts:write", "Contacts"

    def timeline_adder(kind: str, model: type[BaseModel]) -> Schema:
        return {
            "post": _operation(
                f"add{kind.capitalize()}",
                f"Add a {kind} to a contact's timeline",
                tag,
                scope=write,
                path=["ContactId"],
                body=c.model(model),
                responses={"201": _response(f"The {kind}", _data(r["TimelineItem"]))},
            )
        }

    return {
        "/v1/contacts": {
            "post": _operation(
                "createContact",
                "Create a contact",
                tag,
                scope=write,
                body=c.model(ContactCreate),
                responses={"201": _response("The contact", _data(r["Contact"]))},
            )
        },
        "/v1/contacts/query": {
            "post": _operation(
                "queryContacts",
                "Find contacts by filter and/or search",
                tag,
                scope=read,
                body=c.model(ContactQuery),
                description="The same filter language as bulk delete: the dry run of a filter.",
                responses={"200": _response("A page of contacts", _page(r["Contact"]))},
            )
        },
        "/v1/contacts/{contact_id}": {
            "get": _operation(
                "getContact",
                "Get a contact",
                tag,
                scope=read,
                path=["ContactId"],
                responses={"200": _response("The contact", _data(r["Contact"]))},
            ),
            "delete": _operation(
                "deleteContact",
                "Delete one contact (a deletion job of one)",
                "Deletion",
                scope=write,
                path=["ContactId"],
                headers=["IdempotencyKey", "Prefer"],
                errors=[409],
                responses=_job_answers(r["Job"]),
            ),
        },
        "/v1/contacts/{contact_id}/activities": timeline_adder("activity", ActivityCreate),
        "/v1/contacts/{contact_id}/notes": timeline_adder("note", NoteCreate),
        "/v1/contacts/{contact_id}/tasks": timeline_adder("task", TaskCreate),
        "/v1/contacts/{contact_id}/timeline": {
            "get": _operation(
                "getContactTimeline",
                "A contact's activities, notes and tasks",
                tag,
                scope=read,
                path=["ContactId"],
                responses={"200": _response("The timeline", _data(r["Timeline"]))},
            )
        },
    }


def _deletion_paths(c: _Components, r: dict[str, Schema]) -> dict[str, Schema]:
    tag, read = "Deletion", "contacts:read"
    return {
        "/v1/contacts/bulk-delete": {
            "post": _operation(
                "bulkDelete",
                "Delete contacts by ids, emails, or filter and/or search",
                tag,
                scope="contacts:write",
                headers=["IdempotencyKey", "Prefer"],
                body=c.model(BulkDeleteRequest),
                errors=[409],
                description="Exactly one selector: `contact_ids` (1 to 500), `emails` (1 to 1000), "
                "or `filter` and/or `search`. The job runs in the background; a contact "
                "that matches nothing is `not_found`, never an error. `dry_run` changes "
                "nothing and answers 200 with the counts a real run would give.",
                responses=_job_answers(r["Job"]),
            )
        },
        "/v1/bulk-jobs": {
            "get": _operation(
                "listJobs",
                "List deletion jobs, newest first",
                tag,
                scope=read,
                query=[_limit(50, 500), _ref("parameters", "Cursor")],
                responses={"200": _response("A page of jobs", _page(r["Job"]))},
            )
        },
        "/v1/bulk-jobs/{job_id}": {
            "get": _operation(
                "getJob",
                "Get a deletion job",
                tag,
                scope=read,
                path=["JobId"],
                responses={"200": _response("The job", _data(r["Job"]))},
            )
        },
        "/v1/bulk-jobs/{job_id}/items": {
            "get": _operation(
                "listJobItems",
                "Page through a job's per-contact outcomes",
                tag,
                scope=read,
                path=["JobId"],
                query=[
                    _query("status", _enum(ItemStatus)),
                    _limit(50, 500),
                    _ref("parameters", "Cursor"),
                ],
                responses={"200": _response("A page of items", _page(r["JobItem"]))},
            )
        },
    }


def _webhook_paths(r: dict[str, Schema]) -> dict[str, Schema]:
    tag, scope = "Webhooks", "webhooks:manage"
    base = "/v1/webhooks/endpoints"
    one = f"{base}/{{endpoint_id}}"
    endpoint = _data(r["WebhookEndpoint"])
    with_secret = _data(r["WebhookEndpointWithSecret"])

    def endpoint_action(operation_id: str, summary: str, responses: dict[str, Schema]) -> Schema:
        return {
            "post": _operation(
                operation_id, summary, tag, scope=scope, path=["EndpointId"], responses=responses
            )
        }

    return {
        base: {
            "post": _operation(
                "createWebhookEndpoint",
                "Subscribe a webhook receiver",
                tag,
                scope=scope,
                body=r["WebhookEndpointCreate"],
                description="A URL that resolves to a private, loopback or link-local "
                "address is refused unless the operator allows it.",
                responses={"201": _response("The endpoint, with its secret", with_secret)},
            ),
            "get": _operation(
                "listWebhookEndpoints",
                "List webhook endpoints",
                tag,
                scope=scope,
                responses={
                    "200": _response(
                        "The endpoints", _data({"type": "array", "items": r["WebhookEndpoint"]})
                    )
                },
            ),
        },
        one: {
            "get": _operation(
                "getWebhookEndpoint",
                "Get a webhook endpoint",
                tag,
                scope=scope,
                path=["EndpointId"],
                responses={"200": _response("The endpoint", endpoint)},
            ),
            "patch": _operation(
                "updateWebhookEndpoint",
                "Change a webhook endpoint",
                tag,
                scope=scope,
                path=["EndpointId"],
                body=r["WebhookEndpointUpdate"],
                responses={"200": _response("The endpoint", endpoint)},
            ),
            "delete": _operation(
                "deleteWebhookEndpoint",
                "Delete a webhook endpoint",
                tag,
                scope=scope,
                path=["EndpointId"],
                responses={"204": _response("Deleted")},
            ),
        },
        f"{one}/rotate-secret": endpoint_action(
            "rotateWebhookSecret",
            "Issue a new secret; the old one keeps signing alongside it for 24 h",
            {"200": _response("The endpoint, with its new secret", with_secret)},
        ),
        f"{one}/test": endpoint_action(
            "testWebhookEndpoint",
            "Send a webhook.test event",
            {
                "202": _response(
                    "Queued",
                    _data(
                        _object(
                            {"event_id": {"type": "string"}, "endpoint_id": _UUID},
                            ["event_id", "endpoint_id"],
                        )
                    ),
                )
            },
        ),
        f"{one}/enable": endpoint_action(
            "enableWebhookEndpoint",
            "Re-enable a disabled endpoint",
            {"200": _response("The endpoint", endpoint)},
        ),
        f"{one}/recover": {
            "post": _operation(
                "recoverWebhookDeliveries",
                "Send again every failed delivery since a time",
                tag,
                scope=scope,
                path=["EndpointId"],
                body=r["WebhookRecover"],
                responses={
                    "202": _response(
                        "Queued again",
                        _data(
                            _object(
                                {
                                    "endpoint_id": _UUID,
                                    "requeued": {"type": "integer", "minimum": 0},
                                },
                                ["endpoint_id", "requeued"],
                            )
                        ),
                    )
                },
            )
        },
        f"{one}/deliveries": {
            "get": _operation(
                "listWebhookDeliveries",
                "List an endpoint's deliveries, newest first",
                tag,
                scope=scope,
                path=["EndpointId"],
                query=[
                    _query("status", _enum(["pending", "succeeded", "failed", "cancelled"])),
                    _limit(50, 500),
                    _ref("parameters", "Cursor"),
                ],
                responses={"200": _response("A page of deliveries", _page(r["WebhookDelivery"]))},
            )
        },
        "/v1/webhooks/deliveries/{delivery_id}": {
            "get": _operation(
                "getWebhookDelivery",
                "A delivery with its attempts: time, status code, latency, error",
                tag,
                scope=scope,
                path=["DeliveryId"],
                responses={
                    "200": _response("The delivery", _data(r["WebhookDeliveryWithAttempts"]))
                },
            )
        },
        "/v1/webhooks/deliveries/{delivery_id}/retry": {
            "post": _operation(
                "retryWebhookDelivery",
                "Send a delivery again now",
                tag,
                scope=scope,
                path=["DeliveryId"],
                responses={"202": _response("Queued", _data(r["WebhookDelivery"]))},
            )
        },
    }


def _audit_paths(r: dict[str, Schema]) -> dict[str, Schema]:
    tag, scope = "Audit", "audit:read"
    return {
        "/v1/audit/events": {
            "get": _operation(
                "listAuditEvents",
                "Search the audit trail, in seq order",
                tag,
                scope=scope,
                query=[
                    _query("target_id", {"type": "string"}),
                    _query("job_id", {"type": "string"}),
                    _query("action", {"type": "string"}, "e.g. contact.deleted"),
                    _query("actor", {"type": "string"}, "An actor id, e.g. an API key id"),
                    _query("since", _TIME),
                    _query("until", _TIME),
                    _limit(100, 1000),
                    _ref("parameters", "Cursor"),
                ],
                responses={"200": _response("A page of events", _page(r["AuditEvent"]))},
            )
        },
        "/v1/audit/contacts/{contact_id}/timeline": {
            "get": _operation(
                "getDeletedContactTimeline",
                "What happened to a deleted contact, and its timeline as it stands now",
                tag,
                scope=scope,
                path=["ContactId"],
                responses={
                    "200": _response("The deletion and timeline", _data(r["AuditContactTimeline"]))
                },
            )
        },
        "/v1/audit/verify": {
            "get": _operation(
                "verifyAuditChain",
                "Walk the hash chain: ok with the head hash, or the first broken seq",
                tag,
                scope=scope,
                responses={"200": _response("The verdict", _data(r["VerifyResult"]))},
            )
        },
        "/v1/audit/export": {
            "get": _operation(
                "exportAuditEvents",
                "Stream the audit trail as NDJSON, one AuditEvent a line",
                tag,
                scope=scope,
                query=[_query("since_seq", {"type": "integer", "minimum": 1, "default": 1})],
                responses={
                    "200": _response(
                        "The events from since_seq on",
                        {"type": "string"},
                        media_type="application/x-ndjson",
                    )
                },
            )
        },
    }


def _ops_paths() -> dict[str, Schema]:
    tag = "Operations"

    def get(operation_id: str, summary: str, responses: dict[str, Schema]) -> Schema:
        return {"get": _operation(operation_id, summary, tag, scope=None, responses=responses)}

    status = _data(_object({"status": {"type": "string"}}, ["status"]))
    checks = {"type": "object", "additionalProperties": {"type": "string"}}
    return {
        "/healthz": get(
            "healthz", "Alive", {"200": _response("Alive", status, headers=_OPS_HEADERS)}
        ),
        "/readyz": get(
            "readyz",
            "Ready: the database and Kafka are reachable",
            {
                "200": _response(
                    "Ready",
                    _data(_object({"status": {"type": "string"}, "checks": checks}, ["status"])),
                    headers=_OPS_HEADERS,
                ),
                "503": _response(
                    "`not_ready`: details name what is unreachable",
                    _ref("schemas", "Error"),
                    headers=_OPS_HEADERS,
                ),
            },
        ),
        "/metrics": get(
            "metrics",
            "Prometheus metrics",
            {
                "200": _response(
                    "The metrics", {"type": "string"}, headers=_OPS_HEADERS, media_type="text/plain"
                )
            },
        ),
        "/openapi.json": get(
            "openapi",
            "This document",
            {"200": _response("OpenAPI 3.1", {"type": "object"}, headers=_OPS_HEADERS)},
        ),
    }


def _me_paths() -> dict[str, Schema]:
    """``GET /v1/me``: any valid key may ask which workspace and scopes it has."""
    me = _object(
        {
            "workspace_id": _UUID,
            "workspace_name": {"type": "string"},
            "key_id": _UUID,
            "scopes": {
                "type": "array",
                "items": _enum(
                    ["contacts:read", "contacts:write", "webhooks:manage", "audit:read"]
                ),
            },
        },
        ["workspace_id", "workspace_name", "key_id", "scopes"],
    )
    op = _operation(
        "getMe",
        "The calling key: its workspace and the scopes it holds",
        "Operations",
        scope=None,
        responses={"200": _response("The key", _data(me))},
        errors=(401, 429),
        description="Needs no scope: any valid key may learn its own scopes (the console "
        "uses it to show only what the key can use).",
    )
    op["security"] = [{"bearer": []}]
    return {"/v1/me": {"get": op}}


def _console_paths() -> dict[str, Schema]:
    """The web console and this document rendered, with their assets (HTML, not JSON)."""
    tag = "Console"
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}

    def page(operation_id: str, summary: str, media_type: str, asset: bool = False) -> Schema:
        op = _operation(
            operation_id,
            summary,
            tag,
            scope=None,
            errors=(404,) if asset else (),
            responses={
                "200": _response(
                    summary, {"type": "string"}, headers=_OPS_HEADERS, media_type=media_type
                )
            },
        )
        if asset:
            op["parameters"].insert(0, name)
        return {"get": op}

    redirect = _operation(
        "root",
        "Redirects to the console",
        tag,
        scope=None,
        responses={"302": {"description": "Location: /console"}},
    )
    return {
        "/": {"get": redirect},
        "/console": page("console", "The web console (sign in with an API key)", "text/html"),
        "/console/assets/{name}": page("consoleAsset", "A file of the console", "*/*", True),
        "/docs": page("docs", "This document, rendered by Swagger UI", "text/html"),
        "/docs/assets/{name}": page("docsAsset", "A file of Swagger UI", "*/*", True),
    }


def _webhooks(c: _Components) -> dict[str, Schema]:
    """What this service POSTs to receivers (OpenAPI 3.1 `webhooks`)."""

    def header(name: str, description: str) -> Schema:
        return {
            "name": name,
            "in": "header",
            "required": True,
            "description": description,
            "schema": {"type": "string"},
        }

    parameters = [
        header("webhook-id", "The event id, the same on every retry: dedupe on it"),
        header("webhook-timestamp", "Unix seconds of this attempt"),
        header(
            "webhook-signature",
            'v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}"> with the '
            "endpoint secret; two, space-separated, while a rotated secret is still live",
        ),
    ]
    responses = {
        "2XX": {"description": "Delivered"},
        "410": {"description": "Gone: the endpoint is disabled"},
        "429": {"description": "Retried later, honouring Retry-After"},
        "503": {"description": "Retried later, honouring Retry-After"},
    }
    return {
        event_type: {
            "post": {
                "operationId": model.__name__[0].lower() + model.__name__[1:],
                "summary": model.__doc__.strip().splitlines()[0] if model.__doc__ else event_type,
                "parameters": parameters,
                "requestBody": {"required": True, "content": _json(c.model(model))},
                "responses": responses,
            }
        }
        for event_type, model in _WEBHOOK_MODELS
    }


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (DESIGN §3), as a JSON-ready dict."""
    c = _Components()
    c.add("Error", _ERROR_SCHEMA)
    r = _resource_schemas(c)
    paths = {
        **_contact_paths(c, r),
        **_deletion_paths(c, r),
        **_webhook_paths(r),
        **_audit_paths(r),
        **_ops_paths(),
        **_me_paths(),
        **_console_paths(),
    }
    webhooks = _webhooks(c)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Contact deletion service",
            "version": "1",
            "description": "Bulk contact deletion for CRMs, with signed webhooks and a "
            'tamper-evident audit trail. Success bodies are `{"data": …}`; errors '
            '`{"error": {"code", "message", "details"}}`.',
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "The local default"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": name}
            for name in (
                "Contacts",
                "Deletion",
                "Webhooks",
                "Audit",
                "Operations",
                "Console",
            )
        ],
        "paths": paths,
        "webhooks": webhooks,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of one workspace. The scopes an operation "
                    "needs (contacts:read, contacts:write, webhooks:manage, audit:read) "
                    "are listed in its security requirement.",
                }
            },
            "schemas": c.schemas,
            "responses": {
                name: _response(description, _ref("schemas", "Error"), headers=headers)
                for name, description, headers in _ERRORS.values()
            },
            "parameters": _PARAMETERS,
            "headers": _HEADERS,
        },
    }


# --- Files --------------------------------------------------------------------------------


def render(document: Any) -> str:
    """A document as it is committed: pretty, sorted, with a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """Every generated file's text, by path relative to schemas/."""
    files = {name: render(schema) for name, schema in event_schemas().items()}
    files[OPENAPI_FILE] = render(openapi_spec())
    return files


_GENERATED_DIRS = ("events", "webhooks")


def write_all(directory: Path) -> list[Path]:
    """Write every schema under `directory`; stale `*.schema.json` files are removed."""
    files = rendered()
    for sub in _GENERATED_DIRS:
        for stale in (directory / sub).glob("*.schema.json"):
            if f"{sub}/{stale.name}" not in files:
                stale.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    """`python -m service.schemas`: regenerate the repository's schemas/."""
    for path in write_all(SCHEMAS_DIR):
        sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
