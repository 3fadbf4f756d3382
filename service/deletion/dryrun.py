"""A dry run: the counts and per-contact errors a real run would give, changing nothing."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.contacts.filters import selection_clause
from service.db import contacts, utcnow
from service.deletion.models import BulkDeleteRequest, ItemStatus, decide
from service.deletion.store import LIST_CAP, job_json, resolve_emails

PAGE = 1000


async def dry_run(
    conn: AsyncConnection, workspace_id: uuid.UUID, req: BulkDeleteRequest, page: int = PAGE
) -> dict[str, Any]:
    """Evaluate the selector against today's contacts with the real outcome rules."""
    selector = req.selector()
    counts = {ItemStatus.DELETED: 0, ItemStatus.NOT_FOUND: 0, ItemStatus.FAILED: 0}
    not_found: list[str] = []
    errors: list[dict[str, Any]] = []

    def judge(ref: str, contact: Any) -> None:
        outcome = decide(contact, req.delete_members)
        counts[outcome.status] += 1
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
        "selector": selector,
        "total_requested": processed,
        "processed_count": processed,
        "deleted_count": counts[ItemStatus.DELETED],
        "not_found_count": counts[ItemStatus.NOT_FOUND],
        "failed_count": counts[ItemStatus.FAILED],
        "created_at": now,
        "started_at": now,
        "completed_at": now,
    }
    return job_json(job_row, not_found, errors)
