"""The webhook dispatcher: fans events out to endpoints, then sends due deliveries.

Two loops share one process:

- **fan-out** consumes `contact.deleted` and `deletion_job.completed` and writes one
  delivery row per event and matching endpoint (a unique constraint makes a repeated
  event a no-op), then commits the offsets. A new delivery to an endpoint this process
  owns is claimed by that INSERT and goes straight into the endpoint's buffer (no read
  or claim of its own: on SQLite, no second wait for the single writer).
- **sender** keeps per-endpoint queues of due delivery ids (no payloads) and claims from
  them into per-endpoint buffers (loading payloads only for what it sends); sends run from
  the buffers up to each endpoint's limits, and the attempts that finished meanwhile are
  recorded together, one transaction per pass (group commit): the attempt rows, the next
  state (retry scheduled or finished), the endpoint's failing streak. A buffer holds what
  its endpoint takes in WEBHOOK_CLAIM_AHEAD_S (or in two passes, when passes wait longer
  for SQLite's one writer) at its limit and fastest recent latency (at least twice its
  limit) and is topped up at half, or at three quarters by a pass that records anyway;
  a pass runs WEBHOOK_GROUP_COMMIT_S after the first unrecorded attempt ended, so one
  transaction (recording and claiming together) covers many deliveries (a finished send
  does not start a pass of its own).

Limits hold across dispatcher processes because one dispatcher at a time sends to an
endpoint: it owns the endpoint (`owner`, `owner_until` on its row, claimed atomically and
renewed while it has work), and enforces `max_in_flight` and `rate_limit_per_s` in
memory. It starts a request only while its ownership outlasts the request timeout
(checked as a send leaves the buffer and again at the request itself), so a successor
(once the ownership lapsed, e.g. after a crash or a stall) never overlaps it. Claimed
deliveries are leased (`claimed_until`) for as long; a stalled dispatcher renews only the
leases that are still the ones it took, and records an attempt whose lease lapsed only if
nobody claimed the delivery since (tests/integration/test_dispatcher_stalls.py).
A `retry` asked for while a delivery is claimed is only noted (`retry_requested`):
recording the attempt under way makes it due again, so a delivery is never in flight
twice.

Endpoints with work spread over the dispatchers: each owns at most its fair share of them,
its share of the partitions of the dispatchers' Kafka group (the fan-out consumer's) times
the endpoints with work, and gives the least busy ones beyond that up, once their requests
ended and were recorded. Without a known share (the group rebalancing, the broker away) a
dispatcher takes what nobody owns, and an endpoint nobody took for UNOWNED_GRACE_S is
taken whatever the shares say: spreading is for speed, ownership is what keeps the limits.

An endpoint's change reaches what is claimed ahead for it (README "How soon a change is
seen"): after a 410 answer no other send to the endpoint starts until the answer is
recorded (it disables the endpoint, and the claimed deliveries are failed unsent); a
change through this process's API (`EndpointChanges`) holds the endpoint's sends until
the next pass read its row; and a pass reads the rows of the endpoints it holds claimed
deliveries for (at most every WEBHOOK_GROUP_COMMIT_S), so that what is buffered goes out
with the URL and secrets as they are now, and a disabled or deleted endpoint is let go.

A slow receiver holds only its own endpoint's slots: its queue is capped at a refill, so
its backlog never queues in front of other endpoints' deliveries.
Retries are rows with a `next_attempt_at`, not sleeps holding a Kafka partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, TypeVar

import sqlalchemy as sa
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

from service.aio import (
    Backoff,
    Sleep,
    Stopped,
    retry_transient,
    sleep_unless_stopped,
    wait_any,
    wait_for_dependency,
)
from service.audit.store import AuditRecord, append_events
from service.config import Settings
from service.db import (
    Database,
    any_of,
    insert_rows,
    new_time_ids,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.deployment import ForeignRecords
from service.events import (
    DLQ_SUFFIX,
    SOURCE,
    TOPIC_CONTACT_DELETED,
    TOPIC_JOB_COMPLETED,
    TYPE_CONTACT_DELETED,
    TYPE_HEADER,
    TYPE_JOB_COMPLETED,
    CloudEvent,
    ContactDeleted,
    DeletionJobCompleted,
)
from service.failpoints import Pauses
from service.faults import describe, is_transient
from service.kafka import (
    Consumer,
    InMessage,
    Producer,
    next_offsets,
    send_dead_letters,
)
from service.limits import storable
from service.logs import get_logger
from service.metrics import Metrics
from service.timefmt import iso
from service.webhooks.changes import EndpointChanges
from service.webhooks.models import SENDABLE, DeliveryStatus, DisabledReason, EndpointStatus
from service.webhooks.payloads import (
    ContactDeletedWebhook,
    DeletionJobCompletedWebhook,
    webhook_body,
)
from service.webhooks.post import WebhookClient, target
from service.webhooks.refanout import LostEvents, recover_events
from service.webhooks.schedule import Outcome, RetryPolicy, classify, parse_retry_after
from service.webhooks.signing import signature_header
from service.webhooks.ssrf import BlockedDestination, PinnedResolver, check_url, failure_text
from service.webhooks.store import NewDeliveries, disable_endpoint, enqueue_many, live_secrets

log = get_logger(__name__)
T = TypeVar("T")

USER_AGENT = "contact-deletion-webhooks/0.1 (+https://github.com/contact-deletion)"
RESPONSE_BODY_LIMIT = 4096
QUEUE_REFILL = 1000
"""Due delivery ids (no payloads) read into the per-endpoint queues at a time."""
REFILL_EVERY_S = 0.5
"""The queues are read afresh at least this often, and whenever new work is signalled."""
QUEUE_KEEP = 100
"""A queue this long is kept as it is at a refill (the endpoint has work enough)."""
MIN_AHEAD_ROUNDS = 2
"""Deliveries claimed ahead per endpoint: at least this many times its max_in_flight,
counting the ones in flight, so sends go on while the batch before is recorded; more for
an endpoint seen to answer fast (what it sends in WEBHOOK_CLAIM_AHEAD_S at its limit and
its observed latency)."""
LEASE_ROUNDS = 3
"""An endpoint is owned (and its deliveries leased) for this many request timeouts, plus
LEASE_SLACK_S: a buffer claimed ahead is sent well within it."""
LEASE_SLACK_S = 10
FAST_WINDOW_S = 2.0
"""An endpoint's pace is judged by its fastest attempt in the last one or two windows of
this long: a mean would count the time an answer waited for this process's busy event
loop (a fan-out batch, a pass) as the receiver's, and shrink the buffer just when a
bigger one is needed (issue 8: on SQLite the buffer then ran dry between passes)."""
PASS_WEIGHT = 0.2
"""Weight of the newest pass in the smoothed duration of the sender's passes."""
TOP_UP_SHARE = 4
"""A pass that writes anyway also tops up any buffer missing a quarter of its size."""
UNOWNED_GRACE_S = 2.0
"""An endpoint with due work that no dispatcher took for this long is taken whatever the
fair share says."""
EXCESS_FOR_S = 1.0
"""A dispatcher owning more endpoints than its fair share for this long gives some up."""
RELEASE_HOLD_S = 2.0
"""A dispatcher leaves an endpoint it gave up alone this long (another takes it)."""
CHECK_TTL_S = 10.0
"""A URL's passing SSRF check is reused this long (a new connection checks its host's
addresses again as it resolves them: `PinnedResolver`)."""
CHECKED_URLS_MAX = 10_000
LISTENERS_AT_ONCE = 200
"""While at most this many endpoints are enabled (all workspaces), the fan-out reads
them all for each batch and skips, unread, every event of a type none of them takes
(by its `ce_type` header); beyond, it reads each event's routing and the endpoints of the
batch's workspaces (and, for MANY_LISTENERS_S, does not try to read them all again)."""
MANY_LISTENERS_S = 10.0
FANOUT_YIELD_EVERY = 64
"""The fan-out reads and encodes a batch (up to 500 events) in runs of this many, giving
the event loop a turn between them: an answer that arrives while a batch is read waits
for the loop, and so does that slot's next send; with an endpoint's few slots all
waiting, its receiver idles until the batch is done (issue 8: the drain)."""
D = webhook_deliveries.c
E = webhook_endpoints.c


@dataclass
class EndpointSlots:
    """This process's view of one endpoint: the ids of its due deliveries (a queue, oldest
    first), the deliveries it claimed and has yet to send, its open requests, how long it
    owns the endpoint, and its token bucket."""

    queue: deque[uuid.UUID] = field(default_factory=deque)
    ready: deque[dict[str, Any]] = field(default_factory=deque)  # claimed, not sent yet
    in_flight: int = 0  # requests open now
    owned_until: datetime | None = None  # this process sends to it until then
    max_in_flight: int | None = None  # the endpoint's own limit, once seen
    rate: float | None = None  # the endpoint's rate_limit_per_s, once seen
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)
    ahead: int = 0  # deliveries to hold claimed (in flight included); 0: not yet known
    fastest_s: float | None = None  # its fastest attempt in this window, once one ended
    fastest_before_s: float | None = None  # and in the window before
    window_from: float = field(default_factory=time.monotonic)
    failing: bool | None = None  # its failing streak as last read or written; None: unknown
    waiting_since: float | None = None  # due work seen, not owned by this process yet
    releasing: bool = False  # to be given up to another dispatcher (fair share)
    # Its row as last read (`updated_at`, which every change of what a send carries or
    # whether it is sent moves), news of changes since (`changes`, counted; `seen`: the
    # count when the row was last read) and an unrecorded 410 answer (`gone`): while
    # either is pending, no send starts (`Dispatcher._next_send`) until a pass read the
    # row again or recorded the 410.
    version: datetime | None = None
    target: tuple[str, list[str]] = ("", [])  # its URL and live secrets, as of `version`
    changes: int = 0
    seen: int = 0
    gone: bool = False

    def observe(self, latency_s: float, now: float) -> None:
        """Note one attempt's latency (seconds), ended at `now` (monotonic seconds)."""
        if now - self.window_from >= FAST_WINDOW_S:
            self.fastest_before_s, self.fastest_s = self.fastest_s, None
            self.window_from = now
        if self.fastest_s is None or latency_s < self.fastest_s:
            self.fastest_s = latency_s

    def pace(self, limit: int) -> float:
        """Attempts per second this endpoint takes at `limit` requests in flight, from its
        fastest recent attempt (`FAST_WINDOW_S`; 0 while none is known)."""
        seen = [x for x in (self.fastest_s, self.fastest_before_s) if x is not None]
        if not seen:
            return 0.0
        return limit / max(min(seen), 0.001)

    def idle(self, now: float) -> bool:
        """Nothing claimed or in flight and a full bucket: forgetting it loses nothing."""
        if self.in_flight or self.ready:
            return False
        return self.rate is None or self.tokens_now(self.rate, now) >= max(self.rate, 1.0)

    def tokens_now(self, rate: float, now: float) -> int:
        """Whole tokens available at `now` (monotonic seconds) for `rate` per second."""
        self.tokens = min(max(rate, 1.0), self.tokens + (now - self.updated) * rate)
        self.updated = now
        return int(self.tokens)


