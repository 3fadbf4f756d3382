"""Contacts and their timeline: the shapes that cross the API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, field_validator

from service.apimodels import Out, Time, UtcRange, UuidText
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
)


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


class ContactQuery(Strict):
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


class ActivityCreate(Strict):
    type: str = Field(default="activity", min_length=1, max_length=64)
    subject: str | None = Field(default=None, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    occurred_at: Annotated[datetime, UtcRange] | None = None


class NoteCreate(Strict):
    body: str = Field(min_length=1, max_length=100_000)


class TaskCreate(Strict):
    title: str = Field(min_length=1, max_length=500)
    body: str | None = Field(default=None, max_length=100_000)
    status: Literal["open", "completed"] = "open"
    due_at: Annotated[datetime, UtcRange] | None = None


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
