"""The transactional outbox: rows written with the change, published later by the relay."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from service.db import EncodedJSON, utcnow
from service.events import CloudEvent


def outbox_row(topic: str, key: str, event: CloudEvent) -> dict[str, Any]:
    """An outbox row for a CloudEvent (structured JSON, content type header), as the
    column values of an ``outbox.insert()``."""
    payload = event.model_dump_json(exclude_none=True).encode("utf-8")
    return encoded_outbox_row(topic, key, event.type, payload)._asdict()


class OutboxRow(NamedTuple):
    """An outbox row as written: the field names are the table's columns (for
    `service.db.insert_rows`, which writes hundreds of them without a dict each)."""

    topic: str
    key: str | None
    payload: bytes
    headers: Any
    created_at: datetime


def encoded_outbox_row(
    topic: str, key: str, event_type: str, payload: bytes, created_at: datetime | None = None
) -> OutboxRow:
    """An outbox row for a CloudEvent already encoded as structured JSON (``payload``)."""
    return OutboxRow(topic, key, payload, _headers(event_type), created_at or utcnow())


_HEADERS: dict[str, EncodedJSON] = {}


def _headers(event_type: str) -> EncodedJSON:
    """``[["content-type", ...], ["ce_type", event_type]]``, JSON-encoded once per type."""
    headers = _HEADERS.get(event_type)
    if headers is None:
        if len(_HEADERS) >= 256:
            _HEADERS.clear()
        headers = EncodedJSON(
            (("content-type", "application/cloudevents+json"), ("ce_type", event_type))
        )
        _HEADERS[event_type] = headers
    return headers
