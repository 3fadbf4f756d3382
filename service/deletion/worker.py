"""The deletion worker: consumes `contact.deletion-requested` and deletes contacts.

One database transaction per batch of messages deletes the contacts, nulls their
timeline back-references, appends the audit events, marks the job items, writes the
`contact.deleted` outbox rows and moves the job counters. Offsets are committed only after
that transaction commits, and an item that is no longer pending is skipped, so a
redelivered message changes nothing and emits nothing.

Up to `worker_concurrency` batches are in flight at once, each in its own transaction:
every transaction of the worker takes its locks in one order (items and contacts, then job
rows, then the audit chain head, appended last), so two of them never wait for each other
in a cycle, and the next batch deletes while the previous one holds its job row and chain
head to commit. Offsets are committed in batch order, each after its own batch's commit.

Error kinds (service.faults decides which is which): a malformed message is dead-lettered
and committed; a transient database or broker error is retried with capped, jittered
back-off for as long as it lasts, never skipped and never counted against an item; a
permanent one (a statement the database refuses) splits the batch so that only its own
command fails: the item as `FAILED_DELETE_CONTACT`, or the job for an expansion, each with
its audit event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import operator
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import sqlalchemy as sa
from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from service.aio import (
    Backoff,
    Sleep,
    Stopped,
    retry_transient,
    sleep_unless_stopped,
    wait_for_dependency,
)
from service.audit.chain import EmailHmac
from service.audit.store import AuditRecord, append_events, load_hash_key
from service.config import Settings
from service.contacts.store import TIMELINE_TABLES
from service.db import (
    Database,
    any_of,
    contacts,
    deletion_job_items,
    deletion_jobs,
    idempotency_keys,
    insert_rows,
    new_id_texts,
    outbox,
    raw_column,
    stored_values,
    utcnow,
)
from service.deletion.backstop import LostWork
from service.deletion.encoding import ContactDeletedEncoder, contact_deleted_row
from service.deletion.giveup import give_up, resend_lost, unreadable_commands
from service.deletion.giveup import job_actor as _job_actor
from service.deletion.models import NOT_FOUND, ItemStatus, Outcome, decide
from service.deletion.notify import JobNotifier
from service.deletion.store import (
    JobChange,
    ProgressDelta,
    apply_progress,
    expand_page,
    pending_items_statement,
)
from service.deployment import ForeignRecords
from service.erasure.redact import TEXT_FIELDS, RedactionSummary, Redactor
from service.erasure.scrubber import Scrubber, touched_tables
from service.errors import PoisonMessage
from service.events import (
    DLQ_SUFFIX,
    TOPIC_CONTACT_DELETED,
    TOPIC_DELETION_REQUESTED,
    CloudEvent,
    DeletionRequested,
    JobExpand,
)
from service.failpoints import crash_if
from service.faults import describe, is_transient
from service.idempotency import erase_answers
from service.kafka import (
    Consumer,
    InMessage,
    LostRecords,
    Producer,
    next_offsets,
    send_dead_letters,
)
from service.logs import get_logger
from service.metrics import Metrics
from service.outbox import OutboxRow
from service.webhooks.signing import email_sha256

log = get_logger(__name__)
T = TypeVar("T")

# The jitter of the worker's back-offs: one generator for the process. A `Backoff` of its
# own per call seeded a new `random.Random` from the system's random source each time,
# and the worker makes one per fetch and per batch (about 1 % of its time in a filter job).
_JITTER = random.Random()

KIND_PLURAL = {"activity": "activities", "note": "notes", "task": "tasks"}


# The literals are TYPE_DELETION_REQUESTED and TYPE_JOB_EXPAND (a Literal cannot name a
# constant; tests/unit/test_worker_commands.py parses events made with the constants).
class _DeletionRequestedEvent(CloudEvent):
    type: Literal["contact.deletion_requested"]
    data: DeletionRequested  # type: ignore[assignment]


class _JobExpandEvent(CloudEvent):
    type: Literal["deletion_job.expand"]
    data: JobExpand  # type: ignore[assignment]


# The worker's commands, validated in one pass (envelope and data) by their event type: a
# third of the time of validating the envelope and then its data (16 -> 5 us a message).
_COMMAND: TypeAdapter[_DeletionRequestedEvent | _JobExpandEvent] = TypeAdapter(
    Annotated[_DeletionRequestedEvent | _JobExpandEvent, Field(discriminator="type")]
)


def parse_message(message: InMessage) -> DeletionRequested | JobExpand:
    """The typed command inside a message, or PoisonMessage."""
    return parse_command(message.value)


def parse_command(payload: bytes) -> DeletionRequested | JobExpand:
    """The command of a ``contact.deletion_requested`` or ``deletion_job.expand`` CloudEvent
    (its JSON), or PoisonMessage: the one parser of the worker and of the relay (which
    reads a refused outbox row's command with it)."""
    try:
        return _COMMAND.validate_json(payload).data
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "union_tag_invalid":
            tag = errors[0].get("ctx", {}).get("tag")
            raise PoisonMessage(f"unknown event type {tag!r}") from exc
        raise PoisonMessage(f"malformed message: {describe(exc)}") from exc


@dataclass
class BatchResult:
    finished_jobs: list[uuid.UUID] = field(default_factory=list)
    deleted: int = 0
    # For the log lines written once the batch has committed:
    started: list[uuid.UUID] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)
    failed_jobs: list[uuid.UUID] = field(default_factory=list)
    progress: dict[uuid.UUID, ProgressDelta] = field(default_factory=dict)
    # Tables whose old row versions now hold deleted values (for the scrubber).
    touched: set[str] = field(default_factory=set)
    # Commands whose failure could not be written either, with why: dead-lettered (`handle`).
    unrecorded: list[tuple[DeletionRequested | JobExpand, str]] = field(default_factory=list)

    def add(self, other: BatchResult) -> None:
        self.finished_jobs += other.finished_jobs
        self.deleted += other.deleted
        self.touched |= other.touched
        self.started += other.started
        self.finished += other.finished
        self.failed_jobs += other.failed_jobs
        self.unrecorded += other.unrecorded
        for job_id, delta in other.progress.items():
            mine = self.progress.setdefault(job_id, ProgressDelta())
            mine.deleted += delta.deleted
            mine.not_found += delta.not_found
            mine.failed += delta.failed
            mine.added += delta.added
            mine.expanded = mine.expanded or delta.expanded

    def note(self, job_id: uuid.UUID, change: JobChange) -> None:
        if change.started:
            self.started.append(job_id)
        if change.finished is not None:
            self.finished_jobs.append(job_id)
            self.finished.append(change.finished)
        if change.redacted:
            self.touched.add(deletion_jobs.name)


