"""Composition root: the HTTP app factory and the components that `run` starts.

Nothing is built at import time; `create_app(settings, db)` wires the HTTP side and
`run_components` starts any of api, relay, worker and dispatcher in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from service import ops
from service.aio import Stopped, wait_for_dependency
from service.api import route_tables
from service.audit import routes as audit_routes
from service.config import Settings, StartupError
from service.console import routes as console_routes
from service.db import Database, outbox
from service.deletion import routes as deletion_routes
from service.deletion.notify import JobNotifier
from service.deletion.worker import DeletionWorker
from service.http import (
    DB_KEY,
    RATE_LIMITER_KEY,
    SETTINGS_KEY,
    RateLimiter,
    edge_headers,
    edge_middleware,
    encode_json,
)
from service.httpserver import EnvelopeRunner
from service.kafka import Producer
from service.logs import get_logger
from service.metrics import Metrics
from service.relay import Relay
from service.retention import run_retention
from service.routing import register
from service.schemas import openapi_spec
from service.topics import all_topics, create_topics
from service.watch import KAFKA_COMPONENTS, broker_watch
from service.webhooks import routes as webhook_routes
from service.webhooks.changes import EndpointChanges
from service.webhooks.dispatcher import Dispatcher

log = get_logger(__name__)

# How long one start-up try to reach the broker and create the topics lasts (seconds).
TOPICS_TRY_S = 2.0


@dataclass
class Services:
    """The long-lived resources of one process, shared by its components."""

    settings: Settings
    db: Database
    metrics: Metrics = field(default_factory=Metrics)
    # In-process signals: "a job finished" (for Prefer: wait) and "the outbox has rows".
    notifier: JobNotifier = field(default_factory=JobNotifier)
    outbox_signal: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_signal: asyncio.Event = field(default_factory=asyncio.Event)
    # "This endpoint changed through the API": the dispatcher stops sending from what it
    # read of it before the API answers.
    webhook_changes: EndpointChanges = field(default_factory=EndpointChanges)
    # Components still waiting for a dependency at start-up (name -> what), for /readyz.
    waiting: dict[str, str] = field(default_factory=dict)
    # Set once the HTTP API listens (`dev` prints its banner then, not before).
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    _topics_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _topics_ready: bool = False

    async def ensure_topics(self) -> None:
        """Create the Kafka topics once per process, whichever component asks first."""
        async with self._topics_lock:
            if not self._topics_ready:
                # A short try: a broker that does not answer is waited for by the caller
                # (wait_for_dependency), which logs `waiting_for_dependency` at each try.
                await create_topics(self.settings, timeout_s=TOPICS_TRY_S)
                self._topics_ready = True

    async def close(self) -> None:
        await self.db.dispose()


def create_app(services: Services) -> web.Application:
    """The HTTP API as an aiohttp application."""
    settings = services.settings
    app = web.Application(
        middlewares=[services.metrics.middleware, edge_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app.on_response_prepare.append(edge_headers)
    app[SETTINGS_KEY] = settings
    app[DB_KEY] = services.db
    app[RATE_LIMITER_KEY] = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app[ops.METRICS_KEY] = services.metrics
    app[ops.WAITING_KEY] = services.waiting
    app[deletion_routes.NOTIFIER_KEY] = services.notifier
    app[deletion_routes.OUTBOX_SIGNAL_KEY] = services.outbox_signal
    app[webhook_routes.WEBHOOK_SIGNAL_KEY] = services.webhook_signal
    app[webhook_routes.WEBHOOK_CHANGES_KEY] = services.webhook_changes
    audit_routes.add_state(app)
    tables = route_tables()
    app[ops.OPENAPI_KEY] = encode_json(openapi_spec(tables))
    register(app, tables)
    console_routes.add_asset_routes(app)
    return app


# What a process serves on OPS_PORT: the probes and its own counters, nothing else.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_ops_app(services: Services) -> web.Application:
    """`GET /healthz`, `/readyz` and `/metrics` alone, as the api serves them (the same
    routes and error envelope), for a process that runs a relay, worker or dispatcher: its
    liveness and readiness probes and its own Prometheus counters."""
    app = web.Application(middlewares=[services.metrics.middleware, edge_middleware])
    app.on_response_prepare.append(edge_headers)
    app[SETTINGS_KEY] = services.settings
    app[DB_KEY] = services.db
    app[ops.METRICS_KEY] = services.metrics
    app[ops.WAITING_KEY] = services.waiting
    register(app, [tuple(op for op in ops.ROUTES if op.path in OPS_PATHS)])
    return app


async def _serve(
    app: web.Application,
    metrics: Metrics,
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    setting: str,
    event: str,
    listening: asyncio.Event | None = None,
) -> None:
    """Serve `app` on host:port until `stop` is set; `event` is logged with the port bound
    (a port of 0 asks the system for a free one) and `listening` set once it is bound. An
    address it cannot listen on is a StartupError naming `setting` (HTTP_PORT or OPS_PORT)."""
    runner = EnvelopeRunner(app, metrics)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:  # in use, not an address of this host, a name that resolves not
        await runner.cleanup()
        raise StartupError(_cannot_listen(host, port, setting, exc)) from None
    if listening is not None:
        listening.set()
    bound = [address[1] for address in runner.addresses if isinstance(address, tuple)]
    log.info(event, host=host, port=bound[0] if bound else port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _cannot_listen(host: str, port: int, setting: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot listen on HTTP_HOST={host} {setting}={port}: {reason}"


def listen_problem(settings: Settings, names: Sequence[str]) -> str | None:
    """Why the named components could not listen where the settings say (HTTP_PORT for
    the api, OPS_PORT when set), found before anything starts: the one-line start-up
    error (``StartupError``) the bind itself would give, or None.

    Each address the host resolves to is bound and released at once, as the server would
    bind it (``SO_REUSEADDR``, IPv6 only on IPv6): a port in use, an address not of this
    host and a name that does not resolve are caught before `run` migrates or `dev` starts
    a broker. The server's own bind stays the authority (something may take the port in
    between); this only moves the common failures ahead of any other work.
    """
    wanted = [("HTTP_PORT", settings.http_port)] if "api" in names else []
    if settings.ops_port is not None:
        wanted.append(("OPS_PORT", settings.ops_port))
    host = settings.http_host
    for setting, port in wanted:
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(address)
        except OSError as exc:
            return _cannot_listen(host, port, setting, exc)
    return None


async def run_api(services: Services, stop: asyncio.Event) -> None:
    """Serve the HTTP API until `stop` is set."""
    settings = services.settings
    await _serve(
        create_app(services),
        services.metrics,
        stop,
        host=settings.http_host,
        port=settings.http_port,
        setting="HTTP_PORT",
        event="api_listening",
        listening=services.listening,
    )


async def run_ops(services: Services, stop: asyncio.Event) -> None:
    """Serve `create_ops_app` on HTTP_HOST:OPS_PORT until `stop` is set."""
    settings = services.settings
    assert settings.ops_port is not None
    await _serve(
        create_ops_app(services),
        services.metrics,
        stop,
        host=settings.http_host,
        port=settings.ops_port,
        setting="OPS_PORT",
        event="ops_listening",
    )


async def _topics_ready(services: Services, stop: asyncio.Event, component: str) -> bool:
    """Wait (with back-off and a log line) until the broker answers and the topics exist.

    False if stopped first. Meanwhile the component is listed as waiting in /readyz.
    """
    services.waiting[component] = "kafka"
    try:
        await wait_for_dependency(
            services.ensure_topics,
            stop,
            dependency="kafka",
            component=component,
        )
    except Stopped:
        return False
    services.waiting.pop(component, None)
    return True


def _started(services: Services, component: str, **fields: str) -> None:
    """The one line a Kafka component writes when its dependencies answer and it starts
    its work (the api's is `api_listening`)."""
    log.info(
        "component_started",
        component=component,
        kafka=services.settings.kafka_bootstrap_servers,
        database=services.settings.describe_database(),
        **fields,
    )


async def warn_of_other_topics(services: Services) -> int:
    """Log `outbox_rows_for_other_topics` when unpublished outbox rows name topics this
    configuration does not use (KAFKA_TOPIC_PREFIX changed while rows were waiting: the
    relay sends them to the old topics, which this deployment's consumers do not read).
    Returns how many such rows it saw (at most 10,000 are counted)."""
    ours = all_topics(services.settings)
    o = outbox.c
    waiting = o.published_at.is_(None) & o.failed_at.is_(None) & o.topic.not_in(ours)
    async with services.db.read() as conn:
        rows = (
            (await conn.execute(sa.select(o.topic).where(waiting).order_by(o.id).limit(10_000)))
            .scalars()
            .all()
        )
    if rows:
        log.warning(
            "outbox_rows_for_other_topics",
            count=len(rows),
            topics=sorted(set(rows))[:5],
            kafka_topic_prefix=services.settings.kafka_topic_prefix,
            hint="KAFKA_TOPIC_PREFIX changed while rows waited? set it back until they are "
            "published: the relay sends them to the topics they name",
        )
    return len(rows)


async def run_relay(services: Services, stop: asyncio.Event) -> None:
    """Publish the outbox to Kafka until `stop` is set."""
    settings = services.settings
    if not await _topics_ready(services, stop, "relay"):
        return
    try:
        await wait_for_dependency(
            lambda: warn_of_other_topics(services), stop, dependency="database", component="relay"
        )
    except Stopped:
        return
    producer = Producer(
        settings.kafka_bootstrap_servers,
        linger_ms=settings.relay_linger_ms,
        max_request_size=settings.relay_max_request_size,
        report_refusals=True,
    )
    try:
        await wait_for_dependency(producer.start, stop, dependency="kafka", component="relay")
    except Stopped:
        return
    _started(services, "relay")
    try:
        relay = Relay(
            settings,
            services.db,
            producer,
            services.metrics,
            services.outbox_signal,
            notifier=services.notifier,
        )
        pruning = asyncio.create_task(run_retention(services.db, settings, stop))
        try:
            await relay.run(stop)
        finally:
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
    finally:
        await producer.stop()


async def run_worker(services: Services, stop: asyncio.Event) -> None:
    """Consume deletion requests and delete contacts until `stop` is set."""
    if not await _topics_ready(services, stop, "worker"):
        return
    _started(services, "worker", group=f"{services.settings.kafka_consumer_group_prefix}.worker")
    worker = DeletionWorker(
        services.settings,
        services.db,
        services.metrics,
        services.notifier,
        services.outbox_signal,
    )
    await worker.run(stop)


async def run_dispatcher(services: Services, stop: asyncio.Event) -> None:
    """Fan events out to webhook endpoints and deliver them until `stop` is set."""
    if not await _topics_ready(services, stop, "dispatcher"):
        return
    _started(
        services,
        "dispatcher",
        group=f"{services.settings.kafka_consumer_group_prefix}.dispatcher",
    )
    dispatcher = Dispatcher(
        services.settings,
        services.db,
        services.metrics,
        services.webhook_signal,
        changes=services.webhook_changes,
    )
    await dispatcher.run(stop)


Component = Callable[[Services, asyncio.Event], Coroutine[Any, Any, None]]


def components() -> dict[str, Component]:
    """Every component `run` knows, by name."""
    return {
        "api": run_api,
        "relay": run_relay,
        "worker": run_worker,
        "dispatcher": run_dispatcher,
    }


async def run_components(services: Services, names: Sequence[str], stop: asyncio.Event) -> None:
    """Run the named components until `stop` is set or one of them fails."""
    known = components()
    tasks = [asyncio.create_task(known[n](services, stop), name=n) for n in names]
    waiting = sorted(set(names) & KAFKA_COMPONENTS)
    if waiting:
        settings = services.settings
        watch = broker_watch(
            settings.kafka_bootstrap_servers,
            settings.kafka_watch_interval_s,
            waiting,
            services.metrics.dependency_up,
        )
        tasks.append(asyncio.create_task(watch.run(stop), name="broker-watch"))
    if services.settings.ops_port is not None:
        tasks.append(asyncio.create_task(run_ops(services, stop), name="ops"))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = task.exception() if task is not stopper else None
            if failure is not None:
                # A StartupError is the command's one error line (service.cli), not a log.
                if not isinstance(failure, StartupError):
                    log.error("component_failed", component=task.get_name(), error=repr(failure))
                raise failure
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=15)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
