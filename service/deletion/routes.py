"""HTTP routes of bulk deletion and jobs."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import idempotency
from service.audit.store import AuditRecord, append_events
from service.deletion.dryrun import dry_run
from service.deletion.models import BulkDeleteRequest, ItemStatus, JobStatus
from service.deletion.notify import JobNotifier
from service.deletion.store import (
    Requester,
    create_job,
    list_items,
    list_jobs,
    load_job,
    selector_summary,
)
from service.errors import ValidationFailed
from service.http import (
    DB_KEY,
    SETTINGS_KEY,
    encode_json,
    json_response,
    parse_uuid,
    query_model,
    read_json,
    request_id,
    require,
    validation_details,
)
from service.pagination import decode_cursor, encode_cursor

NOTIFIER_KEY = web.AppKey("job_notifier", JobNotifier)
OUTBOX_SIGNAL_KEY = web.AppKey("outbox_signal", asyncio.Event)

MAX_WAIT_S = 60
FINISHED = {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED}
_WAIT_RE = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)


def prefer_wait(request: web.Request) -> float:
    """Seconds the client will wait (`Prefer: wait=N`, RFC 7240), capped at 60."""
    match = _WAIT_RE.search(request.headers.get("Prefer", ""))
    return float(min(int(match.group(1)), MAX_WAIT_S)) if match else 0.0


async def bulk_delete(request: web.Request) -> web.Response:
    who = require(request, "contacts:write")
    raw = await read_json(request)
    try:
        req = BulkDeleteRequest.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed("the request body is invalid", validation_details(exc)) from None
    req.filter_tree()  # refuses unknown fields and operators before anything is written
    return await _submit(request, who.key_id, who.workspace_id, req, raw)


async def delete_contact(request: web.Request) -> web.Response:
    who = require(request, "contacts:write")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    req = BulkDeleteRequest(contact_ids=[contact_id])
    return await _submit(request, who.key_id, who.workspace_id, req, None)


async def _submit(
    request: web.Request,
    key_id: uuid.UUID,
    workspace_id: uuid.UUID,
    req: BulkDeleteRequest,
    raw: Any,
) -> web.Response:
    db = request.app[DB_KEY]
    settings = request.app[SETTINGS_KEY]
    key = request.headers.get("Idempotency-Key")
    if key is None:
        status, headers, body = await _handle(request, workspace_id, key_id, req, None, None)
        return web.Response(status=status, body=body, headers=headers)
    idempotency.check_key(key)
    print_ = idempotency.fingerprint(request.method, request.path, raw)
    claim = await idempotency.claim(db, workspace_id, key, print_, settings.idempotency_ttl_s)
    if claim.replay is not None:
        stored = claim.replay
        return web.Response(
            status=stored.status,
            body=stored.body,
            headers={**stored.headers, "Idempotent-Replayed": "true"},
        )
    assert claim.token is not None
    held = (key, claim.token)
    try:
        async with idempotency.hold(db, workspace_id, key, claim.token):
            status, headers, body = await _handle(
                request, workspace_id, key_id, req, held, claim.abandoned_job
            )
        await idempotency.complete(
            db,
            workspace_id,
            key,
            idempotency.StoredResponse(status, headers, body),
            token=claim.token,
            ttl_s=settings.idempotency_ttl_s,
        )
    except idempotency.LostClaim:
        raise  # the key is someone else's now: leave it alone
    except BaseException:
        # Whatever failed (an outage, a refusal), the client's retry must be able to run.
        await idempotency.release(db, workspace_id, key, claim.token)
        raise
    return web.Response(status=status, body=body, headers=headers)


async def _handle(
    request: web.Request,
    workspace_id: uuid.UUID,
    key_id: uuid.UUID,
    req: BulkDeleteRequest,
    held: tuple[str, datetime] | None,
    resumed: uuid.UUID | None,
) -> tuple[int, dict[str, str], bytes]:
    """Create the job (or dry-run it, or answer an abandoned one); the answer to send."""
    db = request.app[DB_KEY]
    settings = request.app[SETTINGS_KEY]
    who = Requester(workspace_id, key_id, request_id(request))
    if resumed is not None:
        status, headers, body = await _answer(request, workspace_id, resumed, 0.0)
    elif req.dry_run:
        status, headers, body = await _dry_run(request, who, req, held)
    else:
        job_id = uuid.uuid4()
        async with db.begin() as conn:
            if held is not None:
                await idempotency.record_job(conn, workspace_id, held[0], job_id, held[1])
            await create_job(conn, db, settings, who, req, job_id)
        request.app[OUTBOX_SIGNAL_KEY].set()
        status, headers, body = await _answer(request, workspace_id, job_id, prefer_wait(request))
    headers["Content-Type"] = "application/json"
    return status, headers, body


async def _dry_run(
    request: web.Request,
    who: Requester,
    req: BulkDeleteRequest,
    held: tuple[str, datetime] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    db = request.app[DB_KEY]
    async with db.begin() as conn:
        if held is not None:
            await idempotency.fence(conn, who.workspace_id, held[0], held[1])
        job = await dry_run(conn, who.workspace_id, req)
        await append_events(
            conn,
            db,
            [
                AuditRecord(
                    workspace_id=who.workspace_id,
                    actor={"type": "api_key", "id": str(who.api_key_id)},
                    action="deletion.requested",
                    target={"type": "deletion_job", "id": job["job_id"]},
                    job_id=job["job_id"],
                    request_id=who.request_id,
                    data={
                        "selector": selector_summary(req),
                        "count": job["total_requested"],
                        "dry_run": True,
                        "delete_members": req.delete_members,
                    },
                )
            ],
        )
    return 200, {}, encode_json({"data": job})


async def _answer(
    request: web.Request, workspace_id: uuid.UUID, job_id: uuid.UUID, wait_s: float
) -> tuple[int, dict[str, str], bytes]:
    """200 with the finished job if it finishes within `wait_s`, else 202 with its state."""
    job = await wait_for_job(request, workspace_id, job_id, wait_s)
    if job["status"] in FINISHED and wait_s > 0:
        return 200, {}, encode_json({"data": job})
    return 202, {"Location": f"/v1/bulk-jobs/{job_id}"}, encode_json({"data": job})


async def wait_for_job(
    request: web.Request, workspace_id: uuid.UUID, job_id: uuid.UUID, wait_s: float
) -> dict[str, Any]:
    """The job once finished, or as it stands when `wait_s` runs out."""
    db = request.app[DB_KEY]
    notifier = request.app[NOTIFIER_KEY]
    deadline = time.monotonic() + wait_s
    backoff = 0.05
    while True:
        async with db.read() as conn:
            job = await load_job(conn, workspace_id, job_id)
        remaining = deadline - time.monotonic()
        if job["status"] in FINISHED or remaining <= 0:
            return job
        await notifier.wait(job_id, min(remaining, backoff))
        backoff = min(backoff * 2, 1.0)


async def get_job(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    job_id = parse_uuid(request.match_info["job_id"], "job")
    async with request.app[DB_KEY].read() as conn:
        job = await load_job(conn, who.workspace_id, job_id)
    return json_response({"data": job})


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class ItemsQuery(ListQuery):
    status: ItemStatus | None = None


async def get_jobs(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    query = query_model(request, ListQuery)
    before = None
    if query.cursor:
        pos = decode_cursor(query.cursor, ("at", "id"))
        try:
            before = (datetime.fromisoformat(pos["at"]), uuid.UUID(pos["id"]))
        except (ValueError, TypeError):
            raise ValidationFailed(
                "invalid cursor", [{"field": "cursor", "message": "bad"}]
            ) from None
    async with request.app[DB_KEY].read() as conn:
        page, nxt = await list_jobs(conn, who.workspace_id, query.limit, before)
    cursor = encode_cursor({"at": nxt[0].isoformat(), "id": str(nxt[1])}) if nxt else None
    return json_response({"data": page, "next_cursor": cursor})


async def get_items(request: web.Request) -> web.Response:
    who = require(request, "contacts:read")
    job_id = parse_uuid(request.match_info["job_id"], "job")
    query = query_model(request, ItemsQuery)
    after = None
    if query.cursor:
        value = decode_cursor(query.cursor, ("after",))["after"]
        if not isinstance(value, int):
            raise ValidationFailed("invalid cursor", [{"field": "cursor", "message": "bad"}])
        after = value
    async with request.app[DB_KEY].read() as conn:
        page, nxt = await list_items(
            conn, who.workspace_id, job_id, query.status, query.limit, after
        )
    cursor = encode_cursor({"after": nxt}) if nxt is not None else None
    return json_response({"data": page, "next_cursor": cursor})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/contacts/bulk-delete", bulk_delete)
    app.router.add_delete("/v1/contacts/{contact_id}", delete_contact)
    app.router.add_get("/v1/bulk-jobs", get_jobs)
    app.router.add_get("/v1/bulk-jobs/{job_id}", get_job)
    app.router.add_get("/v1/bulk-jobs/{job_id}/items", get_items)
