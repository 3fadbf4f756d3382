"""Deletion jobs and their items in the database.

`create_job` writes a job, its items, one outbox row per contact (or one expansion
message for filter/search jobs) and the `deletion.requested` audit event in the caller's
transaction. `apply_progress` moves a job's counters, expands a filter/search job further
when few of its items are left waiting (`expand_page`) and, when the last item is done,
finishes it (status, `deletion.completed` audit event, `deletion_job.completed` outbox row).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.store import AuditRecord, append_events
from service.config import Settings
from service.contacts.filters import FIELDS as FILTER_FIELDS
from service.contacts.filters import parse_filter, selection_clause
from service.db import (
    Database,
    any_of,
    contacts,
    deletion_job_items,
    deletion_jobs,
    insert_rows,
    new_id_texts,
    outbox,
    utcnow,
)
from service.deletion.models import BulkDeleteRequest, ItemStatus, JobStatus, final_status
from service.errors import NotFound, ValidationFailed
from service.events import (
    TOPIC_DELETION_REQUESTED,
    TOPIC_JOB_COMPLETED,
    TYPE_DELETION_REQUESTED,
    TYPE_JOB_COMPLETED,
    TYPE_JOB_EXPAND,
    DeletionJobCompleted,
    DeletionRequestedEncoder,
    JobExpand,
    envelope,
)
from service.faults import describe, is_transient
from service.logs import get_logger
from service.outbox import encoded_outbox_row, outbox_row
from service.pagination import newest_first, split_page
from service.timefmt import iso

log = get_logger(__name__)

LIST_CAP = 1000  # not_found / errors shown on the job object; the items endpoint pages the rest


@dataclass(frozen=True)
class Requester:
    """Who asked for a job: the key, its workspace and the request id."""

    workspace_id: uuid.UUID
    api_key_id: uuid.UUID | None
    request_id: str | None


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED})


def job_phase(row: Mapping[Any, Any]) -> str:
    """``finding_contacts`` while a filter/search job is still expanding its matches (its
    ``total_requested`` is what was found so far), ``deleting`` once every item is known,
    ``done`` when the job is finished."""
    if row["status"] in FINISHED:
        return "done"
    return "deleting" if row["expanded"] else "finding_contacts"


def job_json(
    row: Mapping[Any, Any], not_found: Sequence[str], errors: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The job object of DESIGN §3, with ``phase``, ``estimated_total`` (a filter/search
    job's match count when it was accepted; null for ids/emails jobs) and ``failure``
    (``{code, message}`` of a job that ended ``failed``; null otherwise)."""
    failure_code = row.get("failure_code")
    return {
        "job_id": str(row["id"]),
        "status": row["status"],
        "phase": job_phase(row),
        "dry_run": row["dry_run"],
        "delete_members": row["delete_members"],
        "redact_timeline": row.get("redact_timeline", False),
        "selector": row["selector"],
        "total_requested": row["total_requested"],
        "estimated_total": row["estimated_total"],
        "processed_count": row["processed_count"],
        "deleted_count": row["deleted_count"],
        "not_found_count": row["not_found_count"],
        "failed_count": row["failed_count"],
        "not_found": list(not_found),
        "errors": [dict(e) for e in errors],
        "failure": {"code": failure_code, "message": row.get("failure_message") or ""}
        if failure_code
        else None,
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "completed_at": iso(row["completed_at"]),
    }


def item_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "ref": row["ref"],
        "contact_id": str(row["contact_id"]) if row["contact_id"] else None,
        "status": row["status"],
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "processed_at": iso(row["processed_at"]),
    }


async def load_job(
    conn: AsyncConnection, workspace_id: uuid.UUID, job_id: uuid.UUID
) -> dict[str, Any]:
    """A job of this workspace as the API shows it (404 otherwise)."""
    return await _with_lists(conn, await load_job_row(conn, workspace_id, job_id))


def status_is(status: ItemStatus) -> sa.ColumnElement[bool]:
    """``deletion_job_items.status = '<status>'`` with the value written into the statement:
    a partial index (migration 0005) serves only a plan that knows the value, and the
    generic plan PostgreSQL settles on for a prepared statement (asyncpg prepares them
    all) does not know its parameters."""
    return deletion_job_items.c.status == sa.literal(status.value, literal_execute=True)


