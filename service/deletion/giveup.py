"""Giving up on a command for good: what its item or job records, finding the command of
a message or outbox row that cannot be read, and writing again the commands a batch that
cannot be read may have held.

One place for the deletion worker (a command that failed permanently, a dead-lettered
message, an unreadable batch) and the relay (an outbox row it sets aside): an item that
nothing will ever process again must not stay ``pending``, or its job never completes
(GUIDE "Errors mean something").
"""

from __future__ import annotations

import uuid
from collections.abc import Container, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from service.audit.store import AuditRecord, append_events
from service.config import Settings
from service.db import Database, deletion_job_items, deletion_jobs, insert_rows, outbox, utcnow
from service.deletion.models import ErrorCode, ItemStatus
from service.deletion.store import (
    PROGRESS_COLUMNS,
    ProgressDelta,
    apply_progress,
    finish_job,
    queue_expansion,
)
from service.events import (
    JOB_HEADER,
    TOPIC_DELETION_REQUESTED,
    TYPE_DELETION_REQUESTED,
    TYPE_HEADER,
    TYPE_JOB_EXPAND,
    DeletionRequested,
    DeletionRequestedEncoder,
    JobExpand,
)
from service.faults import describe, is_transient
from service.kafka import LostRecords
from service.logs import get_logger
from service.outbox import encoded_outbox_row

if TYPE_CHECKING:  # (the worker imports this module)
    from service.deletion.worker import BatchResult

Command = DeletionRequested | JobExpand

log = get_logger(__name__)


BARE_REASON = "why could not be recorded (see the service's error log)"
"""The reason a bare record gives (`give_up`): fixed words, nothing of the command."""


async def give_up(
    db: Database, settings: Settings, command: Command, reason: str, into: BatchResult
) -> None:
    """Record a command that failed permanently, in one transaction: its item fails with
    ``FAILED_DELETE_CONTACT`` and a ``contact.deletion_failed`` audit event, and counts in
    its job (which completes if it was the last); an expansion fails its job. What it did
    goes to ``into`` (for the log lines and notices after commit). Changes nothing twice:
    an item no longer pending, a job already completed, are left as they are.

    Locks in the worker's one order (items, then job rows, then the audit chain head), so
    that it never deadlocks with a batch under way.

    A transient error propagates (the caller retries). When the database refuses the record
    for good, retrying it would be refused forever, and not recording anything would leave
    the item pending and its job unfinished forever, with nothing to say why. What it
    refused may be the command's own values (its ref: PostgreSQL text cannot hold a NUL)
    or the reason's text, so the record is made once more, bare: the pending item of the
    command's job and contact (not its ref) fails with :data:`BARE_REASON`, the same code,
    audit event and counts; an error line ``give_up_recorded_bare`` (job, contact, and the
    value-free refusal) keeps the reason, and the command goes to ``into.unrecorded`` (the
    worker dead-letters its message). If the bare record is refused too, or finds no pending
    item (then none is left pending), the first refusal is raised: the callers log it, the
    worker dead-letters the message, and none retries it. A refused bare record leaves the
    item pending, with an error line ``job_item_left_pending`` that names the job and the
    contact: nothing can be written for them; only a database that refuses the job's own
    rows (a bug, or damage such as a broken audit chain head) leads there.
    """
    done = type(into)()
    try:
        await _record(db, settings, command, reason, done, bare=False)
    except Exception as exc:
        if is_transient(exc):
            raise
        refused = exc
    else:
        into.add(done)
        return
    about = _about(command)
    done = type(into)()
    try:
        changed = await _record(db, settings, command, BARE_REASON, done, bare=True)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.error(
            "job_item_left_pending", **about, error=describe(refused), bare_error=describe(exc)
        )
        raise refused from None
    if not changed:
        raise refused  # no item of its job and contact waits: nothing is left pending
    log.error("give_up_recorded_bare", **about, error=describe(refused))
    done.unrecorded.append((command, f"{reason}; recorded bare: {describe(refused)}"))
    into.add(done)


def _about(command: Command) -> dict[str, str | None]:
    contact = command.contact_id if isinstance(command, DeletionRequested) else None
    return {"job_id": str(command.job_id), "contact_id": str(contact) if contact else None}


