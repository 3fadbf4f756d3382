"""Operational routes: liveness, readiness, metrics and the OpenAPI document, and their table."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from pydantic import Field, RootModel

from service import backlog
from service.apimodels import Data, Out
from service.db import Database
from service.faults import DATABASE_BUSY, DATABASE_TIMEOUT, STORAGE_FULL, outage_cause
from service.http import DB_KEY, SETTINGS_KEY
from service.kafka import kafka_reachable
from service.logs import get_logger
from service.metrics import Metrics
from service.routing import Answer, Call, Operation, Reply

METRICS_KEY = web.AppKey("metrics", Metrics)
# Components of this process still waiting for a dependency at start-up (name -> what).
WAITING_KEY = web.AppKey("waiting", dict[str, str])
OPENAPI_KEY = web.AppKey("openapi", bytes)
"""The OpenAPI document, rendered once by the composition root from the route tables."""

log = get_logger(__name__)


class Health(Out):
    status: str


class Readiness(Out):
    status: str
    checks: dict[str, str] = Field(
        description="database: ok, unreachable, database_timeout, storage_full or "
        "database_busy; kafka: ok or unreachable"
    )


class ErrorBody(Out):
    code: str
    message: str
    details: Any = None


class NotReady(Out):
    """`not_ready`: details name what is unreachable."""

    error: ErrorBody


class Document(RootModel[dict[str, Any]]):
    """A JSON object (the OpenAPI document)."""


async def healthz(_: Call) -> Data[Health]:
    return Data[Health](data=Health(status="ok"))


# How long /readyz waits for each dependency's answer (seconds); both are asked at once.
READINESS_TIMEOUT_S = 3.0
# What /readyz names as such; any other failure of the database is "unreachable".
_NAMED = frozenset({DATABASE_TIMEOUT, STORAGE_FULL, DATABASE_BUSY})


async def _database_check(db: Database) -> str:
    """``ok``, or what is wrong with the database (`service.faults.outage_cause`): no
    answer to a ping within ``READINESS_TIMEOUT_S`` (``database_timeout``), a refusal
    (``unreachable``), or this process's last write failed for a full storage or
    another process's lock, less than `service.db.TROUBLE_MEMORY_S` ago (a ping reads, so
    it answers while every write fails)."""
    try:
        await asyncio.wait_for(db.ping(), timeout=READINESS_TIMEOUT_S)
    except Exception as exc:  # any failure means "not ready"; say which
        cause = outage_cause(exc)
        log.warning("readiness_database_failed", cause=cause, error=repr(exc)[:300])
        # A refusal (or any other failure) keeps the word probes have always read.
        return cause if cause in _NAMED else "unreachable"
    return db.write_trouble() or "ok"


async def readyz(call: Call) -> Reply:
    bootstrap = call.app[SETTINGS_KEY].kafka_bootstrap_servers
    database, kafka = await asyncio.gather(
        _database_check(call.app[DB_KEY]),
        kafka_reachable(bootstrap, timeout_s=READINESS_TIMEOUT_S),
    )
    checks: dict[str, str] = {"database": database, "kafka": "ok" if kafka else "unreachable"}
    for component, dependency in sorted(call.app.get(WAITING_KEY, {}).items()):
        checks[component] = f"waiting for {dependency}"
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return Reply(Data[Readiness](data=Readiness(status="ready", checks=checks)))
    error = ErrorBody(code="not_ready", message="a dependency is down", details=checks)
    return Reply(NotReady(error=error), 503)


async def metrics(call: Call) -> web.StreamResponse:
    registry = call.app[METRICS_KEY]
    await backlog.refresh(call.app[DB_KEY], registry)
    return registry.render()


async def openapi(call: Call) -> web.StreamResponse:
    # Built from the route tables, the same document as schemas/openapi.json (a test keeps
    # them equal).
    return web.Response(body=call.app[OPENAPI_KEY], content_type="application/json")


TAG = "Operations"
ROUTES: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/healthz",
        healthz,
        "healthz",
        "Alive",
        tag=TAG,
        scope=None,
        answers=(Answer(200, Data[Health], "Alive"),),
    ),
    Operation(
        "GET",
        "/readyz",
        readyz,
        "readyz",
        "Ready: the database and Kafka are reachable",
        tag=TAG,
        scope=None,
        answers=(
            Answer(200, Data[Readiness], "Ready"),
            Answer(503, NotReady, "`not_ready`: details name what is unreachable"),
        ),
    ),
    Operation(
        "GET",
        "/metrics",
        metrics,
        "metrics",
        "Prometheus metrics",
        tag=TAG,
        scope=None,
        answers=(Answer(200, None, "The metrics", media_type="text/plain"),),
    ),
    Operation(
        "GET",
        "/openapi.json",
        openapi,
        "openapi",
        "This document",
        tag=TAG,
        scope=None,
        answers=(Answer(200, Document, "OpenAPI 3.1"),),
    ),
)
"""The operational routes (no key needed)."""
