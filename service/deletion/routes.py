"""HTTP routes of bulk deletion and jobs: the handlers and their route table."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from service import idempotency
from service.apimodels import Data, Page, QueryFlag
from service.audit.store import AuditRecord, append_events
from service.contacts.store import contact_exists
from service.deletion.dryrun import dry_run
from service.deletion.models import (
    BulkDeleteRequest,
    DryRun,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
)
from service.deletion.notify import JobNotifier
from service.deletion.store import (
    Requester,
    create_job,
    list_items,
    list_jobs,
    load_job,
    selector_summary,
)
from service.errors import NotFound
from service.http import DB_KEY, SETTINGS_KEY, request_id
from service.logs import get_logger
from service.pagination import (
    ListQuery,
    PositionCursor,
    TimeIdCursor,
    encode_cursor,
    read_cursor,
)
from service.routing import IDEMPOTENCY_KEY, Answer, Call, HeaderParam, Operation, dump

log = get_logger(__name__)

NOTIFIER_KEY = web.AppKey("job_notifier", JobNotifier)
OUTBOX_SIGNAL_KEY = web.AppKey("outbox_signal", asyncio.Event)

MAX_WAIT_S = 60
FINISHED = {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED}
# RFC 7240 §2: a preference's value is a token or a quoted-string (wait=5 or wait="5").
_WAIT_RE = re.compile(r'(?:^|[,;\s])wait\s*=\s*(?:(\d+)|"(\d+)")', re.IGNORECASE)


def prefer_wait(request: web.Request) -> float:
    """Seconds the client will wait (`Prefer: wait=N`, RFC 7240), capped at 60."""
    match = _WAIT_RE.search(request.headers.get("Prefer", ""))
    if match is None:
        return 0.0
    return float(min(int(match.group(1) or match.group(2)), MAX_WAIT_S))


async def bulk_delete(call: Call) -> web.StreamResponse:
    req = call.body_as(BulkDeleteRequest)
    req.filter_tree()  # refuses unknown fields and operators before anything is written
    who = call.principal
    return await _submit(call.request, who.key_id, who.workspace_id, req, call.raw_body)


class DeleteOneQuery(BaseModel):
    """The options of ``DELETE /v1/contacts/{id}``: bulk delete's, for one contact."""

    model_config = ConfigDict(extra="forbid")

    delete_members: QueryFlag = Field(
        default=False, description="Allow deleting a site member (as in bulk delete)"
    )
    redact_timeline: QueryFlag = Field(
        default=False,
        description="Redact the contact's values inside the timeline items that survive it "
        "(as in bulk delete)",
    )


async def delete_contact(call: Call) -> web.StreamResponse:
    who = call.principal
    contact_id = call.path["contact_id"]
    options = call.query_as(DeleteOneQuery)
    req = BulkDeleteRequest(contact_ids=[contact_id], **options.model_dump())
    # The options are what makes two such requests different for their Idempotency-Key.
    raw = options.model_dump(exclude_defaults=True) or None
    return await _submit(call.request, who.key_id, who.workspace_id, req, raw, contact_id)


