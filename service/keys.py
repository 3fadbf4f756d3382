"""Workspaces and API keys: creation, hashing, lookup, revocation, scopes.

A key is shown once, at creation; only its SHA-256 is stored. Keys are 256-bit random
tokens, so a fast unsalted hash is the right tool (there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.models import AuditAction
from service.audit.store import AuditRecord, append_events
from service.db import Database, api_keys, new_id, utcnow, workspaces
from service.scopes import SCOPES as SCOPES
from service.timefmt import iso

KEY_PREFIX = "cdk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key of one workspace and what it may do."""

    key_id: uuid.UUID
    workspace_id: uuid.UUID
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True)
class CreatedKey:
    key: str
    key_id: uuid.UUID
    workspace_id: uuid.UUID
    scopes: tuple[str, ...]
    new_workspace: bool = False


def generate_key() -> str:
    """A new API key: a recognisable prefix and 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def validate_scopes(scopes: list[str]) -> tuple[str, ...]:
    """The scopes, deduplicated and checked against the known ones."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError("at least one scope is required")
    return tuple(s for s in SCOPES if s in scopes)


MAX_WORKSPACE_NAME = 200  # the column's length


def check_workspace_name(name: str) -> str:
    """A workspace name as given, or ValueError: 1-200 printable characters, not blank,
    no space at either end (" acme" and "acme" would be two workspaces)."""
    if not name.strip() or name != name.strip():
        raise ValueError("a workspace name is not blank and has no space at either end")
    if len(name) > MAX_WORKSPACE_NAME or not name.isprintable():
        raise ValueError(f"a workspace name is 1-{MAX_WORKSPACE_NAME} printable characters")
    return name


async def ensure_workspace(db: Database, name: str) -> uuid.UUID:
    """The id of the workspace with this name, creating it when new."""
    workspace_id, _ = await workspace_of(db, name)
    return workspace_id


async def workspace_of(db: Database, name: str) -> tuple[uuid.UUID, bool]:
    """The id of the workspace with this name, and whether this call created it."""
    async with db.begin() as conn:
        row = (
            await conn.execute(sa.select(workspaces.c.id).where(workspaces.c.name == name))
        ).first()
        if row is not None:
            workspace_id: uuid.UUID = row.id
            return workspace_id, False
        workspace_id = new_id()
        await conn.execute(
            workspaces.insert().values(id=workspace_id, name=name, created_at=utcnow())
        )
        return workspace_id, True


async def create_key(db: Database, workspace: str, scopes: list[str]) -> CreatedKey:
    """Create a key for the named workspace (created if new); the clear key is returned once."""
    checked = validate_scopes(scopes)
    workspace_id, new_workspace = await workspace_of(db, check_workspace_name(workspace))
    key = generate_key()
    key_id = new_id()
    async with db.begin() as conn:
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                workspace_id=workspace_id,
                key_hash=hash_key(key),
                prefix=key[:12],
                scopes=list(checked),
                created_at=utcnow(),
            )
        )
        await _audit_key(
            conn, db, workspace_id, key_id, "api_key.created", {"scopes": list(checked)}
        )
    return CreatedKey(
        key=key,
        key_id=key_id,
        workspace_id=workspace_id,
        scopes=checked,
        new_workspace=new_workspace,
    )


async def list_keys(db: Database) -> list[dict[str, Any]]:
    """Every key with its workspace (never the key itself)."""
    stmt = (
        sa.select(api_keys, workspaces.c.name.label("workspace"))
        .join(workspaces, workspaces.c.id == api_keys.c.workspace_id)
        .order_by(api_keys.c.created_at)
    )
    async with db.read() as conn:
        rows = (await conn.execute(stmt)).mappings().all()
    return [
        {
            "key_id": str(r["id"]),
            "workspace": r["workspace"],
            "workspace_id": str(r["workspace_id"]),
            "prefix": r["prefix"],
            "scopes": list(r["scopes"]),
            "created_at": iso(r["created_at"]),
            "last_used_at": iso(r["last_used_at"]),
            "revoked_at": iso(r["revoked_at"]),
        }
        for r in rows
    ]


async def revoke_key(db: Database, key_id: uuid.UUID) -> bool:
    """Revoke a key; False when no live key has that id."""
    async with db.begin() as conn:
        row = (
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .returning(api_keys.c.workspace_id)
            )
        ).first()
        if row is None:
            return False
        await _audit_key(conn, db, row.workspace_id, key_id, "api_key.revoked", {})
    return True


async def authenticate(db: Database, key: str) -> Principal | None:
    """The principal of a live key, or None for an unknown or revoked one."""
    stmt = sa.select(api_keys.c.id, api_keys.c.workspace_id, api_keys.c.scopes).where(
        api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None)
    )
    async with db.read() as conn:
        row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    return Principal(key_id=row.id, workspace_id=row.workspace_id, scopes=frozenset(row.scopes))


async def _audit_key(
    conn: AsyncConnection,
    db: Database,
    workspace_id: uuid.UUID,
    key_id: uuid.UUID,
    action: AuditAction,
    data: dict[str, Any],
) -> None:
    record = AuditRecord(
        workspace_id=workspace_id,
        actor={"type": "system", "id": "cli"},
        action=action,
        target={"type": "api_key", "id": str(key_id)},
        data=data,
    )
    await append_events(conn, db, [record])
