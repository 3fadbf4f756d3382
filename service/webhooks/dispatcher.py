"""The webhook dispatcher: fans events out to endpoints, then sends due deliveries.

Two loops share one process:

- **fan-out** consumes `contact.deleted` and `deletion_job.completed` and writes one
  delivery row per event and matching endpoint (a unique constraint makes a repeated
  event a no-op), then commits the offsets.
- **sender** claims due deliveries (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so several
  dispatchers can share the work), sends each as a signed Standard Webhooks POST, stores
  the attempt, and schedules the retry or finishes the delivery.

A slow receiver holds only its own endpoint's slots (default 4 in flight): deliveries of a
saturated endpoint are not claimed, so they never queue in front of other endpoints'.
Retries are rows with a `next_attempt_at`, not sleeps holding a Kafka partition.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import sqlalchemy as sa
from pydantic import ValidationError

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
    new_id,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.events import DLQ_SUFFIX, TOPIC_CONTACT_DELETED, TOPIC_JOB_COMPLETED, CloudEvent
from service.faults import describe, is_transient
from service.kafka import (
    Consumer,
    InMessage,
    OutMessage,
    Producer,
    dead_letter,
    next_offsets,
)
from service.limits import storable
from service.logs import get_logger
from service.metrics import Metrics
from service.timefmt import iso
from service.webhooks.models import SENDABLE, DeliveryStatus, DisabledReason, EndpointStatus
from service.webhooks.payloads import webhook_body
from service.webhooks.schedule import Outcome, RetryPolicy, classify, parse_retry_after
from service.webhooks.signing import webhook_headers
from service.webhooks.ssrf import BlockedDestination, PinnedResolver, check_url, failure_text
from service.webhooks.store import disable_endpoint, enqueue, live_secrets

log = get_logger(__name__)
T = TypeVar("T")

USER_AGENT = "contact-deletion-webhooks/0.1 (+https://github.com/contact-deletion)"
RESPONSE_BODY_LIMIT = 4096
CLAIM_BATCH = 200
D = webhook_deliveries.c
E = webhook_endpoints.c


@dataclass
class EndpointSlots:
    """In-flight count and optional rate limit of one endpoint, in this process."""

    in_flight: int = 0
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def has_token(self, rate: float | None, now: float) -> bool:
        if rate is None:
            return True
        self.tokens = min(max(rate, 1.0), self.tokens + (now - self.updated) * rate)
        self.updated = now
        return self.tokens >= 1.0


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
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.wakeup = wakeup or asyncio.Event()
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.policy = RetryPolicy(settings.retry_schedule)
        self.slots: dict[uuid.UUID, EndpointSlots] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.topics = [settings.topic(TOPIC_CONTACT_DELETED), settings.topic(TOPIC_JOB_COMPLETED)]

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
        )
        dlq = Producer(bootstrap)
        try:
            await wait_for_dependency(
                consumer.start, stop, dependency="kafka", component="dispatcher"
            )
        except Stopped:
            return
        try:
            await wait_for_dependency(dlq.start, stop, dependency="kafka", component="dispatcher")
            while not stop.is_set():
                messages = await self._transient(
                    functools.partial(consumer.getmany, timeout_ms=200, max_records=500), stop
                )
                if not messages:
                    continue
                if not await self._fan_out_isolating(messages, dlq, stop):
                    break
                # A refused commit (the partition moved) is logged and skipped inside.
                await self._transient(
                    functools.partial(consumer.commit, next_offsets(messages)), stop
                )
                self.wakeup.set()
        except Stopped:
            pass
        finally:
            await consumer.stop()
            await dlq.stop()

    async def fan_out(self, messages: Sequence[InMessage], dlq: Producer) -> int:
        """Write the deliveries of these events (idempotent); dead-letter malformed ones."""
        events: list[CloudEvent] = []
        poison: list[OutMessage] = []
        for m in messages:
            try:
                event = CloudEvent.model_validate_json(m.value)
                uuid.UUID(str(event.data["workspace_id"]))
                events.append(event)
            except (ValidationError, ValueError, KeyError) as exc:
                log.error("webhook_event_dead_lettered", topic=m.topic, offset=m.offset)
                poison.append(dead_letter(m, str(exc), DLQ_SUFFIX))
        if poison:
            await dlq.send_many(poison)
        created = 0
        if not events:
            return 0
        workspace_ids = {uuid.UUID(str(e.data["workspace_id"])) for e in events}
        # Read first: most events have no endpoint to go to, and then nothing is written.
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(E.id, E.workspace_id, E.event_types).where(
                        E.workspace_id.in_(workspace_ids), E.status == EndpointStatus.ENABLED
                    )
                )
            ).all()
        planned = []
        for event in events:
            ws = uuid.UUID(str(event.data["workspace_id"]))
            targets = [
                r.id
                for r in rows
                if r.workspace_id == ws and (not r.event_types or event.type in r.event_types)
            ]
            if targets:
                planned.append((event, ws, targets))
        if not planned:
            return 0
        async with self.db.begin() as conn:
            for event, ws, targets in planned:
                created += await enqueue(
                    conn,
                    self.db,
                    workspace_id=ws,
                    endpoint_ids=targets,
                    event_id=event.id,
                    event_type=event.type,
                    payload=webhook_body(event.type, event.time, event.data),
                )
        return created

    # -- sender -------------------------------------------------------------------------

    async def run_sender(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self.settings.webhook_timeout_s,
            connect=self.settings.webhook_connect_timeout_s,
        )
        connector = aiohttp.TCPConnector(
            resolver=PinnedResolver(allow_private=self.settings.webhook_allow_private_networks),
            limit=0,
            ttl_dns_cache=10,
        )
        backoff = self._backoff()
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False
        ) as session:
            try:
                while not stop.is_set():
                    try:
                        claimed = await self.claim()
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
                    for row in claimed:
                        task = asyncio.create_task(self._send(session, row))
                        self.tasks.add(task)
                        task.add_done_callback(self._done)
                    if len(claimed) < CLAIM_BATCH:
                        self.wakeup.clear()
                        await wait_any(0.5, stop, self.wakeup)
            finally:
                if self.tasks:
                    await asyncio.wait(self.tasks, timeout=self.settings.webhook_timeout_s + 1)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.wakeup.set()  # a slot is free

    def _saturated(self, limit: int) -> set[uuid.UUID]:
        return {eid for eid, s in self.slots.items() if s.in_flight >= limit}

    async def claim(self) -> list[dict[str, Any]]:
        """Claim due deliveries of endpoints with free slots; marks them claimed for a while."""
        limit = self.settings.webhook_max_in_flight_per_endpoint
        now = utcnow()
        # A request ends within the timeout, so a claim older than that plus a margin
        # belongs to a dispatcher that died: another one may send it again.
        lease = now + timedelta(seconds=self.settings.webhook_timeout_s + 10)
        saturated = self._saturated(limit)
        stmt = (
            sa.select(
                D.id,
                D.workspace_id,
                D.endpoint_id,
                D.event_id,
                D.event_type,
                D.payload,
                D.attempt_count,
                D.created_at,
            )
            .where(
                D.status.in_(SENDABLE),
                D.next_attempt_at <= now,
                sa.or_(D.claimed_until.is_(None), D.claimed_until < now),
            )
            .order_by(D.next_attempt_at)
            .limit(CLAIM_BATCH * 2)
        )
        if saturated:
            stmt = stmt.where(D.endpoint_id.not_in(saturated))
        async with self.db.begin() as conn:
            candidates = (await conn.execute(self.db.for_update(stmt, skip_locked=True))).all()
            if not candidates:
                return []
            endpoint_ids = {c.endpoint_id for c in candidates}
            endpoints = {
                r.id: r
                for r in (
                    await conn.execute(sa.select(webhook_endpoints).where(E.id.in_(endpoint_ids)))
                ).all()
            }
            picked: list[dict[str, Any]] = []
            gone: list[uuid.UUID] = []
            taken: dict[uuid.UUID, int] = {}
            mono = time.monotonic()
            for c in candidates:
                endpoint = endpoints.get(c.endpoint_id)
                if endpoint is None or endpoint.status != EndpointStatus.ENABLED:
                    gone.append(c.id)
                    continue
                slots = self.slots.setdefault(c.endpoint_id, EndpointSlots())
                if slots.in_flight + taken.get(c.endpoint_id, 0) >= limit:
                    continue
                if not slots.has_token(endpoint.rate_limit_per_s, mono):
                    continue
                if endpoint.rate_limit_per_s is not None:
                    slots.tokens -= 1
                taken[c.endpoint_id] = taken.get(c.endpoint_id, 0) + 1
                picked.append(
                    {
                        "id": c.id,
                        "workspace_id": c.workspace_id,
                        "endpoint_id": c.endpoint_id,
                        "event_id": c.event_id,
                        "event_type": c.event_type,
                        "payload": bytes(c.payload),
                        "attempt_count": c.attempt_count,
                        "url": endpoint.url,
                        "secrets": live_secrets(endpoint._mapping, now),
                    }
                )
                if len(picked) >= CLAIM_BATCH:
                    break
            if gone:
                # The endpoint was deleted or disabled: these wait for `recover`/`retry`.
                await conn.execute(
                    webhook_deliveries.update()
                    .where(D.id.in_(gone))
                    .values(status=DeliveryStatus.FAILED, completed_at=now)
                )
                log.info("webhook_deliveries_failed_endpoint_disabled", count=len(gone))
            if picked:
                await conn.execute(
                    webhook_deliveries.update()
                    .where(D.id.in_([p["id"] for p in picked]))
                    .values(claimed_until=lease)
                )
        for p in picked:
            self.slots[p["endpoint_id"]].in_flight += 1
        return picked

    async def _send(self, session: aiohttp.ClientSession, delivery: dict[str, Any]) -> None:
        try:
            result = await self.attempt(session, delivery)
            await self._retry_db(lambda: self.record_safely(delivery, result))
        except Exception:
            log.exception("webhook_send_crashed", delivery_id=str(delivery["id"]))
        finally:
            self.slots[delivery["endpoint_id"]].in_flight -= 1

    async def _retry_db(self, work: Any) -> None:
        backoff = self._backoff()
        for _ in range(20):
            try:
                await work()
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("webhook_record_retry", error=repr(exc)[:500])
                await backoff.sleep(backoff.next_delay(), asyncio.Event())
        # The claim lease runs out and another pass sends it again: at least once.
        log.error("webhook_record_gave_up", delivery_id="unknown")

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

    async def attempt(
        self, session: aiohttp.ClientSession, delivery: dict[str, Any]
    ) -> AttemptResult:
        """One signed POST; never raises for a receiver's failure."""
        started = time.perf_counter()
        body: bytes = delivery["payload"]
        headers = webhook_headers(
            delivery["secrets"], delivery["event_id"], int(time.time()), body, USER_AGENT
        )
        try:
            await check_url(
                delivery["url"], allow_private=self.settings.webhook_allow_private_networks
            )
            async with session.post(
                delivery["url"], data=body, headers=headers, allow_redirects=False
            ) as response:
                text = (await response.content.read(RESPONSE_BODY_LIMIT)).decode("utf-8", "replace")
                retry_after = None
                if response.status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("Retry-After"), utcnow())
                error = None
                if 300 <= response.status < 400:
                    error = f"redirect to {response.headers.get('Location', '?')} not followed"
                return AttemptResult(response.status, _ms(started), error, text, retry_after)
        except BlockedDestination as exc:
            return AttemptResult(None, _ms(started), f"blocked: {exc}", None, None)
        except TimeoutError:
            return AttemptResult(None, _ms(started), "timed out", None, None)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return AttemptResult(None, _ms(started), failure_text(exc, delivery["url"]), None, None)

    async def record(self, delivery: dict[str, Any], result: AttemptResult) -> None:
        """Store the attempt and decide what happens next, in one transaction."""
        now = utcnow()
        outcome = classify(result.status_code)
        attempts = delivery["attempt_count"] + 1
        self.metrics.webhook_attempts.labels(outcome.value).inc()
        values: dict[str, Any] = {
            "attempt_count": attempts,
            "last_attempt_at": now,
            "claimed_until": None,
        }
        exhausted = False
        if outcome is Outcome.SUCCESS:
            values |= {"status": DeliveryStatus.SUCCEEDED, "completed_at": now}
        elif outcome is Outcome.GONE:
            values |= {"status": DeliveryStatus.FAILED, "completed_at": now}
        else:
            delay = self.policy.next_delay(attempts, self.rng, result.retry_after_s)
            if delay is None:
                exhausted = True
                values |= {"status": DeliveryStatus.FAILED, "completed_at": now}
            else:
                values |= {
                    "status": DeliveryStatus.FAILING,
                    "next_attempt_at": now + timedelta(seconds=delay),
                }
        disabled: DisabledReason | None = None
        async with self.db.begin() as conn:
            await conn.execute(
                webhook_attempts.insert().values(
                    id=new_id(),
                    delivery_id=delivery["id"],
                    attempted_at=now,
                    status_code=result.status_code,
                    latency_ms=result.latency_ms,
                    error=result.error,
                    response_body=result.body,
                )
            )
            await conn.execute(
                webhook_deliveries.update().where(D.id == delivery["id"]).values(**values)
            )
            ws, eid = delivery["workspace_id"], delivery["endpoint_id"]
            if outcome is Outcome.SUCCESS:
                await conn.execute(
                    webhook_endpoints.update()
                    .where(E.id == eid, E.failing_since.is_not(None))
                    .values(failing_since=None)
                )
            elif outcome is Outcome.GONE and await disable_endpoint(
                conn, self.db, ws, eid, DisabledReason.GONE, "the receiver answered 410 Gone"
            ):
                disabled = DisabledReason.GONE
            if outcome is not Outcome.SUCCESS and exhausted:
                await append_events(
                    conn,
                    self.db,
                    [
                        AuditRecord(
                            workspace_id=ws,
                            actor={"type": "system", "id": "dispatcher"},
                            action="webhook.delivery.exhausted",
                            target={"type": "webhook_delivery", "id": str(delivery["id"])},
                            data={
                                "endpoint_id": str(eid),
                                "event_id": delivery["event_id"],
                                "event_type": delivery["event_type"],
                                "attempts": attempts,
                                "last_status_code": result.status_code,
                                "last_error": result.error,
                            },
                        )
                    ],
                )
            if outcome is not Outcome.SUCCESS and await self._note_failure(conn, ws, eid, now):
                disabled = DisabledReason.FAILING
        _log_outcome(delivery, values, attempts, result, exhausted)
        if disabled is not None:
            log.warning("webhook_endpoint_disabled", endpoint_id=str(eid), reason=disabled.value)

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
            copy = dead_letter(message, reason, DLQ_SUFFIX)
            if not await self._durably(functools.partial(dlq.send_many, [copy]), stop):
                return False
        return True

    def _backoff(self) -> Backoff:
        return Backoff(cap_s=self.settings.retry_max_backoff_s, rng=self.rng, sleep=self.sleep)

    async def _transient(self, work: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
        return await retry_transient(
            work, stop, is_transient, event="dispatcher_transient_error", backoff=self._backoff()
        )

    async def _durably(self, work: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> bool:
        """Run ``work`` until it is done; False if stopped first. Never raises.

        Transient errors are waited out. A permanent error is logged and the same work is
        retried at the slowest pace, so the process stays up (and says so in its log).
        """
        backoff = self._backoff()
        while True:
            try:
                await self._transient(work, stop)
                return True
            except Stopped:
                return False
            except Exception as exc:
                log.error("dispatcher_work_failed", error=describe(exc), exception=repr(exc)[:500])
                backoff.attempt = 32
                await backoff.wait(stop)
                if stop.is_set():
                    return False

    async def run(self, stop: asyncio.Event) -> None:
        """Fan-out and sender together, until `stop`."""
        await asyncio.gather(self.run_fanout(stop), self.run_sender(stop))


def _log_outcome(
    delivery: dict[str, Any],
    values: dict[str, Any],
    attempts: int,
    result: AttemptResult,
    exhausted: bool,
) -> None:
    """One line per attempt's outcome: ids, codes and timing, never the URL or payload."""
    fields = {
        "delivery_id": str(delivery["id"]),
        "endpoint_id": str(delivery["endpoint_id"]),
        "event_id": delivery["event_id"],
        "event_type": delivery["event_type"],
        "attempt": attempts,
        "status_code": result.status_code,
        "latency_ms": round(result.latency_ms, 1),
    }
    status = values.get("status")
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


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
