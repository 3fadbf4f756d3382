"""Webhook endpoints and deliveries: request shapes and states."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from service.apimodels import Instant, Out, Time, UuidText
from service.webhooks.ssrf import validate_endpoint_url

EventType = Literal["contact.deleted", "deletion_job.completed", "webhook.test"]
EVENT_TYPES: tuple[str, ...] = ("contact.deleted", "deletion_job.completed", "webhook.test")
# What an endpoint subscribes to: the events the service emits. ``webhook.test`` is not
# one: ``…/test`` sends it to the endpoint whatever its event types.
SubscribableType = Literal["contact.deleted", "deletion_job.completed"]
SUBSCRIBABLE: tuple[str, ...] = ("contact.deleted", "deletion_job.completed")
EVENT_TYPES_TEXT = (
    "The event types this endpoint gets, each at most once; empty (the default): every type. "
    "webhook.test is not one to subscribe to: …/test sends it to the endpoint whatever this says"
)


def check_event_types(value: Any) -> Any:
    """`event_types` as Svix checks its ``filterTypes``: an unknown type is a 400 naming it,
    and so is a type given twice (``uniqueItems``). Unlike Svix (``minItems: 1``, omit for
    all), ``[]`` stays "every type": it is the documented way, on PATCH the only way, to
    say so. Shapes that are not a list of strings are left to the field's own type."""
    if not isinstance(value, list):
        return value
    for item in value:
        if item == "webhook.test":
            raise ValueError(
                "'webhook.test' is not an event type to subscribe to: POST "
                "…/endpoints/{id}/test sends it to the endpoint whatever its event_types"
            )
        if isinstance(item, str) and item not in SUBSCRIBABLE:
            raise ValueError(
                f"{item[:100]!r} is not an event type; the types: {', '.join(SUBSCRIBABLE)}"
            )
    repeated = sorted({t for t in value if isinstance(t, str) and value.count(t) > 1})
    if repeated:
        raise ValueError(f"{', '.join(map(repr, repeated))} given more than once")
    return value


class EndpointStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class DeliveryStatus(enum.StrEnum):
    """``pending``: not tried yet; ``failing``: tried, failed, a retry is scheduled;
    ``succeeded``; ``failed``: retries exhausted, or the endpoint was disabled or deleted
    (a deleted endpoint's unsent deliveries fail with it; ``recover``/``retry`` send a
    failed delivery again while its endpoint exists)."""

    # The four states of DESIGN.md "Webhooks". Migration 0009 turned the ``cancelled`` of
    # earlier versions (a deleted endpoint's unsent deliveries) into ``failed``.

    PENDING = "pending"
    FAILING = "failing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


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


URL_SCHEMA: JsonDict = {
    "format": "uri",
    "maxLength": 2048,
    "pattern": r"^https?://[A-Za-z0-9._-]+(:[0-9]{1,5})?(/[!-~]*)?$",
    "description": "An absolute http(s) URL without credentials; one that is, or resolves "
    "to, a private, loopback or link-local address is refused unless the operator allows it",
}


MAX_IN_FLIGHT_LIMIT = 100
MAX_IN_FLIGHT_TEXT = (
    "Concurrent requests to this endpoint at most, across every dispatcher process; "
    "null: the service default (WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT, 4 unless configured)"
)


_UNIQUE: JsonDict = {"uniqueItems": True}


class EndpointCreate(_Strict):
    url: str = Field(json_schema_extra=URL_SCHEMA)
    event_types: list[SubscribableType] = Field(
        default_factory=list, description=EVENT_TYPES_TEXT, json_schema_extra=_UNIQUE
    )
    description: str | None = Field(default=None, max_length=500)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=10_000)
    max_in_flight: int | None = Field(
        default=None, ge=1, le=MAX_IN_FLIGHT_LIMIT, description=MAX_IN_FLIGHT_TEXT
    )

    _url = field_validator("url")(_check_url)
    _event_types = field_validator("event_types", mode="before")(check_event_types)


class EndpointPatch(_Strict):
    """A change to an endpoint: omitted fields stay as they are.

    ``description`` and ``rate_limit_per_s`` may be null (no description, no limit), and
    ``max_in_flight`` null (the service default);
    ``url`` and ``event_types`` may not: an endpoint always has a URL, and "every event
    type" is the empty list.
    """

    # None only means "not given": an explicit null is refused, and the document
    # (SkipJsonSchema) does not offer it.
    url: SkipJsonSchema[None] | str = Field(default=None, json_schema_extra=URL_SCHEMA)
    event_types: SkipJsonSchema[None] | list[SubscribableType] = Field(
        default=None, description=EVENT_TYPES_TEXT, json_schema_extra=_UNIQUE
    )
    description: str | None = Field(default=None, max_length=500)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=10_000)
    max_in_flight: int | None = Field(
        default=None, ge=1, le=MAX_IN_FLIGHT_LIMIT, description=MAX_IN_FLIGHT_TEXT
    )

    _event_types = field_validator("event_types", mode="before")(check_event_types)

    @field_validator("url", "event_types")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            raise ValueError(f"{info.field_name} cannot be null; omit it to keep it as it is")
        return validate_endpoint_url(value) if info.field_name == "url" else value


class Recover(_Strict):
    since: Instant


# --- Answers ---------------------------------------------------------------------------


class WebhookEndpoint(Out):
    """A subscribed receiver."""

    id: UuidText
    url: str
    description: str | None
    event_types: list[EventType] = Field(
        description="Empty: every event type (webhook.test only on endpoints made before it "
        "was refused: it never chose anything)"
    )
    rate_limit_per_s: float | None
    max_in_flight: int | None = Field(description=MAX_IN_FLIGHT_TEXT)
    status: EndpointStatus
    disabled_reason: DisabledReason | None = Field(
        description="gone: the receiver answered 410; failing: every delivery failed for "
        "WEBHOOK_DISABLE_AFTER_S"
    )
    disabled_at: Time | None
    created_at: Time
    updated_at: Time


class WebhookEndpointWithSecret(WebhookEndpoint):
    """An endpoint with its signing secret, shown only on creation and rotation."""

    secret: str = Field(pattern=r"^whsec_[A-Za-z0-9+/]+=*$")


class WebhookDelivery(Out):
    """One event's delivery to one endpoint."""

    id: UuidText
    endpoint_id: UuidText
    event_id: str = Field(description="The webhook-id header")
    event_type: str
    status: DeliveryStatus
    attempt_count: int = Field(ge=0)
    next_attempt_at: Time | None = Field(
        description="When it is sent next (pending, failing); null once it succeeded, or failed"
    )
    last_attempt_at: Time | None
    created_at: Time
    completed_at: Time | None


class WebhookAttempt(Out):
    """One POST of a delivery: when, the answer's status, how long it took, what failed."""

    id: UuidText
    attempted_at: Time
    status_code: int | None = Field(description="null when no answer came")
    latency_ms: float
    error: str | None
    response_body: str | None = Field(description="The start of the answer")


class WebhookDeliveryWithAttempts(WebhookDelivery):
    """A delivery with its attempts, oldest first."""

    attempts: list[WebhookAttempt]


class QueuedTest(Out):
    """A webhook.test event queued for an endpoint."""

    event_id: str
    endpoint_id: UuidText


class Requeued(Out):
    """How many deliveries recover sent again: failed ones queued again, plus failing ones
    whose scheduled retry was made due now."""

    endpoint_id: UuidText
    requeued: int = Field(ge=0)
