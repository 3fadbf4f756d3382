"""The published contracts under schemas/: no drift, well formed, and true to the code."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from service.app import Services, create_app
from service.config import Settings
from service.console.routes import ASSET_PATHS, PAGE_ALIASES
from service.db import Database
from service.events import (
    TYPE_CONTACT_DELETED,
    ContactDeleted,
    DeletionJobCompleted,
    OrphanedTimeline,
    envelope,
)
from service.schemas import (
    OPENAPI_FILE,
    SCHEMAS_DIR,
    event_schemas,
    openapi_spec,
    render,
    rendered,
)
from service.webhooks.payloads import (
    ContactDeletedWebhook,
    DeletionJobCompletedWebhook,
    WebhookPayload,
    WebhookTestWebhook,
    webhook_body,
)

REGENERATE = "schemas/ is out of date: run `python -m service.schemas` and commit the result"
METHODS = {"get", "put", "post", "delete", "patch"}
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


# --- A small validator for the JSON Schema keywords pydantic emits -------------------------
# (jsonschema is not a dependency; this covers what the generated schemas use, and fails
# loudly on a keyword it does not know rather than passing it silently.)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$defs"}
_KEYWORDS = {
    "type",
    "const",
    "enum",
    "format",
    "required",
    "properties",
    "additionalProperties",
    "items",
}


def _resolve(root: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local refs are used, not {ref!r}"
    node: Any = root
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Where `value` breaks `schema` (empty when it conforms)."""
    if "$ref" in schema:
        return _errors(value, _resolve(root, schema["$ref"]), root, at)
    if "anyOf" in schema:
        options = [_errors(value, option, root, at) for option in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{at}: matches no anyOf option"]
    unknown = set(schema) - _KEYWORDS - _ANNOTATIONS
    if unknown:
        pytest.fail(f"the test validator does not know {sorted(unknown)}; teach it")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return [f"{at}: {value!r} is not of type {schema['type']}"]
    found: list[str] = []
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if "format" in schema and isinstance(value, str):
        found += _format_errors(value, schema["format"], at)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{at}: missing {n!r}" for n in schema.get("required", []) if n not in value]
        for name, item in value.items():
            if name in properties:
                found += _errors(item, properties[name], root, f"{at}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{at}: unexpected {name!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += _errors(item, schema["additionalProperties"], root, f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _errors(item, schema["items"], root, f"{at}[{i}]")
    return found


def _format_errors(value: str, fmt: str, at: str) -> list[str]:
    try:
        if fmt == "uuid":
            uuid.UUID(value)
        elif fmt == "date-time":
            datetime.fromisoformat(value)
        else:
            pytest.fail(f"the test validator does not know the format {fmt!r}; teach it")
    except ValueError:
        return [f"{at}: {value!r} is not a {fmt}"]
    return []


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


# --- Samples -------------------------------------------------------------------------------


def _contact_deleted() -> ContactDeleted:
    return ContactDeleted(
        contact_id=uuid.uuid4(),
        workspace_id=uuid.uuid4(),
        job_id=uuid.uuid4(),
        deleted_at=NOW,
        email_sha256="a" * 64,
        orphaned_timeline=OrphanedTimeline(activities=2, notes=1, tasks=0),
    )


def _job_completed() -> DeletionJobCompleted:
    return DeletionJobCompleted(
        job_id=uuid.uuid4(),
        workspace_id=uuid.uuid4(),
        status="completed_with_errors",
        total_requested=3,
        processed_count=3,
        deleted_count=1,
        not_found_count=1,
        failed_count=1,
        completed_at=NOW,
    )


# --- No drift ------------------------------------------------------------------------------


def test_committed_schemas_are_what_the_generator_makes_now() -> None:
    """Changing a model without regenerating schemas/ fails here."""
    for name, text in rendered().items():
        path = SCHEMAS_DIR / name
        assert path.is_file(), f"{path} is missing; {REGENERATE}"
        assert path.read_text(encoding="utf-8") == text, f"{path} differs; {REGENERATE}"


def test_no_stale_schema_files_are_committed() -> None:
    expected = set(rendered())
    committed = {
        p.relative_to(SCHEMAS_DIR).as_posix() for p in SCHEMAS_DIR.rglob("*") if p.is_file()
    }
    assert committed <= expected, f"not generated: {sorted(committed - expected)}; {REGENERATE}"


def test_rendering_is_pretty_sorted_and_ends_with_a_newline() -> None:
    assert render({"b": 1, "a": [1]}) == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'


def test_the_generator_is_deterministic() -> None:
    assert rendered() == rendered()


# --- Well formed ---------------------------------------------------------------------------


def test_event_and_webhook_schemas_describe_json_objects() -> None:
    schemas = event_schemas()
    assert {n.split("/")[0] for n in schemas} == {"events", "webhooks"}
    for name, schema in schemas.items():
        assert name.endswith(".schema.json")
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["type"] == "object", name
        assert schema["properties"], name
        assert set(schema.get("required", [])) <= set(schema["properties"]), name
        for ref in _refs(schema):
            assert ref.startswith("#/$defs/"), f"{name}: {ref}"
            _resolve(schema, ref)


def test_every_event_type_has_a_data_schema_and_a_webhook_schema() -> None:
    names = set(event_schemas())
    for event_type in ("contact.deleted", "deletion_job.completed"):
        assert f"events/{event_type}.schema.json" in names
        assert f"webhooks/{event_type}.schema.json" in names
    assert "events/cloudevent.schema.json" in names
    assert "webhooks/webhook.test.schema.json" in names
    assert "webhooks/payload.schema.json" in names


def test_every_openapi_component_schema_has_a_type_or_a_ref() -> None:
    for name, schema in openapi_spec()["components"]["schemas"].items():
        assert {"type", "$ref", "allOf", "anyOf"} & set(schema), name
        if schema.get("type") == "object":
            assert "properties" in schema or "additionalProperties" in schema, name


def test_every_ref_in_the_openapi_document_resolves() -> None:
    spec = openapi_spec()
    refs = _refs(spec)
    assert refs
    for ref in refs:
        _resolve(spec, ref)
    assert "$defs" not in json.dumps(spec), "pydantic $defs must be hoisted into components"


def test_the_openapi_document_has_the_shared_parts() -> None:
    spec = openapi_spec()
    components = spec["components"]
    assert spec["openapi"].startswith("3.1")
    assert components["securitySchemes"]["bearer"] == {
        **components["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    error = components["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    for header in (
        "Idempotent-Replayed",
        "Location",
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "X-Request-ID",
    ):
        assert header in components["headers"]
    assert components["parameters"]["IdempotencyKey"]["schema"]["maxLength"] == 255
    assert "Retry-After" in components["responses"]["RateLimited"]["headers"]


def test_every_operation_declares_its_path_parameters_and_answers() -> None:
    spec = openapi_spec()
    for path, item in spec["paths"].items():
        placeholders = set(re.findall(r"{(\w+)}", path))
        for method, op in item.items():
            assert method in METHODS, f"{path}: {method}"
            params = [_resolve(spec, p["$ref"]) if "$ref" in p else p for p in op["parameters"]]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == placeholders, f"{method.upper()} {path}"
            # "/" only ever redirects (to the console).
            assert any(code[0] in "23" for code in op["responses"]), f"{method} {path}"
            # /v1/me needs a key but no scope: any key may learn its own scopes.
            if path.startswith("/v1/") and path != "/v1/me":
                assert {"401", "403", "429"} <= set(op["responses"]), f"{method} {path}"
                assert op["security"][0]["bearer"], f"{method} {path} names no scope"
            if "requestBody" in op:
                assert {"400", "413", "415"} <= set(op["responses"]), f"{method} {path}"


def test_bulk_delete_documents_idempotency_and_prefer_wait() -> None:
    spec = openapi_spec()
    op = spec["paths"]["/v1/contacts/bulk-delete"]["post"]
    params = {p["$ref"].rsplit("/", 1)[-1] for p in op["parameters"] if "$ref" in p}
    assert {"IdempotencyKey", "Prefer"} <= params
    assert {"200", "202", "400", "409"} <= set(op["responses"])
    assert "Location" in op["responses"]["202"]["headers"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/BulkDeleteRequest"}


def _shape(path: str) -> str:
    """A path with its parameter names blanked: /v1/x/{a} and /v1/x/{b} are one route."""
    return re.sub(r"{[^}]*}", "{}", path)


async def test_the_openapi_document_lists_every_route_of_the_app(tmp_path: Path) -> None:
    """The app serves exactly the documented operations (plus HEAD, OPTIONS and 405s)."""
    # A file URL, never opened: building the app connects to nothing. (Database() cannot
    # take ":memory:": SQLAlchemy gives that a StaticPool, which refuses pool_size.)
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    services = Services(settings=settings, db=Database(settings.database_url))
    try:
        app = create_app(services)
        served = {
            (route.method, _shape(route.resource.canonical))
            for route in app.router.routes()
            if route.method not in ("HEAD", "OPTIONS", "*") and route.resource is not None
        }
    finally:
        await services.close()
    documented = {
        (method.upper(), _shape(path))
        for path, item in openapi_spec()["paths"].items()
        for method in item
    }
    assert served, "the app registered no routes"
    # The console's and Swagger UI's files are not API operations (service.console.routes).
    assets = {("GET", _shape(path)) for path in ASSET_PATHS + PAGE_ALIASES}
    assert served == documented | assets


def test_the_openapi_document_is_what_the_ops_route_serves() -> None:
    assert (SCHEMAS_DIR / OPENAPI_FILE).read_text(encoding="utf-8") == render(openapi_spec())


# --- True to the code ----------------------------------------------------------------------


def test_a_contact_deleted_webhook_body_matches_its_published_schema() -> None:
    data = _contact_deleted().model_dump(mode="json")
    body = webhook_body(TYPE_CONTACT_DELETED, NOW, data)
    schema = json.loads((SCHEMAS_DIR / "webhooks/contact.deleted.schema.json").read_text())
    parsed = json.loads(body)
    assert _errors(parsed, schema, schema) == []
    assert _errors(parsed, event_schemas()["webhooks/payload.schema.json"], schema) == []
    again = ContactDeletedWebhook.model_validate_json(body)
    assert again.data.model_dump(mode="json") == data
    assert again.timestamp == NOW


def test_the_validator_used_here_does_reject_a_wrong_body() -> None:
    """Guards the test above: a body that breaks the schema is caught."""
    schema = event_schemas()["webhooks/contact.deleted.schema.json"]
    good = json.loads(webhook_body(TYPE_CONTACT_DELETED, NOW, _contact_deleted().model_dump()))
    assert _errors({**good, "type": "contact.created"}, schema, schema)
    assert _errors({**good, "extra": 1}, schema, schema)
    assert _errors({**good, "data": {**good["data"], "contact_id": "x"}}, schema, schema)
    without_email = {k: v for k, v in good["data"].items() if k != "email_sha256"}
    assert _errors({**good, "data": without_email}, schema, schema)


@pytest.mark.parametrize(
    ("event_type", "model", "data"),
    [
        ("contact.deleted", ContactDeletedWebhook, _contact_deleted().model_dump(mode="json")),
        (
            "deletion_job.completed",
            DeletionJobCompletedWebhook,
            _job_completed().model_dump(mode="json"),
        ),
        ("webhook.test", WebhookTestWebhook, {"endpoint_id": "ep_1", "message": "hello"}),
    ],
)
def test_each_webhook_type_matches_its_schema_and_model(
    event_type: str, model: type[WebhookPayload], data: dict[str, Any]
) -> None:
    schema = event_schemas()[f"webhooks/{event_type}.schema.json"]
    body = webhook_body(event_type, NOW, data)
    assert _errors(json.loads(body), schema, schema) == []
    assert model.model_validate_json(body).type == event_type


def test_a_webhook_body_is_compact_json_with_type_first_and_utc_time() -> None:
    later = NOW.astimezone(timezone(timedelta(hours=2)))
    body = webhook_body("webhook.test", later, {"endpoint_id": "e", "message": "m"})
    assert body == (
        b'{"type":"webhook.test","timestamp":"2025-01-02T03:04:05Z",'
        b'"data":{"endpoint_id":"e","message":"m"}}'
    )


def test_a_webhook_body_refuses_data_that_breaks_its_type() -> None:
    data = {**_contact_deleted().model_dump(mode="json"), "email": "a@example.com"}
    with pytest.raises(ValidationError):
        webhook_body(TYPE_CONTACT_DELETED, NOW, data)


def test_a_webhook_body_refuses_a_naive_timestamp() -> None:
    with pytest.raises(ValueError, match="timezone"):
        webhook_body("webhook.test", datetime(2025, 1, 1), {"endpoint_id": "e", "message": "m"})


def test_an_unknown_webhook_type_gets_the_generic_shape() -> None:
    body = webhook_body("something.new", NOW, {"n": 1})
    schema = event_schemas()["webhooks/payload.schema.json"]
    assert _errors(json.loads(body), schema, schema) == []


def test_a_cloudevent_on_kafka_matches_the_published_envelope_and_data_schemas() -> None:
    data = _contact_deleted()
    event = envelope(TYPE_CONTACT_DELETED, str(data.contact_id), data, NOW)
    message = json.loads(event.model_dump_json())
    schemas = event_schemas()
    envelope_schema = schemas["events/cloudevent.schema.json"]
    data_schema = schemas[f"events/{event.type}.schema.json"]
    assert _errors(message, envelope_schema, envelope_schema) == []
    assert _errors(message["data"], data_schema, data_schema) == []


def test_every_boolean_query_parameter_takes_only_true_or_false() -> None:
    """pydantic's lax mode reads yes/no, on/off, 1/0 as booleans in a query string, where a
    body's boolean is strictly true or false: every boolean query parameter of every route
    is an `apimodels.QueryFlag` (trial 6: ?delete_members=yes deleted a site member)."""
    from pydantic import ValidationError

    from service.api import route_tables

    checked = []
    for table in route_tables():
        for op in table:
            for name, field in op.query.model_fields.items():
                if field.annotation is not bool:
                    continue
                checked.append((op.operation_id, name))
                with pytest.raises(ValidationError):
                    op.query.model_validate({name: "yes"})
                assert getattr(op.query.model_validate({name: "true"}), name) is True
    assert checked, "no boolean query parameter found: the check checks nothing"


def test_every_paged_listing_answers_a_page_of_the_one_shape() -> None:
    """A contact's timeline answered ``{"data": {"items": [...], "next_cursor"}}`` while
    every other listing answers ``{"data": [...], "next_cursor"}``: every operation that
    takes a ``cursor`` answers an `apimodels.Page`, except the audit trail's contact
    timeline, an object (the deletion and who asked) that carries one page of its items."""
    from service.api import route_tables
    from service.apimodels import Page

    objects_with_a_page = {"getDeletedContactTimeline"}
    paged = []
    for table in route_tables():
        for op in table:
            if "cursor" not in op.query.model_fields:
                continue
            paged.append(op.operation_id)
            model = op.answer(200).model
            assert model is not None
            if op.operation_id in objects_with_a_page:
                data = model.model_fields["data"].annotation
                assert isinstance(data, type) and issubclass(data, BaseModel), model
                assert "next_cursor" in data.model_fields, data
                continue
            assert issubclass(model, Page), (op.operation_id, model)
    assert "getContactTimeline" in paged and len(paged) >= 8, paged