def outcome_list(job_id: uuid.UUID, status: ItemStatus) -> sa.Select[Any]:
    """The first ``LIST_CAP`` items of a job with this outcome, in request order: what the
    job object lists as ``not_found`` and ``errors``. Reads only items of that outcome (a
    partial index), however many others the job has."""
    items = deletion_job_items.c
    return (
        sa.select(items.ref, items.contact_id, items.error_code, items.error_message)
        .where(items.job_id == job_id, status_is(status))
        .order_by(items.position)
        .limit(LIST_CAP)
    )


async def _with_lists(conn: AsyncConnection, row: Mapping[Any, Any]) -> dict[str, Any]:
    not_found = (await conn.execute(outcome_list(row["id"], ItemStatus.NOT_FOUND))).all()
    failed = (await conn.execute(outcome_list(row["id"], ItemStatus.FAILED))).all()
    errors = [
        {"contact_id": str(f.contact_id or f.ref), "code": f.error_code, "message": f.error_message}
        for f in failed
    ]
    return job_json(row, [str(r.ref) for r in not_found], errors)


async def list_jobs(
    conn: AsyncConnection,
    workspace_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    """A page of jobs, newest first, and where the next page starts."""
    stmt = sa.select(deletion_jobs).where(deletion_jobs.c.workspace_id == workspace_id)
    rows = (await conn.execute(newest_first(stmt, deletion_jobs, limit, before))).mappings().all()
    page, nxt = split_page(rows, limit)
    return [await _with_lists(conn, r) for r in page], nxt


async def list_items(
    conn: AsyncConnection,
    workspace_id: uuid.UUID,
    job_id: uuid.UUID,
    status: ItemStatus | None,
    limit: int,
    after: int | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of a job's items in request order, and the position to continue after."""
    await load_job_row(conn, workspace_id, job_id)
    c = deletion_job_items.c
    stmt = sa.select(deletion_job_items).where(c.job_id == job_id).order_by(c.position)
    if status is not None:
        stmt = stmt.where(status_is(status))
    if after is not None:
        stmt = stmt.where(c.position > after)
    rows = (await conn.execute(stmt.limit(limit + 1))).mappings().all()
    next_after = int(rows[limit - 1]["position"]) if len(rows) > limit else None
    return [item_json(r) for r in rows[:limit]], next_after


async def load_job_row(
    conn: AsyncConnection, workspace_id: uuid.UUID, job_id: uuid.UUID
) -> Mapping[Any, Any]:
    row = (
        (
            await conn.execute(
                sa.select(deletion_jobs).where(
                    deletion_jobs.c.id == job_id, deletion_jobs.c.workspace_id == workspace_id
                )
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound("no such job")
    return row


def selector_summary(req: BulkDeleteRequest) -> dict[str, Any]:
    """What the audit trail keeps of a selector: its kind and size, never addresses."""
    if req.contact_ids is not None:
        return {"type": "contact_ids", "count": len(set(req.contact_ids))}
    if req.emails is not None:
        return {"type": "emails", "count": len(set(req.emails))}
    fields = sorted(_filter_fields(req.filter or {}))
    return {"type": "filter", "fields": fields, "search": req.search is not None}


def stored_selector(selector: dict[str, Any]) -> dict[str, Any]:
    """The selector as the job keeps it: addresses of contacts being deleted are personal
    data the service must not keep, so an emails selector is kept as its size only (an
    address that matched nothing is listed in `not_found` by its place, see `email_ref`)."""
    if "emails" in selector:
        return {"emails": {"count": len(selector["emails"])}}
    return selector


def _filter_fields(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if not k.startswith("$"):
                found.add(k)
            found |= _filter_fields(v)
    elif isinstance(value, list):
        for v in value:
            found |= _filter_fields(v)
    return found


async def create_job(
    conn: AsyncConnection,
    db: Database,
    settings: Settings,
    who: Requester,
    req: BulkDeleteRequest,
    job_id: uuid.UUID,
) -> JobChange:
    """Write the job, its items, its outbox rows and its audit event (one transaction).

    A job whose every id or address matched nothing finishes at once (see the change).
    """
    now = utcnow()
    selector = req.selector()
    refs: list[tuple[str, uuid.UUID | None]] = []
    if req.contact_ids is not None:
        # The selector's texts are these ids' (`BulkDeleteRequest.selector`), in order.
        refs = list(zip(selector["contact_ids"], dict.fromkeys(req.contact_ids), strict=True))
    elif req.emails is not None:
        refs = await resolve_emails(conn, who.workspace_id, req.emails)
    expanding = req.contact_ids is None and req.emails is None
    unknown = sum(1 for _, cid in refs if cid is None)
    estimate: int | None = None
    if expanding:
        where = selection_clause(contacts, req.filter_tree(), req.search)
        estimate = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(contacts)
                .where(contacts.c.workspace_id == who.workspace_id, where)
            )
        ).scalar_one()
        await refuse_if_everything(conn, who.workspace_id, req, estimate)
    await conn.execute(
        deletion_jobs.insert().values(
            id=job_id,
            workspace_id=who.workspace_id,
            api_key_id=who.api_key_id,
            request_id=who.request_id,
            status=JobStatus.PENDING,
            dry_run=False,
            delete_members=req.delete_members,
            redact_timeline=req.redact_timeline,
            selector=stored_selector(selector),
            expanded=not expanding,
            total_requested=len(refs),
            estimated_total=estimate,
            processed_count=unknown,
            deleted_count=0,
            not_found_count=unknown,
            failed_count=0,
            created_at=now,
        )
    )
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    if expanding:
        event = envelope(
            TYPE_JOB_EXPAND,
            str(job_id),
            JobExpand(job_id=job_id, workspace_id=who.workspace_id),
            now,
        )
        await conn.execute(outbox.insert().values(**outbox_row(topic, str(job_id), event)))
    else:
        await insert_items(conn, settings, job_id, who.workspace_id, refs, start=0, now=now)
    # The audit append locks the workspace's chain head until commit: do it last, so that
    # concurrent requests and workers wait for it as briefly as possible.
    await append_events(
        conn,
        db,
        [
            AuditRecord(
                workspace_id=who.workspace_id,
                actor=_actor(who),
                action="deletion.requested",
                target={"type": "deletion_job", "id": str(job_id)},
                job_id=str(job_id),
                request_id=who.request_id,
                data={
                    "selector": selector_summary(req),
                    "count": len(refs) if not expanding else None,
                    "dry_run": False,
                    "delete_members": req.delete_members,
                    **({"redact_timeline": True} if req.redact_timeline else {}),
                },
            )
        ],
    )
    if not expanding and refs and unknown == len(refs):
        return await apply_progress(conn, db, settings, job_id, ProgressDelta())
    return JobChange()


class _ItemRow(NamedTuple):
    """A new job item as `insert_items` writes it (the field names are the columns; its
    error columns stay null)."""

    job_id: uuid.UUID
    ref: str
    position: int
    contact_id: uuid.UUID | None
    status: str
    processed_at: datetime | None


async def insert_items(
    conn: AsyncConnection,
    settings: Settings,
    job_id: uuid.UUID,
    workspace_id: uuid.UUID,
    refs: Sequence[tuple[str, uuid.UUID | None]],
    *,
    start: int,
    now: datetime,
) -> None:
    """Items for these refs; a ref without a contact is `not_found` at once, the rest get work.

    A ref with a contact is that contact id's text (``str(uuid)``, as every caller makes
    it): the events and outbox keys use it as it is."""
    if not refs:
        return
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    encoder = DeletionRequestedEncoder(job_id, workspace_id, now)
    items: list[_ItemRow] = []
    messages = []
    # The events' ids from one read of the system's random source, not a uuid4 each.
    event_ids = iter(new_id_texts(len(refs)))
    for position, (ref, contact_id) in enumerate(refs, start=start):
        found = contact_id is not None
        items.append(
            _ItemRow(
                job_id=job_id,
                ref=ref,
                position=position,
                contact_id=contact_id,
                status=ItemStatus.PENDING if found else ItemStatus.NOT_FOUND,
                processed_at=None if found else now,
            )
        )
        if contact_id is not None:
            # The bytes the DeletionRequested envelope would dump, spliced (property-tested).
            payload = encoder.encode(ref, ref, next(event_ids))
            messages.append(
                encoded_outbox_row(topic, ref, TYPE_DELETION_REQUESTED, payload, now, job_id=job_id)
            )
    await insert_rows(conn, deletion_job_items, items)
    await insert_rows(conn, outbox, messages)


@dataclass(frozen=True)
class ExpandedPage:
    """What one expansion page of a filter/search job found."""

    found: int  # items added (the job's total_requested grows by this much)
    last: bool  # the matches are exhausted: the job now knows every one of its items


# How many windows of ``expand_page_size`` contacts (in id order) one page may read when
# the matches are sparse, before it hands over to the next page.
EXPAND_WINDOWS_PER_PAGE = 10

ANALYZE_FROM_ITEMS = 4096
"""On PostgreSQL, a job's expansion refreshes the statistics of `deletion_job_items` when
its item count reaches this and each time it doubles after (`expand_page`)."""


def pending_items_statement(job_ids: Sequence[uuid.UUID], refs: Sequence[str]) -> sa.Select[Any]:
    """The worker's look-up of a batch's items (job id, ref, status), served by the primary
    key (job_id, ref) — as long as the planner's statistics know how big the jobs are. The
    job id is read as the driver returns it (SQLite: its stored hex text), unconverted."""
    items = deletion_job_items.c
    job_id = sa.type_coerce(items.job_id, sa.types.NullType()).label("job_id")
    return sa.select(job_id, items.ref, items.status).where(
        any_of(items.job_id, job_ids), any_of(items.ref, refs)
    )


def _doubled(before: int, after: int) -> bool:
    """Whether a job growing from `before` to `after` items reached ANALYZE_FROM_ITEMS or
    doubled past it (4096, 8192, 16384, ...)."""
    return after >= ANALYZE_FROM_ITEMS and (
        before < ANALYZE_FROM_ITEMS or after.bit_length() > before.bit_length()
    )


async def expand_page(
    conn: AsyncConnection,
    settings: Settings,
    job: Mapping[Any, Any],
    selector: Mapping[str, Any],
    *,
    accepted_at: datetime,
    now: datetime,
) -> ExpandedPage:
    """Turn the next page of a filter/search job's matches into items and deletion messages,
    and move the job's cursor (``expand_after``) past them; the caller adds ``found`` to the
    job's ``total_requested`` (and sets ``expanded`` on the last page).

    Only contacts created by ``accepted_at`` (the job's ``created_at``) are matched: a job
    deletes what matched when it was asked, never a contact created while it runs (a job of
    millions pages for minutes; a contact created meanwhile, matching, was deleted when its
    random id fell after the cursor).

    ``job`` needs ``id``, ``workspace_id``, ``expand_after`` and ``total_requested`` (the
    position of the page's first item). The caller holds the job row (``FOR UPDATE``, or the
    ``UPDATE`` of `apply_progress`), so two pages of one job never run at once, and the
    cursor makes a page exactly-once: each match is found by one page only.

    A page is at most ``expand_page_size`` matches, looked for among the next contacts of
    the workspace in id order, one window of ``expand_page_size`` contacts at a time
    (`_window_statement`): whatever the filter and whatever the planner thinks of it, a
    page reads O(page) rows, so the millionth contact costs what the first did (a plain
    ``WHERE filter AND id > cursor ORDER BY id LIMIT n`` lets PostgreSQL read every
    remaining match through the filter's own index and sort them, for every page).
    """
    tree = parse_filter(selector["filter"]) if "filter" in selector else None
    search = selector.get("search")

    def clause_of(table: sa.FromClause) -> sa.ColumnElement[bool]:
        created = table.c.created_at <= accepted_at
        return sa.and_(selection_clause(table, filter_tree=tree, search=search), created)

    page_size = settings.expand_page_size
    after: uuid.UUID | None = job["expand_after"]
    ids: list[uuid.UUID] = []
    last = False
    for _ in range(EXPAND_WINDOWS_PER_PAGE):
        stmt = _window_statement(
            job["workspace_id"], after, page_size, page_size - len(ids), clause_of
        )
        rows = (await conn.execute(stmt)).all()
        ids += sorted(r.id for r in rows if r.kind == _MATCH)
        ends = [r.id for r in rows if r.kind == _WINDOW_END]
        if len(ids) == page_size:
            after = ids[-1]
            break
        if not ends:
            last = True  # an empty window: nothing left after the cursor
            break
        after = ends[0]  # the window was read to its end, and held too few matches
    await insert_items(
        conn,
        settings,
        job["id"],
        job["workspace_id"],
        [(str(i), i) for i in ids],
        start=job["total_requested"],
        now=now,
    )
    total = job["total_requested"]
    if conn.dialect.name == "postgresql" and _doubled(total, total + len(ids)):
        # Planned with statistics from when this job had few items, the worker's item
        # look-up (`pending_items_statement`) scanned the job's whole (job_id, position)
        # range for each batch instead of its primary key: 137 ms per 500-contact batch at
        # 100,000 items, two thirds of the server's time in a filter job (measured with
        # pg_stat_statements). ANALYZE samples a bounded number of rows, runs inside this
        # transaction and blocks no reader or writer.
        await conn.exec_driver_sql("ANALYZE deletion_job_items")
    if after != job["expand_after"]:
        await conn.execute(
            deletion_jobs.update().where(deletion_jobs.c.id == job["id"]).values(expand_after=after)
        )
    if not ids and not last:
        # Nothing found that a deletion would later top up from: the next page comes by
        # message instead, so a sparse job never stalls.
        await queue_expansion(conn, settings, job["id"], job["workspace_id"], after, now)
    return ExpandedPage(found=len(ids), last=last)


async def queue_expansion(
    conn: AsyncConnection,
    settings: Settings,
    job_id: uuid.UUID,
    workspace_id: uuid.UUID,
    after: uuid.UUID | None,
    now: datetime,
) -> None:
    """An expansion message for the page after ``after`` (the worker ignores it unless the
    job's cursor is still there when it arrives)."""
    event = envelope(
        TYPE_JOB_EXPAND,
        str(job_id),
        JobExpand(job_id=job_id, workspace_id=workspace_id, after=after),
        now,
    )
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    await conn.execute(outbox.insert().values(**outbox_row(topic, str(job_id), event)))


_MATCH = 1
_WINDOW_END = 0


def _window_statement(
    workspace_id: uuid.UUID,
    after: uuid.UUID | None,
    window_rows: int,
    wanted: int,
    clause_of: Callable[[sa.FromClause], sa.ColumnElement[bool]],
) -> sa.CompoundSelect[Any]:
    """One statement over the next ``window_rows`` contacts of a workspace after ``after``
    (in id order): the first ``wanted`` of them that match (kind ``_MATCH``), and the
    window's last contact (kind ``_WINDOW_END``; none when the window is empty).

    The window is a LIMITed CTE, which neither database pushes the filter into, so it is
    read through the ``(workspace_id, id)`` index, never the filter's own; and the window's
    end comes from the same statement (one snapshot) as its matches, so a contact deleted
    meanwhile by someone else cannot move the next window past contacts never read.
    """
    window = sa.select(*(contacts.c[f] for f in FILTER_FIELDS)).where(
        contacts.c.workspace_id == workspace_id
    )
    if after is not None:
        window = window.where(contacts.c.id > after)
    w = window.order_by(contacts.c.id).limit(window_rows).cte("expansion_window")
    matches = sa.select(w.c.id).where(clause_of(w)).order_by(w.c.id).limit(wanted).subquery()
    end = sa.select(w.c.id).order_by(w.c.id.desc()).limit(1).subquery()
    return sa.union_all(
        sa.select(matches.c.id, sa.literal(_MATCH).label("kind")),
        sa.select(end.c.id, sa.literal(_WINDOW_END).label("kind")),
    )


def email_ref(index: int) -> str:
    """How a job names an address that matched nothing: its place in the request's
    ``emails`` array (``"emails[3]"``, 0-based, first occurrence). The caller holds its own
    list; the service never keeps an address it did not delete (DESIGN.md, Erasure)."""
    return f"emails[{index}]"


async def refuse_if_everything(
    conn: AsyncConnection, workspace_id: uuid.UUID, req: BulkDeleteRequest, matched: int
) -> None:
    """A filter/search that selects every contact of the workspace is a 400 unless the
    request says ``match_all: true`` (DESIGN.md: a deletion never widens by accident).

    The filter's simplification (`service.contacts.filters.simplify`) catches the forms
    that match everything whatever the data; this catches the rest by the data itself:
    ``{"search": "@"}``, ``created_at`` after 1970, a ``$startsWith`` every address shares.
    Dry run and real run both call it, so they agree. Raises `ValidationFailed`.
    """
    if req.match_all or matched == 0:
        return
    total = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(contacts)
            .where(contacts.c.workspace_id == workspace_id)
        )
    ).scalar_one()
    if matched < total:
        return
    fields = [f for f in ("filter", "search") if getattr(req, f) is not None]
    raise ValidationFailed(
        "the selection matches every contact of the workspace; send match_all: true to mean that",
        [
            {
                "field": field,
                "message": f"selects {_all_of(total)} of this workspace; add "
                '"match_all": true to delete them all, or name them with contact_ids',
            }
            for field in fields
        ],
    )


async def resolve_emails(
    conn: AsyncConnection, workspace_id: uuid.UUID, emails: Sequence[str]
) -> list[tuple[str, uuid.UUID | None]]:
    """Refs for an emails selector as the request gave it (duplicates allowed): each
    matching contact by id, each address that matched nothing by `email_ref`."""
    first: dict[str, int] = {}
    for index, email in enumerate(emails):
        first.setdefault(email, index)
    rows = (
        await conn.execute(
            sa.select(contacts.c.id, contacts.c.email)
            .where(contacts.c.workspace_id == workspace_id, contacts.c.email.in_(list(first)))
            .order_by(contacts.c.id)
        )
    ).all()
    by_email: dict[str, list[uuid.UUID]] = {}
    for row in rows:
        by_email.setdefault(row.email, []).append(row.id)
    refs: list[tuple[str, uuid.UUID | None]] = []
    for email, index in first.items():
        matches = by_email.get(email)
        if not matches:
            refs.append((email_ref(index), None))
        else:
            refs.extend((str(cid), cid) for cid in matches)
    return refs


def _actor(who: Requester) -> dict[str, str]:
    if who.api_key_id is None:
        return {"type": "system", "id": "api"}
    return {"type": "api_key", "id": str(who.api_key_id)}


# What finishing a job needs of its row: never the selector, which can be large.
PROGRESS_COLUMNS = (
    deletion_jobs.c.id,
    deletion_jobs.c.workspace_id,
    deletion_jobs.c.request_id,
    deletion_jobs.c.expanded,
    deletion_jobs.c.completed_at,
    deletion_jobs.c.total_requested,
    deletion_jobs.c.processed_count,
    deletion_jobs.c.deleted_count,
    deletion_jobs.c.not_found_count,
    deletion_jobs.c.failed_count,
    deletion_jobs.c.started_at,
)


@dataclass
class JobChange:
    """What one progress update did to a job, for the log lines written after commit."""

    started: bool = False
    finished: dict[str, Any] | None = None  # the finished job's id, status and counts
    redacted: bool = False  # its selector's personal values were just forgotten


@dataclass
class ProgressDelta:
    """How many items of one job a transaction just finished, by outcome."""

    deleted: int = 0
    not_found: int = 0
    failed: int = 0
    added: int = 0  # items added by an expansion page
    expanded: bool = False  # the expansion reached the end of the matches

    @property
    def processed(self) -> int:
        return self.deleted + self.not_found + self.failed


async def apply_progress(
    conn: AsyncConnection,
    db: Database,
    settings: Settings,
    job_id: uuid.UUID,
    delta: ProgressDelta,
    *,
    audit: list[AuditRecord] | None = None,
) -> JobChange:
    """Add outcomes to a job; finish it when nothing is left (then `finished` is set).

    ``audit``: see `finish_job` (the finished job's event goes there, for the caller to
    append, when given).
    """
    c = deletion_jobs.c
    now = utcnow()
    values: dict[str, Any] = {
        "processed_count": c.processed_count + delta.processed,
        "deleted_count": c.deleted_count + delta.deleted,
        "not_found_count": c.not_found_count + delta.not_found,
        "failed_count": c.failed_count + delta.failed,
        "total_requested": c.total_requested + delta.added,
        "status": sa.case((c.status == JobStatus.PENDING, JobStatus.IN_PROGRESS), else_=c.status),
        "started_at": sa.func.coalesce(c.started_at, now),
    }
    if delta.expanded:
        values["expanded"] = True
    row: Mapping[Any, Any] = (
        (
            await conn.execute(
                deletion_jobs.update()
                .where(c.id == job_id)
                .values(**values)
                .returning(*PROGRESS_COLUMNS, c.expand_after)
            )
        )
        .mappings()
        .one()
    )
    change = JobChange(started=row["started_at"] == now)
    if (
        delta.processed
        and not row["expanded"]
        and row["completed_at"] is None
        and row["total_requested"] - row["processed_count"] < settings.expand_ahead_max
    ):
        row = await _expand_ahead(conn, settings, row, delta, now)
    done = row["expanded"] and row["processed_count"] >= row["total_requested"]
    if not done or row["completed_at"] is not None:
        return change
    finished = await finish_job(conn, db, settings, row, now, audit=audit)
    change.finished, change.redacted = finished.finished, finished.redacted
    return change


PERSONAL_FIELDS = frozenset({"email", "first_name", "last_name", "phone"})
"""Filter fields whose values are a contact's personal data (service.contacts.filters)."""
REDACTED_VALUE = "[redacted]"


def without_personal_values(selector: Mapping[str, Any]) -> dict[str, Any]:
    """A filter/search selector with every value given for a personal field, and the
    search text, replaced by ``"[redacted]"`` (operators, other fields and their values
    kept): what a finished job keeps of what it was asked to match."""

    def walk(value: Any, personal: bool) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, personal or k in PERSONAL_FIELDS) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, personal) for v in value]
        return REDACTED_VALUE if personal and isinstance(value, str) else value

    kept = dict(selector)
    if "filter" in kept:
        kept["filter"] = walk(kept["filter"], False)
    if isinstance(kept.get("search"), str):
        kept["search"] = REDACTED_VALUE
    return kept


