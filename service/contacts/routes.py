"""HTTP routes of contacts and their timeline: the handlers and their route table."""

from __future__ import annotations

import uuid

from service.apimodels import Data, Page
from service.contacts import store
from service.contacts.filters import parse_filter
from service.contacts.models import (
    ActivityCreate,
    Contact,
    ContactCreate,
    ContactList,
    ContactQuery,
    NoteCreate,
    TaskCreate,
    TimelineItem,
)
from service.http import DB_KEY
from service.pagination import IdCursor, ListQuery, TimeIdCursor, encode_cursor, read_cursor
from service.routing import Answer, Call, Handler, Operation, Reply

READ = "contacts:read"
WRITE = "contacts:write"
TAG = "Contacts"


async def create_contact(call: Call) -> Reply:
    body = call.body_as(ContactCreate)
    contact = await store.create_contact(call.app[DB_KEY], call.principal.workspace_id, body)
    return Reply(Data[Contact].model_validate({"data": contact}), 201)


async def get_contact(call: Call) -> Data[Contact]:
    contact = await store.get_contact(
        call.app[DB_KEY], call.principal.workspace_id, call.path["contact_id"]
    )
    return Data[Contact].model_validate({"data": contact})


def _after(cursor: str | None) -> uuid.UUID | None:
    """The contact id a `next_cursor` points after (a bad cursor is a 400 naming it)."""
    return read_cursor(cursor, IdCursor).after if cursor else None


async def query_contacts(call: Call) -> Page[Contact]:
    body = call.body_as(ContactQuery)
    tree = parse_filter(body.filter) if body.filter is not None else None
    page, next_after = await store.query_contacts(
        call.app[DB_KEY],
        call.principal.workspace_id,
        tree,
        body.search,
        body.limit,
        _after(body.cursor),
    )
    next_cursor = encode_cursor({"after": str(next_after)}) if next_after else None
    return Page[Contact].model_validate({"data": page, "next_cursor": next_cursor})


async def list_contacts(call: Call) -> Page[Contact]:
    """``GET /v1/contacts?limit=&cursor=``: every contact of the workspace, in id order."""
    query = call.query_as(ContactList)
    page, next_after = await store.query_contacts(
        call.app[DB_KEY], call.principal.workspace_id, None, None, query.limit, _after(query.cursor)
    )
    next_cursor = encode_cursor({"after": str(next_after)}) if next_after else None
    return Page[Contact].model_validate({"data": page, "next_cursor": next_cursor})


def _timeline_adder(model: type[ActivityCreate] | type[NoteCreate] | type[TaskCreate]) -> Handler:
    async def handler(call: Call) -> Reply:
        item = await store.add_timeline_item(
            call.app[DB_KEY],
            call.principal.workspace_id,
            call.path["contact_id"],
            call.body_as(model),
        )
        return Reply(Data[TimelineItem].model_validate({"data": item}), 201)

    return handler


async def get_timeline(call: Call) -> Page[TimelineItem]:
    """A page of a live contact's timeline, newest first: ``{"data": [...],
    "next_cursor"}`` like every listing (it was ``{"data": {"items", "next_cursor"}}``)."""
    query = call.query_as(ListQuery)
    before = read_cursor(query.cursor, TimeIdCursor).position if query.cursor else None
    items, nxt = await store.contact_timeline(
        call.app[DB_KEY], call.principal.workspace_id, call.path["contact_id"], query.limit, before
    )
    cursor = encode_cursor({"at": nxt[0].isoformat(), "id": str(nxt[1])}) if nxt else None
    return Page[TimelineItem].model_validate({"data": items, "next_cursor": cursor})


def _adder(
    kind: str, model: type[ActivityCreate] | type[NoteCreate] | type[TaskCreate], plural: str
) -> Operation:
    return Operation(
        "POST",
        f"/v1/contacts/{{contact_id}}/{plural}",
        _timeline_adder(model),
        f"add{kind.capitalize()}",
        f"Add {'an' if kind[0] in 'aeiou' else 'a'} {kind} to a contact's timeline",
        tag=TAG,
        scope=WRITE,
        body=model,
        answers=(Answer(201, Data[TimelineItem], f"The {kind}"),),
    )


ROUTES: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/v1/contacts",
        create_contact,
        "createContact",
        "Create a contact",
        tag=TAG,
        scope=WRITE,
        body=ContactCreate,
        description="Any syntactically valid address is accepted, special-use names such "
        "as .test or .local included; it is stored lowercased.",
        answers=(Answer(201, Data[Contact], "The contact"),),
    ),
    Operation(
        "GET",
        "/v1/contacts",
        list_contacts,
        "listContacts",
        "List the workspace's contacts, in id order",
        tag=TAG,
        scope=READ,
        query=ContactList,
        answers=(Answer(200, Page[Contact], "A page of contacts"),),
    ),
    Operation(
        "POST",
        "/v1/contacts/query",
        query_contacts,
        "queryContacts",
        "Find contacts by filter and/or search",
        tag=TAG,
        scope=READ,
        body=ContactQuery,
        description="The same filter language as bulk delete: the dry run of a filter.",
        answers=(Answer(200, Page[Contact], "A page of contacts"),),
    ),
    Operation(
        "GET",
        "/v1/contacts/{contact_id}",
        get_contact,
        "getContact",
        "Get a contact",
        tag=TAG,
        scope=READ,
        answers=(Answer(200, Data[Contact], "The contact"),),
    ),
    _adder("activity", ActivityCreate, "activities"),
    _adder("note", NoteCreate, "notes"),
    _adder("task", TaskCreate, "tasks"),
    Operation(
        "GET",
        "/v1/contacts/{contact_id}/timeline",
        get_timeline,
        "getContactTimeline",
        "A contact's activities, notes and tasks, newest first, a page at a time",
        tag=TAG,
        scope=READ,
        query=ListQuery,
        answers=(Answer(200, Page[TimelineItem], "A page of the timeline, newest first"),),
    ),
)
"""The contacts capability's operations (DELETE /v1/contacts/{id} is deletion's)."""
