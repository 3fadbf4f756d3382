"""Opaque cursors for keyset pagination, typed and bounded when they come back.

A cursor is base64url of a small JSON object. What a client sends back is validated into
one of the models below before any SQL sees it, so a crafted cursor (a 20-digit integer,
a naive or out-of-range time, another listing's cursor) is a 400 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from service.errors import ValidationFailed
from service.limits import MAX_CURSOR_LENGTH, MAX_INT64


def _instant(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("a cursor time has an offset")
    return parsed.astimezone(UTC)  # OverflowError at the edges of the calendar: a 400 too


class _Cursor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeqCursor(_Cursor):
    """After an audit event's seq."""

    after_seq: StrictInt = Field(ge=0, le=MAX_INT64)


class IdCursor(_Cursor):
    """After a contact id."""

    after: uuid.UUID


class PositionCursor(_Cursor):
    """After a job item's position."""

    after: StrictInt = Field(ge=0, le=MAX_INT64)


class TimeIdCursor(_Cursor):
    """Before a (created_at, id) pair, newest first."""

    at: str
    id: uuid.UUID

    @field_validator("at")
    @classmethod
    def _at(cls, value: str) -> str:
        _instant(value)
        return value

    @property
    def position(self) -> tuple[datetime, uuid.UUID]:
        return _instant(self.at), self.id


C = TypeVar("C", bound=_Cursor)
S = TypeVar("S", bound=sa.Select[Any])
R = TypeVar("R", bound=Mapping[Any, Any])

TimeId = tuple[datetime, uuid.UUID]


def newest_first(stmt: S, table: sa.Table, limit: int, before: TimeId | None) -> S:
    """``stmt`` over ``table`` as one page, newest first: ordered by (created_at, id)
    descending, rows strictly before ``before`` (a `TimeIdCursor` position), ``limit + 1``
    rows (the extra one says a next page exists; `split_page` drops it)."""
    c = table.c
    stmt = stmt.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
    if before is not None:
        at, last = before
        stmt = stmt.where(sa.or_(c.created_at < at, sa.and_(c.created_at == at, c.id < last)))
    return stmt


def split_page(rows: Sequence[R], limit: int) -> tuple[Sequence[R], TimeId | None]:
    """The page of rows a `newest_first` query returned, and the position of its last row
    if another page follows (else None)."""
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], (last["created_at"], last["id"])


class ListQuery(BaseModel):
    """The query string of a listing: ``limit`` rows (1 to 500, default 50) after ``cursor``."""

    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(
        default=None,
        max_length=MAX_CURSOR_LENGTH,
        description="The `next_cursor` of the previous page",
    )


def encode_cursor(position: dict[str, Any]) -> str:
    """An opaque, URL-safe cursor for a position in a listing."""
    raw = json.dumps(position, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_cursor(cursor: str, model: type[C], field: str = "cursor") -> C:
    """The position inside a cursor, or a 400 naming the cursor's `field`."""
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        return model.model_validate(value)
    except (ValueError, UnicodeError, binascii.Error, ValidationError, OverflowError):
        raise ValidationFailed(
            f"invalid {field}", [{"field": field, "message": "not a cursor from this listing"}]
        ) from None


def decode_cursor(cursor: str, required: tuple[str, ...]) -> dict[str, Any]:
    """The raw position inside a cursor (prefer `read_cursor` with a model), or a 400."""
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        value = None
    if not isinstance(value, dict) or any(k not in value for k in required):
        raise ValidationFailed(
            "invalid cursor", [{"field": "cursor", "message": "not a cursor from this listing"}]
        )
    return value