async def forget_selector_values(conn: AsyncConnection, job_id: uuid.UUID) -> bool:
    """Once a job is finished, its filter no longer needs the values it matched: an
    address (or name, phone, search text) it was given is personal data the deletion must
    not leave behind (README "Prove an erasure"; `stored_selector` does the same for an
    emails job at once). True if the stored selector changed (its old row version then
    needs the erasure scrub)."""
    c = deletion_jobs.c
    selector = (await conn.execute(sa.select(c.selector).where(c.id == job_id))).scalar_one()
    kept = without_personal_values(selector)
    if kept == selector:
        return False
    await conn.execute(deletion_jobs.update().where(c.id == job_id).values(selector=kept))
    return True


async def _expand_ahead(
    conn: AsyncConnection,
    settings: Settings,
    row: Mapping[Any, Any],
    delta: ProgressDelta,
    now: datetime,
) -> Mapping[Any, Any]:
    """One more expansion page for a filter/search job whose waiting items fell below
    ``expand_ahead_max``, in the transaction of the deletions that made them fall; the
    job's row as it now stands. ``delta`` learns what the page added, for the log lines.

    Expanding here, rather than by a message queued behind the job's own deletions, keeps
    between ``expand_ahead_max`` and ``expand_ahead_max + expand_page_size`` items waiting
    while the job runs: enough to keep the workers busy, never the whole job. A statement
    the database refuses is not this batch's fault: the page is rolled back to its
    savepoint and left to an expansion message, whose failure fails the job as any
    expansion failure does (service.deletion.worker).
    """
    c = deletion_jobs.c
    selector, accepted_at = (
        await conn.execute(sa.select(c.selector, c.created_at).where(c.id == row["id"]))
    ).one()
    try:
        async with conn.begin_nested():
            page = await expand_page(
                conn, settings, row, selector, accepted_at=accepted_at, now=now
            )
    except Exception as exc:
        if is_transient(exc):
            raise
        log.warning("deletion_job_expansion_deferred", job_id=str(row["id"]), error=describe(exc))
        await queue_expansion(
            conn, settings, row["id"], row["workspace_id"], row["expand_after"], now
        )
        return row
    delta.added += page.found
    delta.expanded = delta.expanded or page.last
    values: dict[str, Any] = {"total_requested": c.total_requested + page.found}
    if page.last:
        values["expanded"] = True
    updated = await conn.execute(
        deletion_jobs.update()
        .where(c.id == row["id"])
        .values(**values)
        .returning(*PROGRESS_COLUMNS, c.expand_after)
    )
    return updated.mappings().one()


