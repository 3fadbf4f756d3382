"""Idempotency keys (Stripe-style): replay the first answer, refuse a different body.

A key is claimed in its own short transaction before the work starts, so a concurrent
repeat sees it and gets 409 with Retry-After; the answer is stored when the work is done
and replayed byte for byte for 24 hours (configurable). With ``one_transaction`` (every
replayable POST but the deletions, service.routing) the answer is stored in the work's own
transaction (`Database.unit`): the change and its key commit together or not at all, so
no crash between them lets a retry run the change again.

A claim is a lease (LEASE, renewed while the request runs): a request that fails is
released at once, and one whose process died frees its key when the lease lapses. Every
write of the request is fenced by its claim's token, so the same request never runs
twice at once, even after a takeover.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from multidict import CIMultiDictProxy
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.chain import canonical_json
from service.db import Database, any_of, idempotency_keys, utcnow
from service.errors import IdempotencyConflict, ValidationFailed
from service.failpoints import crash_if
from service.faults import describe, is_transient
from service.logs import get_logger

log = get_logger(__name__)

MAX_KEY_LENGTH = 255
# A running request holds its key under a lease that its handler renews every
# LEASE / 3 (see `hold`); a key whose handler died is free again once the lease lapses,
# within seconds, not minutes.
LEASE = timedelta(seconds=10)
# Claims written before leases existed carry the replay window as their expiry: for those,
# the old rule (abandoned after 120 s, the longest a request can wait) still applies.
STALE_AFTER = timedelta(seconds=120)
REPLAYED_HEADERS = ("Location", "Content-Type")
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


@dataclass(frozen=True)
class StoredResponse:
    """An answer kept for replay. ``contact_id``: the contact it shows (a created contact,
    a timeline item's contact), whose deletion erases it (:func:`erase_answers`)."""

    status: int
    headers: dict[str, str]
    body: bytes
    contact_id: uuid.UUID | None = field(default=None, compare=False)


ERASED_STATUS = 410
"""What a key whose answer showed a since-deleted contact replays: the request is not run
again (a create would bring the contact back), and its answer is no longer kept."""
ERASED_BODY = (
    b'{"error":{"code":"answer_erased","message":"The answer to this request showed a '
    b"contact that has since been deleted; it is no longer kept, and the request is not "
    b'run again.","details":{}}}'
)


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key: go ahead, replay, or resume an abandoned job.

    ``token`` fences the claim: it is the claim's ``created_at``, which a takeover
    changes, and every later write of this request (the job, the answer, the release)
    only applies while the row still carries it. So a request whose lease lapsed and was
    taken over can never create a second job or overwrite the new owner's answer.
    """

    replay: StoredResponse | None = None
    abandoned_job: uuid.UUID | None = None
    token: datetime | None = field(default=None, compare=False)


class LostClaim(IdempotencyConflict):
    """The request's lease lapsed and another request took its key over."""


def header_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The request's ``Idempotency-Key`` (None without one), or a 400 when it is blank,
    too long, not printable, or sent more than once: two keys leave unclear which retry is
    "the same" (the IETF draft httpapi-idempotency-key-header makes it a single value)."""
    keys = headers.getall("Idempotency-Key", [])
    if len(keys) > 1:
        raise ValidationFailed(
            "more than one Idempotency-Key",
            [{"field": "Idempotency-Key", "message": "send one key per request"}],
        )
    return check_key(keys[0]) if keys else None


def check_key(key: str) -> str:
    # A blank key would silently give no idempotency (e.g. `$(uuidgen)` with no uuidgen).
    if not key.strip() or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            "invalid Idempotency-Key",
            [
                {
                    "field": "Idempotency-Key",
                    "message": f"1-{MAX_KEY_LENGTH} printable characters, not all blank",
                }
            ],
        )
    return key


def fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests "the same": method, path and the parsed JSON body."""
    material = canonical_json({"method": method, "path": path, "body": body})
    return hashlib.sha256(material).hexdigest()


def _insert(db: Database) -> Any:
    return (sqlite.insert if db.is_sqlite else postgresql.insert)(idempotency_keys)


def _lease_lapsed(row: Any, now: datetime) -> bool:
    if row["expires_at"] <= now:
        return True
    legacy = row["expires_at"] > now + 2 * LEASE
    return bool(legacy and row["created_at"] < now - STALE_AFTER)


async def claim(db: Database, workspace_id: uuid.UUID, key: str, print_: str, ttl_s: int) -> Claim:
    """Claim `key` for a request with this fingerprint, or say why not.

    While a request runs, its row is ``in_progress`` and ``expires_at`` is the end of its
    lease (renewed by :func:`hold`); once answered, the row is ``done`` and ``expires_at``
    is the end of the replay window (``ttl_s``). Raises :class:`IdempotencyConflict` for
    another body, or (with ``Retry-After: 1``) while the first request holds the lease.
    """
    now = utcnow()
    c = idempotency_keys.c
    async with db.begin() as conn:
        inserted = await conn.execute(
            _insert(db)
            .values(
                workspace_id=workspace_id,
                key=key,
                fingerprint=print_,
                state="in_progress",
                created_at=now,
                expires_at=now + LEASE,
            )
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 1:
            return Claim(token=now)
        where = sa.and_(c.workspace_id == workspace_id, c.key == key)
        row = (
            (await conn.execute(db.for_update(sa.select(idempotency_keys).where(where))))
            .mappings()
            .one()
        )
        fresh = {
            "fingerprint": print_,
            "state": "in_progress",
            "job_id": None,
            "response_status": None,
            "response_headers": None,
            "response_body": None,
            "created_at": now,
            "expires_at": now + LEASE,
        }
        if row["state"] == "done":
            if row["expires_at"] <= now:
                await conn.execute(idempotency_keys.update().where(where).values(**fresh))
                return Claim(token=now)
            if row["fingerprint"] != print_:
                raise _different_body(key)
            return Claim(
                replay=StoredResponse(
                    row["response_status"], dict(row["response_headers"]), row["response_body"]
                )
            )
        lapsed = _lease_lapsed(row, now)
        if lapsed and row["job_id"] is None:
            # Abandoned before it created anything: start afresh, under a new token.
            await conn.execute(idempotency_keys.update().where(where).values(**fresh))
            return Claim(token=now)
        if row["fingerprint"] != print_:
            raise _different_body(key)
        if lapsed:
            # The job exists; take the key over to answer it (and to store that answer).
            await conn.execute(
                idempotency_keys.update()
                .where(where)
                .values(created_at=now, expires_at=now + LEASE)
            )
            return Claim(abandoned_job=row["job_id"], token=now)
        raise IdempotencyConflict(
            "a request with this Idempotency-Key is still being handled",
            {"idempotency_key": key},
            headers={"Retry-After": "1"},
        )


def _different_body(key: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        "this Idempotency-Key was used with a different request (another body or path; a"
        " dry run spends its key too): send this request with a new key",
        {"idempotency_key": key},
    )


def _held(workspace_id: uuid.UUID, key: str, token: datetime) -> sa.ColumnElement[bool]:
    c = idempotency_keys.c
    return sa.and_(
        c.workspace_id == workspace_id,
        c.key == key,
        c.created_at == token,
        c.state == "in_progress",
    )


async def fence(
    conn: Any,
    workspace_id: uuid.UUID,
    key: str,
    token: datetime,
    job_id: uuid.UUID | None = None,
) -> None:
    """Inside the request's own write transaction: check the claim is still ours (and
    note the job it creates); raises :class:`LostClaim` (409) otherwise, which rolls the
    transaction back. This is what keeps one key from ever creating two jobs.
    """
    values: dict[str, Any] = {"expires_at": utcnow() + LEASE}
    if job_id is not None:
        values["job_id"] = job_id
    updated = await conn.execute(
        idempotency_keys.update().where(_held(workspace_id, key, token)).values(**values)
    )
    if updated.rowcount != 1:
        raise _lost(key)


async def record_job(
    conn: Any, workspace_id: uuid.UUID, key: str, job_id: uuid.UUID, token: datetime
) -> None:
    """Note the job a claimed request created (in the job's own transaction)."""
    await fence(conn, workspace_id, key, token, job_id)


async def renew(db: Database, workspace_id: uuid.UUID, key: str, token: datetime) -> bool:
    """Extend the lease of a running request; False if the claim is no longer ours."""
    async with db.begin() as conn:
        updated = await conn.execute(
            idempotency_keys.update()
            .where(_held(workspace_id, key, token))
            .values(expires_at=utcnow() + LEASE)
        )
    return bool(updated.rowcount == 1)


@contextlib.asynccontextmanager
async def hold(
    db: Database, workspace_id: uuid.UUID, key: str, token: datetime
) -> AsyncIterator[None]:
    """Renew the claim's lease every LEASE / 3 while the block runs: through an outage
    (logged, tried again); not after the database refused a renewal for good (logged as
    an error, not an outage: the lease then lapses and `fence` guards)."""

    async def renewing() -> None:
        while True:
            await asyncio.sleep(LEASE.total_seconds() / 3)
            try:
                if not await renew(db, workspace_id, key, token):
                    return
            except Exception as exc:
                if not is_transient(exc):
                    # Refused for good: renewing again cannot work. The lease lapses; `fence`
                    # still guards.
                    log.error("idempotency_renew_refused", error=describe(exc))
                    return
                # An outage: the lease may lapse, `fence` still guards.
                log.warning("idempotency_renew_failed", error=repr(exc)[:300])

    task = asyncio.create_task(renewing())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def complete(
    db: Database,
    workspace_id: uuid.UUID,
    key: str,
    response: StoredResponse,
    *,
    token: datetime,
    ttl_s: int,
    fenced: bool = False,
) -> None:
    """Store the answer to replay (for `ttl_s` seconds), if the claim is still ours; if it
    is not (its lease lapsed and a retry took the key over), raises :class:`LostClaim` when
    `fenced` (inside the work's transaction: the work rolls back with it), else does
    nothing (a deletion's job is the same whoever answers it)."""
    async with db.begin() as conn:
        stored = await conn.execute(
            idempotency_keys.update()
            .where(_held(workspace_id, key, token))
            .values(
                state="done",
                response_status=response.status,
                response_headers=response.headers,
                response_body=response.body,
                expires_at=utcnow() + timedelta(seconds=ttl_s),
                contact_id=response.contact_id,
            )
        )
        if fenced and stored.rowcount != 1:
            raise _lost(key)


def _lost(key: str) -> LostClaim:
    return LostClaim(
        "a request with this Idempotency-Key took over while this one was stalled",
        {"idempotency_key": key},
        headers={"Retry-After": "1"},
    )


async def erase_answers(conn: AsyncConnection, contact_ids: Sequence[uuid.UUID]) -> int:
    """In the deleting transaction: replace every kept answer that shows one of these
    contacts by the erased answer (410 ``answer_erased``), so no copy of a deleted contact's
    data or of its timeline's back-reference stays in a replay (README "Erasure"); the key
    still answers, so a retried create does not bring the contact back. Returns the rows
    changed (their table then needs the erasure scrub)."""
    if not contact_ids:
        return 0
    c = idempotency_keys.c
    result = await conn.execute(
        idempotency_keys.update()
        .where(any_of(c.contact_id, contact_ids))
        .values(
            response_status=ERASED_STATUS,
            response_headers={"Content-Type": "application/json; charset=utf-8"},
            response_body=ERASED_BODY,
            contact_id=None,
        )
    )
    return int(result.rowcount or 0)


async def prune_expired(db: Database, older_than: timedelta, chunk: int) -> int:
    """Delete keys whose replay window (or a claim's lease) ended before now - `older_than`,
    at most `chunk` per transaction; returns how many (service.retention). A pruned key is
    free again, as Stripe's are after 24 h."""
    cutoff = utcnow() - older_than
    c = idempotency_keys.c
    total = 0
    while True:
        async with db.begin() as conn:
            expired = sa.select(c.workspace_id, c.key).where(c.expires_at < cutoff).limit(chunk)
            rows = (await conn.execute(expired)).all()
            if rows:
                await conn.execute(
                    idempotency_keys.delete().where(
                        sa.tuple_(c.workspace_id, c.key).in_([tuple(r) for r in rows])
                    )
                )
        total += len(rows)
        if len(rows) < chunk:
            return total


async def release(db: Database, workspace_id: uuid.UUID, key: str, token: datetime) -> None:
    """Give a claim back after a failure, so that the client's retry runs at once.

    A claim that created nothing is deleted; one whose job exists has its lease ended, so
    the retry answers that job instead of making another. Never raises: during an outage
    the release itself may fail, and then the lease lapses on its own within LEASE.
    """
    c = idempotency_keys.c
    held = _held(workspace_id, key, token)
    try:
        async with db.begin() as conn:
            await conn.execute(idempotency_keys.delete().where(held, c.job_id.is_(None)))
            await conn.execute(
                idempotency_keys.update()
                .where(held, c.job_id.is_not(None))
                .values(expires_at=utcnow())
            )
    except Exception as exc:
        log.warning("idempotency_release_failed", error=repr(exc)[:300])


async def once(
    db: Database,
    workspace_id: uuid.UUID,
    key: str,
    print_: str,
    ttl_s: int,
    work: Callable[[Claim], Awaitable[StoredResponse]],
    *,
    one_transaction: bool = False,
    failpoint: str | None = None,
) -> tuple[StoredResponse, bool]:
    """Run `work` under the key once: the answer, and whether it is a replay.

    Claims the key (409 for another body or while the first runs, `claim`), replays a
    stored answer, or runs `work(claim)` under the renewed lease (`hold`) and stores its
    answer for `ttl_s` seconds; a `work` that raises gives the key back (`release`) so the
    client's retry runs, unless the claim was lost to a takeover meanwhile.

    `one_transaction`: `work` and the stored answer are one transaction (`Database.unit`:
    the work's own transactions join it), and a claim lost meanwhile rolls the work back
    (409 ``idempotency_conflict``). The transaction stays open for the whole work, so
    only for work that does not wait: a deletion's ``Prefer: wait`` would hold it (and
    SQLite's one writer) for up to 60 s; deletions record their key in the job's own
    transaction instead (`record_job`). `failpoint` ``idempotent_work_before_key`` kills
    the process between the work and the stored answer (service.failpoints, for tests).
    """
    claim_ = await claim(db, workspace_id, key, print_, ttl_s)
    if claim_.replay is not None:
        return claim_.replay, True
    assert claim_.token is not None
    token = claim_.token
    try:
        async with hold(db, workspace_id, key, token):
            if one_transaction:
                async with db.unit():
                    answer = await work(claim_)
                    crash_if(failpoint, "idempotent_work_before_key")
                    await complete(
                        db, workspace_id, key, answer, token=token, ttl_s=ttl_s, fenced=True
                    )
            else:
                answer = await work(claim_)
        if not one_transaction:
            crash_if(failpoint, "idempotent_work_before_key")
            await complete(db, workspace_id, key, answer, token=token, ttl_s=ttl_s)
    except LostClaim:
        raise  # the key is someone else's now: leave it alone
    except BaseException:
        # Whatever failed (an outage, a refusal), the client's retry must be able to run.
        await release(db, workspace_id, key, claim_.token)
        raise
    return answer, False


def response(answer: StoredResponse, replayed: bool) -> web.Response:
    """The HTTP answer of `once`: a replay says so (``Idempotent-Replayed: true``)."""
    headers = {**answer.headers, REPLAYED: "true"} if replayed else dict(answer.headers)
    return web.Response(status=answer.status, body=answer.body, headers=headers)
