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
# "…T12:00:00+02:00" in a query string whose "+" was not encoded arrives as "… 02:00".
_PLUS_AS_SPACE = re.compile(r"\d \d{2}(:?\d{2})?$")


def _instant(value: Any) -> Any:
    # ISO 8601 / RFC 3339 only (pydantic would also take a bare number as a Unix time),
    # with its offset: an instant, not a wall-clock time somewhere.
    if isinstance(value, datetime):
        parsed = value
    elif not isinstance(value, str):
        raise ValueError(f"give an ISO-8601 date-time string, {_EXAMPLE}")
    elif _PLUS_AS_SPACE.search(value.strip()):
        raise ValueError(
            "in a query string an unencoded '+' arrives as a space: send the offset's '+' "
            f"as %2B, or give the time in UTC with Z, {_EXAMPLE}"
        )
    else:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO-8601 date-time, {_EXAMPLE}") from None
        if "T" not in value.upper() and " " not in value.strip():
            raise ValueError(f"a date alone is not an instant: add a time and Z, {_EXAMPLE}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"add a UTC offset or Z, {_EXAMPLE}")
    return in_utc_range(parsed)


Instant = Annotated[datetime, BeforeValidator(_instant)]
"""An instant given by a client (a filter's bound, recover's ``since``): an ISO-8601 /
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
