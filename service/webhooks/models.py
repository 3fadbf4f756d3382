"""Webhook endpoints and deliveries: request shapes and states."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.webhooks.ssrf import validate_endpoint_url

EventType = Literal["contact.deleted", "deletion_job.completed", "webhook.test"]
EVENT_TYPES: tuple[str, ...] = ("contact.deleted", "deletion_job.completed", "webhook.test")


class EndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class DeliveryStatus(enum.StrEnum):
    """``pending``: not tried yet; ``failing``: tried, failed, a retry is scheduled;
    ``succeeded``; ``failed``: retries exhausted, or the endpoint was disabled or deleted
    (``recover``/``retry`` send it again); ``cancelled``: its endpoint was deleted first."""

    PENDING = "pending"
    FAILING = "failing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Deliveries the sender still has to send (first try or a scheduled retry).
SENDABLE = (DeliveryStatus.PENDING, DeliveryStatus.FAILING)


class DisabledReason(enum.StrEnum):
    """Why an endpoint was disabled (DESIGN §3 Webhooks)."""

    GONE = "gone"  # the receiver answered 410 Gone
    FAILING = "failing"  # every delivery failed for WEBHOOK_DISABLE_AFTER_S


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_url(value: str) -> str:
    return validate_endpoint_url(value)


class EndpointCreate(_Strict):
    url: str
    event_types: list[EventType] = Field(default_factory=list)
    description: str | None = Field(default=None, max_length=500)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=10_000)

    _url = field_validator("url")(_check_url)


class EndpointPatch(_Strict):
    url: str | None = None
    event_types: list[EventType] | None = None
    description: str | None = Field(default=None, max_length=500)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=10_000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return validate_endpoint_url(value) if value is not None else None


class Recover(_Strict):
    since: datetime

    @field_validator("since")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("since needs a timezone (e.g. Z)")
        return value
