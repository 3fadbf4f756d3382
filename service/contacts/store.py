"""Contacts and timeline items in the database (SQLAlchemy Core)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from service.contacts.filters import Node, selection_clause
from service.contacts.models import ActivityCreate, ContactCreate, NoteCreate, TaskCreate
from service.db import Database, activities, contacts, new_id, notes, tasks, utcnow
from service.errors import NotFound, ValidationFailed
from service.timefmt import iso

TIMELINE_TABLES: dict[str, sa.Table] = {"activity": activities, "note": notes, "task": tasks}


def contact_row(
    contact_id: uuid.UUID,
    workspace_id: uuid.UUID,
    email: str,
    *,
    first_name: str | None = None,
    last_name: str | None = None,
    phone: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """A whole `contacts` row for a bulk insert (seeding, tests): no properties, no member
    role, no billing subscription, created and updated `at` (default now, UTC)."""
    now = at or utcnow()
    return {
        "id": contact_id,
        "workspace_id": workspace_id,
        "email": email,
        "first_name": first_name,
        "last_name": last_name,
        "phone": phone,
        "properties": {},
        "member_role": None,
        "has_billing_subscription": False,
        "created_at": now,
        "updated_at": now,
    }


def contact_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A contact row as the API shows it."""
    return {
        "id": str(row["id"]),
        "email": row["email"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "phone": row["phone"],
        "properties": row["properties"],
        "member_role": row["member_role"],
        "has_billing_subscription": row["has_billing_subscription"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def timeline_json(kind: str, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A timeline item (activity, note or task) as the API shows it."""
    item: dict[str, Any] = {
        "id": str(row["id"]),
        "kind": kind,
        "contact_id": str(row["contact_id"]) if row["contact_id"] is not None else None,
        "created_at": iso(row["created_at"]),
    }
    if kind == "activity":
        item |= {
            "type": row["type"],
            "subject": row["subject"],
            "body": row["body"],
            "occurred_at": iso(row["occurred_at"]),
        }
    elif kind == "note":
        item |= {"body": row["body"]}
    else:
        item |= {
            "title": row["title"],
            "body": row["body"],
            "status": row["status"],
            "due_at": iso(row["due_at"]),
        }
    return item


def timeline_time(item: Mapping[Any, Any]) -> datetime:
    """When an item happened: an activity's occurred_at, otherwise its creation."""
    value: str = item.get("occurred_at") or item["created_at"]
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def create_contact(
    db: Database, workspace_id: uuid.UUID, body: ContactCreate
) -> dict[str, Any]:
    now = utcnow()
    values = {
        "id": new_id(),
        "workspace_id": workspace_id,
        **body.model_dump(),
        "created_at": now,
        "updated_at": now,
    }
    async with db.begin() as conn:
        await conn.execute(contacts.insert().values(**values))
    return contact_json(values)


async def get_contact(
    db: Database, workspace_id: uuid.UUID, contact_id: uuid.UUID
) -> dict[str, Any]:
    stmt = sa.select(contacts).where(
        contacts.c.id == contact_id, contacts.c.workspace_id == workspace_id
    )
    async with db.read() as conn:
        row = (await conn.execute(stmt)).mappings().first()
    if row is None:
        raise NotFound("no such contact")
    return contact_json(row)


async def contact_exists(db: Database, workspace_id: uuid.UUID, contact_id: uuid.UUID) -> bool:
    """Whether this workspace has the contact (now)."""
    stmt = sa.select(contacts.c.id).where(
        contacts.c.id == contact_id, contacts.c.workspace_id == workspace_id
    )
    async with db.read() as conn:
        return (await conn.execute(stmt)).first() is not None


async def query_contacts(
    db: Database,
    workspace_id: uuid.UUID,
    tree: Node | None,
    search: str | None,
    limit: int,
    after: uuid.UUID | None,
) -> tuple[list[dict[str, Any]], uuid.UUID | None]:
    """One page of matching contacts in id order, and the id to continue after."""
    stmt = (
        sa.select(contacts)
        .where(contacts.c.workspace_id == workspace_id, selection_clause(contacts, tree, search))
        .order_by(contacts.c.id)
        .limit(limit + 1)
    )
    if after is not None:
        stmt = stmt.where(contacts.c.id > after)
    async with db.read() as conn:
        rows = (await conn.execute(stmt)).mappings().all()
    page = [contact_json(r) for r in rows[:limit]]
    next_after = rows[limit - 1]["id"] if len(rows) > limit else None
    return page, next_after


async def add_timeline_item(
    db: Database,
    workspace_id: uuid.UUID,
    contact_id: uuid.UUID,
    body: ActivityCreate | NoteCreate | TaskCreate,
) -> dict[str, Any]:
    """Add an activity, note or task to a contact of this workspace."""
    kind = {ActivityCreate: "activity", NoteCreate: "note", TaskCreate: "task"}[type(body)]
    values: dict[str, Any] = {
        "id": new_id(),
        "workspace_id": workspace_id,
        "contact_id": contact_id,
        **body.model_dump(),
        "created_at": utcnow(),
    }
    for name in ("occurred_at", "due_at"):
        if isinstance(values.get(name), datetime) and values[name].tzinfo is None:
            raise ValidationFailed(
                f"{name} needs a timezone", [{"field": name, "message": "add a UTC offset or Z"}]
            )
    if kind == "activity" and values["occurred_at"] is None:
        values["occurred_at"] = values["created_at"]
    async with db.begin() as conn:
        exists = (
            await conn.execute(
                sa.select(contacts.c.id).where(
                    contacts.c.id == contact_id, contacts.c.workspace_id == workspace_id
                )
            )
        ).first()
        if exists is None:
            raise NotFound("no such contact")
        await conn.execute(TIMELINE_TABLES[kind].insert().values(**values))
    return timeline_json(kind, values)


_IDS_PER_READ = 1000


async def timeline_items(
    db: Database,
    workspace_id: uuid.UUID,
    *,
    contact_id: uuid.UUID | None = None,
    ids: Mapping[str, list[uuid.UUID]] | None = None,
) -> list[dict[str, Any]]:
    """Timeline items of a contact, or the items with the given ids; newest first.

    Ids are read ``_IDS_PER_READ`` at a time: a deleted contact's audit event may name tens
    of thousands, over SQLite's 32,766 bound parameters per statement."""
    items: list[dict[str, Any]] = []
    async with db.read() as conn:
        for kind, table in TIMELINE_TABLES.items():
            stmt = sa.select(table).where(table.c.workspace_id == workspace_id)
            if contact_id is not None:
                stmt = stmt.where(table.c.contact_id == contact_id)
            if ids is None:
                rows = (await conn.execute(stmt)).mappings().all()
                items.extend(timeline_json(kind, r) for r in rows)
                continue
            wanted = ids.get(kind, [])
            for start in range(0, len(wanted), _IDS_PER_READ):
                chunk = wanted[start : start + _IDS_PER_READ]
                rows = (await conn.execute(stmt.where(table.c.id.in_(chunk)))).mappings().all()
                items.extend(timeline_json(kind, r) for r in rows)
    items.sort(key=lambda i: (timeline_time(i), i["id"]), reverse=True)
    return items


async def contact_timeline(
    db: Database,
    workspace_id: uuid.UUID,
    contact_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> tuple[list[dict[str, Any]], tuple[datetime, uuid.UUID] | None]:
    """One page of a live contact's timeline, newest first: at most ``limit`` items
    strictly before ``before`` (a (time, id) position: an activity's occurred_at, another
    item's created_at, then the id), and the position of the page's last item when more
    follow (else None). Each kind is read in that order, ``limit + 1`` rows at most, so a
    contact with tens of thousands of notes costs one page, not the whole history.
    404 (NotFound) when this workspace has no such contact."""
    await get_contact(db, workspace_id, contact_id)
    rows: list[tuple[datetime, uuid.UUID, dict[str, Any]]] = []
    async with db.read() as conn:
        for kind, table in TIMELINE_TABLES.items():
            at = table.c.occurred_at if kind == "activity" else table.c.created_at
            stmt = (
                sa.select(table)
                .where(table.c.workspace_id == workspace_id, table.c.contact_id == contact_id)
                .order_by(at.desc(), table.c.id.desc())
                .limit(limit + 1)
            )
            if before is not None:
                when, last = before
                stmt = stmt.where(sa.or_(at < when, sa.and_(at == when, table.c.id < last)))
            for row in (await conn.execute(stmt)).mappings():
                moment = row["occurred_at"] if kind == "activity" else row["created_at"]
                rows.append((moment, uuid.UUID(str(row["id"])), timeline_json(kind, row)))
    rows.sort(key=lambda r: (r[0], str(r[1])), reverse=True)
    page = rows[:limit]
    following = (page[-1][0], page[-1][1]) if len(rows) > limit else None
    return [item for _, _, item in page], following
