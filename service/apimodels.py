"""Shared pieces of the API's pydantic models: envelopes, time and id strings, no-query.

Pure (pydantic only), so a capability's models can use them without the HTTP layer.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

T = TypeVar("T")


def in_utc_range(value: datetime) -> datetime:
    """An aware time that still exists once moved to UTC (0001-01-01T00:00+14:00 does not:
    converting it overflows, which would be a 500 at the database); naive ones pass as is."""
    if value.tzinfo is not None and value.utcoffset() is not None:
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("this time is out of range once converted to UTC") from None
    return value


UtcRange = AfterValidator(in_utc_range)

_EXAMPLE = "e.g. 2024-05-01T12:00:00Z"


# RFC 3339 §5.6 date-time, the one grammar of every time a client gives (audit since/until,
# recover's since, a filter's created_at, occurred_at, due_at): full-date, "T" (either case,
# or a space: RFC 3339's note), full-time (seconds may be left out) and an offset ("Z" in
# either case, or ±hh:mm). ISO 8601's other forms (week dates 2026-W48-1, ordinal dates,
# the basic format 20261130T000000Z) are refused everywhere alike.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)([Zz]|[+-]\d{2}:\d{2})?"
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_instant(text: str) -> datetime:
    """An RFC 3339 date-time with its offset as an aware datetime (fractions past
    microseconds dropped); ValueError naming what is wrong, with an example, otherwise."""
    value = text.strip()
    if _DATE.fullmatch(value):
        raise ValueError(f"a date alone is not an instant: add a time and Z, {_EXAMPLE}")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time, {_EXAMPLE}")
    date, time, offset = match.groups()
    if offset is None:
        raise ValueError(f"add a UTC offset or Z, {_EXAMPLE}")
    whole, _, fraction = time.partition(".")
    time = f"{whole}.{fraction[:6]}" if fraction else whole
    try:
        parsed = datetime.fromisoformat(f"{date}T{time}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as exc:  # a month 13, a minute 61
        raise ValueError(f"not a valid date-time ({exc}), {_EXAMPLE}") from None
    return in_utc_range(parsed)


def _instant(value: Any) -> Any:
    # RFC 3339 strings only (pydantic would also take a bare number as a Unix time), with
    # an offset: an instant, not a wall-clock time somewhere.
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"add a UTC offset or Z, {_EXAMPLE}")
        return in_utc_range(value)
    if not isinstance(value, str):
        raise ValueError(f"give an RFC 3339 date-time string, {_EXAMPLE}")
    return parse_instant(value)


def _query_flag(value: Any) -> Any:
    # A query string's boolean is `true` or `false`, as a body's is (pydantic's lax mode
    # also reads yes/no, on/off, 1/0, t/f, y/n: a typo would not be an error).
    if isinstance(value, str) and value not in ("true", "false"):
        raise ValueError("give true or false")
    return value == "true" if isinstance(value, str) else value


QueryFlag = Annotated[bool, BeforeValidator(_query_flag)]
"""A boolean in a query string: exactly ``true`` or ``false``."""

Instant = Annotated[datetime, BeforeValidator(_instant)]
"""An instant given by a client (a filter's bound, recover's ``since``): an
RFC 3339 date-time string with its UTC offset or ``Z``; every refusal names an example."""

UuidText = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
"""A UUID as the API writes it (a string, kept as the store wrote it)."""

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
"""A time as the API writes it: ISO-8601 in UTC with a Z (`service.timefmt.iso`)."""


class Out(BaseModel):
    """Base of response models: a field the document does not name is an error, not a leak."""

    model_config = ConfigDict(extra="forbid")


class Data(BaseModel, Generic[T]):
    """The success envelope ``{"data": …}``."""

    model_config = ConfigDict(extra="forbid")
    data: T

    @classmethod
    def model_parametrized_name(cls, params: tuple[Any, ...]) -> str:
        return f"{_type_name(params[0])}Data"


class Page(BaseModel, Generic[T]):
    """A page of a list: ``{"data": [...], "next_cursor": …}``."""

    model_config = ConfigDict(extra="forbid")
    data: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last"
    )

    @classmethod
    def model_parametrized_name(cls, params: tuple[Any, ...]) -> str:
        return f"{_type_name(params[0])}Page"


def _type_name(type_: Any) -> str:
    name = getattr(type_, "__name__", None)
    if name == "list":
        return f"{_type_name(type_.__args__[0])}List"
    return str(name or "Value")


class NoQuery(BaseModel):
    """Operations without query parameters still refuse unknown ones (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")
