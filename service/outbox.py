"""The transactional outbox: rows written with the change, published later by the relay."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

from service.db import EncodedJSON, utcnow
from service.events import CONTENT_TYPE_HEADER, JOB_HEADER, TYPE_HEADER, CloudEvent


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
    topic: str,
    key: str,
    event_type: str,
    payload: bytes,
    created_at: datetime | None = None,
    *,
    job_id: uuid.UUID | None = None,
) -> OutboxRow:
    """An outbox row for a CloudEvent already encoded as structured JSON (``payload``).

    ``job_id``: the job a ``contact.deletion_requested`` row is an item of, also written as
    its :data:`service.events.JOB_HEADER` header, so that a row (or message) whose payload
    cannot be read still names its job (its key is the contact's id, which may be an item
    of several jobs): its item is failed instead of staying pending forever
    (service.deletion.giveup).
    """
    return OutboxRow(topic, key, payload, _headers(event_type, job_id), created_at or utcnow())


_HEADERS: dict[tuple[str, uuid.UUID | None], EncodedJSON] = {}


def _headers(event_type: str, job_id: uuid.UUID | None = None) -> EncodedJSON:
    """``[[CONTENT_TYPE_HEADER, ...], [TYPE_HEADER, event_type]]`` (and ``[JOB_HEADER, job_id]``
    when given), JSON-encoded once per type and job: a job's rows share them."""
    headers = _HEADERS.get((event_type, job_id))
    if headers is None:
        if len(_HEADERS) >= 256:
            _HEADERS.clear()
        pairs: tuple[tuple[str, str], ...] = (
            (CONTENT_TYPE_HEADER, "application/cloudevents+json"),
            (TYPE_HEADER, event_type),
        )
        if job_id is not None:
            pairs += ((JOB_HEADER, str(job_id)),)
        headers = EncodedJSON(pairs)
        _HEADERS[(event_type, job_id)] = headers
    return headers