@dataclass
class Orphaned:
    """What deleting a batch's contacts left of their timelines."""

    kept: dict[uuid.UUID, dict[str, list[dict[str, str]]]] = field(default_factory=dict)
    redactions: dict[uuid.UUID, RedactionSummary] = field(default_factory=dict)
    redacted_tables: set[sa.Table] = field(default_factory=set)


@dataclass
class _Plan:
    """What a batch of deletion requests comes to, as read (`DeletionWorker._plan`)."""

    jobs: dict[uuid.UUID, Any]
    found: dict[uuid.UUID, Any]  # the contacts its pending items name that exist, by id
    outcomes: list[tuple[DeletionRequested, Outcome]]
    doomed: dict[uuid.UUID, DeletionRequested]
    redact: dict[uuid.UUID, Redactor]
    now: datetime


@dataclass
class _Outcomes:
    """What a plan writes besides the deletion itself (`DeletionWorker._build`)."""

    now: datetime
    records: list[AuditRecord] = field(default_factory=list)
    deleted_rows: list[OutboxRow] = field(default_factory=list)
    progress: dict[uuid.UUID, ProgressDelta] = field(default_factory=dict)
    groups: dict[tuple[uuid.UUID, Outcome], list[str]] = field(default_factory=dict)

    def add_to(self, progress: dict[uuid.UUID, ProgressDelta], records: list[AuditRecord]) -> None:
        records += self.records
        for job_id, delta in self.progress.items():
            mine = progress.setdefault(job_id, ProgressDelta())
            mine.deleted += delta.deleted
            mine.not_found += delta.not_found
            mine.failed += delta.failed


