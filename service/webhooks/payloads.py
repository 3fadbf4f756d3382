"""The bodies webhook receivers get, per the Standard Webhooks specification.

Every delivery body is ``{"type", "timestamp", "data"}``. ``WebhookPayload`` is that
shape with untyped ``data``; the concrete models pin ``type`` and ``data`` for each event
type this service sends. Their JSON Schemas are published under ``schemas/webhooks/``
(see service.schemas), so the models here are the contract receivers code against.

Pure: nothing here does I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from service.events import (
    TYPE_CONTACT_DELETED,
    TYPE_JOB_COMPLETED,
    ContactDeleted,
    DeletionJobCompleted,
)

TYPE_WEBHOOK_TEST = "webhook.test"


Timestamp = Annotated[AwareDatetime, Field(description="When the event happened (RFC 3339)")]


class _Payload(BaseModel):
    """Webhook bodies name every field they carry; nothing else travels."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookPayload(_Payload):
    """Any webhook body: the event type, when it happened, and its data."""

    type: str = Field(description="The event type, e.g. contact.deleted")
    timestamp: Timestamp
    data: dict[str, Any]


class ContactDeletedWebhook(_Payload):
    """Sent once per deleted contact. The address itself never travels, only its SHA-256."""

    type: Literal["contact.deleted"]
    timestamp: Timestamp
    data: ContactDeleted


class DeletionJobCompletedWebhook(_Payload):
    """Sent once per finished deletion job, with its final counts."""

    type: Literal["deletion_job.completed"]
    timestamp: Timestamp
    data: DeletionJobCompleted


class WebhookTestData(BaseModel):
    """The data of a `webhook.test` event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_id: str
    message: str


class WebhookTestWebhook(_Payload):
    """Sent by POST /v1/webhooks/endpoints/{id}/test."""

    type: Literal["webhook.test"]
    timestamp: Timestamp
    data: WebhookTestData


TYPED_PAYLOADS: dict[
    str, type[ContactDeletedWebhook] | type[DeletionJobCompletedWebhook] | type[WebhookTestWebhook]
] = {
    TYPE_CONTACT_DELETED: ContactDeletedWebhook,
    TYPE_JOB_COMPLETED: DeletionJobCompletedWebhook,
    TYPE_WEBHOOK_TEST: WebhookTestWebhook,
}
"""The model of each event type this service sends, by type."""


def webhook_body(event_type: str, timestamp: datetime, data: dict[str, Any]) -> bytes:
    """The exact bytes of a delivery body: compact JSON, as the signature covers them.

    For the event types in ``TYPED_PAYLOADS`` the data is validated against that type's
    model first (a ``pydantic.ValidationError`` means a bug upstream), so receivers only
    ever get bodies that match the published schema. ``timestamp`` must be timezone-aware;
    it is sent in UTC.
    """
    if timestamp.tzinfo is None:
        raise ValueError("webhook_body needs a timezone-aware timestamp")
    fields = {"type": event_type, "timestamp": timestamp.astimezone(UTC), "data": data}
    model = TYPED_PAYLOADS.get(event_type)
    payload: BaseModel = (
        model.model_validate(fields) if model is not None else WebhookPayload.model_validate(fields)
    )
    # pydantic's own serializer writes the same compact UTF-8 JSON as json.dumps with
    # separators=(",", ":") and ensure_ascii=False, in a third of the time (issue 8).
    return payload.model_dump_json().encode("utf-8")
