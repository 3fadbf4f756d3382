"""Hot-path encodings are byte-for-byte what the slow, obvious code produces.

The outbox's `contact.deletion_requested` payloads are spliced by DeletionRequestedEncoder
instead of dumped through two pydantic models, and the producer computes each record's
partition itself with a faster murmur2: consumers and partition-keyed ordering depend on
both being exactly the same as before.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from service.db import EncodedJSON, json_serializer
from service.events import (
    TYPE_DELETION_REQUESTED,
    CloudEvent,
    DeletionRequested,
    DeletionRequestedEncoder,
)
from service.kafka import key_hash, murmur2

# database=None: property tests must not write a .hypothesis directory into the tree.
PROPERTY = settings(max_examples=300, database=None, deadline=None)

uuids = st.uuids()
# Text JSON can hold (no lone surrogates), including quotes, backslashes, control
# characters, non-ASCII and astral characters.
refs = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
) | st.datetimes(timezones=st.just(timezone(timedelta(hours=5, minutes=30))))


def model_bytes(
    event_id: str, ref: str, contact_id: uuid.UUID, job: uuid.UUID, ws: uuid.UUID, t: datetime
) -> bytes:
    """What `envelope(...)` + `outbox_row` wrote before: the pydantic models' JSON."""
    data = DeletionRequested(job_id=job, workspace_id=ws, ref=ref, contact_id=contact_id)
    event = CloudEvent(
        id=event_id,
        type=TYPE_DELETION_REQUESTED,
        time=t,
        subject=str(contact_id),
        data=data.model_dump(mode="json"),
    )
    return event.model_dump_json(exclude_none=True).encode("utf-8")


@PROPERTY
@given(ref=refs, contact_id=uuids, job=uuids, ws=uuids, t=times, event_id=uuids)
def test_spliced_deletion_requested_equals_the_models_json(
    ref: str, contact_id: uuid.UUID, job: uuid.UUID, ws: uuid.UUID, t: datetime, event_id: uuid.UUID
) -> None:
    encoder = DeletionRequestedEncoder(job, ws, t)
    encoded = encoder.encode(ref, contact_id, str(event_id))
    assert encoded == model_bytes(str(event_id), ref, contact_id, job, ws, t)
    # The contact id given as its text (the job's items pass their ref) splices the same.
    assert encoder.encode(ref, str(contact_id), str(event_id)) == encoded


def test_spliced_event_has_a_fresh_uuid4_id_and_parses_back() -> None:
    job, ws, contact = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    encoder = DeletionRequestedEncoder(job, ws, datetime(2026, 11, 29, 18, 0, 0, 5, tzinfo=UTC))
    first = CloudEvent.model_validate_json(encoder.encode('a"b\\c\n', contact))
    second = CloudEvent.model_validate_json(encoder.encode("x", contact))
    assert first.id != second.id
    assert uuid.UUID(first.id).version == 4
    assert first.subject == str(contact)
    parsed = DeletionRequested.model_validate(first.data)
    assert parsed == DeletionRequested(
        job_id=job, workspace_id=ws, ref='a"b\\c\n', contact_id=contact
    )


def test_a_ref_json_cannot_hold_is_a_value_error() -> None:
    encoder = DeletionRequestedEncoder(uuid.uuid4(), uuid.uuid4(), datetime.now(UTC))
    try:
        encoder.encode("\ud800", uuid.uuid4())
    except ValueError:
        return
    raise AssertionError("a lone surrogate was encoded")


@PROPERTY
@given(data=st.binary(max_size=300))
def test_murmur2_equals_aiokafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@PROPERTY
@given(
    key=uuids.map(lambda u: str(u).encode()) | st.binary(min_size=1, max_size=80),
    count=st.integers(1, 64),
)
def test_partition_from_murmur2_is_the_default_partitioners(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert partitions[(murmur2(key) & 0x7FFFFFFF) % count] == expected
    # The producer's remembered hash: the same when computed and when looked up.
    assert partitions[key_hash(key) % count] == expected
    assert partitions[key_hash(bytes(key)) % count] == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@PROPERTY
@given(items=st.lists(json_values, max_size=5))
def test_pre_encoded_json_is_written_as_json_dumps_writes_the_array(items: list[Any]) -> None:
    value = EncodedJSON(items)
    assert json_serializer(value) == json.dumps(items) == json.dumps(value)
    assert json_serializer(items) == json.dumps(items)
