"""The worker's ``contact.deleted`` CloudEvents, encoded without a pydantic model each.

The worker writes one such event per deleted contact. Building a `ContactDeleted`, its
`CloudEvent` envelope and dumping both cost about a fifth of the worker's time per
contact; every field of this event is an id, a timestamp shared by the batch, a hex
digest or a count, none of which JSON escapes, so the bytes are spliced instead.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime

from service.events import SOURCE, TIME_JSON, TYPE_CONTACT_DELETED
from service.outbox import OutboxRow, encoded_outbox_row


class ContactDeletedEncoder:
    """The JSON bytes of ``contact.deleted`` events deleted at one time.

    ``encode(...)`` returns exactly what ``envelope(TYPE_CONTACT_DELETED, str(contact_id),
    ContactDeleted(...), time).model_dump_json(exclude_none=True)`` returns for the same
    event id (property-tested in tests/unit/test_contact_deleted_encoding.py): the fields
    in the models' order, the time as pydantic writes it. The event id is a fresh uuid4
    unless given.
    """

    def __init__(self, time: datetime) -> None:
        time_json = TIME_JSON.dump_json(time).decode("ascii")
        self._middle = (
            f'","source":{json.dumps(SOURCE)},"type":"{TYPE_CONTACT_DELETED}"'
            f',"time":{time_json},"subject":"'
        )
        self._deleted_at = f'","deleted_at":{time_json},"email_sha256":"'

    def encode(
        self,
        contact_id: str,
        workspace_id: str,
        job_id: str,
        email_sha256: str,
        timeline: tuple[int, int, int],
        event_id: str | None = None,
    ) -> bytes:
        """One event's JSON (UTF-8). The ids are UUIDs' canonical text (``str(uuid)``, the
        caller's to reuse across a batch); ``email_sha256`` is 64 hex digits;
        ``timeline`` counts the orphaned activities, notes and tasks. Text that JSON would
        have to escape raises ValueError."""
        if _SAFE.fullmatch(f"{contact_id}{workspace_id}{job_id}{email_sha256}") is None:
            raise ValueError("ids and digest must be hex text")
        activities, notes, tasks = timeline
        return (
            f'{{"specversion":"1.0","id":"{event_id or uuid.uuid4()}{self._middle}{contact_id}'
            f'","datacontenttype":"application/json","data":{{"contact_id":"{contact_id}'
            f'","workspace_id":"{workspace_id}","job_id":"{job_id}{self._deleted_at}'
            f'{email_sha256}","orphaned_timeline":{{"activities":{int(activities)}'
            f',"notes":{int(notes)},"tasks":{int(tasks)}}}}}}}'
        ).encode("ascii")


# What a UUID's text and a hex digest are made of: nothing JSON escapes.
_SAFE = re.compile("[0-9a-f-]*")


def contact_deleted_row(
    topic: str, contact_id: str, payload: bytes, created_at: datetime
) -> OutboxRow:
    """The outbox row of an encoded ``contact.deleted`` event, as `outbox_row` makes it."""
    return encoded_outbox_row(topic, contact_id, TYPE_CONTACT_DELETED, payload, created_at)
