"""The worker's spliced contact.deleted JSON is byte for byte what the pydantic models give."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.deletion.encoding import ContactDeletedEncoder, contact_deleted_row
from service.events import (
    TYPE_CONTACT_DELETED,
    CloudEvent,
    ContactDeleted,
    OrphanedTimeline,
    envelope,
)
from service.outbox import outbox_row

times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
) | st.datetimes(timezones=st.just(UTC)).map(lambda t: t.replace(microsecond=0))
counts = st.integers(min_value=0, max_value=10**9)


def model_event(
    event_id: str,
    ids: tuple[uuid.UUID, uuid.UUID, uuid.UUID],
    digest: str,
    timeline: tuple[int, int, int],
    time: datetime,
) -> CloudEvent:
    contact_id, workspace_id, job_id = ids
    event = envelope(
        TYPE_CONTACT_DELETED,
        str(contact_id),
        ContactDeleted(
            contact_id=contact_id,
            workspace_id=workspace_id,
            job_id=job_id,
            deleted_at=time,
            email_sha256=digest,
            orphaned_timeline=OrphanedTimeline(
                activities=timeline[0], notes=timeline[1], tasks=timeline[2]
            ),
        ),
        time,
    )
    return event.model_copy(update={"id": event_id})


@given(
    ids=st.tuples(st.uuids(), st.uuids(), st.uuids()),
    digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
    timeline=st.tuples(counts, counts, counts),
    time=times,
)
def test_spliced_bytes_equal_the_models_json(
    ids: tuple[uuid.UUID, uuid.UUID, uuid.UUID],
    digest: str,
    timeline: tuple[int, int, int],
    time: datetime,
) -> None:
    event_id = str(uuid.uuid4())
    expected = model_event(event_id, ids, digest, timeline, time)
    contact, workspace, job = (str(i) for i in ids)
    spliced = ContactDeletedEncoder(time).encode(
        contact, workspace, job, digest, timeline, event_id=event_id
    )
    assert spliced == expected.model_dump_json(exclude_none=True).encode("utf-8")
    assert CloudEvent.model_validate_json(spliced) == expected


def test_each_event_gets_a_fresh_id_and_the_row_is_what_outbox_row_writes() -> None:
    now = datetime.now(UTC)
    ids = (uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
    encoder = ContactDeletedEncoder(now)
    texts = [str(i) for i in ids]
    first, second = (
        encoder.encode(texts[0], texts[1], texts[2], "ab" * 32, (1, 0, 2)) for _ in range(2)
    )
    assert json.loads(first)["id"] != json.loads(second)["id"]
    expected = outbox_row(
        "t.contact.deleted",
        texts[0],
        model_event(json.loads(first)["id"], ids, "ab" * 32, (1, 0, 2), now),
    )
    row = contact_deleted_row("t.contact.deleted", texts[0], first, now + timedelta(seconds=1))
    assert {k: v for k, v in row._asdict().items() if k != "created_at"} == {
        k: v for k, v in expected.items() if k != "created_at"
    }


@pytest.mark.parametrize(
    "bad",
    ['"' + "0" * 35, "ab\\" + "c" * 33, "AB" * 18],
)
def test_text_json_would_escape_is_refused(bad: str) -> None:
    encoder = ContactDeletedEncoder(datetime.now(UTC))
    with pytest.raises(ValueError):
        encoder.encode(bad, str(uuid.uuid4()), str(uuid.uuid4()), "ab" * 32, (0, 0, 0))
    with pytest.raises(ValueError):
        encoder.encode(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()), bad, (0, 0, 0))
