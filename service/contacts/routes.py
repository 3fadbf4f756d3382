"""HTTP routes of contacts and their timeline."""

from __future__ import annotations

import uuid

from aiohttp import web

from service.contacts import store
from service.contacts.filters import parse_filter
from service.contacts.models import (
    ActivityCreate,
    ContactCreate,
    ContactList,
    ContactQuery,
    NoteCreate,
    TaskCreate,
)
from service.errors import ValidationFailed
from service.http import (
    DB_KEY,
    Handler,
    json_response,
    parse_uuid,
    query_model,
    read_model,
    require,
)
from service.pagination import decode_cursor, encode_cursor


async def create_contact(request: web.Request) -> web.Response:
    who = require(request, "contacts:write")
    body = await read_model(request, ContactCreate)
    contact = await store.create_contact(request.app[DB_KEY], who.workspace_id, body)
    return json_response({"data": contact}, status=201)


async def get_contact(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    contact = await store.get_contact(request.app[DB_KEY], who.workspace_id, contact_id)
    return json_response({"data": contact})


def _after(cursor: str | None) -> uuid.UUID | None:
    if not cursor:
        return None
    try:
        return uuid.UUID(str(decode_cursor(cursor, ("after",))["after"]))
    except ValueError:
        raise ValidationFailed(
            "invalid cursor",
            [{"field": "cursor", "message": "not a cursor from this listing"}],
        ) from None


async def query_contacts(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    body = await read_model(request, ContactQuery)
    tree = parse_filter(body.filter) if body.filter is not None else None
    page, next_after = await store.query_contacts(
        request.app[DB_KEY], who.workspace_id, tree, body.search, body.limit, _after(body.cursor)
    )
    next_cursor = encode_cursor({"after": str(next_after)}) if next_after else None
    return json_response({"data": page, "next_cursor": next_cursor})


async def list_contacts(request: web.Request) -> web.Response:
    """``GET /v1/contacts?limit=&cursor=``: every contact of the workspace, in id order."""
    who = require(request, "contacts:read")
    query = query_model(request, ContactList)
    page, next_after = await store.query_contacts(
        request.app[DB_KEY], who.workspace_id, None, None, query.limit, _after(query.cursor)
    )
    next_cursor = encode_cursor({"after": str(next_after)}) if next_after else None
    return json_response({"data": page, "next_cursor": next_cursor})


def _timeline_adder(
    model: type[ActivityCreate] | type[NoteCreate] | type[TaskCreate],
) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        who = require(request, "contacts:write")
        contact_id = parse_uuid(request.match_info["contact_id"], "contact")
        body = await read_model(request, model)
        item = await store.add_timeline_item(
            request.app[DB_KEY], who.workspace_id, contact_id, body
        )
        return json_response({"data": item}, status=201)

    return handler


async def get_timeline(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    items = await store.contact_timeline(request.app[DB_KEY], who.workspace_id, contact_id)
    return json_response({"data": {"items": items}})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/contacts", create_contact)
    app.router.add_get("/v1/contacts", list_contacts)
    app.router.add_post("/v1/contacts/query", query_contacts)
    app.router.add_get("/v1/contacts/{contact_id}", get_contact)
    app.router.add_post("/v1/contacts/{contact_id}/activities", _timeline_adder(ActivityCreate))
    app.router.add_post("/v1/contacts/{contact_id}/notes", _timeline_adder(NoteCreate))
    app.router.add_post("/v1/contacts/{contact_id}/tasks", _timeline_adder(TaskCreate))
    app.router.add_get("/v1/contacts/{contact_id}/timeline", get_timeline)
