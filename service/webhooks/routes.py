"""HTTP routes of webhook endpoints, deliveries and recovery (scope webhooks:manage)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service.db import utcnow
from service.errors import ValidationFailed
from service.http import (
    DB_KEY,
    SETTINGS_KEY,
    json_response,
    parse_uuid,
    query_model,
    read_model,
    request_id,
    require,
)
from service.keys import Principal
from service.pagination import decode_cursor, encode_cursor
from service.webhooks import store
from service.webhooks.models import DeliveryStatus, EndpointCreate, EndpointPatch, Recover
from service.webhooks.payloads import TYPE_WEBHOOK_TEST, webhook_body

WEBHOOK_SIGNAL_KEY = web.AppKey("webhook_signal", asyncio.Event)
SCOPE = "webhooks:manage"


def _actor(who: Principal) -> dict[str, str]:
    return {"type": "api_key", "id": str(who.key_id)}


def _endpoint_id(request: web.Request) -> uuid.UUID:
    return parse_uuid(request.match_info["endpoint_id"], "webhook endpoint")


async def create(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    body = await read_model(request, EndpointCreate)
    endpoint = await store.create_endpoint(
        request.app[DB_KEY], who.workspace_id, body, _actor(who), request_id(request)
    )
    return json_response({"data": endpoint}, status=201)


async def list_all(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    return json_response(
        {"data": await store.list_endpoints(request.app[DB_KEY], who.workspace_id)}
    )


async def get_one(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint = await store.get_endpoint(
        request.app[DB_KEY], who.workspace_id, _endpoint_id(request)
    )
    return json_response({"data": endpoint})


async def patch(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint_id = _endpoint_id(request)
    body = await read_model(request, EndpointPatch)
    endpoint = await store.update_endpoint(
        request.app[DB_KEY], who.workspace_id, endpoint_id, body, _actor(who), request_id(request)
    )
    return json_response({"data": endpoint})


async def delete(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    await store.delete_endpoint(
        request.app[DB_KEY],
        who.workspace_id,
        _endpoint_id(request),
        _actor(who),
        request_id(request),
    )
    return web.Response(status=204)


async def rotate(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint = await store.rotate_secret(
        request.app[DB_KEY],
        who.workspace_id,
        _endpoint_id(request),
        request.app[SETTINGS_KEY].webhook_secret_overlap_s,
        _actor(who),
        request_id(request),
    )
    return json_response({"data": endpoint})


async def enable(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint = await store.enable_endpoint(
        request.app[DB_KEY],
        who.workspace_id,
        _endpoint_id(request),
        _actor(who),
        request_id(request),
    )
    request.app[WEBHOOK_SIGNAL_KEY].set()
    return json_response({"data": endpoint})


async def send_test(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    db = request.app[DB_KEY]
    endpoint_id = _endpoint_id(request)
    await store.get_enabled_endpoint(db, who.workspace_id, endpoint_id)
    event_id = f"evt_test_{uuid.uuid4().hex}"
    body = webhook_body(
        TYPE_WEBHOOK_TEST,
        utcnow(),
        {"endpoint_id": str(endpoint_id), "message": "a test event from contact-deletion"},
    )
    async with db.begin() as conn:
        await store.enqueue(
            conn,
            db,
            workspace_id=who.workspace_id,
            endpoint_ids=[endpoint_id],
            event_id=event_id,
            event_type=TYPE_WEBHOOK_TEST,
            payload=body,
        )
    request.app[WEBHOOK_SIGNAL_KEY].set()
    return json_response({"data": {"event_id": event_id, "endpoint_id": str(endpoint_id)}}, 202)


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: DeliveryStatus | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


async def deliveries(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint_id = _endpoint_id(request)
    query = query_model(request, DeliveriesQuery)
    before = None
    if query.cursor:
        pos = decode_cursor(query.cursor, ("at", "id"))
        try:
            before = (datetime.fromisoformat(pos["at"]), uuid.UUID(pos["id"]))
        except (TypeError, ValueError):
            raise ValidationFailed(
                "invalid cursor", [{"field": "cursor", "message": "bad"}]
            ) from None
    page, nxt = await store.list_deliveries(
        request.app[DB_KEY], who.workspace_id, endpoint_id, query.status, query.limit, before
    )
    cursor = encode_cursor({"at": nxt[0].isoformat(), "id": str(nxt[1])}) if nxt else None
    return json_response({"data": page, "next_cursor": cursor})


async def delivery(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    delivery_id = parse_uuid(request.match_info["delivery_id"], "delivery")
    found = await store.get_delivery(request.app[DB_KEY], who.workspace_id, delivery_id)
    return json_response({"data": found})


async def retry(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    delivery_id = parse_uuid(request.match_info["delivery_id"], "delivery")
    found = await store.retry_delivery(request.app[DB_KEY], who.workspace_id, delivery_id)
    request.app[WEBHOOK_SIGNAL_KEY].set()
    return json_response({"data": found}, 202)


async def recover(request: web.Request) -> web.Response:
    who = require(request, SCOPE)
    endpoint_id = _endpoint_id(request)
    body = await read_model(request, Recover)
    count = await store.recover(request.app[DB_KEY], who.workspace_id, endpoint_id, body.since)
    request.app[WEBHOOK_SIGNAL_KEY].set()
    return json_response({"data": {"endpoint_id": str(endpoint_id), "requeued": count}}, 202)


def add_routes(app: web.Application) -> None:
    base = "/v1/webhooks/endpoints"
    app.router.add_post(base, create)
    app.router.add_get(base, list_all)
    app.router.add_get(base + "/{endpoint_id}", get_one)
    app.router.add_patch(base + "/{endpoint_id}", patch)
    app.router.add_delete(base + "/{endpoint_id}", delete)
    app.router.add_post(base + "/{endpoint_id}/rotate-secret", rotate)
    app.router.add_post(base + "/{endpoint_id}/enable", enable)
    app.router.add_post(base + "/{endpoint_id}/test", send_test)
    app.router.add_post(base + "/{endpoint_id}/recover", recover)
    app.router.add_get(base + "/{endpoint_id}/deliveries", deliveries)
    app.router.add_get("/v1/webhooks/deliveries/{delivery_id}", delivery)
    app.router.add_post("/v1/webhooks/deliveries/{delivery_id}/retry", retry)
