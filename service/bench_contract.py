"""The bench's contract floor, and the count of rows a deletion writes per table.

The bare floor (`service.bench.bare_floor`) only nulls timeline back-references and
deletes contacts. DESIGN.md §1 asks more of *any* implementation: every deletion leaves
durable rows behind in several tables (the transactional outbox, the job's items, the audit
chain, the webhook delivery log). `contract_floor` writes those rows and nothing else, with
plain SQL in the bench's process, one statement after another on one connection: no Kafka,
no HTTP, none of the service's API, relay, worker or dispatcher code, in the service's real
schema (its tables and indexes, so index upkeep counts). It uses only the schema's table
objects and the generic driver-level helpers of `service.db` (`insert_rows`: one multi-row
statement; `any_of`: an id list bound as one parameter), the cheapest way this code base
knows to write many rows. Its rate is what end to end could reach on this machine if an
implementation cost nothing beyond its rows and did them one after another;
``service_to_contract_floor_ratio`` is how far the service is from that.

Per batch of 500 contacts (like the bare floor; the bench passes its ``--batch``), one job
as a 500-id ``bulk-delete`` request makes, in six transactions (`STAGES`), each standing
for one component's; `StageClock` times each:

1. **API** (`service.deletion.store.create_job`): INSERT ``deletion_jobs`` (1 row),
   ``deletion_job_items`` (one per contact, ``pending``), ``outbox`` (one
   ``contact.deletion_requested`` event per contact); the ``deletion.requested`` audit event
   (see 3 for the chain: the head read and locked, one ``audit_events`` row, the head
   updated).
2. **relay** (`service.relay`): read the unpublished outbox rows (topic, key, payload,
   headers: what it would produce) and UPDATE their ``published_at``.
3. **worker** (`service.deletion.worker`): read the items' statuses (the idempotency check),
   DELETE the contacts (the member and billing rules in its WHERE; RETURNING the address
   for its hashes), read the timeline rows (kind, id, contact, time), UPDATE
   ``activities``/``notes``/``tasks`` to null their back-references, UPDATE the items
   (``deleted``, ``processed_at``), INSERT one ``contact.deleted`` outbox row per contact,
   UPDATE the job once (its counts and ``completed``: one batch is its whole job) with its
   ``deletion_job.completed`` outbox row, and append the audit events: the head read and
   locked (``SELECT … FOR UPDATE``; SQLite's one writer holds the database already), one
   ``contact.deleted`` event per contact (the preserved timeline and the address's keyed
   HMAC in its data) and the job's ``deletion.completed``, each hashed SHA-256(prev_hash ‖
   canonical JSON of the event) with one orjson call (the chain verifies with
   `service.audit.store.verify_workspace`), then UPDATE ``audit_heads``.
4. **relay**: as 2, for the ``contact.deleted`` and ``deletion_job.completed`` rows.
5. **dispatcher fan-out** (`service.webhooks.dispatcher.Dispatcher.fan_out`): read the
   workspace's endpoints; INSERT one ``webhook_deliveries`` row per contact and endpoint
   (the webhook body as its payload, claimed by the insert as the service's hand-over does).
6. **dispatcher record** (`_record_in`): INSERT one ``webhook_attempts`` row per delivery
   (a 200 answer) and UPDATE the deliveries ``succeeded``.

Left out, and why: Kafka (the broker's work is measured beside the service, as
``broker_cpu_ms_per_*``; a floor of the database writes does not include it); HTTP, on the
way in and out, signing and the POSTs (the signed-POST floor, ``webhook_floor_*``, measures
those); the erasure of idempotency answers (an UPDATE that matches no row here: the bench
sends no ``Idempotency-Key``); the member/billing error paths (every bench contact is
deletable); retries; the dispatcher's endpoint ownership leases and the relay's and
dispatcher's polling (a cost per second, not per contact).

Fidelity: `RowCounter` counts, through triggers, the rows each table gets written
(inserted, updated, deleted: distinct rows, and row versions ``writes``), for a sample of
the service's own deletions and for the contract floor's (``rows_per_contact`` in the
bench's figures); tests/integration/test_contract_floor.py holds the distinct rows per
table equal for the same contacts on both databases.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.audit.store import _EventRow as EventRow
from service.db import (
    Database,
    EncodedJSON,
    activities,
    any_of,
    audit_events,
    audit_heads,
    contacts,
    deletion_job_items,
    deletion_jobs,
    insert_rows,
    metadata,
    new_ids,
    new_time_ids,
    notes,
    outbox,
    raw_column,
    tasks,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.outbox import OutboxRow

STAGES = ("api", "relay", "worker", "relay_facts", "fan_out", "record")
"""The contract floor's transactions per batch, in order (see the module docstring)."""
DELETION_STAGES = STAGES[:3]
"""Those a deletion waits for: the point at which the service's end to end counts it."""
CONTRACT_BATCH = 500
"""Contacts per job and per transaction of each component, as the bare floor's batch."""
GENESIS = "0" * 64
TOPIC_PREFIX = "bench-contract."
_TIMELINE = (
    ("activity", activities, "occurred_at"),
    ("note", notes, "created_at"),
    ("task", tasks, "created_at"),
)
_PLURAL = {"activity": "activities", "note": "notes", "task": "tasks"}


