"""Events on Kafka: CloudEvents 1.0 in structured JSON, with typed `data`.

`contact.deletion-requested` carries the work (one message per contact, keyed by contact
id, plus `job.expand` messages keyed by job id for filter/search jobs); `contact.deleted`
and `deletion_job.completed` are facts for the webhook dispatcher. JSON Schemas of these
models live in schemas/ (see service.schemas).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SOURCE = "/contact-deletion"

TOPIC_DELETION_REQUESTED = "contact.deletion-requested"
TOPIC_CONTACT_DELETED = "contact.deleted"
TOPIC_JOB_COMPLETED = "deletion_job.completed"
DLQ_SUFFIX = ".dlq"

TYPE_DELETION_REQUESTED = "contact.deletion_requested"
TYPE_JOB_EXPAND = "deletion_job.expand"
TYPE_CONTACT_DELETED = "contact.deleted"
TYPE_JOB_COMPLETED = "deletion_job.completed"

# The names of the Kafka headers the service writes: each defined here, once.
TYPE_HEADER = "ce_type"
"""An event's type (a CloudEvents attribute, in the Kafka binding's header name), written
by the outbox with every event, so that a consumer can tell what a record is for without
reading it (the fan-out's skip, service.deletion.giveup for an unreadable payload)."""
CONTENT_TYPE_HEADER = "content-type"
"""The payload's media type (``application/cloudevents+json``: structured mode)."""
JOB_HEADER = "job-id"
"""The job a ``contact.deletion_requested`` record is an item of (its id as text)."""
DLQ_REASON_HEADER = "dlq-reason"
"""Why a dead-lettered record could not be processed (value-free words)."""
DLQ_SOURCE_HEADER = "dlq-source"
"""Where a dead-lettered record is in its topic: ``topic/partition/offset``."""
DLQ_SOURCE_END_HEADER = "dlq-source-end"
"""For an unreadable batch's stub: the first offset after the batch."""
DLQ_REFUSED_HEADER = "dlq-refused"
"""For a stub that stands for a refused copy: why the broker or producer refused it."""
DLQ_ORIGINAL_SIZE_HEADER = "dlq-original-size"
"""For such a stub: the original value's size in bytes."""
DLQ_ORIGINAL_SHA256_HEADER = "dlq-original-sha256"
"""For such a stub: the original value's SHA-256, hex."""


class EventData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeletionRequested(EventData):
    """Delete one contact as part of a job."""

    job_id: uuid.UUID
    workspace_id: uuid.UUID
    ref: str = Field(description="The job item: the contact id as the caller named it")
    contact_id: uuid.UUID


class JobExpand(EventData):
    """Expand the next page of a filter/search job's matches into items."""

    job_id: uuid.UUID
    workspace_id: uuid.UUID
    after: uuid.UUID | None = Field(default=None, description="Continue after this contact id")


class OrphanedTimeline(EventData):
    activities: int
    notes: int
    tasks: int


class ContactDeleted(EventData):
    """A contact was deleted; its timeline stays without the back-reference."""

    contact_id: uuid.UUID
    workspace_id: uuid.UUID
    job_id: uuid.UUID
    deleted_at: datetime
    email_sha256: str = Field(description="Hex SHA-256 of the lowercased, trimmed address")
    orphaned_timeline: OrphanedTimeline


class DeletionJobCompleted(EventData):
    """A deletion job finished, with its final counts."""

    job_id: uuid.UUID
    workspace_id: uuid.UUID
    status: Literal["completed", "completed_with_errors", "failed"]
    total_requested: int
    processed_count: int
    deleted_count: int
    not_found_count: int
    failed_count: int
    completed_at: datetime


class CloudEvent(BaseModel):
    """The CloudEvents 1.0 structured-mode envelope."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = SOURCE
    type: str
    time: datetime
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any]


def envelope(event_type: str, subject: str, data: EventData, time: datetime) -> CloudEvent:
    """Wrap typed data in a CloudEvent with a fresh id."""
    return CloudEvent(
        id=str(uuid.uuid4()),
        type=event_type,
        time=time,
        subject=subject,
        data=data.model_dump(mode="json"),
    )


TIME_JSON: TypeAdapter[datetime] = TypeAdapter(datetime)
"""Writes a time exactly as the event models do (for encoders that splice event JSON)."""


class DeletionRequestedEncoder:
    """The JSON bytes of ``contact.deletion_requested`` CloudEvents of one job and time,
    built by splicing instead of constructing and dumping two pydantic models per contact.

    ``encode(ref, contact_id)`` returns exactly what
    ``envelope(TYPE_DELETION_REQUESTED, str(contact_id), DeletionRequested(...), time)
    .model_dump_json(exclude_none=True)`` returns for the same event id (property-tested in
    tests/unit/test_event_encoding.py): the same fields in the same order, the time as
    pydantic writes it, ``ref`` escaped as JSON. The event id is a fresh uuid4 unless given.
    """

    def __init__(self, job_id: uuid.UUID, workspace_id: uuid.UUID, time: datetime) -> None:
        time_json = TIME_JSON.dump_json(time)
        self._head = b'{"specversion":"1.0","id":"'
        self._middle = (
            b'","source":'
            + orjson.dumps(SOURCE)
            + b',"type":"'
            + TYPE_DELETION_REQUESTED.encode()
            + b'","time":'
            + time_json
            + b',"subject":"'
        )
        self._data = (
            b'","datacontenttype":"application/json","data":{"job_id":"'
            + str(job_id).encode()
            + b'","workspace_id":"'
            + str(workspace_id).encode()
            + b'","ref":'
        )

    def encode(self, ref: str, contact_id: uuid.UUID | str, event_id: str | None = None) -> bytes:
        """One event's JSON (UTF-8); raises ValueError for a ``ref`` JSON cannot hold.
        ``contact_id``: the UUID, or its canonical text (``str(uuid)``, which the caller
        may already hold: spares a conversion per contact)."""
        try:
            ref_json = orjson.dumps(ref)
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate
            raise ValueError(f"ref is not JSON text: {exc}") from exc
        contact = (contact_id if isinstance(contact_id, str) else str(contact_id)).encode()
        return b"".join(
            (
                self._head,
                (event_id or str(uuid.uuid4())).encode(),
                self._middle,
                contact,
                self._data,
                ref_json,
                b',"contact_id":"',
                contact,
                b'"}}',
            )
        )