async def _record(
    db: Database, settings: Settings, command: Command, reason: str, into: BatchResult, bare: bool
) -> bool:
    """`give_up`'s transaction (``bare``: the item by job and contact, not by ref); True if
    it failed an item or a job."""
    async with db.begin() as conn:
        if isinstance(command, JobExpand):
            job_stmt = sa.select(*PROGRESS_COLUMNS).where(
                deletion_jobs.c.id == command.job_id, deletion_jobs.c.completed_at.is_(None)
            )
            job_row = (await conn.execute(db.for_update(job_stmt))).mappings().first()
            if job_row is None:
                return False
            message = f"the job's contacts could not be selected: {reason}"
            failure = (str(ErrorCode.FAILED), message[:500])
            change = await finish_job(conn, db, settings, job_row, utcnow(), failure=failure)
            into.note(command.job_id, change)
            into.failed_jobs.append(command.job_id)
            return True
        items = deletion_job_items.c
        now = utcnow()
        message = f"the contact could not be deleted: {reason}"[:500]
        which = items.contact_id == command.contact_id if bare else items.ref == command.ref
        updated = await conn.execute(
            deletion_job_items.update()
            .where(items.job_id == command.job_id, which, items.status == ItemStatus.PENDING)
            .values(
                status=ItemStatus.FAILED,
                error_code=ErrorCode.FAILED,
                error_message=message,
                processed_at=now,
            )
        )
        count = updated.rowcount or 0
        if not count:
            return False
        # Like a refused deletion, a given-up one leaves its trace in the audit trail
        # (appended last: the lock order of the worker's batches).
        job = (
            await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == command.job_id))
        ).one()
        records = [
            AuditRecord(
                workspace_id=job.workspace_id,
                actor=job_actor(job),
                action="contact.deletion_failed",
                target={"type": "contact", "id": str(command.contact_id)},
                job_id=str(command.job_id),
                request_id=job.request_id,
                data={"code": str(ErrorCode.FAILED), "message": message},
                occurred_at=now,
            )
            for _ in range(count)
        ]
        delta = ProgressDelta(failed=count)
        change = await apply_progress(conn, db, settings, command.job_id, delta, audit=records)
        await append_events(conn, db, records)
        into.note(command.job_id, change)
        into.progress[command.job_id] = delta
        return True


def job_actor(job: Any) -> dict[str, str]:
    """Who a job's audit events are attributed to: its API key, or the worker itself."""
    if job.api_key_id:
        return {"type": "api_key", "id": str(job.api_key_id)}
    return {"type": "system", "id": "worker"}


async def unreadable_commands(
    db: Database, key: bytes | str | None, headers: Sequence[tuple[str, bytes | str | None]]
) -> list[Command]:
    """The commands a message or outbox row whose payload cannot be read still names, from
    its key and headers (never its payload): empty if they do not say, or name nothing
    that is still waiting.

    - ``ce_type: deletion_job.expand``: the key is the job's id (as
      `service.deletion.store` writes it); the job's expansion, if that job exists;
    - ``ce_type: contact.deletion_requested`` with a ``job-id`` header
      (:data:`service.events.JOB_HEADER`, written since it exists): the key is the
      contact's id; one command per item of that job for that contact still pending
      (normally one). Rows written before the header existed name no job (the contact
      may be an item of several): nothing.

    A cold path (corruption only): the item look-up reads the job's items for that contact.
    """
    found = dict(headers)
    try:
        event_type = _text(found.get(TYPE_HEADER))
        key_text = _text(key)
        job_text = _text(found.get(JOB_HEADER))
    except UnicodeDecodeError:
        return []
    if event_type == TYPE_JOB_EXPAND:
        expansion = await expansion_by_key(db, key_text, event_type)
        return [] if expansion is None else [expansion]
    if event_type != TYPE_DELETION_REQUESTED or key_text is None or job_text is None:
        return []
    try:
        job_id, contact_id = uuid.UUID(job_text), uuid.UUID(key_text)
    except ValueError:
        return []
    items = deletion_job_items.c
    async with db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(items.ref, deletion_jobs.c.workspace_id)
                .join(deletion_jobs, deletion_jobs.c.id == items.job_id)
                .where(
                    items.job_id == job_id,
                    items.contact_id == contact_id,
                    items.status == ItemStatus.PENDING,
                )
                .order_by(items.position)
            )
        ).all()
    return [
        DeletionRequested(
            job_id=job_id, workspace_id=r.workspace_id, ref=r.ref, contact_id=contact_id
        )
        for r in rows
    ]