@dataclass
class StageClock:
    """Wall seconds and CPU seconds per stage: the bench process's, and with
    ``server_cpu`` (a reading of the database server's CPU seconds) the server's."""

    server_cpu: Callable[[], float] | None = None
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    server: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _last: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float]:
        server = self.server_cpu() if self.server_cpu is not None else 0.0
        return time.perf_counter(), time.process_time(), server

    def start(self) -> None:
        self._last = self._now()

    def mark(self, stage: str) -> None:
        """What was spent since the last mark (or the start) goes to ``stage``."""
        now = self._now()
        self.seconds[stage] += now[0] - self._last[0]
        self.cpu[stage] += now[1] - self._last[1]
        self.server[stage] += now[2] - self._last[2]
        self._last = now


class _Item(NamedTuple):
    job_id: uuid.UUID
    ref: str
    position: int
    contact_id: uuid.UUID
    status: str
    processed_at: datetime | None


class _Delivery(NamedTuple):
    """A delivery for `insert_rows`, its columns in the table's order (the service's own
    row, `service.webhooks.store._DeliveryRow`, goes through another statement)."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: str
    event_type: str
    payload: bytes
    status: str
    attempt_count: int
    next_attempt_at: datetime
    claimed_until: datetime
    created_at: datetime


class _Record(NamedTuple):
    """An audit event before its place in the chain; ``data`` is canonical JSON."""

    actor: str
    action: str
    kind: str
    target: str
    data: bytes
    keyed: str | None


class _Attempt(NamedTuple):
    id: uuid.UUID
    delivery_id: uuid.UUID
    attempted_at: datetime
    status_code: int
    latency_ms: float
    error: str | None
    response_body: str | None


def _headers(event_type: str) -> EncodedJSON:
    return EncodedJSON((("content-type", "application/cloudevents+json"), ("ce_type", event_type)))


async def add_endpoints(db: Database, workspace_id: uuid.UUID, count: int) -> list[uuid.UUID]:
    """``count`` enabled endpoints of the workspace taking ``contact.deleted`` (rows only:
    nothing is sent to them), each with its ``webhook.endpoint.created`` audit event as the
    service writes it (which also starts the workspace's chain); their ids."""
    ids = new_ids(count)
    now = utcnow()
    chain = _Chain(workspace_id)
    async with db.begin() as conn:
        for endpoint_id in ids:
            await conn.execute(
                webhook_endpoints.insert().values(
                    id=endpoint_id,
                    workspace_id=workspace_id,
                    url=f"https://bench.invalid/{endpoint_id}",
                    event_types=["contact.deleted"],
                    secret="whsec_" + "A" * 32,
                    retired_secrets=[],
                    status="enabled",
                    created_at=now,
                    updated_at=now,
                )
            )
            target = str(endpoint_id)
            data = orjson.dumps({"event_types": ["contact.deleted"]})
            record = _Record(
                "api", "webhook.endpoint.created", "webhook_endpoint", target, data, None
            )
            await chain.append(conn, None, [record])
    return ids


class _Chain:
    """A workspace's audit chain head, as the floor appends to it."""

    def __init__(self, workspace_id: uuid.UUID) -> None:
        self.workspace_id = workspace_id
        self.workspace = str(workspace_id)

    async def append(
        self, conn: AsyncConnection, job: str | None, events: Sequence[_Record]
    ) -> None:
        """Lock the head, insert these events (of one job, or none), update the head."""
        job_json = f'"{job}"' if job is not None else "null"
        # The head's row lock for the rest of the transaction (SQLite's one writer holds
        # the whole database already); a workspace's first event creates it.
        h = audit_heads.c
        read = sa.select(h.seq, h.hash).where(h.workspace_id == self.workspace_id)
        if conn.dialect.name != "sqlite":
            read = read.with_for_update()
        head = (await conn.execute(read)).first()
        if head is None:
            await conn.execute(
                audit_heads.insert().values(workspace_id=self.workspace_id, seq=0, hash=GENESIS)
            )
        seq, prev = (0, GENESIS) if head is None else (head.seq, head.hash)
        at = utcnow().isoformat(timespec="microseconds").replace("+00:00", "Z")
        rows = []
        for (actor, action, kind, target, data, keyed), event_id in zip(
            events, new_ids(len(events)), strict=True
        ):
            seq += 1
            text = data.decode()
            # The canonical JSON of the event (sorted keys, no spaces), spliced: ``data``
            # is already canonical, every other value is an id or a name JSON leaves as is.
            body = (
                f'{{"action":"{action}","actor":{{"id":"{actor}","type":"system"}}'
                f',"data":{text},"id":"{event_id}","job_id":{job_json}'
                f',"occurred_at":"{at}","request_id":null,"seq":{seq}'
                f',"target":{{"id":"{target}","type":"{kind}"}}'
                f',"workspace_id":"{self.workspace}"}}'
            )
            digest = hashlib.sha256((prev + body).encode()).hexdigest()
            rows.append(
                EventRow(
                    self.workspace_id,
                    seq,
                    event_id,
                    at,
                    "system",
                    actor,
                    action,
                    kind,
                    target,
                    job,
                    None,
                    text,
                    keyed,
                    prev,
                    digest,
                )
            )
            prev = digest
        await insert_rows(conn, audit_events, rows)
        await conn.execute(
            audit_heads.update()
            .where(audit_heads.c.workspace_id == self.workspace_id)
            .values(seq=seq, hash=prev)
        )


async def _publish(conn: AsyncConnection, limit: int) -> list[Any]:
    """The relay's pass: read what it would produce (as the driver returns it), mark it
    published; the rows read."""
    o = outbox.c
    rows = (
        await conn.execute(
            sa.select(*(raw_column(c) for c in (o.id, o.topic, o.key, o.payload, o.headers)))
            .where(
                o.published_at.is_(None), o.failed_at.is_(None), o.topic.startswith(TOPIC_PREFIX)
            )
            .order_by(o.id)
            .limit(limit)
        )
    ).all()
    await conn.execute(
        outbox.update().where(any_of(o.id, [r.id for r in rows])).values(published_at=utcnow())
    )
    return list(rows)


async def contract_floor(
    db: Database,
    workspace_id: uuid.UUID,
    ids: Sequence[uuid.UUID],
    endpoint_ids: Sequence[uuid.UUID],
    hash_key: bytes,
    clock: StageClock | None = None,
    *,
    batch: int = CONTRACT_BATCH,
) -> StageClock:
    """Write, for these contacts of the workspace (seeded, with their timelines), the rows
    DESIGN.md §1 requires of any implementation (see the module docstring), ``batch`` at a
    time (a job each, as a ``batch``-id request makes); returns ``clock`` (a new one by
    default) with each stage's time added. ``endpoint_ids``: the workspace's endpoints
    (one delivery per contact and endpoint); ``hash_key``: the audit's email HMAC key
    (any bytes)."""
    clock = clock or StageClock()
    chain = _Chain(workspace_id)
    keyed = hmac.new(hash_key, digestmod=hashlib.sha256)
    workspace = str(workspace_id)
    clock.start()
    for start in range(0, len(ids), batch):
        contacts_of_job = list(ids[start : start + batch])
        await _one_job(db, chain, workspace, contacts_of_job, endpoint_ids, keyed, clock)
    return clock


async def _one_job(
    db: Database,
    chain: _Chain,
    workspace: str,
    batch: list[uuid.UUID],
    endpoint_ids: Sequence[uuid.UUID],
    keyed: Any,
    clock: StageClock,
) -> None:
    workspace_id = chain.workspace_id
    job_id = uuid.uuid4()
    job = str(job_id)
    refs = [str(c) for c in batch]
    now = utcnow()
    at = now.isoformat().replace("+00:00", "Z")
    # 1. The API's transaction.
    async with db.begin() as conn:
        await conn.execute(
            deletion_jobs.insert().values(
                id=job_id,
                workspace_id=workspace_id,
                status="pending",
                dry_run=False,
                delete_members=False,
                redact_timeline=False,
                selector={"contact_ids": refs},
                expanded=True,
                total_requested=len(batch),
                processed_count=0,
                deleted_count=0,
                not_found_count=0,
                failed_count=0,
                created_at=now,
            )
        )
        await insert_rows(
            conn,
            deletion_job_items,
            [
                _Item(job_id, ref, i, cid, "pending", None)
                for i, (ref, cid) in enumerate(zip(refs, batch, strict=True))
            ],
        )
        requested = _headers("contact.deletion_requested")
        await insert_rows(
            conn,
            outbox,
            [
                OutboxRow(
                    TOPIC_PREFIX + "contact.deletion-requested",
                    ref,
                    (
                        f'{{"specversion":"1.0","id":"{event_id}","source":"/contact-deletion"'
                        f',"type":"contact.deletion_requested","time":"{at}","subject":"{ref}"'
                        f',"data":{{"job_id":"{job}","workspace_id":"{workspace}"'
                        f',"ref":"{ref}","contact_id":"{ref}"}}}}'
                    ).encode(),
                    requested,
                    now,
                )
                for ref, event_id in zip(refs, new_ids(len(refs)), strict=True)
            ],
        )
        summary = orjson.dumps(
            {
                "count": len(batch),
                "delete_members": False,
                "dry_run": False,
                "selector": {"contact_ids": len(batch)},
            }
        )
        await chain.append(
            conn, job, [_Record("api", "deletion.requested", "deletion_job", job, summary, None)]
        )
    clock.mark("api")
    # 2. The relay publishes the requests.
    async with db.begin() as conn:
        await _publish(conn, len(batch))
    clock.mark("relay")
    # 3. The worker's transaction.
    async with db.begin() as conn:
        items = deletion_job_items.c
        await conn.execute(
            sa.select(items.ref, items.status).where(
                items.job_id == job_id, any_of(items.ref, refs)
            )
        )
        c = contacts.c
        gone = (
            await conn.execute(
                contacts.delete()
                .where(
                    any_of(c.id, batch),
                    c.workspace_id == workspace_id,
                    c.member_role.is_(None),
                    c.has_billing_subscription.is_(False),
                )
                .returning(c.id, c.email)
            )
        ).all()
        kept: dict[uuid.UUID, dict[str, list[dict[str, str]]]] = {}
        reads = [
            sa.select(
                sa.literal(kind).label("kind"), t.c.id, t.c.contact_id, t.c[when].label("at")
            ).where(any_of(t.c.contact_id, batch))
            for kind, t, when in _TIMELINE
        ]
        for kind, item_id, contact_id, when in (await conn.execute(sa.union_all(*reads))).all():
            entry = {
                "at": when.isoformat().replace("+00:00", "Z"),
                "id": str(item_id),
                "kind": kind,
            }
            kept.setdefault(contact_id, {}).setdefault(_PLURAL[kind], []).append(entry)
        for _, table, _ in _TIMELINE:
            await conn.execute(
                table.update().where(any_of(table.c.contact_id, batch)).values(contact_id=None)
            )
        done = utcnow()
        done_at = done.isoformat().replace("+00:00", "Z")
        await conn.execute(
            deletion_job_items.update()
            .where(items.job_id == job_id, any_of(items.ref, [str(r.id) for r in gone]))
            .values(status="deleted", processed_at=done)
        )
        events: list[_Record] = []
        deleted_rows: list[OutboxRow] = []
        deleted = _headers("contact.deleted")
        for (contact_id, email), event_id in zip(gone, new_ids(len(gone)), strict=True):
            address = email.strip().lower().encode()
            mac = keyed.copy()
            mac.update(address)
            hmac_hex = mac.hexdigest()
            timeline = kept.get(contact_id, {})
            data = orjson.dumps(
                {
                    "api_key_id": None,
                    "email_hmac": hmac_hex,
                    "member_role": None,
                    "preserved_timeline": {p: timeline.get(p, []) for p in _PLURAL.values()},
                },
                option=orjson.OPT_SORT_KEYS,
            )
            ref = str(contact_id)
            events.append(_Record("worker", "contact.deleted", "contact", ref, data, hmac_hex))
            counts = [len(timeline.get(p, ())) for p in _PLURAL.values()]
            deleted_rows.append(
                OutboxRow(
                    TOPIC_PREFIX + "contact.deleted",
                    ref,
                    (
                        f'{{"specversion":"1.0","id":"{event_id}","source":"/contact-deletion"'
                        f',"type":"contact.deleted","time":"{done_at}","subject":"{ref}"'
                        f',"datacontenttype":"application/json","data":{{"contact_id":"{ref}"'
                        f',"workspace_id":"{workspace}","job_id":"{job}"'
                        f',"deleted_at":"{done_at}"'
                        f',"email_sha256":"{hashlib.sha256(address).hexdigest()}"'
                        f',"orphaned_timeline":{{"activities":{counts[0]},"notes":{counts[1]}'
                        f',"tasks":{counts[2]}}}}}}}'
                    ).encode(),
                    deleted,
                    done,
                )
            )
        finished = {
            "deleted_count": len(gone),
            "failed_count": 0,
            "not_found_count": len(batch) - len(gone),
            "processed_count": len(batch),
            "status": "completed",
            "total_requested": len(batch),
        }
        deleted_rows.append(
            OutboxRow(
                TOPIC_PREFIX + "deletion_job.completed",
                job,
                orjson.dumps(
                    {"type": "deletion_job.completed", "data": {"job_id": job, **finished}}
                ),
                _headers("deletion_job.completed"),
                done,
            )
        )
        await insert_rows(conn, outbox, deleted_rows)
        j = deletion_jobs.c
        await conn.execute(
            deletion_jobs.update()
            .where(j.id == job_id)
            .values(
                processed_count=len(batch),
                deleted_count=len(gone),
                not_found_count=len(batch) - len(gone),
                status="completed",
                started_at=done,
                completed_at=done,
            )
        )
        events.append(
            _Record(
                "worker",
                "deletion.completed",
                "deletion_job",
                job,
                orjson.dumps(finished, option=orjson.OPT_SORT_KEYS),
                None,
            )
        )
        await chain.append(conn, job, events)
    clock.mark("worker")
    # 4. The relay publishes the facts (what the dispatcher then consumes).
    async with db.begin() as conn:
        facts = await _publish(conn, len(gone) + 1)
    clock.mark("relay_facts")
    # 5. The dispatcher's fan-out: one delivery per contact.deleted and endpoint.
    async with db.begin() as conn:
        e = webhook_endpoints.c
        await conn.execute(
            sa.select(e.id, e.event_types, e.status).where(e.workspace_id == workspace_id)
        )
        now = utcnow()
        # Claimed by the insert, as the service hands a new delivery to its sender.
        lease = now + timedelta(seconds=30)
        published = [bytes(r.payload) for r in facts if r.topic.endswith(".contact.deleted")]
        deliveries = []
        fresh = iter(new_time_ids(len(published) * len(endpoint_ids)))
        for payload in published:
            fact_id = payload[_ID_AT : _ID_AT + 36].decode()
            body = _webhook_body(payload)
            for endpoint_id in endpoint_ids:
                deliveries.append(
                    _Delivery(
                        next(fresh),
                        workspace_id,
                        endpoint_id,
                        fact_id,
                        "contact.deleted",
                        body,
                        "pending",
                        0,
                        now,
                        lease,
                        now,
                    )
                )
        await insert_rows(conn, webhook_deliveries, deliveries)
    clock.mark("fan_out")
    # 6. The dispatcher records each delivery's attempt and outcome.
    async with db.begin() as conn:
        now = utcnow()
        await insert_rows(
            conn,
            webhook_attempts,
            [
                _Attempt(attempt_id, d.id, now, 200, 1.0, None, None)
                for d, attempt_id in zip(deliveries, new_time_ids(len(deliveries)), strict=True)
            ],
        )
        d = webhook_deliveries.c
        await conn.execute(
            webhook_deliveries.update()
            .where(any_of(d.id, [x.id for x in deliveries]))
            .values(
                status="succeeded",
                attempt_count=d.attempt_count + 1,
                last_attempt_at=now,
                completed_at=now,
                claimed_until=None,
            )
        )
    clock.mark("record")


_ID_AT = len(b'{"specversion":"1.0","id":"')
"""Where a spliced event's id starts in its bytes."""


def _webhook_body(payload: bytes) -> bytes:
    """The Standard Webhooks body of a spliced ``contact.deleted`` CloudEvent: its type,
    time and data, sliced out of the event's bytes (as cheaply as a floor can)."""
    data = payload.index(b',"data":')
    time_at = payload.index(b',"time":')
    subject = payload.index(b',"subject":')
    return (
        b'{"type":"contact.deleted","timestamp":'
        + payload[time_at + 8 : subject]
        + b',"data":'
        + payload[data + 8 : -1]
        + b"}"
    )


# --- counting the rows written --------------------------------------------------------------

ROW_LOG = "bench_row_writes"


class RowCounter:
    """Triggers that log every row written (table, operation, primary key) to a table of
    their own, on every table of the schema; `counts` reads them per table. For a sample
    of deletions only: a trigger per row costs each writer time, so timed phases run
    without them. ``install`` and ``remove`` are DDL the bench runs on its own database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.tables = list(metadata.sorted_tables)

    async def install(self) -> None:
        async with self.db.begin() as conn:
            sqlite = conn.dialect.name == "sqlite"
            serial = "INTEGER PRIMARY KEY AUTOINCREMENT" if sqlite else "BIGSERIAL PRIMARY KEY"
            await conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {ROW_LOG} "
                f"(n {serial}, tbl TEXT NOT NULL, op TEXT NOT NULL, pk TEXT NOT NULL)"
            )
            if not sqlite:
                await conn.exec_driver_sql(_PG_FUNCTION)
            for table in self.tables:
                keys = [c.name for c in table.primary_key.columns]
                for statement in _trigger_sql(table.name, keys, sqlite):
                    await conn.exec_driver_sql(statement)

    async def remove(self) -> None:
        async with self.db.begin() as conn:
            sqlite = conn.dialect.name == "sqlite"
            for table in self.tables:
                for op in ("insert", "update", "delete") if sqlite else ("row",):
                    on = "" if sqlite else f" ON {table.name}"
                    await conn.exec_driver_sql(
                        f"DROP TRIGGER IF EXISTS {_trigger(table.name, op)}{on}"
                    )
            if not sqlite:
                await conn.exec_driver_sql("DROP FUNCTION IF EXISTS bench_row_write() CASCADE")
            await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {ROW_LOG}")

    async def counts(self, per: int, *, clear: bool = True) -> dict[str, dict[str, float]]:
        """Per table written: distinct rows inserted, updated and deleted, and the row
        versions written (``writes``: a row updated twice counts twice), each divided by
        ``per`` (rounded to 3 places); the log is emptied unless ``clear`` is False."""
        async with self.db.begin() as conn:
            rows = (
                await conn.exec_driver_sql(
                    f"SELECT tbl, op, COUNT(DISTINCT pk), COUNT(*) FROM {ROW_LOG} GROUP BY tbl, op"
                )
            ).all()
            if clear:
                await conn.exec_driver_sql(f"DELETE FROM {ROW_LOG}")
        out: dict[str, dict[str, float]] = {}
        for table, op, distinct, versions in rows:
            entry = out.setdefault(table, {"writes": 0.0})
            entry[op.lower()] = round(distinct / per, 3)
            entry["writes"] = round(entry["writes"] + versions / per, 3)
        return dict(sorted(out.items()))


def _trigger(table: str, op: str) -> str:
    return f"bench_rw_{table}_{op}"


def _trigger_sql(table: str, keys: list[str], sqlite: bool) -> list[str]:
    if not sqlite:
        args = ", ".join(f"'{k}'" for k in keys)
        return [
            f"DROP TRIGGER IF EXISTS {_trigger(table, 'row')} ON {table}",
            f"CREATE TRIGGER {_trigger(table, 'row')} AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION bench_row_write({args})",
        ]
    out = []
    for op, row in (("insert", "NEW"), ("update", "NEW"), ("delete", "OLD")):
        key = " || '/' || ".join(f"{row}.{k}" for k in keys)
        out.append(f"DROP TRIGGER IF EXISTS {_trigger(table, op)}")
        out.append(
            f"CREATE TRIGGER {_trigger(table, op)} AFTER {op.upper()} ON {table} BEGIN "
            f"INSERT INTO {ROW_LOG} (tbl, op, pk) VALUES ('{table}', '{op.upper()}', {key}); END"
        )
    return out


_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION bench_row_write() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  r jsonb;
  k text := '';
BEGIN
  IF TG_OP = 'DELETE' THEN r := to_jsonb(OLD); ELSE r := to_jsonb(NEW); END IF;
  FOR i IN 0 .. TG_NARGS - 1 LOOP
    k := k || '/' || (r ->> TG_ARGV[i]);
  END LOOP;
  INSERT INTO {ROW_LOG} (tbl, op, pk) VALUES (TG_TABLE_NAME, TG_OP, k);
  RETURN NULL;
END
$$
"""
