"""Contacts and their timeline: the shapes that cross the API."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

import email_validator
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.apimodels import Instant, Out, Time, UuidText
from service.limits import (
    MAX_CURSOR_LENGTH,
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    MAX_FILTER_STRING,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    MAX_PROPERTIES,
    MAX_PROPERTIES_BYTES,
    MAX_SEARCH_LENGTH,
    not_null_in_schema,
    refuse_nulls,
)


def _special_use_suffix(domain: str) -> str | None:
    """The special-use or reserved name (RFC 6761: ``test``, ``local``, ``invalid``...)
    that `domain` is or ends in, if any."""
    for name in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        if domain == name or domain.endswith("." + name):
            return name
    return None


def check_email(value: str) -> str:
    """A syntactically valid address, stripped and lowercased.

    The syntax rules are email-validator's (no DNS lookups). Unlike its defaults, an
    address on a special-use or reserved name (``bulk1@load.test``, ``a@host.local``) is
    accepted: a CRM holds such addresses and must be able to delete them. Raises
    ValueError with email-validator's message otherwise.
    """
    text = value.strip()
    local, at, domain = text.rpartition("@")
    suffix = _special_use_suffix(domain.lower()) if at else None
    # email-validator refuses special-use names outright, except `test` in its test
    # mode; check the same syntax with the reserved suffix spelled `test`, keep the original.
    probe = f"{local}@{domain[: len(domain) - len(suffix)]}test" if suffix else text
    try:
        checked = email_validator.validate_email(
            probe, check_deliverability=False, test_environment=True
        )
    except email_validator.EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None
    normalized = checked.normalized
    if suffix:
        normalized = normalized[: -len("test")] + suffix
    return normalized.lower()


Email = Annotated[str, AfterValidator(check_email)]
MemberRole = Literal["member", "owner", "contributor"]
TimelineKind = Literal["activity", "note", "task"]


class Strict(BaseModel):
    """Request bodies refuse unknown fields."""

    model_config = ConfigDict(extra="forbid")


class ContactCreate(Strict):
    email: Email
    first_name: str | None = Field(default=None, max_length=200)
    last_name: str | None = Field(default=None, max_length=200)
    phone: str | None = Field(default=None, max_length=64)
    properties: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_PROPERTIES,
        description=f"Any JSON object: at most {MAX_PROPERTIES} keys and "
        f"{MAX_PROPERTIES_BYTES} bytes as compact JSON",
    )
    member_role: MemberRole | None = None
    has_billing_subscription: bool = False

    @field_validator("properties")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_PROPERTIES_BYTES:
            raise ValueError(f"at most {MAX_PROPERTIES_BYTES} bytes as compact JSON")
        return value


_QUERY_CONDITIONS = ("filter", "search")


class ContactQuery(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra=lambda s: not_null_in_schema(s, _QUERY_CONDITIONS)
    )

    filter: dict[str, Any] | None = Field(
        default=None,
        description=f"The filter language of bulk delete: at most {MAX_FILTER_NODES} "
        f"conditions and combinations, {MAX_FILTER_DEPTH} levels deep, {MAX_FILTER_VALUES} "
        f"values in all ({MAX_IN_VALUES} per $in), {MAX_FILTER_STRING} characters a value",
    )
    search: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SEARCH_LENGTH,
        description="Case-insensitive substring of a name, the email or the phone "
        "(both sides lowercased by Unicode's default mapping: ÖZTÜRK finds öztürk)",
    )
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(
        default=None,
        max_length=MAX_CURSOR_LENGTH,
        description="The `next_cursor` of the previous page",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null_condition(cls, data: Any) -> Any:
        return refuse_nulls(data, _QUERY_CONDITIONS)


class ContactList(Strict):
    """The query string of ``GET /v1/contacts``."""

    unknown_hint: ClassVar[str] = "to filter or search contacts, POST /v1/contacts/query"

    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=MAX_CURSOR_LENGTH)


class ActivityCreate(Strict):
    type: str = Field(default="activity", min_length=1, max_length=64)
    subject: str | None = Field(default=None, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    occurred_at: Instant | None = None


class NoteCreate(Strict):
    body: str = Field(min_length=1, max_length=100_000)


class TaskCreate(Strict):
    title: str = Field(min_length=1, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    status: Literal["open", "completed"] = "open"
    due_at: Instant | None = None


# --- Answers ---------------------------------------------------------------------------


class Contact(Out):
    """A contact as the API shows it."""

    id: UuidText
    email: str = Field(json_schema_extra={"format": "email"})
    first_name: str | None
    last_name: str | None
    phone: str | None
    properties: dict[str, Any]
    member_role: MemberRole | None
    has_billing_subscription: bool
    created_at: Time
    updated_at: Time


class TimelineItem(Out):
    """An activity, note or task; the fields after `created_at` depend on `kind`."""

    id: UuidText
    kind: TimelineKind
    contact_id: UuidText | None = Field(description="null once the contact is deleted")
    created_at: Time
    type: str | None = Field(default=None, description="activity only")
    subject: str | None = Field(default=None, description="activity only")
    occurred_at: Time | None = Field(default=None, description="activity only")
    title: str | None = Field(default=None, description="task only")
    status: Literal["open", "completed"] | None = Field(default=None, description="task only")
    due_at: Time | None = Field(default=None, description="task only")
    body: str | None = None
