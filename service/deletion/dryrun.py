"""A dry run: what a real run would do, in fields that cannot be mistaken for a job's.

The answer (DESIGN §3, the lead's contract) has no ``job_id`` and no job-status fields:
``would_delete_count``, ``would_fail_count``, ``not_found_count`` with the capped
``not_found`` list, the same per-contact ``errors`` a real run would record, how many
timeline items would lose their back-reference, and one page of the contact ids it would
delete (sorted; ``next_cursor`` is passed back as ``dry_run_cursor`` for the next page).
The counts always cover the whole selection, whatever the page. Nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.contacts.filters import selection_clause
from service.contacts.store import TIMELINE_TABLES
from service.db import contacts
from service.deletion.models import BulkDeleteRequest, ItemStatus, decide
from service.deletion.store import (
    LIST_CAP,
    refuse_if_everything,
    resolve_emails,
    stored_selector,
)
from service.erasure.redact import TEXT_FIELDS, Redactor
from service.pagination import IdCursor, encode_cursor, read_cursor

PAGE = 1000
TIMELINE_CHUNK = 500  # ids per IN (...) when counting the timelines that would be orphaned
KIND_PLURAL = {"activity": "activities", "note": "notes", "task": "tasks"}


def _cursor_after(cursor: str | None) -> uuid.UUID | None:
    """The contact id a dry run's `next_cursor` points after (a bad one is a 400)."""
    return read_cursor(cursor, IdCursor, "dry_run_cursor").after if cursor is not None else None


async def dry_run(
    conn: AsyncConnection, workspace_id: uuid.UUID, req: BulkDeleteRequest, page: int = PAGE
) -> dict[str, Any]:
    """Evaluate the selector against today's contacts with the real outcome rules."""
    selector = req.selector()
    after = _cursor_after(req.dry_run_cursor)
    counts = {ItemStatus.DELETED: 0, ItemStatus.NOT_FOUND: 0, ItemStatus.FAILED: 0}
    not_found: list[str] = []
    errors: list[dict[str, Any]] = []
    doomed: set[uuid.UUID] = set()
    # Contacts a real run would delete, whose timelines redaction would rewrite.
    to_redact: dict[uuid.UUID, Redactor] = {}
    would_redact = 0

    def judge(ref: str, contact: Any) -> None:
        outcome = decide(contact, req.delete_members)
        if outcome.status is ItemStatus.DELETED:
            if contact["id"] in doomed:
                return  # named twice (an id and its email): deleted once
            doomed.add(contact["id"])
        counts[outcome.status] += 1
        if req.redact_timeline and outcome.status is ItemStatus.DELETED:
            to_redact[contact["id"]] = Redactor.of(contact)
        if outcome.status is ItemStatus.NOT_FOUND and len(not_found) < LIST_CAP:
            not_found.append(ref)
        elif outcome.code is not None and len(errors) < LIST_CAP:
            errors.append({"contact_id": ref, "code": outcome.code, "message": outcome.message})

    if req.contact_ids is not None or req.emails is not None:
        if req.contact_ids is not None:
            refs: list[tuple[str, uuid.UUID | None]] = [
                (i, uuid.UUID(i)) for i in selector["contact_ids"]
            ]
        else:
            assert req.emails is not None  # the other selector of this branch
            refs = await resolve_emails(conn, workspace_id, req.emails)
        ids = [cid for _, cid in refs if cid is not None]
        rows = (
            (
                await conn.execute(
                    sa.select(contacts).where(
                        contacts.c.workspace_id == workspace_id, contacts.c.id.in_(ids)
                    )
                )
            )
            .mappings()
            .all()
            if ids
            else []
        )
        by_id = {r["id"]: r for r in rows}
        for ref, cid in refs:
            judge(ref, by_id.get(cid) if cid is not None else None)
        would_redact += await count_redactions(conn, to_redact)
    else:
        where = selection_clause(contacts, req.filter_tree(), req.search)
        last: uuid.UUID | None = None
        matched = 0
        while True:
            stmt = (
                sa.select(contacts)
                .where(contacts.c.workspace_id == workspace_id, where)
                .order_by(contacts.c.id)
                .limit(page)
            )
            if last is not None:
                stmt = stmt.where(contacts.c.id > last)
            batch = (await conn.execute(stmt)).mappings().all()
            for row in batch:
                judge(str(row["id"]), row)
            would_redact += await count_redactions(conn, to_redact)
            to_redact.clear()
            matched += len(batch)
            if len(batch) < page:
                break
            last = batch[-1]["id"]
        await refuse_if_everything(conn, workspace_id, req, matched)

    ordered = sorted(doomed)
    start = 0
    if after is not None:
        start = next((i for i, cid in enumerate(ordered) if cid > after), len(ordered))
    shown = ordered[start : start + req.dry_run_limit]
    more = start + req.dry_run_limit < len(ordered)
    return {
        "dry_run": True,
        "selector": stored_selector(selector),
        "would_delete_count": counts[ItemStatus.DELETED],
        "would_fail_count": counts[ItemStatus.FAILED],
        "not_found_count": counts[ItemStatus.NOT_FOUND],
        "not_found": not_found,
        "errors": errors,
        "orphaned_timeline": await _timeline_counts(conn, ordered),
        "would_redact_count": would_redact,
        "contact_ids": [str(c) for c in shown],
        "next_cursor": encode_cursor({"after": str(shown[-1])}) if more and shown else None,
    }


async def _timeline_counts(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """How many activities, notes and tasks would lose their back-reference."""
    totals = dict.fromkeys(KIND_PLURAL.values(), 0)
    for i in range(0, len(ids), TIMELINE_CHUNK):
        chunk = list(ids[i : i + TIMELINE_CHUNK])
        for kind, table in TIMELINE_TABLES.items():
            n = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.contact_id.in_(chunk))
                )
            ).scalar_one()
            totals[KIND_PLURAL[kind]] += int(n)
    return totals


async def count_redactions(conn: AsyncConnection, redactors: dict[uuid.UUID, Redactor]) -> int:
    """How many timeline items of these contacts `redact_timeline` would rewrite."""
    total = 0
    ids = list(redactors)
    for start in range(0, len(ids), TIMELINE_CHUNK):
        chunk = ids[start : start + TIMELINE_CHUNK]
        for kind, table in TIMELINE_TABLES.items():
            rows = await conn.execute(
                sa.select(table.c.contact_id, *[table.c[f] for f in TEXT_FIELDS[kind]]).where(
                    table.c.contact_id.in_(chunk)
                )
            )
            for row in rows:
                changed, _ = redactors[row.contact_id].redact_item(kind, row._mapping)
                total += bool(changed)
    return total
