"""Appending to and reading the audit trail (SQLAlchemy Core).

Appends happen inside the caller's transaction, so an event commits or rolls back with
the change it describes. The per-workspace head row is locked for the append, which
keeps `seq` gap-free and the chain unforked with any number of concurrent writers.
There is no function here that updates or deletes an event.

Reads (the query API, the export, verification) page through a workspace's events in
`seq` order on the primary key, one short read transaction per page, so that memory
stays flat however long the chain and no connection is held while a client is slow.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.chain import (
    GENESIS_HASH,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    event_hash_with_data,
    format_time,
    hashed_before,
)
from service.audit.models import AuditAction
from service.config import StartupError
from service.db import (
    Database,
    audit_events,
    audit_heads,
    insert_rows,
    new_ids,
    server_secrets,
    utcnow,
    workspaces,
)

_PARTY_KEYS = frozenset({"type", "id"})


class _EventRow(NamedTuple):
    """An event's row as `append_events` inserts it: the field names are the columns."""

    workspace_id: uuid.UUID
    seq: int
    id: uuid.UUID
    occurred_at: str
    actor_type: str
    actor_id: str
    action: str
    target_type: str | None
    target_id: str | None
    job_id: str | None
    request_id: str | None
    data: str
    email_hmac: str | None
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditRecord:
    """What happened, before it gets its place (seq) and hash in the chain."""

    workspace_id: uuid.UUID
    actor: Mapping[str, str]
    action: AuditAction
    target: Mapping[str, str] | None = None
    job_id: str | None = None
    request_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    email_hmac: str | None = None
    occurred_at: datetime | None = None


async def _lock_head(
    conn: AsyncConnection, db: Database, workspace_id: uuid.UUID
) -> tuple[int, str]:
    # One round trip: create the head if new, else "update" it to itself, which takes its
    # row lock (waiting for any other writer's commit, then reading what it committed) and
    # returns it; the lock is held until this transaction ends, like SELECT FOR UPDATE.
    ins: Any = (postgresql.insert if not db.is_sqlite else sqlite.insert)(audit_heads)
    stmt = (
        ins.values(workspace_id=workspace_id, seq=0, hash=GENESIS_HASH)
        .on_conflict_do_update(
            index_elements=[audit_heads.c.workspace_id], set_={"seq": audit_heads.c.seq}
        )
        .returning(audit_heads.c.seq, audit_heads.c.hash)
    )
    row = (await conn.execute(stmt)).one()
    return int(row.seq), str(row.hash)


async def append_events(
    conn: AsyncConnection, db: Database, records: Sequence[AuditRecord]
) -> None:
    """Append records to their workspaces' chains in this transaction.

    Each event's ``data`` is encoded once (canonical JSON): those bytes are what is
    stored and what the hash covers (``chain.event_hash_with_data``).
    """
    by_workspace: dict[uuid.UUID, list[AuditRecord]] = {}
    for record in records:
        _check_record(record)
        by_workspace.setdefault(record.workspace_id, []).append(record)
    times: dict[datetime, str] = {}  # a batch's events usually share one time
    # ... and their action and actor: the hashed half those make, encoded once each.
    befores: dict[tuple[str, Any, Any], bytes] = {}
    # Lock heads in a fixed order so two writers over several workspaces cannot deadlock.
    for workspace_id in sorted(by_workspace, key=str):
        seq, prev_hash = await _lock_head(conn, db, workspace_id)
        workspace = str(workspace_id)
        rows: list[_EventRow] = []
        batch = by_workspace[workspace_id]
        for record, event_id in zip(batch, new_ids(len(batch)), strict=True):
            seq += 1
            actor = record.actor
            target = record.target
            data_json = canonical_json(dict(record.data))
            at = record.occurred_at or utcnow()
            occurred_at = times.get(at)
            if occurred_at is None:
                occurred_at = times[at] = format_time(at)
            event = {
                "seq": seq,
                "id": str(event_id),
                "workspace_id": workspace,
                "occurred_at": occurred_at,
                "actor": dict(actor),
                "action": record.action,
                "target": dict(target) if target is not None else None,
                "job_id": record.job_id,
                "request_id": record.request_id,
            }
            # Only text keys the cache: 1, 1.0 and True are equal keys, not equal JSON.
            shared = (record.action, actor["type"], actor["id"])
            text = type(shared[1]) is str and type(shared[2]) is str and type(shared[0]) is str
            before = befores.get(shared) if text else None
            if before is None:
                before = hashed_before(event)
                if text:
                    befores[shared] = before
            digest = event_hash_with_data(prev_hash, event, data_json, before)
            rows.append(
                _EventRow(
                    workspace_id=workspace_id,
                    seq=seq,
                    id=event_id,
                    occurred_at=occurred_at,
                    actor_type=actor["type"],
                    actor_id=actor["id"],
                    action=record.action,
                    target_type=target["type"] if target else None,
                    target_id=target["id"] if target else None,
                    job_id=record.job_id,
                    request_id=record.request_id,
                    data=data_json.decode("utf-8"),
                    email_hmac=record.email_hmac,
                    prev_hash=prev_hash,
                    hash=digest,
                )
            )
            prev_hash = digest
        await insert_rows(conn, audit_events, rows)
        await conn.execute(
            audit_heads.update()
            .where(audit_heads.c.workspace_id == workspace_id)
            .values(seq=seq, hash=prev_hash)
        )