async def finish_job(
    conn: AsyncConnection,
    db: Database,
    settings: Settings,
    row: Mapping[Any, Any],
    now: datetime,
    *,
    failure: tuple[str, str] | None = None,
    audit: list[AuditRecord] | None = None,
) -> JobChange:
    """Mark a job finished, forget the personal values its selector was given
    (`forget_selector_values`), and record and announce it; returns the change (`finished`:
    its id, status and counts; `redacted`: whether its selector changed).

    ``audit``: when given, the job's ``deletion.completed`` event is added to it rather
    than appended here, and the caller appends the list (`append_events`) before it
    commits. The worker does so to take its locks in one order in every transaction —
    items and contacts, then job rows, then the audit chain head — and to append the
    job's last deletions and its completion, in that order, in one go.

    ``failure`` (code, message) finishes it ``failed``: the job itself could not run, for
    instance because the database refused its selection statement. The reason is kept on
    the job (its ``failure`` in the API, at most 500 characters of message) and in its
    ``deletion.completed`` audit event.
    """
    status = JobStatus.FAILED if failure is not None else final_status(row["failed_count"])
    await conn.execute(
        deletion_jobs.update()
        .where(deletion_jobs.c.id == row["id"])
        .values(
            status=status,
            completed_at=now,
            started_at=sa.func.coalesce(deletion_jobs.c.started_at, now),
            failure_code=failure[0] if failure else None,
            failure_message=failure[1][:500] if failure else None,
        )
    )
    counts = {
        "total_requested": row["total_requested"],
        "processed_count": row["processed_count"],
        "deleted_count": row["deleted_count"],
        "not_found_count": row["not_found_count"],
        "failed_count": row["failed_count"],
    }
    record = AuditRecord(
        workspace_id=row["workspace_id"],
        actor={"type": "system", "id": "worker"},
        action="deletion.completed",
        target={"type": "deletion_job", "id": str(row["id"])},
        job_id=str(row["id"]),
        request_id=row["request_id"],
        data={
            "status": str(status),
            **counts,
            **({"code": failure[0], "message": failure[1]} if failure else {}),
        },
    )
    if audit is not None:
        audit.append(record)
    else:
        await append_events(conn, db, [record])
    event = envelope(
        TYPE_JOB_COMPLETED,
        str(row["id"]),
        DeletionJobCompleted(
            job_id=row["id"],
            workspace_id=row["workspace_id"],
            status=status.value,
            completed_at=now,
            **counts,
        ),
        now,
    )
    topic = settings.topic(TOPIC_JOB_COMPLETED)
    await conn.execute(outbox.insert().values(**outbox_row(topic, str(row["id"]), event)))
    redacted = await forget_selector_values(conn, row["id"])
    return JobChange(
        finished={"job_id": str(row["id"]), "status": status.value, **counts}, redacted=redacted
    )


def _all_of(total: int) -> str:
    return "its only contact" if total == 1 else f"all {total} contacts"
