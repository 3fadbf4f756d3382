"""The fan-out reads an event of a type it sends in one go (`_TypedEvent`) and builds the
webhook body from it: byte for byte what the general way (`CloudEvent`, then `webhook_body`)
gives, and whatever the one-go read refuses is left to the general way."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.events import TYPE_CONTACT_DELETED, TYPE_JOB_COMPLETED, CloudEvent
from service.webhooks.dispatcher import _TYPED_EVENTS, _typed_body
from service.webhooks.payloads import webhook_body

offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
times = st.builds(
    lambda t, tz: t.replace(tzinfo=UTC).astimezone(tz),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1)),
    offsets,
)
counts = st.integers(min_value=0, max_value=10**9)


def contact_deleted(time: datetime, ids: tuple[uuid.UUID, ...], n: tuple[int, ...]) -> Any:
    return {
        "contact_id": str(ids[0]),
        "workspace_id": str(ids[1]),
        "job_id": str(ids[2]),
        "deleted_at": time.isoformat(),
        "email_sha256": "ab" * 32,
        "orphaned_timeline": {"activities": n[0], "notes": n[1], "tasks": n[2]},
    }


def job_completed(time: datetime, ids: tuple[uuid.UUID, ...], n: tuple[int, ...]) -> Any:
    return {
        "job_id": str(ids[0]),
        "workspace_id": str(ids[1]),
        "status": "completed_with_errors",
        "total_requested": n[0],
        "processed_count": n[0],
        "deleted_count": n[1],
        "not_found_count": n[2],
        "failed_count": 0,
        "completed_at": time.isoformat(),
    }


def raw_event(event_type: str, time: datetime, data: Any, **extra: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/contact-deletion",
            "type": event_type,
            "time": time.isoformat(),
            "subject": str(uuid.uuid4()),
            "datacontenttype": "application/json",
            "data": data,
            **extra,
        }
    ).encode()


def the_general_way(raw: bytes) -> bytes:
    event = CloudEvent.model_validate_json(raw)
    return webhook_body(event.type, event.time, event.data)


@given(
    kind=st.sampled_from([TYPE_CONTACT_DELETED, TYPE_JOB_COMPLETED]),
    time=times,
    ids=st.tuples(st.uuids(), st.uuids(), st.uuids()),
    n=st.tuples(counts, counts, counts),
)
def test_the_one_go_body_is_the_general_way_s_bytes(
    kind: str, time: datetime, ids: tuple[uuid.UUID, ...], n: tuple[int, ...]
) -> None:
    data = (contact_deleted if kind == TYPE_CONTACT_DELETED else job_completed)(time, ids, n)
    raw = raw_event(kind, time, data, extension="kept by CloudEvent, ignored here")
    event = _TYPED_EVENTS[kind][0].model_validate_json(raw)
    assert _typed_body(event) == the_general_way(raw)


NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
IDS = (uuid.uuid4(), uuid.uuid4(), uuid.uuid4())


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (
            "data the webhook's schema refuses",
            raw_event(TYPE_CONTACT_DELETED, NOW, {**contact_deleted(NOW, IDS, (1, 1, 1)), "x": 1}),
        ),
        (
            "a time without an offset",
            raw_event(
                TYPE_CONTACT_DELETED, NOW.replace(tzinfo=None), contact_deleted(NOW, IDS, (1, 1, 1))
            ),
        ),
        (
            "a body of the other type than its header",
            raw_event(TYPE_JOB_COMPLETED, NOW, job_completed(NOW, IDS, (1, 1, 1))),
        ),
        (
            "another CloudEvents version",
            raw_event(
                TYPE_CONTACT_DELETED, NOW, contact_deleted(NOW, IDS, (1, 1, 1)), specversion="2.0"
            ),
        ),
    ],
)
def test_what_the_one_go_read_refuses_is_left_to_the_general_way(name: str, raw: bytes) -> None:
    """(Read under the contact.deleted header.) The general way then dead-letters it or
    skips it, as before: the one-go read never accepts an event it would not."""
    with pytest.raises(ValidationError):
        _TYPED_EVENTS[TYPE_CONTACT_DELETED][0].model_validate_json(raw)
