"""HTTP routes of webhook endpoints, deliveries and recovery (webhooks:manage): handlers, table."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from service.apimodels import Data, NoQuery, Page
from service.db import utcnow
from service.errors import ValidationFailed
from service.http import DB_KEY, SETTINGS_KEY, request_id
from service.keys import Principal
from service.pagination import ListQuery, TimeIdCursor, encode_cursor, read_cursor
from service.routing import Answer, Call, Handler, Operation, Reply
from service.webhooks import store
from service.webhooks.changes import EndpointChanges
from service.webhooks.models import (
    DeliveryStatus,
    EndpointCreate,
    EndpointPatch,
    QueuedTest,
    Recover,
    Requeued,
    WebhookDelivery,
    WebhookDeliveryWithAttempts,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
)
from service.webhooks.payloads import TYPE_WEBHOOK_TEST, webhook_body
from service.webhooks.ssrf import ensure_public

WEBHOOK_SIGNAL_KEY = web.AppKey("webhook_signal", asyncio.Event)
WEBHOOK_CHANGES_KEY = web.AppKey("webhook_changes", EndpointChanges)
SCOPE = "webhooks:manage"


def _cursor(nxt: tuple[datetime, uuid.UUID] | None) -> str | None:
    """The `next_cursor` after a (created_at, id) position, or None on the last page."""
    return encode_cursor({"at": nxt[0].isoformat(), "id": str(nxt[1])}) if nxt else None


def _actor(who: Principal) -> dict[str, str]:
    return {"type": "api_key", "id": str(who.key_id)}


def _endpoint(endpoint: dict[str, Any]) -> Data[WebhookEndpoint]:
    return Data[WebhookEndpoint].model_validate({"data": endpoint})


def _with_secret(endpoint: dict[str, Any]) -> Data[WebhookEndpointWithSecret]:
    return Data[WebhookEndpointWithSecret].model_validate({"data": endpoint})


async def _public(call: Call, url: str | None) -> None:
    """Refuse (400) a destination that is, or resolves to, a non-public address."""
    if url is None:
        return
    try:
        await ensure_public(
            url, allow_private=call.app[SETTINGS_KEY].webhook_allow_private_networks
        )
    except ValueError as exc:
        raise ValidationFailed(
            "the request body is invalid", [{"field": "url", "message": str(exc)}]
        ) from None


def _wake(call: Call) -> None:
    """Wake this process's dispatcher for work this request queued, once it is committed
    (inside an Idempotency-Key's transaction, when that commits: `Database.after_commit`)."""
    call.app[DB_KEY].after_commit(call.app[WEBHOOK_SIGNAL_KEY].set)


def _changed(call: Call) -> None:
    """Tell this process's dispatcher that the endpoint changed (committed), before the
    answer goes out: no send starts from what it read before (`EndpointChanges`)."""
    changes, endpoint_id = call.app[WEBHOOK_CHANGES_KEY], call.path["endpoint_id"]
    call.app[DB_KEY].after_commit(lambda: changes.changed(endpoint_id))


async def create(call: Call) -> Reply:
    who = call.principal
    body = call.body_as(EndpointCreate)
    await _public(call, body.url)
    endpoint = await store.create_endpoint(
        call.app[DB_KEY],
        who.workspace_id,
        body,
        _actor(who),
        request_id(call.request),
    )
    return Reply(_with_secret(endpoint), 201)


async def list_all(call: Call) -> Page[WebhookEndpoint]:
    query = call.query_as(ListQuery)
    before = read_cursor(query.cursor, TimeIdCursor).position if query.cursor else None
    page, nxt = await store.list_endpoints(
        call.app[DB_KEY], call.principal.workspace_id, query.limit, before
    )
    return Page[WebhookEndpoint].model_validate({"data": page, "next_cursor": _cursor(nxt)})


async def get_one(call: Call) -> Data[WebhookEndpoint]:
    endpoint = await store.get_endpoint(
        call.app[DB_KEY], call.principal.workspace_id, call.path["endpoint_id"]
    )
    return _endpoint(endpoint)


async def patch(call: Call) -> Data[WebhookEndpoint]:
    who = call.principal
    body = call.body_as(EndpointPatch)
    await _public(call, body.url)
    endpoint = await store.update_endpoint(
        call.app[DB_KEY],
        who.workspace_id,
        call.path["endpoint_id"],
        body,
        _actor(who),
        request_id(call.request),
    )
    _changed(call)
    return _endpoint(endpoint)


async def delete(call: Call) -> Reply:
    who = call.principal
    await store.delete_endpoint(
        call.app[DB_KEY],
        who.workspace_id,
        call.path["endpoint_id"],
        _actor(who),
        request_id(call.request),
    )
    _changed(call)
    return Reply(None, 204)


async def rotate(call: Call) -> Data[WebhookEndpointWithSecret]:
    who = call.principal
    endpoint = await store.rotate_secret(
        call.app[DB_KEY],
        who.workspace_id,
        call.path["endpoint_id"],
        call.app[SETTINGS_KEY].webhook_secret_overlap_s,
        _actor(who),
        request_id(call.request),
    )
    _changed(call)
    return _with_secret(endpoint)


async def enable(call: Call) -> Data[WebhookEndpoint]:
    who = call.principal
    endpoint = await store.enable_endpoint(
        call.app[DB_KEY],
        who.workspace_id,
        call.path["endpoint_id"],
        _actor(who),
        request_id(call.request),
    )
    _changed(call)
    _wake(call)
    return _endpoint(endpoint)


async def send_test(call: Call) -> Reply:
    who = call.principal
    db = call.app[DB_KEY]
    endpoint_id = call.path["endpoint_id"]
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
    _wake(call)
    queued = {"event_id": event_id, "endpoint_id": str(endpoint_id)}
    return Reply(Data[QueuedTest].model_validate({"data": queued}), 202)


class DeliveriesQuery(ListQuery):
    """The query string of GET /v1/webhooks/endpoints/{endpoint_id}/deliveries."""

    status: DeliveryStatus | None = None


async def deliveries(call: Call) -> Page[WebhookDelivery]:
    query = call.query_as(DeliveriesQuery)
    before = None
    if query.cursor:
        before = read_cursor(query.cursor, TimeIdCursor).position
    page, nxt = await store.list_deliveries(
        call.app[DB_KEY],
        call.principal.workspace_id,
        call.path["endpoint_id"],
        query.status,
        query.limit,
        before,
    )
    return Page[WebhookDelivery].model_validate({"data": page, "next_cursor": _cursor(nxt)})


async def delivery(call: Call) -> Data[WebhookDeliveryWithAttempts]:
    found = await store.get_delivery(
        call.app[DB_KEY], call.principal.workspace_id, call.path["delivery_id"]
    )
    return Data[WebhookDeliveryWithAttempts].model_validate({"data": found})


async def retry(call: Call) -> Reply:
    found = await store.retry_delivery(
        call.app[DB_KEY], call.principal.workspace_id, call.path["delivery_id"]
    )
    _wake(call)
    return Reply(Data[WebhookDeliveryWithAttempts].model_validate({"data": found}), 202)


async def recover(call: Call) -> Reply:
    endpoint_id = call.path["endpoint_id"]
    body = call.body_as(Recover)
    count = await store.recover(
        call.app[DB_KEY], call.principal.workspace_id, endpoint_id, body.since
    )
    _wake(call)
    requeued = {"endpoint_id": str(endpoint_id), "requeued": count}
    return Reply(Data[Requeued].model_validate({"data": requeued}), 202)


TAG = "Webhooks"
BASE = "/v1/webhooks/endpoints"
ONE = BASE + "/{endpoint_id}"


def _op(
    method: str,
    path: str,
    handler: Handler,
    operation_id: str,
    summary: str,
    *answers: Answer,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] = NoQuery,
    description: str | None = None,
    errors: tuple[int, ...] = (),
) -> Operation:
    return Operation(
        method,
        path,
        handler,
        operation_id,
        summary,
        tag=TAG,
        scope=SCOPE,
        body=body,
        query=query,
        description=description,
        answers=answers,
        errors=errors,
    )


