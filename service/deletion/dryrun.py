"""A dry run: the counts and per-contact errors a real run would give, changing nothing."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.contacts.filters import selection_clause
from service.contacts.store import TIMELINE_TABLES
from service.db import contacts, utcnow
from service.deletion.models import BulkDeleteRequest, ItemStatus, decide
from service.deletion.store import LIST_CAP, job_json, resolve_emails, stored_selector
from service.erasure.redact import TEXT_FIELDS, Redactor

PAGE = 1000


async def dry_run(
    conn: AsyncConnection, workspace_id: uuid.UUID, req: BulkDeleteRequest, page: int = PAGE
) -> dict[str, Any]:
    """Evaluate the selector against today's contacts with the real outcome rules."""
    selector = req.selector()
    counts = {ItemStatus.DELETED: 0, ItemStatus.NOT_FOUND: 0, ItemStatus.FAILED: 0}
    not_found: list[str] = []
    errors: list[dict[str, Any]] = []
    # Contacts a real run would delete, whose timelines redaction would rewrite.
    to_redact: dict[uuid.UUID, Redactor] = {}
    would_redact = 0

    def judge(ref: str, contact: Any) -> None:
        outcome = decide(contact, req.delete_members)
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
            refs = await resolve_emails(conn, workspace_id, selector["emails"])
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
        after: uuid.UUID | None = None
        while True:
            stmt = (
                sa.select(contacts)
                .where(contacts.c.workspace_id == workspace_id, where)
                .order_by(contacts.c.id)
                .limit(page)
            )
            if after is not None:
                stmt = stmt.where(contacts.c.id > after)
            rows = (await conn.execute(stmt)).mappings().all()
            for row in rows:
                judge(str(row["id"]), row)
            would_redact += await count_redactions(conn, to_redact)
            to_redact.clear()
            if len(rows) < page:
                break
            after = rows[-1]["id"]
    now = utcnow()
    processed = sum(counts.values())
    job_row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "status": "completed_with_errors" if counts[ItemStatus.FAILED] else "completed",
        "dry_run": True,
        "delete_members": req.delete_members,
        "selector": stored_selector(selector),
        "total_requested": processed,
        "processed_count": processed,
        "deleted_count": counts[ItemStatus.DELETED],
        "not_found_count": counts[ItemStatus.NOT_FOUND],
        "failed_count": counts[ItemStatus.FAILED],
        "created_at": now,
        "started_at": now,
        "completed_at": now,
    }
    return job_json(job_row, not_found, errors) | {"would_redact_count": would_redact}


async def count_redactions(conn: AsyncConnection, redactors: dict[uuid.UUID, Redactor]) -> int:
    """How many timeline items of these contacts `redact_timeline` would rewrite."""
    total = 0
    ids = list(redactors)
    for start in range(0, len(ids), PAGE):
        chunk = ids[start : start + PAGE]
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