@dataclass(frozen=True)
class AttemptResult:
    """One POST's outcome. `error` and `body` are storable text (`limits.storable`)."""

    status_code: int | None
    latency_ms: float
    error: str | None
    body: str | None
    retry_after_s: float | None

    def __post_init__(self) -> None:
        # Whatever a receiver sends back (NUL bytes, invalid UTF-8, odd headers or reason
        # phrases) must not make the attempt unrecordable.
        object.__setattr__(self, "error", storable(self.error, 1000))
        object.__setattr__(self, "body", storable(self.body, RESPONSE_BODY_LIMIT))

    def bare(self) -> AttemptResult:
        """The same outcome without the receiver's text (when that could not be stored)."""
        note = "the answer's details could not be stored"
        return AttemptResult(self.status_code, self.latency_ms, note, None, self.retry_after_s)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        metrics: Metrics,
        wakeup: asyncio.Event | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = sleep_unless_stopped,
        clock: Callable[[], datetime] = utcnow,
        pauses: Pauses | None = None,
        changes: EndpointChanges | None = None,
    ) -> None:
        self.settings = settings
        # The API's news of changed endpoints in this process (None: no API here).
        self.changes = changes
        # The time leases are taken and checked by (tests move it on, as a stall would).
        self.clock = clock
        # Points where a test holds this dispatcher, as a stalled process would stop there.
        self.pauses = pauses
        self.db = db
        self.metrics = metrics
        self.wakeup = wakeup or asyncio.Event()
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.policy = RetryPolicy(settings.retry_schedule)
        self.slots: dict[uuid.UUID, EndpointSlots] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # Attempts sent but not recorded yet; `flush` records them together.
        self.finished: list[tuple[dict[str, Any], AttemptResult]] = []
        self.progress = asyncio.Event()  # a send finished
        self.held: set[uuid.UUID] = set()  # claimed by this process and not recorded yet
        self.instance = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        timeout_s = settings.webhook_timeout_s
        # Owning an endpoint (and leasing its deliveries) lasts long enough for a full
        # buffer to be sent; a send starts only while a request can end within it.
        self._own = timedelta(seconds=timeout_s * LEASE_ROUNDS + LEASE_SLACK_S)
        self._send_margin = timedelta(seconds=timeout_s + 2)
        # At the request itself (a moment after `_start_sends` checked `_send_margin`).
        self._post_margin = timedelta(seconds=timeout_s + 1)
        # Claimed ahead: what an endpoint sends in this long, never more than it sends in
        # a quarter of the lease (the lease is renewed, with the buffer's, at its half).
        self._ahead_s = min(settings.webhook_claim_ahead_s, self._own.total_seconds() / 4)
        self._ahead_max = settings.webhook_claim_ahead_max
        self._commit_s = settings.webhook_group_commit_s
        # How long a pass takes (its wait for the database's writer included), smoothed:
        # a buffer holds what its endpoint sends in two of them, so that it does not run
        # dry while the pass that tops it up waits for SQLite's one writer.
        self._pass_s = 0.0
        self._commit_timer: asyncio.TimerHandle | None = None
        self._checked: dict[str, float] = {}  # URL -> until when its SSRF check holds
        # Spreading endpoints across dispatchers: this process's share of the
        # dispatchers' Kafka group (set while the fan-out consumer runs), the number of
        # endpoints that makes its fair share, and the ones it gave up lately.
        self.share: Callable[[], float | None] = _unknown_share
        self._quota: int | None = None
        self._excess_since: float | None = None
        self._released: dict[uuid.UUID, float] = {}
        self._session: WebhookClient | None = None
        self._stopping = False
        self._refilled_at = -float("inf")
        self._many_listeners_until = -float("inf")  # (monotonic) see LISTENERS_AT_ONCE
        self._drained = False
        self._watched_at = -float("inf")  # (monotonic) see `_watched`
        self.topics = [settings.topic(TOPIC_CONTACT_DELETED), settings.topic(TOPIC_JOB_COMPLETED)]

    async def _pause(self, point: str) -> None:
        """Wait here while a test holds `point` (`failpoints.Pauses`); nothing otherwise."""
        if self.pauses is not None:
            await self.pauses.at(point)

    # -- fan-out ------------------------------------------------------------------------

    async def run_fanout(self, stop: asyncio.Event) -> None:
        """Consume events until `stop`; outages of the database or broker are waited out."""
        bootstrap = self.settings.kafka_bootstrap_servers
        group = f"{self.settings.kafka_consumer_group_prefix}.dispatcher"
        consumer = Consumer(
            bootstrap,
            self.topics,
            group,
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka_heartbeat_interval_ms,
            on_lost=functools.partial(recover_events, self.db, self.wakeup),
        )
        dlq = Producer(bootstrap)
        backstop = LostEvents(self.db, self.settings, self.wakeup)
        counter = self.metrics.foreign_records_skipped
        try:
            foreign = await wait_for_dependency(
                lambda: ForeignRecords.load(self.db, counter, "dispatcher"),
                stop,
                dependency="database",
                component="dispatcher",
            )
            await wait_for_dependency(
                consumer.start, stop, dependency="kafka", component="dispatcher"
            )
        except Stopped:
            return
        self.share = consumer.assigned_share
        try:
            with contextlib.suppress(Stopped):
                await wait_for_dependency(
                    dlq.start, stop, dependency="kafka", component="dispatcher"
                )
                while not stop.is_set():
                    messages = await self._transient(
                        functools.partial(consumer.getmany, timeout_ms=200, max_records=500), stop
                    )
                    if not messages:  # idle: events left unsent now were lost unseen
                        await self._transient(functools.partial(backstop.check, consumer), stop)
                        continue
                    if not await self._fan_out_isolating(foreign.mine(messages), dlq, stop):
                        break
                    # A refused commit (the partition moved) is logged and skipped inside.
                    await self._transient(
                        functools.partial(consumer.commit, next_offsets(messages)), stop
                    )
        finally:
            self.share = _unknown_share
            await consumer.stop()
            await dlq.stop()

    async def fan_out(self, messages: Sequence[InMessage], dlq: Producer) -> int:
        """Write the deliveries of these events (idempotent); dead-letter malformed ones.

        Returns how many deliveries were new. The endpoints are read afresh from the database
        for every batch (so an endpoint created or enabled by any process before the batch is
        never missed); a disabled endpoint's delivery is written ``failed`` (not sent: `recover`
        after `enable` sends it; DESIGN.md "Webhooks"). All of them are read while there are at
        most LISTENERS_AT_ONCE, and then an event of a type none of them takes (its `ce_type`
        header, as the relay sets it) is skipped without being read at all (issue 8: a filter
        job's events cost a parse each when nobody listened). Any other event is first read only
        as far as its routing (`_Routing`: id, type, time, workspace); beyond LISTENERS_AT_ONCE,
        the endpoints of the batch's workspaces are read then; only an event with an endpoint to
        go to is read in full and written. An event whose routing cannot be read is
        dead-lettered; one nobody subscribes to is not read further.

        A new delivery to an endpoint this process owns (with room in its buffer and no
        older due work queued) is claimed by the same INSERT and handed to the buffer
        from memory, so its first attempt starts without another read or claim
        transaction (`_hand_over`).
        """
        routed: list[tuple[InMessage, _Routing | _TypedEvent]] = []
        poison: list[tuple[InMessage, str]] = []
        endpoints: dict[uuid.UUID, list[Any]] | None = None
        # Read first: most events have no endpoint to go to, and then nothing is written.
        listeners: Sequence[Any] = ()
        many = time.monotonic() < self._many_listeners_until
        if not many:
            async with self.db.read() as conn:
                listeners = (
                    await conn.execute(sa.select(*_ENDPOINT_COLUMNS).limit(LISTENERS_AT_ONCE + 1))
                ).all()
            if len(listeners) > LISTENERS_AT_ONCE:
                many = True
                self._many_listeners_until = time.monotonic() + MANY_LISTENERS_S
        taken: set[str] | None = None  # the event types some endpoint takes; None: any
        if not many:
            endpoints = {}
            taken = set()
            for r in listeners:
                endpoints.setdefault(r.workspace_id, []).append(r)
                if taken is not None:
                    taken = None if not r.event_types else taken.union(r.event_types)
        for n, m in enumerate(messages):
            if n and not n % FANOUT_YIELD_EVERY:
                # Let the sends whose answers came in meanwhile go on (`FANOUT_YIELD_EVERY`).
                await asyncio.sleep(0)
            kind = _header_type(m)
            if taken is not None and kind is not None and kind not in taken:
                continue  # nobody takes this type (an event without the header is read)
            typed = _TYPED_EVENTS.get(kind) if kind is not None else None
            if typed is not None:
                # Read in full at once (it is most likely sent), not its routing first and
                # then the whole event: one parse, not three (issue 8). Whatever does not
                # read this way is read as any other event below, with the same outcome.
                # (If it does not read this way, it is read below as any other event.)
                with contextlib.suppress(ValidationError):
                    routed.append((m, typed[0].model_validate_json(m.value)))
                    continue
            try:
                routed.append((m, _Routing.model_validate_json(m.value)))
            except ValidationError as exc:
                log.error("webhook_event_dead_lettered", topic=m.topic, offset=m.offset)
                poison.append((m, describe(exc)))
        if endpoints is None and routed:
            endpoints = {}
            async with self.db.read() as conn:
                for r in (
                    await conn.execute(
                        sa.select(*_ENDPOINT_COLUMNS).where(
                            E.workspace_id.in_({r.data.workspace_id for _, r in routed})
                        )
                    )
                ).all():
                    endpoints.setdefault(r.workspace_id, []).append(r)
        planned: list[tuple[str, str, bytes, uuid.UUID, list[Any]]] = []
        for n, (m, routing) in enumerate(routed):
            if n and not n % FANOUT_YIELD_EVERY:
                await asyncio.sleep(0)
            ws = routing.data.workspace_id
            targets = [
                e
                for e in (endpoints or {}).get(ws, ())
                if not e.event_types or routing.type in e.event_types
            ]
            if not targets:
                continue
            if isinstance(routing, _TypedEvent):
                planned.append((routing.id, routing.type, _typed_body(routing), ws, targets))
                continue
            try:
                event = CloudEvent.model_validate_json(m.value)
            except ValidationError as exc:
                log.error("webhook_event_dead_lettered", topic=m.topic, offset=m.offset)
                poison.append((m, describe(exc)))
                continue
            body = webhook_body(event.type, event.time, event.data)
            planned.append((event.id, event.type, body, ws, targets))
        if poison:
            refused = self.metrics.dead_letters_refused
            await send_dead_letters(dlq, poison, DLQ_SUFFIX, refused)
        if not planned:
            return 0
        now = self.clock()
        room = self._handover_room({e.id for *_, targets in planned for e in targets}, now)
        leased: dict[uuid.UUID, EndpointSlots] = {eid: self.slots[eid] for eid in room}
        batch = []
        for event_id, event_type, body, ws, targets in planned:
            leases: dict[uuid.UUID, datetime] = {}
            for e in targets:
                if room.get(e.id, 0) > 0:
                    room[e.id] -= 1
                    until = leased[e.id].owned_until
                    assert until is not None
                    leases[e.id] = until
            disabled = frozenset(e.id for e in targets if e.status != EndpointStatus.ENABLED)
            batch.append(
                NewDeliveries(
                    ws, [e.id for e in targets], event_id, event_type, body, leases, disabled
                )
            )
        async with self.db.begin() as conn:
            created = await enqueue_many(conn, self.db, batch)
        unsent = sum(1 for r in created if r["status"] != DeliveryStatus.PENDING)
        if unsent:
            log.info("webhook_deliveries_failed_endpoint_disabled", count=unsent)
        handed = 0
        claimed = [r for r in created if r["claimed_until"] is not None]
        if leased:
            targets_by_id = {e.id: e for *_, targets in planned for e in targets}
            handed = await self._hand_over(claimed, leased, targets_by_id, now)
        if handed < len(claimed) or any(
            not self._queued(r["endpoint_id"], now)
            for r in created
            if r["claimed_until"] is None and r["status"] == DeliveryStatus.PENDING
        ):
            # Written for the sender to queue and claim: it need not wait for its next
            # read. (What went straight into a buffer needs no read, nor what queues behind
            # older work this process holds queued: issue 8, a read of the queues after
            # every fan-out batch, each reading past the whole backlog.)
            self.wakeup.set()
        return len(created)

    def _queued(self, endpoint_id: uuid.UUID, now: datetime) -> bool:
        """Whether a new delivery to this endpoint can wait for the sender's next read of
        the queues without delaying it: this process owns the endpoint and holds older
        due work for it queued, so the new one is sent after that anyway, and the queue
        is read again as soon as it runs dry (`_drained`) or every REFILL_EVERY_S."""
        slots = self.slots.get(endpoint_id)
        return (
            slots is not None
            and bool(slots.queue)
            and not slots.releasing
            and self._owns(slots, now)
        )

    def _handover_room(self, endpoint_ids: set[uuid.UUID], now: datetime) -> dict[uuid.UUID, int]:
        """Per endpoint among these that new deliveries can go to straight from the
        fan-out: owned by this process for longer than a request can take (and not being
        given up), its sender running, nothing older queued for it; the value is the
        room left in its buffer (`_buffer`)."""
        if self._stopping or self._session is None:
            return {}
        room = {}
        for eid in endpoint_ids:
            slots = self.slots.get(eid)
            if (
                slots is None
                or slots.releasing
                or slots.queue
                or slots.owned_until is None
                or slots.owned_until - now <= self._send_margin
            ):
                continue
            free = self._buffer(slots) - len(slots.ready) - slots.in_flight
            if free > 0:
                room[eid] = free
        return room

    async def _hand_over(
        self,
        rows: list[dict[str, Any]],
        leased: dict[uuid.UUID, EndpointSlots],
        endpoints: dict[uuid.UUID, Any],
        now: datetime,
    ) -> int:
        """Put new deliveries the fan-out claimed (`rows`, as inserted) into their
        endpoints' buffers and start their sends; returns how many went into a buffer.
        One whose endpoint this process no longer owns as it did (given up or lost
        meanwhile) has its lease cleared, so that the endpoint's owner sends it; if that
        fails, the lease lapses."""
        orphaned: list[uuid.UUID] = []
        started: set[uuid.UUID] = set()
        handed = 0
        retargeted: set[uuid.UUID] = set()
        for row in rows:
            eid = row["endpoint_id"]
            slots = self.slots.get(eid)
            if (
                slots is not leased[eid]
                or slots.releasing
                or self._stopping
                or slots.owned_until is None
                or slots.owned_until < row["claimed_until"]
            ):
                orphaned.append(row["id"])
                continue
            if eid not in retargeted:
                # The newer of the fan-out's read of the endpoint and the sender's.
                endpoint = endpoints[eid]
                if slots.version is None or endpoint.updated_at > slots.version:
                    self._retarget(slots, endpoint, now)
                retargeted.add(eid)
            url, secrets = slots.target
            slots.ready.append(
                {
                    "id": row["id"],
                    "workspace_id": row["workspace_id"],
                    "endpoint_id": eid,
                    "event_id": row["event_id"],
                    "event_type": row["event_type"],
                    "payload": row["payload"],
                    "attempt_count": 0,
                    "url": url,
                    "secrets": secrets,
                    "claimed_until": row["claimed_until"],
                }
            )
            self.held.add(row["id"])
            started.add(eid)
            handed += 1
        for eid in started:
            self._start_sends(eid)
        if orphaned:
            try:
                async with self.db.begin() as conn:
                    await self._give_back(conn, orphaned, [])
            except Exception as exc:
                log.warning(
                    "webhook_handover_lease_kept", deliveries=len(orphaned), error=repr(exc)[:500]
                )
        return handed

    # -- sender -------------------------------------------------------------------------

    async def run_sender(self, stop: asyncio.Event) -> None:
        """Claim, send and record until `stop`; then let what is in flight finish.

        Sends run from the per-endpoint buffers as fast as the endpoints' limits allow;
        each pass of this loop (`step`) records the attempts that finished meanwhile and
        tops the buffers up, in one transaction. A pass
        runs when new work is signalled, when a buffer is down to half, when
        WEBHOOK_GROUP_COMMIT_S passed since the first unrecorded attempt ended (or a
        buffer's worth of them is waiting), and every REFILL_EVERY_S.
        """
        backoff = self._backoff()
        # A lean HTTP/1.1 client (service.webhooks.post), not aiohttp's ClientSession: a
        # third of its CPU per request (issue 8). No cookies at all: a receiver's
        # Set-Cookie never travels to another endpoint (or back to it).
        session = WebhookClient(
            PinnedResolver(allow_private=self.settings.webhook_allow_private_networks),
            timeout_s=self.settings.webhook_timeout_s,
            connect_timeout_s=self.settings.webhook_connect_timeout_s,
            body_limit=RESPONSE_BODY_LIMIT,
        )
        try:
            self._session = session
            self._stopping = False
            unlisten = self.changes.listen(self._endpoint_changed) if self.changes else None
            try:
                while not stop.is_set():
                    news = self.wakeup.is_set()
                    self.wakeup.clear()
                    self.progress.clear()
                    try:
                        claimed = await self.step(refill=news)
                        backoff.reset()
                    except Exception as exc:
                        # Never let the sender die: an outage is waited out, and anything
                        # else is logged loudly and retried at the slowest pace.
                        transient = is_transient(exc)
                        log.log(
                            logging.WARNING if transient else logging.ERROR,
                            "dispatcher_claim_failed",
                            error=repr(exc)[:500] if transient else describe(exc),
                            transient=transient,
                        )
                        if not transient:
                            backoff.attempt = 32
                        await backoff.wait(stop)
                        continue
                    if claimed and self.pauses is not None:
                        await self._pause("claimed")  # claimed, nothing of it sent yet
                    for eid in list(self.slots):
                        self._start_sends(eid)
                    if claimed:
                        continue
                    await wait_any(REFILL_EVERY_S, stop, self.wakeup, self.progress)
            finally:
                if unlisten is not None:
                    unlisten()
                self._stopping = True
                if self.tasks:
                    await asyncio.wait(self.tasks, timeout=self.settings.webhook_timeout_s + 1)
                await self._flush_at_exit()
        finally:
            self._session = None
            await session.close()

    async def _flush_at_exit(self) -> None:
        """Record what finished, give back the unsent claims and the endpoints; what
        cannot be recorded is sent again later (at least once)."""
        unsent = [d["id"] for s in self.slots.values() for d in s.ready]
        for _ in range(3):
            try:
                await self.flush()
                async with self.db.begin() as conn:
                    await self._give_back(conn, unsent, None)
                return
            except Exception as exc:
                log.warning("webhook_record_retry", error=repr(exc)[:500])
                await asyncio.sleep(0.2)
        log.error("webhook_record_gave_up", attempts=len(self.finished))

    async def _give_back(
        self, conn: Any, unsent: Sequence[uuid.UUID], endpoints: Sequence[uuid.UUID] | None
    ) -> None:
        """Clear the leases of these claimed but unsent deliveries and this process's
        ownership of these endpoints (None: of every endpoint it owns), in the caller's
        transaction, so that another dispatcher takes them at once."""
        if unsent:
            await conn.execute(
                webhook_deliveries.update().where(D.id.in_(unsent)).values(claimed_until=None)
            )
        if endpoints is None or endpoints:
            owned = E.owner == self.instance
            await conn.execute(
                webhook_endpoints.update()
                .where(owned if endpoints is None else sa.and_(E.id.in_(endpoints), owned))
                .values(owner=None, owner_until=None)
            )

    def _limit(self, max_in_flight: int | None) -> int:
        return max_in_flight or self.settings.webhook_max_in_flight_per_endpoint

    def _buffer(self, slots: EndpointSlots) -> int:
        """Deliveries to hold claimed (in flight included): what the endpoint takes in
        WEBHOOK_CLAIM_AHEAD_S (or in two passes, if they take longer) at its limit and
        observed latency (`EndpointSlots.pace`, so
        a burst after a quiet spell is claimed at once), at least MIN_AHEAD_ROUNDS times
        its limit, at most WEBHOOK_CLAIM_AHEAD_MAX; and no more than a rate-limited
        endpoint sends within a request timeout, so that none waits here past its lease."""
        limit = self._limit(slots.max_in_flight)
        ahead_s = max(self._ahead_s, 2 * self._pass_s)
        size = max(limit * MIN_AHEAD_ROUNDS, int(slots.pace(limit) * ahead_s))
        size = min(size, max(self._ahead_max, limit))
        if slots.rate is not None:
            size = min(size, max(1, int(slots.rate * self.settings.webhook_timeout_s)))
        slots.ahead = size
        return size

    @staticmethod
    def _owns(slots: EndpointSlots, now: datetime) -> bool:
        return slots.owned_until is not None and slots.owned_until > now

    def _may_own(self, slots: EndpointSlots, owning: int, mono: float) -> bool:
        """Whether to take one more endpoint: while this process owns fewer than its fair
        share (`_quota`), or once nobody took it for UNOWNED_GRACE_S (so an endpoint with
        work is never left unowned while the dispatchers' views of the group differ)."""
        if self._quota is None or owning < self._quota:
            return True
        return slots.waiting_since is not None and mono - slots.waiting_since >= UNOWNED_GRACE_S

    async def _release_excess(self, now: datetime, mono: float) -> None:
        """Give up endpoints beyond this process's fair share, for another dispatcher.

        Chosen ones (the least busy) start no more sends; once their requests ended and
        were recorded, their ownership and the leases of what was claimed but not sent
        are cleared in one transaction, and this process leaves them alone for
        RELEASE_HOLD_S. An excess must last EXCESS_FOR_S first (no churn while counts
        move during a rebalance).
        """
        owned = [(eid, s) for eid, s in self.slots.items() if self._owns(s, now)]
        kept = [(eid, s) for eid, s in owned if not s.releasing]
        excess = 0 if self._quota is None else len(kept) - self._quota
        if excess <= 0:
            self._excess_since = None
        elif self._excess_since is None:
            self._excess_since = mono
        elif mono - self._excess_since >= EXCESS_FOR_S:
            kept.sort(key=lambda item: len(item[1].ready) + item[1].in_flight)
            for _eid, slots in kept[:excess]:
                slots.releasing = True
            self._excess_since = None
        unrecorded = {d["endpoint_id"] for d, _ in self.finished}
        going = [
            eid for eid, s in owned if s.releasing and not s.in_flight and eid not in unrecorded
        ]
        if not going:
            return
        unsent = [d["id"] for eid in going for d in self.slots[eid].ready]
        async with self.db.begin() as conn:
            await self._give_back(conn, unsent, going)
        for eid in going:
            slots = self.slots.pop(eid)
            self.held.difference_update(d["id"] for d in slots.ready)
            self._released[eid] = mono + RELEASE_HOLD_S
            log.info(
                "webhook_endpoint_released",
                endpoint_id=str(eid),
                reason="fair_share",
                quota=self._quota,
                unsent=len(slots.ready),
            )

    @staticmethod
    def _low(slots: EndpointSlots, size: int) -> bool:
        """Whether an endpoint's buffer is due a top-up: fewer than half of `size` claimed
        and unsent, and room for more."""
        return len(slots.ready) < max(1, size // 2) and len(slots.ready) + slots.in_flight < size

    def _start_sends(self, endpoint_id: uuid.UUID) -> None:
        """Start buffered sends of an endpoint up to its limits, while this process owns
        it for longer than a request can take: one task per free slot, which goes on
        with the endpoint's next buffered delivery as each request ends (`_send`)."""
        while (delivery := self._next_send(endpoint_id)) is not None:
            assert self._session is not None
            task = asyncio.create_task(self._send(self._session, delivery))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _next_send(self, endpoint_id: uuid.UUID) -> dict[str, Any] | None:
        """The endpoint's next buffered delivery, taken for a free slot (counted in
        flight), if its limits and this process's ownership let one start now: owned for
        longer than a request can take, the buffer's leases too (otherwise the pass renews
        them first), under `max_in_flight`, a token in a rate-limited endpoint's bucket
        (otherwise a pass is due when the next one is)."""
        slots = self.slots.get(endpoint_id)
        if slots is None or not slots.ready or slots.releasing:
            return None
        if slots.gone or slots.changes != slots.seen:
            self.progress.set()  # a pass reads the endpoint again (or records the 410)
            return None
        if self._stopping or self._session is None:
            return None
        if slots.in_flight >= self._limit(slots.max_in_flight):
            return None
        now = self.clock()
        if slots.owned_until is None or slots.owned_until - now < self._send_margin:
            return None
        if slots.ready[0]["claimed_until"] - now < self._send_margin:
            self.progress.set()  # the pass renews the buffer's leases first
            return None
        if slots.rate is not None:
            if slots.tokens_now(slots.rate, time.monotonic()) < 1:
                asyncio.get_running_loop().call_later(1 / slots.rate, self.progress.set)
                return None
            slots.tokens -= 1
        slots.in_flight += 1
        return slots.ready.popleft()

    async def _refill(self) -> None:
        """Queue the ids of the oldest due deliveries per endpoint (no payloads), of the
        endpoints that no other dispatcher owns.

        An endpoint whose queue still holds QUEUE_KEEP ids keeps it and is left out of the
        read, so a backlog at one (slow) endpoint never crowds out the others' work.
        """
        now = self.clock()
        mono = time.monotonic()
        full = {eid for eid, s in self.slots.items() if len(s.queue) >= QUEUE_KEEP}
        stmt = _due_ids(now, self.instance, full)
        share = self.share()
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
            others = 0
            if share is not None:
                # Only the others' endpoints with due work count: an ownership outlives
                # an endpoint's work (and a crashed dispatcher) by up to a lease, and
                # counting those idle ones raised every quota, so a busy dispatcher
                # kept all its endpoints while a newcomer idled (issue 8).
                others = (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(webhook_endpoints)
                        .where(
                            E.owner != self.instance,
                            E.owner_until >= now,
                            sa.exists().where(
                                D.endpoint_id == E.id,
                                D.status.in_(SENDABLE),
                                D.next_attempt_at <= now,
                            ),
                        )
                    )
                ).scalar_one()
        # Forget idle endpoints (their ownership lapsed), but never a rate-limited one's
        # partly spent bucket.
        for eid in [
            e
            for e, s in self.slots.items()
            if e not in full and s.idle(mono) and (s.owned_until is None or s.owned_until < now)
        ]:
            del self.slots[eid]
        for eid, slots in self.slots.items():
            if eid not in full:
                slots.queue.clear()
        self._released = {e: t for e, t in self._released.items() if t > mono}
        endpoints: dict[Any, uuid.UUID] = {}  # as the driver gives it -> the slots' key
        keys = {eid: eid for eid in self.slots}
        held = self.held
        for delivery_id, raw in rows:
            endpoint_id = endpoints.get(raw)
            if endpoint_id is None:
                endpoint_id = uuid.UUID(str(raw))
                endpoint_id = endpoints[raw] = keys.get(endpoint_id, endpoint_id)
            if delivery_id not in held and endpoint_id not in self._released:
                queued = self.slots.get(endpoint_id)
                if queued is None:
                    queued = self.slots[endpoint_id] = EndpointSlots()
                    keys[endpoint_id] = endpoint_id
                queued.queue.append(delivery_id)
                if queued.owned_until is None and queued.waiting_since is None:
                    queued.waiting_since = mono
        # This process's fair share of the endpoints with work: its share of the
        # dispatchers' Kafka group times those endpoints (its own and the others').
        mine = sum(1 for s in self.slots.values() if s.queue or self._owns(s, now))
        self._quota = None if share is None else math.ceil((mine + others) * share)
        self._refilled_at = mono
        self._drained = False

    async def claim(self, *, refill: bool = False) -> list[dict[str, Any]]:
        """Own endpoints and claim their due deliveries into this process's buffers.

        Returns the deliveries claimed now (with payloads, URL and live secrets); they
        are also queued for sending. The candidates come from the per-endpoint queues
        (refilled from the database when new work was signalled, when a queue ran dry,
        or every REFILL_EVERY_S). An endpoint is claimed for while no other dispatcher
        owns it, and its ownership is renewed while this one has work for it; each
        claimed delivery is leased (`claimed_until`) for as long, and the leases of the
        ones still buffered are renewed with the ownership, so that after a crash both
        lapse and another dispatcher takes over. A buffer is topped up once it is down
        to half of what the endpoint takes in WEBHOOK_CLAIM_AHEAD_S (`_buffer`), so one
        claim covers many deliveries.
        """
        return await self.step(refill=refill, record=False)

    async def step(self, *, refill: bool = False, record: bool = True) -> list[dict[str, Any]]:
        """One pass of the sender: the finished attempts recorded (`record`) and the
        buffers topped up (`claim`) in ONE write transaction, so that on SQLite a pass
        queues once for the single writer. Returns the deliveries claimed now.

        If the database refuses the recording (not an outage), the attempts are recorded
        one by one (`_record_batch`) and the claim waits for the next pass. An outage
        keeps the attempts for the next pass.
        """
        if self.pauses is not None:
            await self._pause("pass")
        started = time.monotonic()
        try:
            return await self._step(refill=refill, record=record)
        finally:
            took = time.monotonic() - started
            self._pass_s += PASS_WEIGHT * (took - self._pass_s)

    async def _step(self, *, refill: bool, record: bool) -> list[dict[str, Any]]:
        if refill or self._drained or time.monotonic() - self._refilled_at >= REFILL_EVERY_S:
            await self._refill()
        now = self.clock()
        mono = time.monotonic()
        await self._release_excess(now, mono)
        batch = self._take_finished(now) if record else []
        unrecorded = {d["endpoint_id"] for d, _ in batch}
        wanted, renewing = self._wanted(now, mono, unrecorded, writing=bool(batch))
        watched = self._watched(mono)
        if not wanted:
            await self._record_batch(batch)
            if watched:
                await self._watch(watched, now)
            return []
        try:
            async with self.db.begin() as conn:
                recorded = await self._record_in(conn, batch) if batch else None
                # After the recording (a 410 or a failing streak may disable an endpoint
                # in it), before the claim (which then claims nothing for one let go).
                if watched:
                    await self._watch_in(conn, watched, now)
                claimed = await self._claim_in(conn, wanted, renewing, now)
        except Exception as exc:
            if not batch:
                raise
            if is_transient(exc):
                self.finished = batch + self.finished
                raise
            await self._record_batch(batch, refused=exc)
            return []
        if recorded is not None:
            recorded()
            self.held.difference_update(d["id"] for d, _ in batch)
        return self._claimed(claimed, now)

    def _endpoint_changed(self, endpoint_id: uuid.UUID) -> None:
        """The API changed this endpoint in this process (`EndpointChanges`): no send to
        it starts until the next pass (woken now) read its row again."""
        slots = self.slots.get(endpoint_id)
        if slots is not None:
            slots.changes += 1
            self.progress.set()

    def _watched(self, mono: float) -> list[uuid.UUID]:
        """The endpoints whose rows a pass reads again (`_watch_in`): those with news of a
        change, and (in one pass every WEBHOOK_GROUP_COMMIT_S at most: a rate-limited
        endpoint's passes come once a token) those with claimed deliveries waiting."""
        every = mono - self._watched_at >= self._commit_s
        watched = [
            eid
            for eid, s in self.slots.items()
            if s.owned_until is not None and ((every and s.ready) or s.gone or s.changes != s.seen)
        ]
        if every and watched:
            self._watched_at = mono
        return watched

    async def _watch(self, endpoint_ids: list[uuid.UUID], now: datetime) -> None:
        """`_watch_in` in a read; in a write transaction only if one is let go."""
        async with self.db.read() as conn:
            let_go = await self._watch_in(conn, endpoint_ids, now, write=False)
        if let_go:
            async with self.db.begin() as conn:
                await self._let_go(conn, let_go, now)

    async def _watch_in(
        self, conn: Any, endpoint_ids: list[uuid.UUID], now: datetime, *, write: bool = True
    ) -> list[uuid.UUID]:
        """Read these endpoints' rows again, so that what is buffered for them is sent as
        they are now (once a pass: README "Webhooks", how soon a change is seen).

        A changed row (its `updated_at` moved: URL, secrets, limits) is what the buffered
        deliveries carry from now on. A disabled or deleted endpoint is let go
        (`_let_go`: what is buffered and queued for it is failed unsent, no attempt
        counted; the requests in flight end and are recorded), here if `write`, else
        returned for the caller to let go. The news read (`EndpointSlots.changes`) is
        taken as seen: later news waits for the next pass."""
        marks = {eid: self.slots[eid].changes for eid in endpoint_ids}
        rows = {
            r.id: r
            for r in (
                await conn.execute(
                    sa.select(
                        E.id,
                        E.status,
                        E.updated_at,
                        E.url,
                        E.secret,
                        E.retired_secrets,
                        E.max_in_flight,
                        E.rate_limit_per_s,
                    ).where(E.id.in_(endpoint_ids))
                )
            ).all()
        }
        let_go = []
        for eid, mark in marks.items():
            slots = self.slots.get(eid)
            if slots is None:
                continue
            row = rows.get(eid)
            if row is None or row.status != EndpointStatus.ENABLED:
                let_go.append(eid)
                continue
            slots.seen = mark
            slots.max_in_flight = row.max_in_flight
            slots.rate = row.rate_limit_per_s
            if row.updated_at != slots.version:
                self._retarget(slots, row, now)
        if let_go and write:
            await self._let_go(conn, let_go, now)
        return let_go

    @staticmethod
    def _retarget(slots: EndpointSlots, row: Any, now: datetime) -> None:
        """An endpoint's row as read now (`updated_at`, `url`, the secrets): the URL and
        live secrets that every delivery buffered for it carries from now on."""
        slots.version = row.updated_at
        slots.target = url, secrets = row.url, live_secrets(row._mapping, now)
        for delivery in slots.ready:
            delivery["url"] = url
            delivery["secrets"] = secrets

    def _wanted(
        self, now: datetime, mono: float, unrecorded: set[uuid.UUID], *, writing: bool = False
    ) -> tuple[list[uuid.UUID], set[uuid.UUID]]:
        """The endpoints to own (or keep owning) and claim for now, and those among them
        whose ownership and buffered leases are due a renewal: any with deliveries buffered,
        in flight, queued, or sent and not recorded yet (`unrecorded`: an ownership that
        lapsed before its attempts were recorded would drop them, and the webhooks would
        go out again). A pass that writes anyway (`writing`: it records attempts) also
        tops up the buffers missing a quarter of their size (`TOP_UP_SHARE`), so that the
        claim rides on the recording's transaction instead of needing one of its own."""
        owning = sum(1 for s in self.slots.values() if self._owns(s, now) and not s.releasing)
        wanted = []
        renewing: set[uuid.UUID] = set()
        for eid, s in self.slots.items():
            if s.releasing:
                continue
            size = self._buffer(s)
            held = self._owns(s, now)
            due = bool(s.queue) and (
                not held
                or self._low(s, size)
                or (writing and size - len(s.ready) - s.in_flight >= max(1, size // TOP_UP_SHARE))
            )
            if due and s.owned_until is None:
                # A new endpoint for this process (not one whose ownership it let lapse).
                if not self._may_own(s, owning, mono):
                    continue
                owning += 1
            # Renewed at half the lease: the ownership, and the leases of the buffered
            # deliveries (the oldest is first in the buffer).
            renew = s.owned_until is not None and (
                s.owned_until - now < self._own / 2
                or (bool(s.ready) and s.ready[0]["claimed_until"] - now < self._own / 2)
            )
            if renew and (s.ready or s.in_flight or s.queue or eid in unrecorded):
                renewing.add(eid)
            if due or eid in renewing:
                wanted.append(eid)
        return wanted, renewing

    async def _claim_in(
        self, conn: Any, wanted: list[uuid.UUID], renewing: set[uuid.UUID], now: datetime
    ) -> _Claim:
        """`claim`'s statements, in the caller's transaction: own the wanted endpoints,
        renew the buffered leases, claim and read their deliveries.

        The new ownership and leases reach this process's buffers only once the
        transaction committed (`_claimed`): rolled back, they would have made it send
        under an ownership the database never gave it."""
        until = now + self._own
        # The news of changes this read covers (`_watch_in`).
        marks = {eid: self.slots[eid].changes for eid in wanted}
        owned = {
            r.id: r
            for r in (
                await conn.execute(
                    webhook_endpoints.update()
                    .where(
                        E.id.in_(sorted(wanted)),
                        E.status == EndpointStatus.ENABLED,
                        sa.or_(E.owner.is_(None), E.owner == self.instance, E.owner_until < now),
                    )
                    .values(owner=self.instance, owner_until=until)
                    .returning(
                        E.id,
                        E.workspace_id,
                        E.url,
                        E.secret,
                        E.retired_secrets,
                        E.rate_limit_per_s,
                        E.max_in_flight,
                        E.failing_since,
                        E.updated_at,
                    )
                )
            ).all()
        }
        others = [eid for eid in wanted if eid not in owned]
        if others:
            await self._let_go(conn, others, now)
        take: dict[uuid.UUID, uuid.UUID] = {}  # delivery id -> its endpoint, oldest first
        kept: list[dict[str, Any]] = []
        for eid, endpoint in owned.items():
            slots = self.slots[eid]
            slots.max_in_flight = endpoint.max_in_flight
            slots.rate = endpoint.rate_limit_per_s
            slots.failing = endpoint.failing_since is not None
            if eid in renewing:
                kept.extend(slots.ready)
            need = self._buffer(slots) - len(slots.ready) - slots.in_flight
            while need > 0 and slots.queue:
                delivery_id = slots.queue.popleft()
                if delivery_id not in self.held:
                    take[delivery_id] = eid
                    need -= 1
            if not slots.queue:
                self._drained = True
        renewed: set[uuid.UUID] = set()
        if kept:
            # The buffered deliveries stay leased as long as their endpoint is owned, but
            # only those whose lease is still this process's own (the value it set): once
            # it lapsed (a stall), another dispatcher may have claimed, sent and recorded
            # one (then given the endpoint up), and it must not go out again from here.
            renewed = set(
                (
                    await conn.execute(
                        webhook_deliveries.update()
                        .where(
                            D.id.in_([d["id"] for d in kept]),
                            D.claimed_until.in_(sorted({d["claimed_until"] for d in kept})),
                            _Unindexed(D.status).in_(SENDABLE),
                        )
                        .values(claimed_until=until)
                        .returning(D.id)
                    )
                ).scalars()
            )
        if not take:
            return _Claim(owned, [], take, until, kept, renewed, marks)
        # One statement claims and reads them (payloads only for what is sent).
        rows = (await conn.execute(_claim_statement(list(take), now, until))).all()
        return _Claim(owned, rows, take, until, kept, renewed, marks)

    def _claimed(self, claim: _Claim, now: datetime) -> list[dict[str, Any]]:
        """Once `_claim_in` committed: the endpoints' new ownership, the renewed leases
        (a buffered delivery whose lease was not renewed is dropped unsent), and what it
        claimed, into the buffers."""
        owned, rows, take, until = claim.owned, claim.rows, claim.take, claim.until
        for eid, endpoint in owned.items():
            slots = self.slots[eid]
            slots.owned_until = until
            slots.waiting_since = None
            slots.seen = claim.marks[eid]
            if endpoint.updated_at != slots.version:
                self._retarget(slots, endpoint, now)
        lost: dict[uuid.UUID, set[uuid.UUID]] = {}
        for delivery in claim.kept:
            if delivery["id"] in claim.renewed:
                delivery["claimed_until"] = until  # wherever it is now (sent meanwhile)
            else:
                lost.setdefault(delivery["endpoint_id"], set()).add(delivery["id"])
        for eid, ids in lost.items():
            slots = self.slots[eid]
            log.warning("webhook_claims_lost", endpoint_id=str(eid), deliveries=len(ids))
            dropped = {d["id"] for d in slots.ready if d["id"] in ids}
            slots.ready = deque(d for d in slots.ready if d["id"] not in ids)
            self.held.difference_update(dropped)
        if not rows:
            return []
        picked: list[dict[str, Any]] = []
        # Oldest first, as the queue had them. Rows are read as plain tuples (by position,
        # in `_claim_in`'s RETURNING order), and each endpoint's values are looked up once
        # per pass, not once per delivery (issue 8: this loop runs for every delivery).
        order = {delivery_id: n for n, delivery_id in enumerate(take)}
        keys = {eid: eid for eid in self.slots}  # the slots' own key objects
        per_endpoint = {
            eid: (
                keys[eid],
                endpoint.workspace_id,
                endpoint.url,
                live_secrets(endpoint._mapping, now),
            )
            for eid, endpoint in owned.items()
        }
        ready = {eid: self.slots[eid].ready for eid in owned}
        held = self.held
        for delivery_id, event_id, event_type, payload, attempts in sorted(
            map(tuple, rows), key=lambda r: order[r[0]]
        ):
            eid, workspace_id, url, secrets = per_endpoint[take[delivery_id]]
            delivery = {
                "id": delivery_id,
                "workspace_id": workspace_id,
                "endpoint_id": eid,  # (an identical key: its lookups skip comparing)
                "event_id": event_id,
                "event_type": event_type,
                "payload": payload if type(payload) is bytes else bytes(payload),
                "attempt_count": attempts,
                "url": url,
                "secrets": secrets,
                "claimed_until": until,
            }
            ready[eid].append(delivery)
            held.add(delivery_id)
            picked.append(delivery)
        return picked

    async def _let_go(self, conn: Any, endpoint_ids: list[uuid.UUID], now: datetime) -> None:
        """Endpoints this process could not own: disabled or deleted ones fail their
        queued deliveries (they wait for `recover`/`retry`); another dispatcher's are
        left to it, and what this one still buffered for them (its ownership lapsed) is
        dropped unsent."""
        statuses = dict(
            (await conn.execute(sa.select(E.id, E.status).where(E.id.in_(endpoint_ids)))).all()
        )
        gone: list[uuid.UUID] = []
        for eid in endpoint_ids:
            slots = self.slots[eid]
            unsent = [d["id"] for d in slots.ready]
            if statuses.get(eid, EndpointStatus.DISABLED) != EndpointStatus.ENABLED:
                gone.extend(slots.queue)
                gone.extend(unsent)
            slots.queue.clear()
            slots.ready.clear()
            slots.owned_until = None
            slots.gone = False
            self.held.difference_update(unsent)
        if gone:
            failed = await conn.execute(
                webhook_deliveries.update()
                .where(D.id.in_(gone), D.status.in_(SENDABLE))
                .values(status=DeliveryStatus.FAILED, completed_at=now, claimed_until=None)
            )
            log.info("webhook_deliveries_failed_endpoint_disabled", count=failed.rowcount)

    async def _send(self, session: WebhookClient, delivery: dict[str, Any]) -> None:
        """Send `delivery`, then the endpoint's next buffered ones while its limits let
        this slot go on (`_next_send`): one task per slot, not one per delivery."""
        endpoint_id = delivery["endpoint_id"]
        next_delivery: dict[str, Any] | None = delivery
        while next_delivery is not None:
            delivery = next_delivery
            try:
                result = await self.attempt(session, delivery)
                if self.pauses is not None:  # (no await per send otherwise)
                    await self._pause("sent")  # sent, the outcome not noted for recording yet
            except _LeaseTooShort:
                self._unsent(delivery)
            except Exception:
                # A bug, not a receiver's failure: the lease lapses and it is sent again.
                log.exception("webhook_send_crashed", delivery_id=str(delivery["id"]))
                self.held.discard(delivery["id"])
            else:
                self.finished.append((delivery, result))
                slots = self.slots.get(endpoint_id)
                if slots is not None:
                    slots.observe(result.latency_ms / 1000, time.monotonic())
                    if classify(result.status_code) is Outcome.GONE:
                        # The endpoint is disabled as this is recorded: no other send
                        # starts meanwhile (README "A disabled endpoint": at once).
                        slots.gone = True
            finally:
                slots = self.slots.get(endpoint_id)
                if slots is not None:
                    slots.in_flight -= 1
                next_delivery = self._next_send(endpoint_id)
                # Wake the loop to record (group commit: once the window since the first
                # unrecorded attempt passed, or when many wait) and to top the buffer up.
                refill = slots is not None and (bool(slots.queue) or self._drained)
                if (
                    len(self.finished) >= self._ahead_max
                    or self._stopping
                    or (slots is not None and slots.gone)
                    or (refill and slots is not None and self._low(slots, slots.ahead))
                ):
                    self.progress.set()
                elif self._commit_timer is None or self._commit_timer.cancelled():
                    self._commit_timer = asyncio.get_running_loop().call_later(
                        self._commit_s, self._commit_due
                    )

    def _lease_left(self, delivery: dict[str, Any]) -> timedelta:
        """How long this process may still be sending `delivery`: the shorter of its
        lease and its endpoint's ownership (zero once either lapsed or was given up)."""
        slots = self.slots.get(delivery["endpoint_id"])
        if slots is None or slots.owned_until is None or slots.releasing:
            return timedelta(0)
        until: datetime = min(slots.owned_until, delivery["claimed_until"])
        return until - self.clock()

    def _unsent(self, delivery: dict[str, Any]) -> None:
        """A delivery taken for sending whose lease ran short first (the process was held
        up between `_start_sends` and the request): back to the front of its buffer, where
        the next pass renews its lease if it is still this process's, or drops it."""
        log.warning("webhook_send_skipped_lease_short", delivery_id=str(delivery["id"]))
        slots = self.slots.get(delivery["endpoint_id"])
        if slots is None:
            self.held.discard(delivery["id"])  # its lease lapses
            return
        slots.ready.appendleft(delivery)  # given back with the buffer, if it comes to that
        self.progress.set()

    def _commit_due(self) -> None:
        self._commit_timer = None
        if self.finished:
            self.progress.set()

    async def flush(self) -> None:
        """Record every finished attempt in one transaction (group commit).

        An outage keeps them for the next pass (until their lease lapses: then the
        delivery is sent again, at least once). If the database refuses the batch, each
        attempt is recorded alone (`record_safely`), so one bad answer holds back no other.
        """
        await self._record_batch(self._take_finished(self.clock()))

    def _take_finished(self, now: datetime) -> list[tuple[dict[str, Any], AttemptResult]]:
        """The finished attempts to record now, taken off `finished` (`_record_in` checks
        that the late ones are still this process's to record)."""
        batch, self.finished = self.finished, []
        return batch

    async def _record_batch(
        self,
        batch: list[tuple[dict[str, Any], AttemptResult]],
        refused: Exception | None = None,
    ) -> None:
        """Record `batch` in one transaction; once the database refused it (`refused`,
        or now), each attempt alone. An outage puts what is left back on `finished`."""
        if not batch:
            return
        if refused is None:
            try:
                await self.record_many(batch)
            except Exception as exc:
                if is_transient(exc):
                    self.finished = batch + self.finished
                    raise
                refused = exc
            else:
                self.held.difference_update(d["id"] for d, _ in batch)
                return
        log.error("webhook_record_batch_refused", error=describe(refused), attempts=len(batch))
        for n, (delivery, result) in enumerate(batch):
            try:
                await self.record_safely(delivery, result)
            except Exception as alone:
                if is_transient(alone):
                    self.finished = batch[n:] + self.finished
                    raise
                log.error(
                    "webhook_record_gave_up",
                    delivery_id=str(delivery["id"]),
                    error=describe(alone),
                )
                self._gone_recorded({delivery["endpoint_id"]})
            self.held.discard(delivery["id"])

    async def record_safely(self, delivery: dict[str, Any], result: AttemptResult) -> None:
        """`record`, falling back to the bare outcome if the database refuses the details.

        A refused statement (not an outage) must not leave the delivery unrecorded: its
        claim would lapse and the same webhook go out again, forever. The bare outcome
        still counts the attempt, so the retry schedule runs on and ends.
        """
        try:
            await self.record(delivery, result)
        except Exception as exc:
            if is_transient(exc):
                raise  # the database is not answering: retried by the caller
            # A refusal, by the one classification every component uses (service.faults).
            log.error(
                "webhook_attempt_details_refused",
                delivery_id=str(delivery["id"]),
                error=describe(exc),
            )
            await self.record(delivery, result.bare())

    async def attempt(self, session: WebhookClient, delivery: dict[str, Any]) -> AttemptResult:
        """One signed POST; never raises for a receiver's failure."""
        started = time.perf_counter()
        body: bytes = delivery["payload"]
        try:
            # Inside the try: a secret that cannot sign (a damaged row) fails this attempt,
            # retried on the schedule, instead of the pass and every endpoint's sends.
            timestamp = int(time.time())
            event_id = delivery["event_id"]
            to = target(delivery["url"], USER_AGENT)
            request = to.request(
                {
                    "webhook-id": event_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature_header(
                        delivery["secrets"], event_id, timestamp, body
                    ),
                },
                body,
            )
            if self._checked.get(delivery["url"], 0.0) <= time.monotonic():
                await self._check(delivery["url"])  # (no coroutine per send while it holds)
            if self.pauses is not None:
                await self._pause("before_post")
            # Checked again right before the request: a stall since `_start_sends` may
            # have let the lease run short, and a successor sends it once it lapsed.
            if self._lease_left(delivery) < self._post_margin:
                raise _LeaseTooShort
            status, headers, answered = await session.post(to, request)
            text = answered.decode("utf-8", "replace")
            retry_after = None
            if status in (429, 503):
                retry_after = parse_retry_after(headers.get("retry-after"), self.clock())
            error = None
            if 300 <= status < 400:
                error = f"redirect to {headers.get('location', '?')} not followed"
            return AttemptResult(status, _ms(started), error, text, retry_after)
        except BlockedDestination as exc:
            return AttemptResult(None, _ms(started), f"blocked: {exc}", None, None)
        except TimeoutError:
            return AttemptResult(None, _ms(started), "timed out", None, None)
        except (OSError, ValueError) as exc:
            return AttemptResult(None, _ms(started), failure_text(exc, delivery["url"]), None, None)

    async def _check(self, url: str) -> None:
        """`check_url` before a send, its passing answer kept for CHECK_TTL_S per URL.

        The client opens each connection through `PinnedResolver` (the host's addresses
        checked again as they are resolved), so a name's connection still goes only to
        checked addresses; a literal IP host always answers the same. A refusal is never
        kept.
        """
        now = time.monotonic()
        if self._checked.get(url, 0.0) > now:
            return
        await check_url(url, allow_private=self.settings.webhook_allow_private_networks)
        if len(self._checked) >= CHECKED_URLS_MAX:
            self._checked = {u: t for u, t in self._checked.items() if t > now}
            if len(self._checked) >= CHECKED_URLS_MAX:
                self._checked.clear()
        self._checked[url] = now + CHECK_TTL_S

    async def record(self, delivery: dict[str, Any], result: AttemptResult) -> None:
        """Store one attempt and decide what happens next, in one transaction."""
        await self.record_many([(delivery, result)])

    async def record_many(self, batch: Sequence[tuple[dict[str, Any], AttemptResult]]) -> None:
        """Store these attempts and decide what happens next, in one transaction.

        Per delivery: the attempt row; the next state (succeeded, a retry scheduled, or
        failed when exhausted or gone) and the lease released; a retry asked for while
        it was in flight makes it due again now. Per endpoint: a success ends its failing
        streak, a 410 disables it, failing too long disables it, with their audit events.
        """
        if not batch:
            return
        async with self.db.begin() as conn:
            recorded = await self._record_in(conn, batch)
        recorded()

    async def _record_in(
        self, conn: Any, batch: Sequence[tuple[dict[str, Any], AttemptResult]]
    ) -> Callable[[], None]:
        """`record_many`'s statements, in the caller's transaction; returns what is to
        be done once it committed (the endpoints' known state, log lines, metrics).

        An attempt whose lease lapsed before it is recorded (a stall, an outage) is
        recorded only if the delivery is still leased as this process leased it: then
        nobody else claimed it meanwhile, so nobody else sent it, and recording it keeps
        it from going out again. Otherwise another dispatcher claimed it (and sends and
        records it): this attempt is dropped with a log line; the webhook went out twice.
        """
        now = self.clock()
        # Endpoints that answered 410: sends to them start again once this is recorded
        # (the endpoint disabled: let go by the pass; a lost lease: nothing recorded).
        gone = {d["endpoint_id"] for d, r in batch if classify(r.status_code) is Outcome.GONE}
        batch = await self._still_ours(conn, batch, now)
        if not batch:
            return functools.partial(self._gone_recorded, gone)
        plans = [_plan(self.policy, self.rng, d, r, now) for d, r in batch]
        disabled: dict[uuid.UUID, DisabledReason] = {}
        # One statement through the driver (service.db.insert_rows), not a dict per row
        # through SQLAlchemy's bind processing.
        await insert_rows(
            conn,
            webhook_attempts,
            [
                _AttemptRow(
                    attempt_id,
                    p.delivery["id"],
                    now,
                    p.result.status_code,
                    p.result.latency_ms,
                    p.result.error,
                    p.result.body,
                )
                for p, attempt_id in zip(plans, new_time_ids(len(plans)), strict=True)
            ],
        )
        # Finished deliveries (most of them: succeeded) differ only in their id: one
        # UPDATE per final status for all of them (the attempt counted in SQL; only the
        # owner records, so that is the count it read plus one). A scheduled retry has
        # its own time: one cached UPDATE run with many parameter sets.
        done: dict[DeliveryStatus, list[uuid.UUID]] = {}
        for p in plans:
            if p.shape == "done":
                done.setdefault(p.values["status"], []).append(p.delivery["id"])
        # A retry asked for while the attempt was in flight (`retry_requested`) makes the
        # delivery due again now. The finished ones' UPDATEs say whether any was asked
        # for (most passes have none, and need no statement for it).
        asked: list[uuid.UUID] = []
        for status, done_ids in done.items():
            finished = await conn.execute(
                webhook_deliveries.update()
                .where(any_of(D.id, done_ids))
                .values(
                    status=status,
                    attempt_count=D.attempt_count + 1,
                    last_attempt_at=now,
                    completed_at=now,
                    claimed_until=None,
                )
                .returning(D.retry_requested)
            )
            if any(finished.scalars()):
                asked.extend(done_ids)
        retrying = [p.params for p in plans if p.params is not None]
        if retrying:
            await conn.execute(_retry_update(), retrying)
            asked.extend(p.delivery["id"] for p in plans if p.shape == "failing")
        requeued: set[uuid.UUID] = set()
        if asked:
            requeued = set(
                (
                    await conn.execute(
                        webhook_deliveries.update()
                        .where(any_of(D.id, asked), D.retry_requested.is_(True))
                        .values(
                            status=DeliveryStatus.PENDING,
                            next_attempt_at=now,
                            completed_at=None,
                            retry_requested=False,
                        )
                        .returning(D.id)
                    )
                ).scalars()
            )
        last: dict[uuid.UUID, _Plan] = {}
        succeeded: set[uuid.UUID] = set()
        for p in plans:
            last[p.delivery["endpoint_id"]] = p
            if p.outcome is Outcome.SUCCESS:
                succeeded.add(p.delivery["endpoint_id"])
        # Only the owner records attempts, so an endpoint it read (at its claim) or
        # left without a failing streak has none to end.
        succeeded = {e for e in succeeded if self._failing(e) is not False}
        if succeeded:
            await conn.execute(
                webhook_endpoints.update()
                .where(E.id.in_(sorted(succeeded)), E.failing_since.is_not(None))
                .values(failing_since=None)
            )
        for eid in sorted({p.delivery["endpoint_id"] for p in plans if p.gone}):
            ws = last[eid].delivery["workspace_id"]
            if await disable_endpoint(
                conn, self.db, ws, eid, DisabledReason.GONE, "the receiver answered 410 Gone"
            ):
                disabled[eid] = DisabledReason.GONE
        exhausted = [_exhausted_record(p) for p in plans if p.exhausted]
        if exhausted:
            await append_events(conn, self.db, exhausted)
        for eid in sorted(last):
            p = last[eid]
            if p.outcome is not Outcome.SUCCESS and await self._note_failure(
                conn, p.delivery["workspace_id"], eid, now
            ):
                disabled[eid] = DisabledReason.FAILING
        for eid in disabled:
            # No send to it starts from now on; the next pass (at once) reads its row
            # (disabled, once this commits: let go) or, rolled back, sends on.
            self._endpoint_changed(eid)

        def committed() -> None:
            self._gone_recorded(gone)
            outcomes: dict[Outcome, int] = {}
            for eid, p in last.items():
                slots = self.slots.get(eid)
                if slots is not None:
                    slots.failing = eid not in disabled and p.outcome is not Outcome.SUCCESS
            # Checked once a batch: a filtered line still cost its fields (issue 8).
            info = log.is_enabled_for(logging.INFO)
            for p in plans:
                outcomes[p.outcome] = outcomes.get(p.outcome, 0) + 1
                _log_outcome(p.delivery, p.values, p.attempts, p.result, p.exhausted, info)
                if p.delivery["id"] in requeued:
                    log.info(
                        "webhook_delivery_retry_requested_requeued",
                        delivery_id=str(p.delivery["id"]),
                    )
            for outcome, count in outcomes.items():
                self.metrics.webhook_attempts.labels(outcome.value).inc(count)
            for eid, reason in disabled.items():
                log.warning("webhook_endpoint_disabled", endpoint_id=str(eid), reason=reason.value)

        return committed

    def _gone_recorded(self, endpoint_ids: set[uuid.UUID]) -> None:
        """These endpoints' 410 answers are recorded (or never will be): their rows changed
        (disabled), so sends wait on until a pass read them again (`_watch_in`)."""
        for eid in endpoint_ids:
            slots = self.slots.get(eid)
            if slots is not None and slots.gone:
                slots.gone = False
                slots.changes += 1

    async def _still_ours(
        self, conn: Any, batch: Sequence[tuple[dict[str, Any], AttemptResult]], now: datetime
    ) -> Sequence[tuple[dict[str, Any], AttemptResult]]:
        """The attempts of `batch` this process may record (`_record_in`). The rows of
        the late ones are locked (PostgreSQL; SQLite's writer holds the file) until the
        transaction ends, so no claim slips in between the check and the recording."""
        late = {d["id"]: d["claimed_until"] for d, _ in batch if d["claimed_until"] <= now}
        if not late:
            return batch
        stmt = sa.select(D.id, D.claimed_until).where(D.id.in_(sorted(late)))
        if not self.db.is_sqlite:
            stmt = stmt.with_for_update()
        leases = dict((await conn.execute(stmt)).all())
        lost = {i for i, until in late.items() if leases.get(i) != until}
        for delivery_id in sorted(lost):
            log.error(
                "webhook_attempt_not_recorded",
                delivery_id=str(delivery_id),
                reason="lease_lost",
            )
        return [(d, r) for d, r in batch if d["id"] not in lost]

    def _failing(self, endpoint_id: uuid.UUID) -> bool | None:
        slots = self.slots.get(endpoint_id)
        return None if slots is None else slots.failing

    async def _note_failure(
        self, conn: Any, workspace_id: uuid.UUID, endpoint_id: uuid.UUID, now: datetime
    ) -> bool:
        """Start or continue the endpoint's failing streak; True if that disabled it."""
        await conn.execute(
            webhook_endpoints.update()
            .where(E.id == endpoint_id, E.failing_since.is_(None))
            .values(failing_since=now)
        )
        since = (
            await conn.execute(sa.select(E.failing_since).where(E.id == endpoint_id))
        ).scalar_one_or_none()
        limit = timedelta(seconds=self.settings.webhook_disable_after_s)
        if since is not None and now - since >= limit:
            return await disable_endpoint(
                conn,
                self.db,
                workspace_id,
                endpoint_id,
                DisabledReason.FAILING,
                f"every delivery failed for {_duration(limit)}",
            )
        return False

    async def _fan_out_isolating(
        self, messages: Sequence[InMessage], dlq: Producer, stop: asyncio.Event
    ) -> bool:
        """Fan a batch out; False if stopped first. Never raises.

        Outages are waited out. A permanent error splits the batch: each event alone, and
        one that still fails is dead-lettered with the reason, so one bad event never
        holds back the others.
        """
        try:
            await self._transient(functools.partial(self.fan_out, messages, dlq), stop)
            return True
        except Stopped:
            return False
        except Exception as exc:
            log.error("webhook_fanout_failed", error=describe(exc), events=len(messages))
        for message in messages:
            try:
                await self._transient(functools.partial(self.fan_out, [message], dlq), stop)
                continue
            except Stopped:
                return False
            except Exception as exc:
                reason = describe(exc)
            log.error(
                "webhook_event_dead_lettered",
                topic=message.topic,
                offset=message.offset,
                reason=reason,
            )
            send = functools.partial(
                send_dead_letters,
                dlq,
                [(message, reason)],
                DLQ_SUFFIX,
                self.metrics.dead_letters_refused,
            )
            source = {"topic": message.topic, "partition": message.partition}
            if not await self._durably(send, stop, **source, offset=message.offset):
                return False
        return True

    def _backoff(self) -> Backoff:
        return Backoff(cap_s=self.settings.retry_max_backoff_s, rng=self.rng, sleep=self.sleep)

    async def _transient(self, work: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
        return await retry_transient(
            work, stop, is_transient, event="dispatcher_transient_error", backoff=self._backoff()
        )

    async def _durably(
        self, work: Callable[[], Awaitable[Any]], stop: asyncio.Event, **about: Any
    ) -> bool:
        """Run ``work`` until it is done or failed for good; False if stopped first. Never
        raises.

        Transient errors are waited out. A permanent error is not retried (the same work
        would fail the same way): it is logged as an error with ``about`` (what the work
        was for), and the caller goes on.
        """
        try:
            await self._transient(work, stop)
        except Stopped:
            return False
        except Exception as exc:
            log.error("dispatcher_work_failed", **about, error=describe(exc), gave_up=True)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Fan-out and sender together, until `stop`."""
        await asyncio.gather(self.run_fanout(stop), self.run_sender(stop))


class _Unindexed(sa.sql.expression.ColumnElement[Any]):
    """A column that the query planner must not choose an index by: on SQLite ``+column``
    (the unary plus, SQLite's documented way to disqualify a term from index use; the
    value is the same), elsewhere the column itself.

    For statements that pick rows by id but also check their state: SQLite chose the
    (status, next_attempt_at) index for ``status IN (...) AND next_attempt_at <= ?``
    over the primary key's for ``id IN (SELECT value FROM json_each(?))``, so every
    claim read every due delivery (the backlog) to take a few hundred of them by id.
    """

    __visit_name__ = "unindexed"
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: sa.ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _unindexed(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_Unindexed, "sqlite")
def _unindexed_sqlite(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


def _due_ids(now: datetime, instance: str, full: set[uuid.UUID]) -> sa.Select[Any]:
    """The ids (and endpoints, as the driver gives them) of the QUEUE_REFILL oldest due,
    unclaimed deliveries of endpoints no other dispatcher owns, but those of the `full`
    endpoints.

    One branch per sendable status, each read in (status, next_attempt_at) index order
    and stopped at QUEUE_REFILL rows, merged: ``status IN (...) ORDER BY next_attempt_at``
    read and sorted every due delivery (the whole backlog, on both databases) to keep the
    first thousand (issue 8: a refill took 30-50 ms at a backlog of 20,000 on PostgreSQL,
    1.5 ms this way).
    """
    branches = []
    for status in SENDABLE:
        branch = (
            # The endpoint as the driver gives it (no conversion per row: it repeats).
            sa.select(
                D.id,
                sa.type_coerce(D.endpoint_id, sa.types.NullType).label("endpoint_id"),
                D.next_attempt_at,
            )
            .select_from(webhook_deliveries.join(webhook_endpoints, E.id == D.endpoint_id))
            .where(
                D.status == status,
                D.next_attempt_at <= now,
                sa.or_(D.claimed_until.is_(None), D.claimed_until < now),
                sa.or_(E.owner.is_(None), E.owner == instance, E.owner_until < now),
            )
            .order_by(D.next_attempt_at)
            .limit(QUEUE_REFILL)
        )
        if full:
            branch = branch.where(D.endpoint_id.not_in(full))
        branches.append(sa.select(branch.subquery()))
    merged = sa.union_all(*branches).subquery()
    return (
        sa.select(merged.c.id, merged.c.endpoint_id)
        .order_by(merged.c.next_attempt_at)
        .limit(QUEUE_REFILL)
    )


def _claim_statement(ids: list[uuid.UUID], now: datetime, until: datetime) -> sa.Update:
    """Lease these deliveries until `until` if they are still due and unclaimed at `now`,
    returning what a send needs of each (id, event id and type, payload, attempt count;
    not the workspace nor the endpoint: the endpoint's row has the one and the claim the
    other, so fewer values a row to convert). By id only (`_Unindexed`)."""
    return (
        webhook_deliveries.update()
        .where(
            any_of(D.id, ids),
            _Unindexed(D.status).in_(SENDABLE),
            _Unindexed(D.next_attempt_at) <= now,
            sa.or_(D.claimed_until.is_(None), D.claimed_until < now),
        )
        .values(claimed_until=until, retry_requested=False)
        .returning(D.id, D.event_id, D.event_type, D.payload, D.attempt_count)
    )


_ENDPOINT_COLUMNS = (
    E.id,
    E.workspace_id,
    E.event_types,
    E.url,
    E.secret,
    E.retired_secrets,
    E.status,
    E.updated_at,
)
"""What the fan-out reads of an endpoint: its routing, its status (a disabled one's
delivery is written failed), and what a handed-over send needs (with the row's
`updated_at`: the newer of this read and the sender's is sent)."""


def _header_type(message: InMessage) -> str | None:
    """The event type in a record's ``ce_type`` header (set by the relay), or None."""
    for name, value in message.headers:
        if name == TYPE_HEADER:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


class _TypedEvent(BaseModel):
    """A CloudEvent of a type this service sends as a webhook, read in one go with its data
    typed (the subclasses): it accepts what `CloudEvent` accepts and `webhook_body` then
    takes, so the body is built from it without validating the data again
    (`_typed_body`). Anything else is read the general way."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = SOURCE
    type: str
    time: AwareDatetime  # (webhook_body refuses a time without an offset)
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: ContactDeleted | DeletionJobCompleted


class _ContactDeletedEvent(_TypedEvent):
    type: Literal["contact.deleted"]
    data: ContactDeleted


class _JobCompletedEvent(_TypedEvent):
    type: Literal["deletion_job.completed"]
    data: DeletionJobCompleted


_TYPED_EVENTS: dict[str, tuple[type[_TypedEvent], type[BaseModel]]] = {
    TYPE_CONTACT_DELETED: (_ContactDeletedEvent, ContactDeletedWebhook),
    TYPE_JOB_COMPLETED: (_JobCompletedEvent, DeletionJobCompletedWebhook),
}
"""By the ``ce_type`` header: how to read the event, and its webhook body's model."""


def _typed_body(event: _TypedEvent) -> bytes:
    """The same bytes as ``webhook_body(event.type, event.time, data)`` for the event read
    the general way (tests/unit/test_fanout_encoding.py): the data is already valid."""
    model = _TYPED_EVENTS[event.type][1]
    payload = model.model_construct(
        type=event.type, timestamp=event.time.astimezone(UTC), data=event.data
    )
    return payload.model_dump_json().encode("utf-8")


class _RoutingData(BaseModel):
    workspace_id: uuid.UUID


class _Routing(BaseModel):
    """What routes an event to endpoints, read from its CloudEvent JSON without the rest
    of its data (the fan-out reads the whole event only when it has an endpoint to go to).
    The same fields `CloudEvent` requires for a delivery: id, type, time, data.workspace_id."""

    id: str
    type: str
    time: datetime
    data: _RoutingData


class _AttemptRow(NamedTuple):
    """An attempt's row as `_record_in` inserts it: the field names are the columns."""

    id: uuid.UUID
    delivery_id: uuid.UUID
    attempted_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    response_body: str | None


class _LeaseTooShort(Exception):
    """A request was about to start with less of its lease left than it can take."""


@dataclass(frozen=True)
class _Claim:
    """What one claim wrote, applied to the buffers once committed (`_claimed`): the
    endpoints owned until `until` (their rows), the deliveries claimed (rows: id, event
    id, event type, payload, attempt count) out of the ids tried (`take`, oldest first,
    each with its endpoint), the buffered deliveries whose leases were to be renewed
    (`kept`) and the ids of those whose lease was."""

    owned: dict[uuid.UUID, Any]
    rows: list[Any]
    take: dict[uuid.UUID, uuid.UUID]
    until: datetime
    kept: list[dict[str, Any]]
    renewed: set[uuid.UUID]
    marks: dict[uuid.UUID, int]  # the endpoints' news of changes as the rows were read


class _Plan(NamedTuple):
    """What recording one attempt writes: the delivery's next state (`done`: in one
    UPDATE per final status; `failing`: as parameters of the retry UPDATE), and what the
    endpoint and the log are told. (A tuple: one is made per attempt recorded.)"""

    delivery: dict[str, Any]
    result: AttemptResult
    outcome: Outcome
    attempts: int
    values: dict[str, Any]
    exhausted: bool
    shape: str  # "done" (succeeded or failed) | "failing" (a retry is scheduled)
    params: dict[str, Any] | None  # the retry UPDATE's parameters ("failing" only)

    @property
    def gone(self) -> bool:
        return self.outcome is Outcome.GONE


def _plan(
    policy: RetryPolicy,
    rng: random.Random,
    delivery: dict[str, Any],
    result: AttemptResult,
    now: datetime,
) -> _Plan:
    outcome = classify(result.status_code)
    attempts = delivery["attempt_count"] + 1
    exhausted = False
    values: dict[str, Any]
    if outcome is Outcome.SUCCESS:
        values = {"status": DeliveryStatus.SUCCEEDED, "completed_at": now}
    elif outcome is Outcome.GONE:
        values = {"status": DeliveryStatus.FAILED, "completed_at": now}
    else:
        delay = policy.next_delay(attempts, rng, result.retry_after_s)
        if delay is None:
            exhausted = True
            values = {"status": DeliveryStatus.FAILED, "completed_at": now}
        else:
            values = {
                "status": DeliveryStatus.FAILING,
                "next_attempt_at": now + timedelta(seconds=delay),
            }
    if "next_attempt_at" not in values:
        return _Plan(delivery, result, outcome, attempts, values, exhausted, "done", None)
    params = {
        "d_id": delivery["id"],
        "d_status": values["status"].value,
        "d_attempts": attempts,
        "d_last": now,
        "d_when": values["next_attempt_at"],
    }
    return _Plan(delivery, result, outcome, attempts, values, exhausted, "failing", params)


@functools.cache
def _retry_update() -> sa.Update:
    """The UPDATE of one delivery whose retry is scheduled, run once per batch with many
    parameter sets (`_Plan.params`).

    The attempt is counted whatever happened meanwhile, but the retry is scheduled only
    for a delivery still sendable: one its endpoint's deletion or disabling failed while
    the attempt was in flight stays failed (it used to come back `failing`, for an
    endpoint that no longer took sends, and sit in the backlog for good)."""
    sendable = D.status.in_(SENDABLE)
    return (
        webhook_deliveries.update()
        .where(D.id == sa.bindparam("d_id", type_=D.id.type))
        .values(
            {
                D.status: sa.case(
                    (sendable, sa.bindparam("d_status", type_=D.status.type)), else_=D.status
                ),
                D.attempt_count: sa.bindparam("d_attempts", type_=D.attempt_count.type),
                D.last_attempt_at: sa.bindparam("d_last", type_=D.last_attempt_at.type),
                D.next_attempt_at: sa.case(
                    (sendable, sa.bindparam("d_when", type_=D.next_attempt_at.type)),
                    else_=D.next_attempt_at,
                ),
                D.claimed_until: None,
            }
        )
    )


def _exhausted_record(p: _Plan) -> AuditRecord:
    return AuditRecord(
        workspace_id=p.delivery["workspace_id"],
        actor={"type": "system", "id": "dispatcher"},
        action="webhook.delivery.exhausted",
        target={"type": "webhook_delivery", "id": str(p.delivery["id"])},
        data={
            "endpoint_id": str(p.delivery["endpoint_id"]),
            "event_id": p.delivery["event_id"],
            "event_type": p.delivery["event_type"],
            "attempts": p.attempts,
            "last_status_code": p.result.status_code,
            "last_error": p.result.error,
        },
    )


def _log_outcome(
    delivery: dict[str, Any],
    values: dict[str, Any],
    attempts: int,
    result: AttemptResult,
    exhausted: bool,
    info: bool = True,
) -> None:
    """One line per attempt's outcome: ids, codes and timing, never the URL or payload.
    `info`: whether INFO lines are written (a success or a scheduled retry is an INFO
    line; when they are filtered out, nothing is built for them)."""
    status = values.get("status")
    if not info and status in (DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILING):
        return
    fields = {
        "delivery_id": str(delivery["id"]),
        "endpoint_id": str(delivery["endpoint_id"]),
        "event_id": delivery["event_id"],
        "event_type": delivery["event_type"],
        "attempt": attempts,
        "status_code": result.status_code,
        "latency_ms": round(result.latency_ms, 1),
    }
    if status == DeliveryStatus.SUCCEEDED:
        log.info("webhook_delivery_succeeded", **fields)
    elif status == DeliveryStatus.FAILING:
        log.info(
            "webhook_delivery_retry_scheduled",
            **fields,
            error=_error_kind(result),
            next_attempt_at=iso(values["next_attempt_at"]),
        )
    elif exhausted:
        log.warning("webhook_delivery_exhausted", **fields, error=_error_kind(result))
    else:
        log.warning("webhook_delivery_failed", **fields, error=_error_kind(result))


def _error_kind(result: AttemptResult) -> str | None:
    """A short kind of what went wrong; a transport error's text may name the host."""
    if result.error is None:
        return f"http_{result.status_code}" if result.status_code is not None else None
    if result.error.startswith("blocked"):
        return "blocked"
    if result.error == "timed out":
        return "timeout"
    if result.error.startswith("redirect"):
        return "redirect"
    return result.error.split(":", 1)[0]


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def _unknown_share() -> float | None:
    """No group to go by (the fan-out consumer is not running): no fair share."""
    return None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
