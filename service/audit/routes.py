"""HTTP routes of the audit trail (scope ``audit:read``; every answer is per workspace).

- ``GET /v1/audit/events`` pages through events, oldest first, with filters;
- ``GET /v1/audit/contacts/{contact_id}/timeline`` tells what became of a contact: its
  deletion event, who asked for it, and the timeline items it left behind, as they stand;
- ``GET /v1/audit/verify`` walks the hash chain;
- ``GET /v1/audit/export`` streams the chain as NDJSON (``service.audit.export``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.apimodels import Data, Instant, Page
from service.audit.chain import email_hmac, format_time
from service.audit.export import export_line
from service.audit.models import AuditAction, AuditContactTimeline, AuditEvent, ChainVerdict
from service.audit.store import (
    EventFilter,
    load_hash_key,
    query_events,
    stream_events,
    verify_workspace,
)
from service.config import Settings
from service.contacts.models import Email
from service.contacts.store import get_contact, timeline_items
from service.db import Database
from service.errors import ValidationFailed
from service.http import DB_KEY, REQUEST_ID_HEADER, SETTINGS_KEY, request_id
from service.limits import MAX_CURSOR_LENGTH, MAX_INT64, not_null_in_schema, refuse_nulls
from service.logs import get_logger
from service.pagination import ListQuery, SeqCursor, TimeIdCursor, encode_cursor, read_cursor
from service.routing import Answer, Call, Operation

log = get_logger(__name__)

SCOPE: Final = "audit:read"
NDJSON: Final = "application/x-ndjson"
EXPORT_FLUSH_BYTES: Final = 64 * 1024
"""The export writes a chunk once this much is buffered: few writes, bounded memory."""

_TIMELINE_KINDS: Final = {"activities": "activity", "notes": "note", "tasks": "task"}


class EmailKey:
    """The email HMAC key, loaded once (on first use it may be generated and stored)."""

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._lock = asyncio.Lock()

    async def get(self, db: Database, settings: Settings) -> bytes:
        async with self._lock:
            if self._key is None:
                configured = settings.audit_hash_key
                self._key = await load_hash_key(
                    db, configured.get_secret_value() if configured else None
                )
            return self._key


EMAIL_KEY = web.AppKey("audit_email_key", EmailKey)


_EVENT_CONDITIONS = ("target_id", "job_id", "action", "actor_id", "email", "since", "until")


class EventsQuery(BaseModel):
    """The filters of ``GET /v1/audit/events`` (query string) and of ``POST
    /v1/audit/events/query`` (JSON body); unknown ones are refused, and so is a null for
    a filter (``refuse_nulls``)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=lambda s: not_null_in_schema(s, _EVENT_CONDITIONS)
    )

    target_id: str | None = Field(default=None, min_length=1, max_length=200)
    job_id: uuid.UUID | None = Field(
        default=None, description="A deletion job's id (a UUID: anything else is a 400)"
    )
    action: AuditAction | None = None
    actor_id: str | None = Field(default=None, min_length=1, max_length=200)
    email: Email | None = Field(
        default=None,
        description="Was this address deleted? In a query string, URL-encode it (`+` is "
        "%2B), or use POST /v1/audit/events/query to keep it out of the URL",
    )
    since: Instant | None = None
    until: Instant | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(
        default=None,
        max_length=MAX_CURSOR_LENGTH,
        description="The `next_cursor` of the previous page",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null_condition(cls, data: Any) -> Any:
        return refuse_nulls(data, _EVENT_CONDITIONS)


class ExportQuery(BaseModel):
    """The query string of ``GET /v1/audit/export``."""

    model_config = ConfigDict(extra="forbid")

    since_seq: int = Field(default=1, ge=1, le=MAX_INT64)


def _after_seq(cursor: str | None) -> int:
    return read_cursor(cursor, SeqCursor).after_seq if cursor is not None else 0


async def list_events(call: Call) -> Page[AuditEvent]:
    """``GET /v1/audit/events``: matching events by seq, oldest first, cursor-paged.

    ``since`` is inclusive and ``until`` exclusive. ``email`` is normalised as contact
    addresses are and matched by its keyed hash; the address itself is never stored.
    """
    return await _events(call.request, call.principal.workspace_id, call.query_as(EventsQuery))


async def query_events_post(call: Call) -> Page[AuditEvent]:
    """``POST /v1/audit/events/query``: the same filters and answer as
    ``GET /v1/audit/events``, in a JSON body, so that an ``email`` stays out of URLs,
    proxies and access logs (and needs no URL-encoding of ``+``)."""
    return await _events(call.request, call.principal.workspace_id, call.body_as(EventsQuery))


async def _events(
    request: web.Request, workspace_id: uuid.UUID, query: EventsQuery
) -> Page[AuditEvent]:
    if query.since is not None and query.until is not None and query.until <= query.since:
        raise ValidationFailed(
            "the query parameters are invalid",
            [{"field": "until", "message": "must be later than since"}],
        )
    db = request.app[DB_KEY]
    hashed_email = None
    if query.email is not None:
        key = await request.app[EMAIL_KEY].get(db, request.app[SETTINGS_KEY])
        hashed_email = email_hmac(key, query.email)
    where = EventFilter(
        target_id=query.target_id,
        job_id=str(query.job_id) if query.job_id is not None else None,
        action=query.action,
        actor_id=query.actor_id,
        email_hmac=hashed_email,
        since=format_time(query.since) if query.since is not None else None,
        until=format_time(query.until) if query.until is not None else None,
    )
    events, last_seq = await query_events(
        db, workspace_id, where, limit=query.limit, after_seq=_after_seq(query.cursor)
    )
    next_cursor = encode_cursor({"after_seq": last_seq}) if last_seq is not None else None
    return Page[AuditEvent].model_validate({"data": events, "next_cursor": next_cursor})


async def contact_timeline(call: Call) -> Data[AuditContactTimeline]:
    """``GET /v1/audit/contacts/{contact_id}/timeline?limit=&cursor=``: what became of a
    contact.

    For a deleted contact: its ``contact.deleted`` event, who asked (key, job, request
    id), and one page of the activities, notes and tasks it left behind as they stand now
    (content included), newest first by the time the event records for each (an
    activity's occurred_at, another item's created_at, then the id): ``limit`` (1-500,
    default 50) after ``cursor``, with ``next_cursor`` while more follow. The event (which
    lists every item) comes on the first page only; later pages answer ``deletion: null``
    with ``deleted: true``. An item the event names that no longer exists is left out, so
    a page may hold fewer than ``limit``.

    A contact that the workspace still has, or that only has other events (a failed
    deletion), answers ``deleted: false`` with an empty timeline: its live timeline is a
    contacts:read matter. 404 when this workspace has neither the contact nor any event
    about it, which is also what another workspace's contact gets.
    """
    who = call.principal
    contact_id = call.path["contact_id"]
    query = call.query_as(ListQuery)
    before = read_cursor(query.cursor, TimeIdCursor).position if query.cursor else None
    db = call.app[DB_KEY]
    about = EventFilter(target_type="contact", target_id=str(contact_id))
    deletions, _ = await query_events(
        db,
        who.workspace_id,
        EventFilter(target_type="contact", target_id=str(contact_id), action="contact.deleted"),
        limit=1,
        newest_first=True,
    )
    if not deletions:
        any_event, _ = await query_events(db, who.workspace_id, about, limit=1)
        if not any_event:
            await get_contact(db, who.workspace_id, contact_id)  # NotFound when never had
        body: dict[str, Any] = {
            "contact_id": str(contact_id),
            "deleted": False,
            "deletion": None,
            "requested_by": None,
            "timeline": [],
            "next_cursor": None,
        }
        return Data[AuditContactTimeline].model_validate({"data": body})
    deletion = deletions[0]
    data = deletion["data"]
    actor = deletion["actor"]
    api_key_id = data.get("api_key_id") or (actor["id"] if actor["type"] == "api_key" else None)
    entries = _preserved(data, before)
    page = entries[: query.limit]
    ids: dict[str, list[uuid.UUID]] = {kind: [] for kind in _TIMELINE_KINDS.values()}
    for entry in page:
        ids[entry.kind].append(entry.id)
    found = {item["id"]: item for item in await timeline_items(db, who.workspace_id, ids=ids)}
    last = page[-1] if len(entries) > query.limit else None
    body = {
        "contact_id": str(contact_id),
        "deleted": True,
        "deletion": deletion if before is None else None,
        "requested_by": {
            "api_key_id": api_key_id,
            "job_id": deletion["job_id"],
            "request_id": deletion["request_id"],
        },
        "timeline": [found[str(e.id)] for e in page if str(e.id) in found],
        "next_cursor": encode_cursor({"at": last.at_text, "id": str(last.id)}) if last else None,
    }
    return Data[AuditContactTimeline].model_validate({"data": body})


@dataclass(frozen=True)
class _Preserved:
    """One item a ``contact.deleted`` event says lost its back-reference."""

    at: datetime
    at_text: str
    id: uuid.UUID
    kind: str

    @property
    def position(self) -> tuple[datetime, str]:
        return self.at, str(self.id)


# Where an entry whose time does not parse sorts: after every other (oldest).
_NO_TIME = datetime.min.replace(tzinfo=UTC)


def _preserved(data: Any, before: tuple[datetime, uuid.UUID] | None) -> list[_Preserved]:
    """The items a ``contact.deleted`` event names, newest first (its time, then id),
    strictly before `before` when given."""
    preserved = data.get("preserved_timeline") if isinstance(data, dict) else None
    if not isinstance(preserved, dict):
        return []
    entries: list[_Preserved] = []
    for plural, kind in _TIMELINE_KINDS.items():
        for entry in preserved.get(plural) or []:
            try:
                item_id = uuid.UUID(str(entry["id"]))
            except (KeyError, TypeError, ValueError):
                continue  # the event verifies as written; a bad entry names no item
            at_text = str(entry.get("at") or "")
            try:
                at = datetime.fromisoformat(at_text.replace("Z", "+00:00")).astimezone(UTC)
            except ValueError:
                at, at_text = _NO_TIME, _NO_TIME.isoformat()
            entries.append(_Preserved(at, at_text, item_id, kind))
    entries.sort(key=lambda e: e.position, reverse=True)
    if before is not None:
        bound = (before[0], str(before[1]))
        entries = [e for e in entries if e.position < bound]
    return entries


async def verify(call: Call) -> Data[ChainVerdict]:
    """``GET /v1/audit/verify``: walk this workspace's chain (``store.verify_workspace``)."""
    result = await verify_workspace(call.app[DB_KEY], call.principal.workspace_id)
    if not result.ok:
        log.warning(
            "audit_chain_broken",
            broken_seq=result.broken_seq,
            reason=result.reason,
            detail=result.detail,
        )
    return Data[ChainVerdict].model_validate({"data": result.to_dict()})


async def export(call: Call) -> web.StreamResponse:
    """``GET /v1/audit/export?since_seq=``: the chain as NDJSON, streamed in constant memory.

    One ``export.export_line`` per event, in seq order, from ``since_seq`` to the head at
    the time each page is read. If reading fails after the first byte, the connection is
    aborted rather than ended cleanly, so a client cannot take a cut export for a whole one.
    """
    request, who = call.request, call.principal
    query = call.query_as(ExportQuery)
    db = call.app[DB_KEY]
    response = web.StreamResponse(
        headers={
            "Content-Type": NDJSON,
            "Cache-Control": "no-store",
            REQUEST_ID_HEADER: request_id(request),
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    buffer = bytearray()
    events = 0
    try:
        async for event in stream_events(db, who.workspace_id, since_seq=query.since_seq):
            buffer += export_line(event)
            events += 1
            if len(buffer) >= EXPORT_FLUSH_BYTES:
                await response.write(bytes(buffer))
                buffer.clear()
        if buffer:
            await response.write(bytes(buffer))
        await response.write_eof()
    except ConnectionResetError:
        log.info("audit_export_client_gone", events=events)
    except Exception:
        log.exception("audit_export_failed", events=events)
        if request.transport is not None:
            request.transport.abort()
    return response


def add_state(app: web.Application) -> None:
    """The state the audit routes share: the email key, loaded on first use."""
    app[EMAIL_KEY] = EmailKey()


TAG: Final = "Audit"

ROUTES: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/v1/audit/events",
        list_events,
        "listAuditEvents",
        "Search the audit trail, in seq order",
        tag=TAG,
        scope=SCOPE,
        query=EventsQuery,
        answers=(Answer(200, Page[AuditEvent], "A page of events"),),
    ),
    Operation(
        "POST",
        "/v1/audit/events/query",
        query_events_post,
        "queryAuditEvents",
        "Search the audit trail with the filters in a JSON body",
        tag=TAG,
        scope=SCOPE,
        body=EventsQuery,
        description="The same filters and answer as GET /v1/audit/events; an `email` sent "
        "here stays out of URLs and access logs.",
        answers=(Answer(200, Page[AuditEvent], "A page of events"),),
    ),
    Operation(
        "GET",
        "/v1/audit/contacts/{contact_id}/timeline",
        contact_timeline,
        "getDeletedContactTimeline",
        "What happened to a deleted contact, and its timeline as it stands now",
        tag=TAG,
        scope=SCOPE,
        query=ListQuery,
        answers=(Answer(200, Data[AuditContactTimeline], "The deletion and a page of timeline"),),
    ),
    Operation(
        "GET",
        "/v1/audit/verify",
        verify,
        "verifyAuditChain",
        "Walk the hash chain: ok with the head hash, or the first broken seq",
        tag=TAG,
        scope=SCOPE,
        answers=(Answer(200, Data[ChainVerdict], "The verdict"),),
    ),
    Operation(
        "GET",
        "/v1/audit/export",
        export,
        "exportAuditEvents",
        "Stream the audit trail as NDJSON, one AuditEvent a line",
        tag=TAG,
        scope=SCOPE,
        query=ExportQuery,
        answers=(Answer(200, None, "The events from since_seq on", media_type=NDJSON),),
    ),
)
"""The audit capability's operations (scope audit:read)."""
