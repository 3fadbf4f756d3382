"""Prometheus metrics, in a registry of their own per app (nothing global at import)."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.http import Handler


class Metrics:
    """The service's metrics, and the aiohttp middleware that records requests."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route and status",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ("method", "route"),
            registry=self.registry,
        )
        self.contacts_deleted = Counter(
            "contacts_deleted_total", "Contacts deleted by the worker", registry=self.registry
        )
        self.outbox_published = Counter(
            "outbox_published_total", "Outbox rows published to Kafka", registry=self.registry
        )
        self.outbox_rejected = Counter(
            "outbox_rejected_total",
            "Outbox rows set aside, never published: the broker refused them for good or they"
            " could not be read. effect: item_failed, job_failed, webhooks_not_sent, none",
            ("event_type", "effect"),
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "webhook_attempts_total",
            "Webhook delivery attempts by outcome",
            ("outcome",),
            registry=self.registry,
        )
        self.dead_letters_refused = Counter(
            "dead_letters_refused_total",
            "Dead-letter copies the broker refused for good (service.kafka.send_dead_letters):"
            " outcome stub (a copy without the value went instead) or dropped (nothing went;"
            " the original stays in its source topic)",
            ("topic", "outcome"),
            registry=self.registry,
        )
        self.foreign_records_skipped = Counter(
            "foreign_records_skipped_total",
            "Records a consumer did not act on because they are not this deployment's"
            " (service.deployment): case another_deployment (stamped by another one),"
            " stale_record (this one's, naming a job its database does not have) or"
            " unstamped (no deployment header, naming a job its database does not have)",
            ("topic", "case"),
            registry=self.registry,
        )

        # Read from the database on each scrape (service.backlog).
        self.backlog = Gauge(
            "backlog_items",
            "Items waiting, by queue: outbox_unpublished, webhook_deliveries_pending,"
            " webhook_deliveries_failing, deletion_jobs_unfinished (each capped at 1,000,000)",
            ("queue",),
            registry=self.registry,
        )
        self.oldest_job_age = Gauge(
            "deletion_job_oldest_unfinished_age_seconds",
            "How long the oldest unfinished deletion job has waited (0: none)",
            registry=self.registry,
        )
        self.backlog_read_ok = Gauge(
            "backlog_read_ok",
            "1 if the last scrape read the backlog from the database, 0 if it could not"
            " (the backlog gauges then hold older values)",
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "dependency_up",
            "1 while the dependency answers this process's watch, 0 while it does not"
            " (service.watch; kafka, in a process running a relay, worker or dispatcher)",
            ["dependency"],
            registry=self.registry,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.requests.labels(request.method, route, str(response.status)).inc()
        self.latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    def render(self) -> web.Response:
        body = generate_latest(self.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
