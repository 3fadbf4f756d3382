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
  ``GET /openapi.json`` serves, generated from the route tables (`service.routing`):
  paths, parameters, bodies and answers all come from the models the API validates with.

Pure: building the documents does no I/O; only `write_all` touches the disk.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.api import route_tables
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
from service.limits import limits_table
from service.routing import (
    IDEMPOTENCY_KEY,
    Answer,
    HeaderParam,
    Operation,
    RouteTable,
    operations,
    replays,
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


def _object(properties: dict[str, Schema], required: Iterable[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    required = list(required)
    if required:
        schema["required"] = required
    return schema


_UUID: Schema = {"type": "string", "format": "uuid"}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


class _Components:
    """The `components.schemas` being built; refuses two different schemas of one name."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}
        self.parameters: dict[str, Schema] = dict(_PARAMETERS)

    def add(self, name: str, schema: Schema) -> Schema:
        existing = self.schemas.setdefault(name, schema)
        if existing != schema:
            raise ValueError(f"two different schemas are named {name!r}")
        return _ref("schemas", name)

    def model(self, model: type[BaseModel]) -> Schema:
        """A pydantic model's schema, with its `$defs` hoisted into the components."""
        return self._hoisted(model.__name__, model.model_json_schema(ref_template=_COMPONENT_REF))

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
        "first request is still running; `endpoint_disabled` (webhooks): the endpoint is "
        "disabled, enable it first; `endpoint_deleted` (a delivery's retry): its endpoint "
        "was deleted",
        _API_HEADERS,
    ),
    410: (
        "AnswerErased",
        "`answer_erased`: an Idempotency-Key replayed after the contact its first answer "
        "showed was deleted (the answer is no longer kept; the request is not run again)",
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
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Your id for this request; echoed back and logged when it is 1-200 "
        "of A-Z a-z 0-9 . _ : - (any other value is replaced by a new id)",
        "schema": {"type": "string"},
    },
}


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


# --- OpenAPI: the operations, from the route tables ---------------------------------------


def _query_parameters(c: _Components, model: type[BaseModel]) -> list[Schema]:
    """One query parameter per field of the operation's query model."""
    schema = model.model_json_schema(ref_template=_COMPONENT_REF)
    for def_name, definition in schema.pop("$defs", {}).items():
        c.add(def_name, definition)
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        prop.pop("title", None)
        description = prop.pop("description", None)
        # `x | None = None` is "may be omitted"; a query string cannot say null.
        options = prop.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            prop.pop("anyOf")
            prop = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **prop}
        param: Schema = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _header_parameter(c: _Components, header: HeaderParam) -> Schema:
    """A request header, as a shared parameter (refused if one key names two headers)."""
    param = {
        "name": header.name,
        "in": "header",
        "required": False,
        "description": header.description,
        "schema": header.schema,
    }
    if c.parameters.setdefault(header.key, param) != param:
        raise ValueError(f"two different parameters are named {header.key!r}")
    return _ref("parameters", header.key)


def _answer(c: _Components, answer: Answer, scoped: bool) -> Schema:
    base = _API_HEADERS if scoped else _OPS_HEADERS
    headers = (*base, *answer.headers)
    if answer.model is None:
        if answer.media_type == "application/json":
            return _response(answer.description, headers=headers)
        return _response(
            answer.description, {"type": "string"}, headers=headers, media_type=answer.media_type
        )
    return _response(
        answer.description, c.model(answer.model), headers=headers, media_type=answer.media_type
    )


def _security(op: Operation) -> list[Schema]:
    """The scope an operation needs; under /v1/ a key is needed even without a scope."""
    if op.scope is not None:
        return [{"bearer": [op.scope]}]
    return [{"bearer": []}] if op.path.startswith("/v1/") else []


def _operation(c: _Components, op: Operation) -> Schema:
    """One operation; the error answers that always apply are added from what it takes.

    A scope means auth and a rate limit (401, 403, 429); a JSON body can be malformed, too
    large or not JSON (400, 413, 415); a query or header parameter can be invalid (400); a
    path id can name nothing (404).
    """
    codes = set(op.errors)
    generic_key = replays(op)  # Idempotency-Key through service.routing._once
    if generic_key:
        codes.add(409)
        if op.path.startswith("/v1/contacts"):  # its answer shows a contact
            codes.add(410)
    if op.scope is not None:
        codes |= {401, 403, 429}
    if op.body is not None:
        codes |= {400, 413, 415}
    query = _query_parameters(c, op.query)
    if query or op.headers or generic_key:
        codes.add(400)
    if op.path_params:
        codes.add(404)
    documented = {a.status for a in op.answers}
    schema: Schema = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [
            *(
                {"name": name, "in": "path", "required": True, "schema": _UUID}
                for name in op.path_params
            ),
            *query,
            *(_header_parameter(c, h) for h in op.headers),
            *([_header_parameter(c, IDEMPOTENCY_KEY)] if generic_key else []),
            _ref("parameters", "RequestId"),
        ],
        "responses": {
            **{str(a.status): _answer(c, a, op.scope is not None) for a in op.answers},
            **{
                str(code): _ref("responses", _ERRORS[code][0])
                for code in sorted(codes - documented)
            },
        },
        "security": _security(op),
    }
    if op.description is not None:
        schema["description"] = op.description
    if op.body is not None:
        schema["requestBody"] = {"required": True, "content": _json(c.model(op.body))}
    return schema


def _paths(c: _Components, tables: Sequence[RouteTable]) -> dict[str, Schema]:
    paths: dict[str, Schema] = {}
    for op in operations(tables):
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(c, op)
    return paths


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


def openapi_spec(tables: Sequence[RouteTable] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (DESIGN §3), as a JSON-ready dict.

    Built from the route tables (`service.api.route_tables` unless given): every path,
    parameter, body and answer comes from the models the service validates with.
    """
    c = _Components()
    c.add("Error", _ERROR_SCHEMA)
    paths = _paths(c, route_tables() if tables is None else tables)
    webhooks = _webhooks(c)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Contact deletion service",
            "version": "1",
            "description": "Bulk contact deletion for CRMs, with signed webhooks and a "
            'tamper-evident audit trail. Success bodies are `{"data": …}`; errors '
            '`{"error": {"code", "message", "details"}}`.\n\n' + _LIMITS_TEXT,
            "x-limits": limits_table(),
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "The local default"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": name}
            for name in ("Contacts", "Deletion", "Webhooks", "Audit", "Operations", "Console")
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
            "parameters": c.parameters,
            "headers": _HEADERS,
        },
    }


_LIMITS_TEXT = (
    "Limits, enforced before any SQL runs (over one: 400 `validation_error` whose details "
    "name it as `limit`): "
    + "; ".join(f"{name} = {value}" for name, value in limits_table().items())
    + ". Integers in query parameters and cursors are at most 2^63-1. A filter that "
    "matches every contact after simplification is refused unless `match_all` is true."
)

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
