"""Contacts and their timeline: the shapes that cross the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import email_validator
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.apimodels import Out, Time, UuidText


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
    properties: dict[str, Any] = Field(default_factory=dict)
    member_role: MemberRole | None = None
    has_billing_subscription: bool = False


class ContactQuery(Strict):
    filter: dict[str, Any] | None = None
    search: str | None = Field(default=None, min_length=1, max_length=200)
    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = None


class ContactList(Strict):
    """The query string of ``GET /v1/contacts``."""

    limit: int = Field(default=100, ge=1, le=1000)
    cursor: str | None = Field(default=None, max_length=500)


class ActivityCreate(Strict):
    type: str = Field(default="activity", min_length=1, max_length=64)
    subject: str | None = Field(default=None, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    occurred_at: datetime | None = None


class NoteCreate(Strict):
    body: str = Field(min_length=1, max_length=100_000)


class TaskCreate(Strict):
    title: str = Field(min_length=1, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    status: Literal["open", "completed"] = "open"
    due_at: datetime | None = None


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


class Timeline(Out):
    """A contact's timeline, newest first."""

    items: list[TimelineItem]
