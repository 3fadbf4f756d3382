"""The audit trail's answers as the API shows them (pydantic response models)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field

from service.apimodels import Out, Time, UuidText
from service.contacts.models import TimelineItem


class Actor(Out):
    """Who did it: an API key (`api_key`) or the service itself (`system`)."""

    type: str
    id: str


class Target(Out):
    """What it was done to."""

    type: str
    id: str


AuditAction = Literal[
    "deletion.requested",
    "deletion.dry_run",
    "contact.deleted",
    "contact.deletion_failed",
    "deletion.completed",
    "webhook.endpoint.created",
    "webhook.endpoint.updated",
    "webhook.endpoint.deleted",
    "webhook.endpoint.secret_rotated",
    "webhook.endpoint.enabled",
    "webhook.endpoint.disabled",
    "webhook.delivery.exhausted",
    "api_key.created",
    "api_key.revoked",
    "timeline.redacted",
]
"""Every action the service writes to the audit trail (`AuditRecord.action` is typed with
it, so a new one is added here first); ``GET /v1/audit/events?action=`` takes only these."""

AUDIT_ACTIONS: tuple[str, ...] = get_args(AuditAction)


class AuditEvent(Out):
    """One event of a workspace's hash chain."""

    seq: int = Field(ge=1, description="Gap-free per workspace")
    id: UuidText
    workspace_id: UuidText
    occurred_at: Time
    actor: Actor
    action: str = Field(
        examples=["contact.deleted"],
        description="One of the actions `GET /v1/audit/events?action=` takes; a client should "
        "tolerate a new one",
    )
    target: Target | None
    job_id: str | None
    request_id: str | None
    data: dict[str, Any]
    prev_hash: str = Field(pattern="^[0-9a-f]{64}$")
    hash: str = Field(
        pattern="^[0-9a-f]{64}$", description="SHA-256(prev_hash ‖ canonical JSON of the event)"
    )


class RequestedBy(Out):
    """Who asked for a deletion: the key, the job and the request."""

    api_key_id: str | None
    job_id: str | None
    request_id: str | None


class AuditContactTimeline(Out):
    """What became of a contact: its deletion, who asked, and the items it left behind."""

    contact_id: UuidText
    deleted: bool
    deletion: AuditEvent | None = Field(
        description="The contact.deleted event, on the first page; null on later pages "
        "(with a cursor) and when the contact is not deleted"
    )
    requested_by: RequestedBy | None = Field(description="null when the contact is not deleted")
    timeline: list[TimelineItem] = Field(
        description="One page of the items that lost their back-reference, as they stand "
        "now, newest first"
    )
    next_cursor: str | None = Field(
        default=None, description="Pass it back as `cursor` for the next page; null on the last"
    )


class ChainVerdict(Out):
    """The outcome of walking the chain (`service.audit.chain.VerifyResult`)."""

    ok: bool
    events_checked: int = Field(ge=0)
    head_seq: int = Field(ge=0)
    head_hash: str
    broken_seq: int | None = None
    reason: str | None = None
    detail: str | None = None