async def _submit(
    request: web.Request,
    key_id: uuid.UUID,
    workspace_id: uuid.UUID,
    req: BulkDeleteRequest,
    raw: Any,
    must_exist: uuid.UUID | None = None,
) -> web.Response:
    """Create the job (or dry run) under the request's Idempotency-Key, and answer.

    `must_exist` is the contact a single DELETE names: one this workspace does not have
    (another's, or already deleted) is a 404 like on every other route, and no job.
    """
    db = request.app[DB_KEY]
    settings = request.app[SETTINGS_KEY]
    key = idempotency.header_key(request.headers)
    if key is None:
        status, headers, body = await _handle(
            request, workspace_id, key_id, req, None, None, must_exist
        )
        return web.Response(status=status, body=body, headers=headers)
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
                request, workspace_id, key_id, req, held, claim.abandoned_job, must_exist
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
    must_exist: uuid.UUID | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Create the job (or dry-run it, or answer an abandoned one); the answer to send."""
    db = request.app[DB_KEY]
    settings = request.app[SETTINGS_KEY]
    who = Requester(workspace_id, key_id, request_id(request))
    if resumed is not None:
        status, headers, body = await _answer(request, workspace_id, resumed, 0.0)
    elif must_exist is not None and not await contact_exists(db, workspace_id, must_exist):
        raise NotFound("no such contact")
    elif req.dry_run:
        status, headers, body = await _dry_run(request, who, req, held)
    else:
        job_id = uuid.uuid4()
        async with db.begin() as conn:
            if held is not None:
                await idempotency.record_job(conn, workspace_id, held[0], job_id, held[1])
            change = await create_job(conn, db, settings, who, req, job_id)
        request.app[OUTBOX_SIGNAL_KEY].set()
        log.info(
            "deletion_job_accepted",
            job_id=str(job_id),
            selector=selector_summary(req),
            delete_members=req.delete_members,
        )
        if change.finished is not None:
            log.info("deletion_job_finished", **change.finished)
        status, headers, body = await _answer(request, workspace_id, job_id, prefer_wait(request))
    headers["Content-Type"] = "application/json"
    return status, headers, body


async def _dry_run(
    request: web.Request,
    who: Requester,
    req: BulkDeleteRequest,
    held: tuple[str, datetime] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """200 with what a real run would do; no job. The audit trail notes who looked."""
    db = request.app[DB_KEY]
    async with db.begin() as conn:
        if held is not None:
            await idempotency.fence(conn, who.workspace_id, held[0], held[1])
        answer = await dry_run(conn, who.workspace_id, req)
        await append_events(
            conn,
            db,
            [
                AuditRecord(
                    workspace_id=who.workspace_id,
                    actor={"type": "api_key", "id": str(who.api_key_id)},
                    action="deletion.dry_run",
                    target={"type": "request", "id": who.request_id or ""},
                    request_id=who.request_id,
                    data={
                        "selector": selector_summary(req),
                        "would_delete_count": answer["would_delete_count"],
                        "would_fail_count": answer["would_fail_count"],
                        "not_found_count": answer["not_found_count"],
                        "delete_members": req.delete_members,
                    },
                )
            ],
        )
    log.info(
        "deletion_dry_run",
        selector=selector_summary(req),
        would_delete=answer["would_delete_count"],
        would_fail=answer["would_fail_count"],
        not_found=answer["not_found_count"],
    )
    return 200, {}, dump(Data[DryRun].model_validate({"data": answer}))


class JobOrDryRun(BaseModel):
    """The 200 of a bulk delete: a dry run, or the job finished within `Prefer: wait`."""

    model_config = ConfigDict(extra="forbid")
    data: DryRun | Job


def _job_body(job: dict[str, Any]) -> bytes:
    return dump(Data[Job].model_validate({"data": job}))


async def _answer(
    request: web.Request, workspace_id: uuid.UUID, job_id: uuid.UUID, wait_s: float
) -> tuple[int, dict[str, str], bytes]:
    """200 with the finished job if it finishes within `wait_s`, else 202 with its state."""
    job = await wait_for_job(request, workspace_id, job_id, wait_s)
    if job["status"] in FINISHED and wait_s > 0:
        return 200, {}, _job_body(job)
    return 202, {"Location": f"/v1/bulk-jobs/{job_id}"}, _job_body(job)


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


async def get_job(call: Call) -> Data[Job]:
    async with call.app[DB_KEY].read() as conn:
        job = await load_job(conn, call.principal.workspace_id, call.path["job_id"])
    return Data[Job].model_validate({"data": job})


class ItemsQuery(ListQuery):
    """The query string of GET /v1/bulk-jobs/{job_id}/items."""

    status: ItemStatus | None = None


async def get_jobs(call: Call) -> Page[Job]:
    query = call.query_as(ListQuery)
    before = None
    if query.cursor:
        before = read_cursor(query.cursor, TimeIdCursor).position
    async with call.app[DB_KEY].read() as conn:
        page, nxt = await list_jobs(conn, call.principal.workspace_id, query.limit, before)
    cursor = encode_cursor({"at": nxt[0].isoformat(), "id": str(nxt[1])}) if nxt else None
    return Page[Job].model_validate({"data": page, "next_cursor": cursor})


async def get_items(call: Call) -> Page[JobItem]:
    query = call.query_as(ItemsQuery)
    after = None
    if query.cursor:
        after = read_cursor(query.cursor, PositionCursor).after
    async with call.app[DB_KEY].read() as conn:
        page, nxt = await list_items(
            conn,
            call.principal.workspace_id,
            call.path["job_id"],
            query.status,
            query.limit,
            after,
        )
    cursor = encode_cursor({"after": nxt}) if nxt is not None else None
    return Page[JobItem].model_validate({"data": page, "next_cursor": cursor})


PREFER = HeaderParam(
    "Prefer",
    "Prefer",
    "`wait=N` (N ≤ 60): wait up to N seconds for the job and answer 200 with the finished "
    "job if it finished in time (RFC 7240)",
    {"type": "string", "examples": ["wait=10"]},
)
_REPLAYED = ("Idempotent-Replayed",)
ACCEPTED = Answer(202, Data[Job], "Accepted; poll the job at Location", (*_REPLAYED, "Location"))
JOB_ANSWERS = (
    Answer(200, Data[Job], "The job finished within `Prefer: wait`", _REPLAYED),
    ACCEPTED,
)
TAG = "Deletion"

ROUTES: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/v1/contacts/bulk-delete",
        bulk_delete,
        "bulkDelete",
        "Delete contacts by ids, emails, or filter and/or search",
        tag=TAG,
        scope="contacts:write",
        body=BulkDeleteRequest,
        headers=(IDEMPOTENCY_KEY, PREFER),
        errors=(409,),
        description="Exactly one selector: `contact_ids` (1 to 500), `emails` (1 to 1000), "
        "or `filter` and/or `search`. The job runs in the background; a contact that "
        "matches nothing is `not_found`, never an error. `dry_run` changes nothing, "
        "creates no job and answers 200 with a DryRun: what a real run would do, and the "
        "ids it would delete, paged by `dry_run_limit` and `dry_run_cursor`. "
        "`redact_timeline` replaces the deleted contacts' email, phone and names inside the "
        "timeline items that survive them (the dry run's `would_redact_count`).",
        answers=(
            Answer(
                200,
                JobOrDryRun,
                "A dry run (DryRun), or the job finished within `Prefer: wait`",
                _REPLAYED,
            ),
            ACCEPTED,
        ),
    ),
    Operation(
        "DELETE",
        "/v1/contacts/{contact_id}",
        delete_contact,
        "deleteContact",
        "Delete one contact (a deletion job of one)",
        tag=TAG,
        scope="contacts:write",
        query=DeleteOneQuery,
        headers=(IDEMPOTENCY_KEY, PREFER),
        errors=(409,),
        answers=JOB_ANSWERS,
    ),
    Operation(
        "GET",
        "/v1/bulk-jobs",
        get_jobs,
        "listJobs",
        "List deletion jobs, newest first",
        tag=TAG,
        scope="contacts:read",
        query=ListQuery,
        answers=(Answer(200, Page[Job], "A page of jobs"),),
    ),
    Operation(
        "GET",
        "/v1/bulk-jobs/{job_id}",
        get_job,
        "getJob",
        "Get a deletion job",
        tag=TAG,
        scope="contacts:read",
        answers=(Answer(200, Data[Job], "The job"),),
    ),
    Operation(
        "GET",
        "/v1/bulk-jobs/{job_id}/items",
        get_items,
        "listJobItems",
        "Page through a job's per-contact outcomes",
        tag=TAG,
        scope="contacts:read",
        query=ItemsQuery,
        answers=(Answer(200, Page[JobItem], "A page of items"),),
    ),
)
"""The deletion capability's operations."""
