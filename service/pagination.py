"""Opaque cursors for keyset pagination."""

from __future__ import annotations

import base64
import json
from typing import Any

from service.errors import ValidationFailed


def encode_cursor(position: dict[str, Any]) -> str:
    """An opaque, URL-safe cursor for a position in a listing."""
    raw = json.dumps(position, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, required: tuple[str, ...]) -> dict[str, Any]:
    """The position inside a cursor, or a 400 naming the cursor."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict) or any(k not in value for k in required):
        raise ValidationFailed(
            "invalid cursor", [{"field": "cursor", "message": "not a cursor from this listing"}]
        )
    return value
