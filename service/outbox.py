"""The transactional outbox: rows written with the change, published later by the relay."""

from __future__ import annotations

from typing import Any

from service.db import utcnow
from service.events import CloudEvent


def outbox_row(topic: str, key: str, event: CloudEvent) -> dict[str, Any]:
    """An outbox row for a CloudEvent (structured JSON, content type header)."""
    return {
        "topic": topic,
        "key": key,
        "payload": event.model_dump_json(exclude_none=True).encode("utf-8"),
        "headers": [["content-type", "application/cloudevents+json"], ["ce_type", event.type]],
        "created_at": utcnow(),
    }
