"""Shared pieces of the API's pydantic models: envelopes, time and id strings, no-query.

Pure (pydantic only), so a capability's models can use them without the HTTP layer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
