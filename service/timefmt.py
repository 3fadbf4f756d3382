"""How the API writes times: ISO-8601 in UTC with a `Z`."""

from __future__ import annotations

from datetime import datetime


def iso(value: datetime | None) -> str | None:
    """`2026-11-22T14:50:45.821175Z`, or None."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