def _check_record(record: AuditRecord) -> None:
    # The row keeps only type and id of actor and target: any other key would be hashed
    # but not stored, and the event could never verify again. The email_hmac column is
    # an index of data.email_hmac, which verify holds it to.
    if set(record.actor) != _PARTY_KEYS:
        raise ValueError(f"audit actor must have exactly type and id, got {sorted(record.actor)}")
    if record.target is not None and set(record.target) != _PARTY_KEYS:
        raise ValueError(f"audit target must have exactly type and id, got {sorted(record.target)}")
    if record.target is not None and record.target["type"] is None:
        raise ValueError("audit target type must not be None")
    if record.email_hmac != record.data.get("email_hmac"):
        raise ValueError("audit email_hmac must equal data['email_hmac']")


def row_to_event(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An audit row as the event that was hashed (plus its prev_hash and hash)."""
    # No target only when both columns are empty: a target_id alone (written behind the
    # hash's back) must show, and so fail verification, rather than vanish.
    target = (
        {"type": row["target_type"], "id": row["target_id"]}
        if row["target_type"] is not None or row["target_id"] is not None
        else None
    )
    return {
        "seq": int(row["seq"]),
        "id": str(row["id"]),
        "workspace_id": str(row["workspace_id"]),
        "occurred_at": row["occurred_at"],
        "actor": {"type": row["actor_type"], "id": row["actor_id"]},
        "action": row["action"],
        "target": target,
        "job_id": row["job_id"],
        "request_id": row["request_id"],
        "data": json.loads(row["data"]),
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


async def stream_rows(
    db: Database, workspace_id: uuid.UUID, *, since_seq: int = 1, page: int = 1000
) -> AsyncIterator[Mapping[Any, Any]]:
    """Every row of a workspace's events from `since_seq`, in seq order, a page at a time."""
    next_seq = since_seq
    while True:
        stmt = (
            sa.select(audit_events)
            .where(audit_events.c.workspace_id == workspace_id, audit_events.c.seq >= next_seq)
            .order_by(audit_events.c.seq)
            .limit(page)
        )
        async with db.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        for row in rows:
            yield row
        if len(rows) < page:
            return
        next_seq = int(rows[-1]["seq"]) + 1


async def stream_events(
    db: Database, workspace_id: uuid.UUID, *, since_seq: int = 1, page: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every event of a workspace from `since_seq`, in seq order, a page at a time."""
    async for row in stream_rows(db, workspace_id, since_seq=since_seq, page=page):
        yield row_to_event(row)


@dataclass(frozen=True)
class EventFilter:
    """What the query API narrows a workspace's events by; every given field must match.

    ``since`` and ``until`` are ``occurred_at`` bounds in ``chain.format_time`` form
    (inclusive and exclusive); that fixed form sorts as text in time order.
    """

    target_type: str | None = None
    target_id: str | None = None
    job_id: str | None = None
    action: AuditAction | None = None
    actor_id: str | None = None
    email_hmac: str | None = None
    since: str | None = None
    until: str | None = None

    def clauses(self) -> list[sa.ColumnElement[bool]]:
        c = audit_events.c
        equal = {
            c.target_type: self.target_type,
            c.target_id: self.target_id,
            c.job_id: self.job_id,
            c.action: self.action,
            c.actor_id: self.actor_id,
            c.email_hmac: self.email_hmac,
        }
        found: list[sa.ColumnElement[bool]] = [col == v for col, v in equal.items() if v]
        if self.since is not None:
            found.append(c.occurred_at >= self.since)
        if self.until is not None:
            found.append(c.occurred_at < self.until)
        return found


async def query_events(
    db: Database,
    workspace_id: uuid.UUID,
    where: EventFilter,
    *,
    limit: int,
    after_seq: int = 0,
    newest_first: bool = False,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of a workspace's matching events by seq, and the seq to continue after.

    Oldest first, after ``after_seq``; or, with ``newest_first``, the newest ones (used
    to find the latest event of a kind; no continuation).
    """
    c = audit_events.c
    stmt = sa.select(audit_events).where(c.workspace_id == workspace_id, *where.clauses())
    if newest_first:
        stmt = stmt.order_by(c.seq.desc())
    else:
        stmt = stmt.where(c.seq > after_seq).order_by(c.seq)
    async with db.read() as conn:
        rows = (await conn.execute(stmt.limit(limit + 1))).mappings().all()
    events = [row_to_event(r) for r in rows[:limit]]
    more = len(rows) > limit and not newest_first
    return events, (events[-1]["seq"] if more else None)


@dataclass(frozen=True)
class ChainHead:
    """The head row of a workspace's chain: the seq and hash of its last event."""

    seq: int
    hash: str


async def read_head(db: Database, workspace_id: uuid.UUID) -> ChainHead | None:
    """The head of a workspace's chain, or None when it has never had an event."""
    stmt = sa.select(audit_heads.c.seq, audit_heads.c.hash).where(
        audit_heads.c.workspace_id == workspace_id
    )
    async with db.read() as conn:
        row = (await conn.execute(stmt)).first()
    return ChainHead(int(row.seq), str(row.hash)) if row is not None else None


async def verify_workspace(
    db: Database,
    workspace_id: uuid.UUID,
    *,
    page: int = 1000,
    anchors: Mapping[int, str] | None = None,
) -> VerifyResult:
    """Walk a workspace's chain in the database, in constant memory.

    Besides what ``ChainVerifier`` checks, two things the hash cannot see:

    - ``email_hmac_mismatch``: the indexed ``email_hmac`` column differs from the hashed
      ``data.email_hmac`` (an edited column would make ``?email=`` lie);
    - the head row: events cut off at the end leave the last event behind the head
      (``truncated``, ``broken_seq`` the first missing seq), and a last event whose hash
      is not the head's, or events beyond the head, are ``head_mismatch``.

    Writers may append while this runs: the head is read before and after the walk, and
    the walked chain must end between the two.
    """
    before = await read_head(db, workspace_id)
    verifier = ChainVerifier(workspace_id=str(workspace_id), anchors=anchors)
    async for row in stream_rows(db, workspace_id, page=page):
        event = _row_to_event_as_stored(row)
        problem = _index_problem(row, event)
        if problem is not None and event["seq"] == verifier.expected_seq:
            so_far = verifier.result()
            if verifier.feed(event):  # a broken chain is the more basic failure
                return VerifyResult(
                    ok=False,
                    events_checked=so_far.events_checked,
                    head_seq=so_far.head_seq,
                    head_hash=so_far.head_hash,
                    broken_seq=event["seq"],
                    reason="email_hmac_mismatch",
                    detail=problem,
                )
        if not verifier.feed(event):
            break
    walked = verifier.result()
    if not walked.ok:
        return walked
    after = await read_head(db, workspace_id)
    low = before.seq if before is not None else 0
    high = after.seq if after is not None else 0
    if walked.head_seq < low:
        return await _head_failure(
            db,
            workspace_id,
            walked.head_seq + 1,
            "truncated",
            f"the head is at seq {low} but the last event is seq {walked.head_seq}",
        )
    if walked.head_seq > high:
        return await _head_failure(
            db,
            workspace_id,
            high + 1,
            "head_mismatch",
            f"events up to seq {walked.head_seq} but the head is at seq {high}",
        )
    for head in (before, after):
        if head is not None and head.seq == walked.head_seq and head.hash != walked.head_hash:
            return await _head_failure(
                db,
                workspace_id,
                head.seq,
                "head_mismatch",
                "the last event's hash is not the head's",
            )
    return walked


def _row_to_event_as_stored(row: Mapping[Any, Any]) -> dict[str, Any]:
    # Data that is no longer JSON is verified as the text it is: it cannot hash right.
    try:
        return row_to_event(row)
    except ValueError:
        event = row_to_event({**row, "data": "null"})
        event["data"] = row["data"]
        return event


def _index_problem(row: Mapping[Any, Any], event: Mapping[str, Any]) -> str | None:
    data = event["data"]
    hashed = data.get("email_hmac") if isinstance(data, dict) else None
    if row["email_hmac"] != hashed:
        return "the email_hmac column differs from data.email_hmac"
    return None


async def _head_failure(
    db: Database, workspace_id: uuid.UUID, broken_seq: int, reason: str, detail: str
) -> VerifyResult:
    # As for a break inside the chain, the result describes the events before broken_seq
    # (all verified by now, the walk having started at seq 1).
    head_hash = GENESIS_HASH
    if broken_seq > 1:
        stmt = sa.select(audit_events.c.hash).where(
            audit_events.c.workspace_id == workspace_id, audit_events.c.seq == broken_seq - 1
        )
        async with db.read() as conn:
            found = (await conn.execute(stmt)).scalar_one_or_none()
        head_hash = str(found) if found is not None else ""
    return VerifyResult(
        ok=False,
        events_checked=broken_seq - 1,
        head_seq=broken_seq - 1,
        head_hash=head_hash,
        broken_seq=broken_seq,
        reason=reason,
        detail=detail,
    )


async def audited_workspaces(db: Database) -> list[tuple[uuid.UUID, str | None]]:
    """Every workspace that has or may have a chain, with its name when it has one.

    Workspaces known by name, and any workspace id with a head row or with events (so a
    chain whose head row was removed is still walked).
    """
    async with db.read() as conn:
        named = (await conn.execute(sa.select(workspaces.c.id, workspaces.c.name))).all()
        heads = (await conn.execute(sa.select(audit_heads.c.workspace_id))).scalars().all()
        with_events = (
            (await conn.execute(sa.select(audit_events.c.workspace_id).distinct())).scalars().all()
        )
    names: dict[uuid.UUID, str | None] = {row.id: row.name for row in named}
    for workspace_id in (*heads, *with_events):
        names.setdefault(workspace_id, None)
    return sorted(names.items(), key=lambda item: (item[1] is None, item[1] or "", str(item[0])))


HASH_KEY_NAME = "audit_hash_key"
HASH_KEY_FINGERPRINT = "audit_hash_key_fingerprint"


class HashKeyMismatch(StartupError):
    """AUDIT_HASH_KEY is not the key the stored audit events were keyed with (one line
    for the operator: what to set). Permanent: a process refuses to start with it."""


def hash_key_fingerprint(key: bytes) -> str:
    """A fingerprint of the email HMAC key (HMAC-SHA256 of a fixed label under the key,
    16 hex digits): it tells two keys apart and reveals nothing of either."""
    return hmac.new(key, b"contact-deletion audit hash key fingerprint", "sha256").hexdigest()[:16]


async def _hash_key_rows(db: Database) -> tuple[str | None, str | None]:
    """(the generated key, the kept fingerprint of a configured key), each None if absent."""
    select = sa.select(server_secrets.c.name, server_secrets.c.value).where(
        server_secrets.c.name.in_((HASH_KEY_NAME, HASH_KEY_FINGERPRINT))
    )
    async with db.read() as conn:
        found = {row.name: str(row.value) for row in await conn.execute(select)}
    return found.get(HASH_KEY_NAME), found.get(HASH_KEY_FINGERPRINT)


def _mismatch(mine: str, kept: str) -> str:
    return (
        f"AUDIT_HASH_KEY (fingerprint {mine}) is not the key this database's audit "
        f"events were keyed with (fingerprint {kept}): set it back to that key; with "
        "another key no earlier event is found by address"
    )


async def hash_key_problem(db: Database, configured: str | None) -> str | None:
    """Why AUDIT_HASH_KEY (`configured`, None when unset) cannot serve this database's
    audit trail, in one line saying what to set; None when it can. Reads only."""
    generated, kept = await _hash_key_rows(db)
    if configured:
        if kept is not None:
            mine = hash_key_fingerprint(configured.encode("utf-8"))
            return None if kept == mine else _mismatch(mine, kept)
        if generated is None or generated == configured:
            return None
        async with db.read() as conn:
            keyed = (await conn.execute(sa.select(audit_events.c.seq).limit(1))).first()
        if keyed is None:
            return None
        return (
            "AUDIT_HASH_KEY is set, but this database's audit events were keyed with the "
            f"key generated at its first start (server_secrets {HASH_KEY_NAME!r}): unset "
            "AUDIT_HASH_KEY or set it to that key; with another key no earlier event is "
            "found by address"
        )
    if kept is None or (
        generated is not None and hash_key_fingerprint(generated.encode("utf-8")) == kept
    ):
        return None
    return (
        "AUDIT_HASH_KEY is not set, but this database's audit events were keyed with a "
        f"configured key (fingerprint {kept}): set AUDIT_HASH_KEY to that key again"
    )


async def load_hash_key(db: Database, configured: str | None) -> bytes:
    """The key of the email HMACs: AUDIT_HASH_KEY, or one generated and kept on first start.

    A configured key's fingerprint (never the key) is kept in ``server_secrets`` on its
    first use; a later start with another key, with none, or with a key set after events
    were keyed with the generated one raises :class:`HashKeyMismatch`
    (:func:`hash_key_problem`): those events could no longer be found by address.
    """
    problem = await hash_key_problem(db, configured)
    if problem is not None:
        raise HashKeyMismatch(problem)
    ins: Any = (postgresql.insert if not db.is_sqlite else sqlite.insert)(server_secrets)
    if configured:
        key = configured.encode("utf-8")
        mine = hash_key_fingerprint(key)
        fingerprint = sa.select(server_secrets.c.value).where(
            server_secrets.c.name == HASH_KEY_FINGERPRINT
        )
        async with db.begin() as conn:
            await conn.execute(
                ins.values(
                    name=HASH_KEY_FINGERPRINT, value=mine, created_at=utcnow()
                ).on_conflict_do_nothing()
            )
            # Another process may have kept its key's first: that key is the one.
            kept = str((await conn.execute(fingerprint)).scalar_one())
        if kept != mine:
            raise HashKeyMismatch(_mismatch(mine, kept))
        return key
    generated, _ = await _hash_key_rows(db)
    if generated is not None:
        return generated.encode("utf-8")
    stored = sa.select(server_secrets.c.value).where(server_secrets.c.name == HASH_KEY_NAME)
    async with db.begin() as conn:
        await conn.execute(
            ins.values(
                name=HASH_KEY_NAME, value=secrets.token_hex(32), created_at=utcnow()
            ).on_conflict_do_nothing()
        )
        # Another process may have stored its key first: theirs is the one.
        value = (await conn.execute(stored)).scalar_one()
    return str(value).encode("utf-8")
