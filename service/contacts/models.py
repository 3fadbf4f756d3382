"""Contacts and their timeline: the shapes that cross the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field

from service.apimodels import Out, Time, UuidText


def _lower(value: str) -> str:
    return value.strip().lower()


Email = Annotated[EmailStr, AfterValidator(_lower)]
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