class DeletionWorker:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        metrics: Metrics,
        notifier: JobNotifier | None = None,
        outbox_signal: asyncio.Event | None = None,
        scrubber: Scrubber | None = None,
        sleep: Sleep = sleep_unless_stopped,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.notifier = notifier
        self.outbox_signal = outbox_signal
        # The erasure housekeeping of this process: the worker owns it, since it is the
        # component whose transactions delete (service.erasure.scrubber).
        self.scrubber = scrubber if scrubber is not None else Scrubber(settings, db)
        self.topic = settings.topic(TOPIC_DELETION_REQUESTED)
        self.hash_key = b""
        # Records of another deployment on a shared broker (service.deployment), from `run`.
        self.foreign: ForeignRecords | None = None
        # Injected so that tests of the back-off need not wait for it.
        self.sleep: Sleep = sleep

    # -- the consumer loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; waits out database and broker outages, never exits on one."""
        configured = self.settings.audit_hash_key
        try:
            self.hash_key = await wait_for_dependency(
                lambda: load_hash_key(
                    self.db, configured.get_secret_value() if configured else None
                ),
                stop,
                dependency="database",
                component="worker",
            )
            counter = self.metrics.foreign_records_skipped
            self.foreign = await wait_for_dependency(
                lambda: ForeignRecords.load(self.db, counter, "worker"),
                stop,
                dependency="database",
                component="worker",
            )
            bootstrap = self.settings.kafka_bootstrap_servers
            consumer = Consumer(
                bootstrap,
                [self.topic],
                f"{self.settings.kafka_consumer_group_prefix}.worker",
                session_timeout_ms=self.settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=self.settings.kafka_heartbeat_interval_ms,
                on_lost=self._resend_lost,
            )
            dlq = Producer(bootstrap)
            signal = self.outbox_signal
            backstop = LostWork(self.db, self.settings, signal.set if signal else None)
            await wait_for_dependency(consumer.start, stop, dependency="kafka", component="worker")
        except Stopped:
            return
        # Its own stop: it ends with the consumer loop, after a last scrub of what is pending.
        done = asyncio.Event()
        scrubbing = asyncio.create_task(self.scrubber.run(done), name="erasure-scrubber")
        # Batches being handled, oldest first: up to `worker_concurrency` at once, each in
        # its own transaction (`process` takes its locks in one order, so two cannot
        # deadlock; an item two of them name is done by the first, skipped by the second).
        handling: collections.deque[tuple[Sequence[InMessage], asyncio.Task[bool]]] = (
            collections.deque()
        )
        committing: asyncio.Task[bool] | None = None
        durable = True  # every batch handed over so far is done (or dead-lettered)

        async def settle_oldest() -> None:
            # The oldest batch's offsets go to the broker once its transaction committed:
            # one commit at a time, in batch order, each only after its batch's commit. A
            # batch that stopped before it was durable stops the commits: it and every
            # batch after it stay uncommitted, to be delivered again (harmlessly).
            nonlocal committing, durable
            messages, task = handling.popleft()
            if not await task or not durable:
                durable = False
                return
            crash_if(self.settings.failpoint, "worker_after_db_commit")
            # The offsets travel to the broker while the next batches are fetched and
            # processed. A refused commit (the partition moved) is logged and skipped inside.
            if committing is not None:
                await committing
            commit = functools.partial(consumer.commit, next_offsets(messages))
            committing = asyncio.create_task(self._retry_transient(commit, stop))

        try:
            with contextlib.suppress(Stopped):
                await wait_for_dependency(dlq.start, stop, dependency="kafka", component="worker")
                while not stop.is_set() and durable:
                    while handling and (
                        handling[0][1].done() or len(handling) >= self.settings.worker_concurrency
                    ):
                        await settle_oldest()
                    if not durable:
                        break
                    messages = await self._retry_transient(
                        lambda: consumer.getmany(
                            timeout_ms=200, max_records=self.settings.worker_batch
                        ),
                        stop,
                    )
                    if messages:
                        task = asyncio.create_task(self.handle(messages, dlq, stop))
                        handling.append((messages, task))
                    elif not handling:  # idle: work left undone now was lost unseen
                        check = functools.partial(backstop.check, consumer)
                        await self._retry_transient(check, stop)
        finally:
            try:
                # Stopping: the batches under way finish (or give up at the stop) and the
                # durable ones are committed, still in order.
                with contextlib.suppress(Stopped):
                    while handling:
                        await settle_oldest()
                if committing is not None:
                    with contextlib.suppress(Stopped):
                        await committing
            finally:
                await consumer.stop()
                await dlq.stop()
                done.set()
                await scrubbing

    async def handle(
        self, messages: Sequence[InMessage], dlq: Producer, stop: asyncio.Event
    ) -> bool:
        """Process a batch durably; True once every message is done or dead-lettered."""
        foreign = self.foreign
        if foreign is not None:  # another deployment's are never read
            messages = foreign.mine(messages)
        commands: list[tuple[InMessage, DeletionRequested | JobExpand]] = []
        poison: list[tuple[InMessage, str]] = []
        for message in messages:
            try:
                commands.append((message, parse_message(message)))
            except PoisonMessage as exc:
                poison.append((message, str(exc)))
        try:
            if poison:
                await self._dead_letter(dlq, poison, stop)
                await self._fail_unreadable(poison, stop)
            if commands:
                result = await self._process_with_retries([c for _, c in commands], stop)
                if result.unrecorded:
                    why = {id(c): reason for c, reason in result.unrecorded}
                    lost = [(m, why[id(c)]) for m, c in commands if id(c) in why]
                    await self._dead_letter(dlq, lost, stop)
                self.after_commit(result)
                if foreign is not None:
                    await foreign.unknown_jobs(self.db, commands, result.progress)
        except Stopped:
            return False
        return True

    async def _resend_lost(self, lost: LostRecords) -> None:
        """Records of the deletion topic this worker will never read (a batch that cannot be
        read, stepped past; a gap in the log: service.kafka.Consumer): the commands they may
        have held are written again (`giveup.resend_lost`), so that no item or job waits
        forever for them."""
        requests, expansions = await resend_lost(self.db, self.settings, lost)
        log.warning(
            "worker_lost_commands_resent",
            topic=lost.topic,
            partition=lost.partition,
            requests=requests,
            expansions=expansions,
        )
        if self.outbox_signal is not None:
            self.outbox_signal.set()

    async def _fail_unreadable(
        self, poison: list[tuple[InMessage, str]], stop: asyncio.Event
    ) -> None:
        """A dead-lettered message whose key and headers still name its work
        (`unreadable_commands`: a job's expansion, or a deletion request's job item) fails
        that job or item, which would otherwise wait forever for a message that never comes."""
        for message, _ in poison:
            find = functools.partial(unreadable_commands, self.db, message.key, message.headers)
            try:
                for command in await self._retry_transient(find, stop):
                    # Where it is, not what it said (a parser's message may quote the payload).
                    source = f"{message.topic}/{message.partition}/{message.offset}"
                    what = "expansion" if isinstance(command, JobExpand) else "deletion request"
                    why = f"its {what} message could not be read (dead-lettered: {source})"
                    result = await self._retry_transient(
                        functools.partial(self.give_up, command, why), stop
                    )
                    self.after_commit(result)
            except Stopped:
                raise
            except Exception as exc:
                log.error(
                    "worker_job_not_failed",
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    error=describe(exc),
                )

    async def _process_with_retries(
        self, commands: list[DeletionRequested | JobExpand], stop: asyncio.Event
    ) -> BatchResult:
        """The batch in one transaction; on a permanent error, each command alone.

        Transient errors are waited out (never counted); a permanent one is the fault of
        some command in the batch, so the batch is split and only that command fails:
        one bad job never holds back the others in its batch.
        """
        try:
            return await self._retry_transient(lambda: self.process(commands), stop)
        except Stopped:
            raise
        except Exception as exc:
            if len(commands) == 1:
                return await self._fail(commands[0], exc, stop)
            log.warning(
                "worker_batch_failed", error=describe(exc), commands=len(commands), isolating=True
            )
        total = BatchResult()
        for command in commands:
            total.add(await self._process_alone(command, stop))
        return total

    async def _process_alone(
        self, command: DeletionRequested | JobExpand, stop: asyncio.Event
    ) -> BatchResult:
        try:
            return await self._retry_transient(lambda: self.process([command]), stop)
        except Stopped:
            raise
        except Exception as exc:
            return await self._fail(command, exc, stop)

    async def _fail(
        self, command: DeletionRequested | JobExpand, exc: Exception, stop: asyncio.Event
    ) -> BatchResult:
        """A permanent error: the command's item (or, for an expansion, its job) fails."""
        reason = describe(exc)
        log.error(
            "worker_command_failed",
            error=reason,
            exception=type(exc).__name__,
            job_id=str(command.job_id),
            contact_id=str(command.contact_id) if isinstance(command, DeletionRequested) else None,
        )
        try:
            return await self._retry_transient(lambda: self.give_up(command, reason), stop)
        except Stopped:
            raise
        except Exception as failed:
            # The database refuses to record it too (its own values: a NUL in its ref, on
            # PostgreSQL): retrying cannot help, and raising would stop the worker on this
            # message every time. Its message is dead-lettered instead (`handle`).
            return BatchResult(
                unrecorded=[(command, f"{reason}; not recorded: {describe(failed)}")]
            )

    async def _retry_transient(self, work: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
        return await retry_transient(
            work,
            stop,
            is_transient,
            event="worker_transient_error",
            backoff=Backoff(cap_s=self.settings.retry_max_backoff_s, sleep=self.sleep, rng=_JITTER),
        )

    async def _dead_letter(
        self, dlq: Producer, poison: list[tuple[InMessage, str]], stop: asyncio.Event
    ) -> None:
        """Dead-letter these messages, outages waited out. A copy refused for good is
        replaced or dropped by `send_dead_letters`; any other permanent error (a bug) is
        not retried either: an error line per message names its source (it stays in its
        topic until retention) and the worker goes on, since retrying cannot help."""
        for message, reason in poison:
            log.error(
                "message_dead_lettered",
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                reason=reason,
            )
        send = functools.partial(
            send_dead_letters, dlq, poison, DLQ_SUFFIX, self.metrics.dead_letters_refused
        )
        try:
            await self._retry_transient(send, stop)
        except Stopped:
            raise
        except Exception as exc:
            for message, _ in poison:
                log.error(
                    "dead_letter_dropped",
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    error=describe(exc),
                )

    def after_commit(self, result: BatchResult) -> None:
        """What follows a committed batch (or a `give_up`, the relay's too): its log line,
        metrics, the erasure scrubber's note, the relay's wake-up and `Prefer: wait`."""
        _log_batch(result)
        self.metrics.contacts_deleted.inc(result.deleted)
        if result.touched:
            self.scrubber.note(result.touched)
        if self.outbox_signal is not None:
            self.outbox_signal.set()
        if self.notifier is not None:
            for job_id in result.finished_jobs:
                self.notifier.notify(job_id)

    # -- the unit of work ---------------------------------------------------------------

    async def process(self, commands: Sequence[DeletionRequested | JobExpand]) -> BatchResult:
        """Apply a batch of commands in one transaction."""
        result = BatchResult()
        deletions = [c for c in commands if isinstance(c, DeletionRequested)]
        expansions = [c for c in commands if isinstance(c, JobExpand)]
        async with self.db.begin() as conn:
            progress: dict[uuid.UUID, ProgressDelta] = {}
            # Lock order, the same in every transaction of the worker (two of its batches
            # may run at once, and `give_up` too): items and contacts, then job rows, then
            # the audit chain head — appended last, with the events of the jobs this batch
            # finished after its deletions, so the head is held as briefly as can be.
            records: list[AuditRecord] = []
            if deletions:
                result.deleted = await self._delete(
                    conn, deletions, progress, result.touched, records
                )
            for expansion in expansions:
                await self._expand(conn, expansion, progress)
            for job_id in sorted(progress, key=str):
                change = await apply_progress(
                    conn, self.db, self.settings, job_id, progress[job_id], audit=records
                )
                result.note(job_id, change)
            if records:
                await append_events(conn, self.db, records)
            result.progress = progress
        return result

    async def give_up(
        self, command: DeletionRequested | JobExpand, reason: str = "an unexpected error"
    ) -> BatchResult:
        """Record a command that failed permanently: its item fails with
        `FAILED_DELETE_CONTACT` (or its job fails, for an expansion), with an audit event.
        """
        result = BatchResult()
        await give_up(self.db, self.settings, command, reason, result)
        return result

    async def _delete(
        self,
        conn: AsyncConnection,
        commands: Sequence[DeletionRequested],
        progress: dict[uuid.UUID, ProgressDelta],
        touched: set[str],
        records: list[AuditRecord],
    ) -> int:
        """Delete what the commands ask for; their audit events go to ``records``, for the
        caller to append after the job rows (`process`'s lock order)."""
        plan = await self._plan(conn, commands)
        if plan is None:
            return 0
        orphaned = await self._delete_contacts(conn, list(plan.doomed), plan.redact)
        if plan.doomed:
            touched |= touched_tables(True, orphaned.redacted_tables)
            if await erase_answers(conn, list(plan.doomed)):
                touched.add(idempotency_keys.name)
        outcome = self._build(plan, orphaned)
        await self._write_outcomes(conn, outcome)
        outcome.add_to(progress, records)
        return len(plan.doomed)

    async def _plan(
        self, conn: AsyncConnection, commands: Sequence[DeletionRequested]
    ) -> _Plan | None:
        """What the commands come to: their jobs, the items still pending, the contacts
        they name and each one's outcome (None: nothing to do). Its reads lock their rows
        (PostgreSQL; SQLite's one writer serialises anyway)."""
        job_ids = sorted({c.job_id for c in commands}, key=str)
        jobs = {
            r.id: r
            for r in (
                await conn.execute(
                    sa.select(
                        deletion_jobs.c.id,
                        deletion_jobs.c.workspace_id,
                        deletion_jobs.c.api_key_id,
                        deletion_jobs.c.request_id,
                        deletion_jobs.c.delete_members,
                        deletion_jobs.c.redact_timeline,
                    ).where(any_of(deletion_jobs.c.id, job_ids))
                )
            ).all()
        }
        refs = sorted({c.ref for c in commands})
        statuses = await self._statuses(conn, job_ids, refs)
        todo: list[DeletionRequested] = []
        for c in commands:
            # Popped: the same item named again later in the batch finds no status, and is
            # skipped (each look-up hashes a uuid.UUID, in Python: a batch makes dozens of
            # them per contact, a tenth of the worker's time).
            if statuses.pop((c.job_id, c.ref), None) == ItemStatus.PENDING and c.job_id in jobs:
                todo.append(c)
        if not todo:
            return None
        named = _by_stored(conn, {c.contact_id for c in todo})
        contact_stmt = self.db.for_update(
            sa.select(*_DECIDING_COLUMNS).where(any_of(contacts.c.id, named, stored=True))
        )
        found = {named[r["id"]]: r for r in (await conn.execute(contact_stmt)).mappings()}
        workspaces = _by_stored(conn, {job.workspace_id for job in jobs.values()})
        outcomes: list[tuple[DeletionRequested, Outcome]] = []
        doomed: dict[uuid.UUID, DeletionRequested] = {}
        for c in todo:
            job = jobs[c.job_id]
            contact = found.get(c.contact_id)
            if contact is not None and workspaces.get(contact["workspace_id"]) != job.workspace_id:
                contact = None  # another workspace's contact is, for this job, not there
            outcome = decide(contact, job.delete_members)
            if outcome.status is ItemStatus.DELETED and doomed.setdefault(c.contact_id, c) is not c:
                outcome = NOT_FOUND  # two jobs in one batch: the first one deletes it
            outcomes.append((c, outcome))
        redact = {
            cid: Redactor.of(found[cid])
            for cid, c in doomed.items()
            if jobs[c.job_id].redact_timeline
        }
        return _Plan(
            jobs=jobs,
            found=found,
            outcomes=outcomes,
            doomed=doomed,
            redact=redact,
            now=utcnow(),
        )

    async def _statuses(
        self, conn: AsyncConnection, job_ids: list[uuid.UUID], refs: list[str]
    ) -> dict[tuple[uuid.UUID, str], str]:
        """The status of each of these items that exists, by (job id, ref)."""
        stmt = self.db.for_update(pending_items_statement(job_ids, refs))
        jobs = _by_stored(conn, job_ids)
        return {(jobs[job], ref): status for job, ref, status in (await conn.execute(stmt)).all()}

    def _build(self, plan: _Plan, orphaned: Orphaned) -> _Outcomes:
        """The audit events, ``contact.deleted`` outbox rows, item updates and job counts of
        a plan whose contacts left ``orphaned``: Python only, no statement."""
        jobs, outcomes, doomed, now = plan.jobs, plan.outcomes, plan.doomed, plan.now
        found = plan.found
        built = _Outcomes(now=now)
        records = built.records
        progress = built.progress
        deleted_rows = built.deleted_rows
        topic = self.settings.topic(TOPIC_CONTACT_DELETED)
        encoder = ContactDeletedEncoder(now)
        email_hmac = EmailHmac(self.hash_key)
        # What every item of a job shares, as text, once per job rather than per contact.
        texts = {
            job_id: (
                job,
                str(job_id),
                str(job.workspace_id),
                _job_actor(job),
                str(job.api_key_id) if job.api_key_id else None,
            )
            for job_id, job in jobs.items()
        }
        event_ids = iter(new_id_texts(len(doomed)))  # one per contact.deleted event
        for c, outcome in outcomes:
            job, job_text, workspace_text, actor, api_key_text = texts[c.job_id]
            contact_text = str(c.contact_id)
            target = {"type": "contact", "id": contact_text}
            delta = progress.setdefault(c.job_id, ProgressDelta())
            if outcome.status is ItemStatus.DELETED:
                delta.deleted += 1
                contact = found[c.contact_id]
                hmac_hex = email_hmac(contact["email"])
                kept = orphaned.kept.get(c.contact_id, {})
                redaction = orphaned.redactions.get(c.contact_id)
                records.append(
                    AuditRecord(
                        workspace_id=job.workspace_id,
                        actor=actor,
                        action="contact.deleted",
                        target=target,
                        job_id=job_text,
                        request_id=job.request_id,
                        email_hmac=hmac_hex,
                        data={
                            "email_hmac": hmac_hex,
                            "api_key_id": api_key_text,
                            "member_role": contact["member_role"],
                            "preserved_timeline": {
                                KIND_PLURAL[k]: kept.get(k, []) for k in TIMELINE_TABLES
                            },
                            # Only with redact_timeline: what was redacted, never the values.
                            **(
                                {"timeline_redaction": redaction.to_audit()}
                                if redaction is not None
                                else {}
                            ),
                        },
                        occurred_at=now,
                    )
                )
                payload = encoder.encode(
                    contact_text,
                    workspace_text,
                    job_text,
                    email_sha256(contact["email"]),
                    (
                        len(kept.get("activity", ())),
                        len(kept.get("note", ())),
                        len(kept.get("task", ())),
                    ),
                    next(event_ids),
                )
                deleted_rows.append(contact_deleted_row(topic, contact_text, payload, now))
            elif outcome.status is ItemStatus.NOT_FOUND:
                delta.not_found += 1
            else:
                delta.failed += 1
                records.append(
                    AuditRecord(
                        workspace_id=job.workspace_id,
                        actor=actor,
                        action="contact.deletion_failed",
                        target=target,
                        job_id=job_text,
                        request_id=job.request_id,
                        data={"code": str(outcome.code), "message": outcome.message},
                        occurred_at=now,
                    )
                )
        # One statement per job and outcome (usually one per job), not one row each.
        for c, o in outcomes:
            built.groups.setdefault((c.job_id, o), []).append(c.ref)
        return built

    async def _write_outcomes(self, conn: AsyncConnection, built: _Outcomes) -> None:
        """The items' new statuses and the ``contact.deleted`` outbox rows."""
        items = deletion_job_items.c
        for (job_id, o), refs in built.groups.items():
            stmt = (
                deletion_job_items.update()
                .where(items.job_id == job_id, any_of(items.ref, refs))
                .values(
                    status=str(o.status),
                    error_code=str(o.code) if o.code else None,
                    error_message=o.message,
                    processed_at=built.now,
                )
            )
            await conn.execute(stmt)
        await insert_rows(conn, outbox, built.deleted_rows)

    async def _delete_contacts(
        self,
        conn: AsyncConnection,
        contact_ids: list[uuid.UUID],
        redact: dict[uuid.UUID, Redactor],
    ) -> Orphaned:
        """Delete these contacts; null the back-references of their timelines, redact the
        text of those in `redact`; say what was kept and what was redacted."""
        orphaned = Orphaned(redactions={cid: RedactionSummary() for cid in redact})
        if not contact_ids:
            return orphaned
        if not redact and conn.dialect.name == "postgresql":
            return await self._orphan_and_delete_pg(conn, contact_ids, orphaned)
        # The ids as bound (SQLite: hex), converted once for the batch's statements.
        stored = stored_values(conn, contacts.c.id, contact_ids)
        if not redact:
            await self._orphan_unredacted(conn, contact_ids, stored, orphaned)
        else:
            await self._orphan_timelines(conn, contact_ids, redact, orphaned)
        await conn.execute(contacts.delete().where(any_of(contacts.c.id, stored, stored=True)))
        return orphaned

    async def _orphan_and_delete_pg(
        self, conn: AsyncConnection, contact_ids: list[uuid.UUID], orphaned: Orphaned
    ) -> Orphaned:
        """PostgreSQL, without redaction: ONE statement (`_ORPHAN_AND_DELETE_PG`) nulls the
        three timelines' back-references, returning what each kept, and deletes the
        contacts — one round trip where `_orphan_unredacted` and the delete take up to
        five. What is kept is the same, in the same order."""
        result = await conn.exec_driver_sql(_ORPHAN_AND_DELETE_PG, (contact_ids,))
        _keep(orphaned, _by_stored(conn, contact_ids), result.all())
        return orphaned

    async def _orphan_timelines(
        self,
        conn: AsyncConnection,
        contact_ids: list[uuid.UUID],
        redact: dict[uuid.UUID, Redactor],
        orphaned: Orphaned,
    ) -> None:
        """With redaction: per table, read the timeline rows of these contacts, redact the
        text of those in `redact`, null their back-references."""
        kept = orphaned.kept
        for kind, table in TIMELINE_TABLES.items():
            when = _timeline_time(kind, table)
            text = [table.c[f] for f in TEXT_FIELDS[kind]]
            rows = (
                await conn.execute(
                    sa.select(table.c.id, table.c.contact_id, when.label("at"), *text)
                    .where(any_of(table.c.contact_id, contact_ids))
                    .order_by(table.c.id)
                )
            ).all()
            rewrites: list[dict[str, Any]] = []
            for r in rows:
                kept.setdefault(r.contact_id, {}).setdefault(kind, []).append(
                    {"id": str(r.id), "kind": kind, "at": _iso_z(r.at)}
                )
                redactor = redact.get(r.contact_id)
                if redactor is not None:
                    item = r._mapping
                    changed, values = redactor.redact_item(kind, item)
                    orphaned.redactions[r.contact_id].add(kind, changed, values)
                    if changed:
                        rewrites.append(
                            {"b_id": r.id}
                            | {f"b_{f}": changed.get(f, item[f]) for f in TEXT_FIELDS[kind]}
                        )
            if rewrites:
                await conn.execute(
                    table.update()
                    .where(table.c.id == sa.bindparam("b_id"))
                    .values({f: sa.bindparam(f"b_{f}") for f in TEXT_FIELDS[kind]}),
                    rewrites,
                )
                orphaned.redacted_tables.add(table)
            if rows:
                await conn.execute(
                    table.update()
                    .where(any_of(table.c.contact_id, contact_ids))
                    .values(contact_id=None)
                )

    async def _orphan_unredacted(
        self,
        conn: AsyncConnection,
        contact_ids: list[uuid.UUID],
        stored: list[Any],
        orphaned: Orphaned,
    ) -> None:
        """Without redaction: one statement reads what the three timelines keep of these
        contacts, then one per table that has any nulls their back-references (each round
        trip counts: on a busy machine each one waits for the database to be scheduled).
        ``stored``: the same ids as `stored_values` binds them."""
        rows = await self._timeline_rows(conn, stored)
        kinds = _keep(orphaned, dict(zip(stored, contact_ids, strict=True)), rows)
        for kind, table in TIMELINE_TABLES.items():
            if kind in kinds:
                await conn.execute(
                    table.update()
                    .where(any_of(table.c.contact_id, stored, stored=True))
                    .values(contact_id=None)
                )

    @staticmethod
    async def _timeline_rows(conn: AsyncConnection, stored: list[Any]) -> list[Any]:
        """(kind, id, contact id, time) of every timeline row of these contacts (their ids
        as `stored_values` binds them), in one statement, the columns as the driver gives
        them (`raw_column`): a batch reads two or three timeline rows per contact, and building a
        UUID and a datetime for each only to turn them back into text cost more than the
        rest of the read."""
        selects = [
            sa.select(
                sa.literal(kind, sa.String).label("kind"),
                raw_column(table.c.id),
                raw_column(table.c.contact_id),
                raw_column(_timeline_time(kind, table)).label("at"),
            ).where(any_of(table.c.contact_id, stored, stored=True))
            for kind, table in TIMELINE_TABLES.items()
        ]
        return list((await conn.execute(sa.union_all(*selects))).all())

    async def _expand(
        self, conn: AsyncConnection, command: JobExpand, progress: dict[uuid.UUID, ProgressDelta]
    ) -> None:
        """Turn the next page of a filter/search job's matches into items and messages.

        One message, one page: the job's first page comes from the message `create_job`
        writes; later pages come from `apply_progress`, as the job's deletions drain its
        waiting items (service.deletion.store.expand_page). A repeated or stale message
        (its cursor is not the job's) changes nothing.
        """
        c = deletion_jobs.c
        job_stmt = sa.select(
            c.id,
            c.workspace_id,
            c.selector,
            c.expanded,
            c.expand_after,
            c.total_requested,
            c.completed_at,
            c.created_at,
        ).where(c.id == command.job_id)
        job = (await conn.execute(self.db.for_update(job_stmt))).mappings().first()
        if (
            job is None
            or job["expanded"]
            or job["completed_at"] is not None
            or job["expand_after"] != command.after
        ):
            return
        page = await expand_page(
            conn,
            self.settings,
            job,
            job["selector"],
            accepted_at=job["created_at"],
            now=utcnow(),
        )
        delta = progress.setdefault(job["id"], ProgressDelta())
        delta.added += page.found
        delta.expanded = delta.expanded or page.last


def _timeline_time(kind: str, table: sa.Table) -> sa.ColumnElement[Any]:
    """When a timeline item happened: an activity's occurred_at, else its created_at."""
    return table.c.occurred_at if kind == "activity" else table.c.created_at


def _keep(
    orphaned: Orphaned, contacts_by_stored: dict[Any, uuid.UUID], rows: Sequence[Any]
) -> set[str]:
    """Note in ``orphaned.kept`` the timeline rows (kind, id, contact id, time, as the
    driver returned them) the contacts of ``contacts_by_stored`` (`_by_stored`) leave;
    the kinds that had any."""
    kinds: set[str] = set()
    kept = orphaned.kept
    # In id order within each kind, as a per-table ORDER BY id would give (the text forms
    # sort as the UUIDs do: fixed-width lowercase hex; ids are unique within a kind).
    for text_id, kind, contact, at in sorted(
        [(_uuid_text(r[1]), r[0], r[2], r[3]) for r in rows], key=_ID_AND_KIND
    ):
        kinds.add(kind)
        kept.setdefault(contacts_by_stored[contact], {}).setdefault(kind, []).append(
            {"id": text_id, "kind": kind, "at": _raw_iso_z(at)}
        )
    return kinds


_ID_AND_KIND = operator.itemgetter(0, 1)


def _orphan_and_delete_sql() -> str:
    """`_ORPHAN_AND_DELETE_PG`: data-modifying CTEs, all in one snapshot. Each timeline
    UPDATE joins the table to itself to return the back-reference it nulls (RETURNING
    gives the new row); the contacts' DELETE runs though nothing reads it (PostgreSQL
    runs every data-modifying CTE exactly once). ``$1`` is the contact ids (uuid[])."""
    ctes = []
    selects = []
    for kind, table in TIMELINE_TABLES.items():
        when = _timeline_time(kind, table).name
        ctes.append(
            f"{kind} AS (UPDATE {table.name} AS t SET contact_id = NULL "
            f"FROM {table.name} AS o WHERE o.contact_id = ANY($1::uuid[]) AND t.id = o.id "
            f"RETURNING '{kind}'::text AS kind, t.id, o.contact_id, t.{when} AS at)"
        )
        selects.append(f"SELECT kind, id, contact_id, at FROM {kind}")
    ctes.append(f"doomed AS (DELETE FROM {contacts.name} WHERE id = ANY($1::uuid[]))")
    return f"WITH {', '.join(ctes)} {' UNION ALL '.join(selects)}"


_ORPHAN_AND_DELETE_PG = _orphan_and_delete_sql()


def _iso_z(at: Any) -> str:
    return str(at.isoformat().replace("+00:00", "Z"))


def _by_stored(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[Any, uuid.UUID]:
    """These UUIDs by the value a `raw_column` UUID column holding them reads as: on SQLite the
    32 hex digits ``sa.Uuid`` stores, with asyncpg a UUID equal to it. A batch reads one
    or two ids per contact: turning the stored text into a `uuid.UUID` cost more than the
    rest of their reading (SQLAlchemy's result processing, per row)."""
    if conn.dialect.name == "sqlite":
        return {value.hex: value for value in ids}
    return {value: value for value in ids}


# What deciding a contact's outcome and redacting its timeline read of it; the ids as the
# driver returns them (`_by_stored`).
_DECIDING_COLUMNS = (
    raw_column(contacts.c.id),
    raw_column(contacts.c.workspace_id),
    contacts.c.email,
    contacts.c.first_name,
    contacts.c.last_name,
    contacts.c.phone,
    contacts.c.member_role,
    contacts.c.has_billing_subscription,
)


def _uuid_text(value: Any) -> str:
    """A UUID's canonical text (``8-4-4-4-12`` lowercase hex) from a `uuid.UUID`, a driver's
    UUID, or SQLite's stored form (32 hex digits, as ``sa.Uuid`` writes it)."""
    if isinstance(value, uuid.UUID):
        return str(value)  # asyncpg's UUID writes its text in C
    text = str(value).lower()
    if len(text) == 32:
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    return text


def _raw_iso_z(at: Any) -> str:
    """``_iso_z`` of a timestamp column as the driver returned it: an aware datetime
    (asyncpg), or SQLite's stored text ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC (how
    `UTCDateTime` writes it), formatted exactly as ``datetime.isoformat`` would format it
    (no fraction when the microseconds are zero)."""
    if isinstance(at, datetime):
        if at.tzinfo is UTC:  # asyncpg's, always
            return f"{at.isoformat()[:-6]}Z"  # "+00:00" is the last six
        return _iso_z(at if at.tzinfo is not None else at.replace(tzinfo=UTC))
    text = str(at)
    if len(text) == 26 and text[10] == " " and text[19] == ".":
        fraction = text[19:]
        return f"{text[:10]}T{text[11:19]}{'' if fraction == '.000000' else fraction}Z"
    parsed = datetime.fromisoformat(text)
    return _iso_z(parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC))


def _log_batch(result: BatchResult) -> None:
    """The lines of one committed batch: per job, what it did; then starts and ends.

    Ids and counts only: never an address (items of an emails job are named by the
    contact id they resolved to).
    """
    for job_id in result.started:
        log.info("deletion_job_started", job_id=str(job_id))
    for job_id, delta in sorted(result.progress.items(), key=lambda kv: str(kv[0])):
        if delta.processed:
            log.info(
                "deletion_batch",
                job_id=str(job_id),
                deleted=delta.deleted,
                not_found=delta.not_found,
                failed=delta.failed,
            )
        if delta.added or delta.expanded:
            log.info(
                "deletion_job_expansion_done" if delta.expanded else "deletion_job_expansion_page",
                job_id=str(job_id),
                found=delta.added,
            )
    for summary in result.finished:
        log.info("deletion_job_finished", **summary)
    for job_id in result.failed_jobs:
        log.error(
            "deletion_job_failed", job_id=str(job_id), reason="its expansion failed permanently"
        )
