"""Operational routes: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.http import DB_KEY, SETTINGS_KEY, json_response
from service.kafka import kafka_reachable
from service.logs import get_logger
from service.metrics import Metrics
from service.schemas import openapi_spec

METRICS_KEY = web.AppKey("metrics", Metrics)
# Components of this process still waiting for a dependency at start-up (name -> what).
WAITING_KEY = web.AppKey("waiting", dict[str, str])

log = get_logger(__name__)


async def healthz(_: web.Request) -> web.Response:
    return json_response({"data": {"status": "ok"}})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(request.app[DB_KEY].ping(), timeout=3)
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready"; say which
        log.warning("readiness_database_failed", error=str(exc))
        checks["database"] = "unreachable"
    bootstrap = request.app[SETTINGS_KEY].kafka_bootstrap_servers
    checks["kafka"] = "ok" if await kafka_reachable(bootstrap, timeout_s=3) else "unreachable"
    for component, dependency in sorted(request.app.get(WAITING_KEY, {}).items()):
        checks[component] = f"waiting for {dependency}"
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return json_response({"data": {"status": "ready", "checks": checks}})
    body = {"error": {"code": "not_ready", "message": "a dependency is down", "details": checks}}
    return json_response(body, status=503)


async def metrics(request: web.Request) -> web.Response:
    return request.app[METRICS_KEY].render()


async def openapi(_: web.Request) -> web.Response:
    # Built from the code, the same document as schemas/openapi.json (a test keeps them equal).
    return json_response(openapi_spec())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