ROUTES: tuple[Operation, ...] = (
    _op(
        "POST",
        BASE,
        create,
        "createWebhookEndpoint",
        "Subscribe a webhook receiver",
        Answer(201, Data[WebhookEndpointWithSecret], "The endpoint, with its secret"),
        body=EndpointCreate,
        description="A URL that resolves to a private, loopback or link-local address is "
        "refused unless the operator allows it.",
    ),
    _op(
        "GET",
        BASE,
        list_all,
        "listWebhookEndpoints",
        "List webhook endpoints, newest first",
        Answer(200, Page[WebhookEndpoint], "A page of endpoints"),
        query=ListQuery,
    ),
    _op(
        "GET",
        ONE,
        get_one,
        "getWebhookEndpoint",
        "Get a webhook endpoint",
        Answer(200, Data[WebhookEndpoint], "The endpoint"),
    ),
    _op(
        "PATCH",
        ONE,
        patch,
        "updateWebhookEndpoint",
        "Change a webhook endpoint",
        Answer(200, Data[WebhookEndpoint], "The endpoint"),
        body=EndpointPatch,
    ),
    _op(
        "DELETE",
        ONE,
        delete,
        "deleteWebhookEndpoint",
        "Delete a webhook endpoint",
        Answer(204, None, "Deleted"),
    ),
    _op(
        "POST",
        ONE + "/rotate-secret",
        rotate,
        "rotateWebhookSecret",
        "Issue a new secret; each old one keeps signing alongside it for 24 h",
        Answer(200, Data[WebhookEndpointWithSecret], "The endpoint, with its new secret"),
        description="Every rotated-out secret younger than WEBHOOK_SECRET_OVERLAP_S (24 h) "
        "keeps signing, one signature each in webhook-signature, at most 5 live secrets in "
        "all (the oldest retires early beyond that).",
    ),
    _op(
        "POST",
        ONE + "/test",
        send_test,
        "testWebhookEndpoint",
        "Send a webhook.test event",
        Answer(202, Data[QueuedTest], "Queued"),
        description="409 endpoint_disabled while the endpoint is disabled: enable it first.",
        errors=(409,),
    ),
    _op(
        "POST",
        ONE + "/enable",
        enable,
        "enableWebhookEndpoint",
        "Re-enable a disabled endpoint",
        Answer(200, Data[WebhookEndpoint], "The endpoint"),
    ),
    _op(
        "POST",
        ONE + "/recover",
        recover,
        "recoverWebhookDeliveries",
        "Send again every failed or failing delivery since a time",
        Answer(202, Data[Requeued], "Queued again"),
        body=Recover,
        description="Every `failed` delivery created since `since` is queued again, and "
        "every `failing` one waiting for its scheduled retry is made due now; `requeued` "
        "counts both. 409 endpoint_disabled while the endpoint is disabled: enable it "
        "first, then recover.",
        errors=(409,),
    ),
    _op(
        "GET",
        ONE + "/deliveries",
        deliveries,
        "listWebhookDeliveries",
        "List an endpoint's deliveries, newest first",
        Answer(200, Page[WebhookDelivery], "A page of deliveries"),
        query=DeliveriesQuery,
    ),
    _op(
        "GET",
        "/v1/webhooks/deliveries/{delivery_id}",
        delivery,
        "getWebhookDelivery",
        "A delivery with its attempts: time, status code, latency, error",
        Answer(200, Data[WebhookDeliveryWithAttempts], "The delivery"),
    ),
    _op(
        "POST",
        "/v1/webhooks/deliveries/{delivery_id}/retry",
        retry,
        "retryWebhookDelivery",
        "Send a delivery again now",
        Answer(202, Data[WebhookDeliveryWithAttempts], "Queued"),
        description="409 endpoint_disabled while its endpoint is disabled; 409 "
        "endpoint_deleted once its endpoint is deleted (its unsent deliveries failed with it).",
        errors=(409,),
    ),
)
"""The webhooks capability's operations (scope webhooks:manage)."""