async def expansion_by_key(
    db: Database, key: bytes | str | None, event_type: str | None
) -> JobExpand | None:
    """The expansion command an unreadable ``deletion_job.expand`` message (or outbox row)
    still names: its ``ce_type`` header says what it was and its key is its job's id (as
    `service.deletion.store` writes it). None unless both hold and that job exists.
    """
    if event_type != TYPE_JOB_EXPAND or key is None:
        return None
    try:
        job_id = uuid.UUID(key.decode() if isinstance(key, bytes) else key)
    except ValueError:  # UnicodeDecodeError included
        return None
    async with db.read() as conn:
        workspace_id = (
            await conn.execute(
                sa.select(deletion_jobs.c.workspace_id).where(deletion_jobs.c.id == job_id)
            )
        ).scalar_one_or_none()
    return None if workspace_id is None else JobExpand(job_id=job_id, workspace_id=workspace_id)


RESEND_PAGE = 2000
"""Items read (and requests written, in one transaction) at a time by `resend_lost`."""


async def resend_lost(
    db: Database,
    settings: Settings,
    lost: LostRecords,
    *,
    created_before: datetime | None = None,
    skip: Container[uuid.UUID] = (),
    touched: set[uuid.UUID] | None = None,
) -> tuple[int, int]:
    """Write again the commands that ``lost``, a stretch of a partition of the deletion
    topic the worker will never read, may have held; returns (deletion requests,
    expansions) written.

    The worker calls it when it stepped past a batch it cannot decode there, or found a
    gap in the partition's log (retention or DeleteRecords removed records it had not read,
    the log was reset under its position: service.kafka.Consumer): those records are not
    known, not even their keys, so the items and jobs they were for would wait forever.
    What they can be is known: a record's partition is its key's (Kafka's default
    partitioner, as the relay's producer picks it: murmur2 of the key, among the topic's
    partition count now or, if partitions were added since, then:
    ``LostRecords.holds``), so they are among the commands of that partition still
    waiting: a deletion request for each ``pending`` item of an unfinished job whose contact
    id (its key) maps there, and an expansion, at the job's cursor, for each unfinished,
    not fully expanded job whose id (its key) maps there. They go out through the outbox as
    at first. Repeats are harmless: the worker skips an item no longer pending and an
    expansion whose cursor moved on; the cost is one more message for each of those that
    were not in the lost batch (those behind it, or in flight), a bounded, one-off cost
    of a rare event. Unfinished jobs are read first; then each job's pending items,
    ``RESEND_PAGE`` at a time, each page's requests in one short transaction.

    ``created_before`` and ``skip`` narrow the jobs (service.deletion.backstop: jobs
    created before the moment it found the worker caught up, and not those it resent
    lately); the ids of the jobs it wrote anything for are added to ``touched``.
    """
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    now = utcnow()

    def here(key: str) -> bool:
        return lost.holds(key.encode())

    jobs_c, items = deletion_jobs.c, deletion_job_items.c
    async with db.read() as conn:
        jobs = (
            await conn.execute(
                sa.select(
                    jobs_c.id, jobs_c.workspace_id, jobs_c.expanded, jobs_c.expand_after
                ).where(
                    jobs_c.completed_at.is_(None),
                    sa.true() if created_before is None else jobs_c.created_at < created_before,
                )
            )
        ).all()
    requests = expansions = 0
    for job in jobs:
        if job.id in skip:
            continue
        before = requests + expansions
        if not job.expanded and here(str(job.id)):
            async with db.begin() as conn:
                await queue_expansion(
                    conn, settings, job.id, job.workspace_id, job.expand_after, now
                )
            expansions += 1
        encoder = DeletionRequestedEncoder(job.id, job.workspace_id, now)
        after: str | None = None
        while True:
            stmt = (
                sa.select(items.ref, items.contact_id)
                .where(
                    items.job_id == job.id,
                    items.status == ItemStatus.PENDING,
                    items.contact_id.is_not(None),
                )
                .order_by(items.ref)
                .limit(RESEND_PAGE)
            )
            if after is not None:
                stmt = stmt.where(items.ref > after)
            async with db.read() as conn:
                rows = (await conn.execute(stmt)).all()
            if not rows:
                break
            after = rows[-1].ref
            again = [
                encoded_outbox_row(
                    topic,
                    str(r.contact_id),
                    TYPE_DELETION_REQUESTED,
                    encoder.encode(r.ref, r.contact_id),
                    now,
                    job_id=job.id,
                )
                for r in rows
                if here(str(r.contact_id))
            ]
            if again:
                async with db.begin() as conn:
                    await insert_rows(conn, outbox, again)
                requests += len(again)
            if len(rows) < RESEND_PAGE:
                break
        if touched is not None and requests + expansions > before:
            touched.add(job.id)
    return requests, expansions


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
