"""What the worker reads of its messages, and the ids it makes in bulk (pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from service.db import new_id_texts, new_ids
from service.deletion.worker import parse_message
from service.errors import PoisonMessage
from service.events import (
    TYPE_DELETION_REQUESTED,
    TYPE_JOB_EXPAND,
    DeletionRequested,
    JobExpand,
    envelope,
)
from service.kafka import InMessage

AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def message(value: bytes) -> InMessage:
    return InMessage(topic="t", partition=0, offset=0, key=None, value=value, headers=())


@pytest.mark.parametrize(
    ("event_type", "command"),
    [
        (
            TYPE_DELETION_REQUESTED,
            DeletionRequested(
                job_id=uuid.uuid4(), workspace_id=uuid.uuid4(), ref="r", contact_id=uuid.uuid4()
            ),
        ),
        (TYPE_JOB_EXPAND, JobExpand(job_id=uuid.uuid4(), workspace_id=uuid.uuid4())),
        (
            TYPE_JOB_EXPAND,
            JobExpand(job_id=uuid.uuid4(), workspace_id=uuid.uuid4(), after=uuid.uuid4()),
        ),
    ],
)
def test_each_command_reads_back_from_its_event(
    event_type: str, command: DeletionRequested | JobExpand
) -> None:
    event = envelope(event_type, "subject", command, AT)
    value = event.model_dump_json(exclude_none=True).encode()
    assert parse_message(message(value)) == command


def test_an_unknown_type_is_poison_that_names_it() -> None:
    event = envelope(
        TYPE_DELETION_REQUESTED, "s", JobExpand(job_id=uuid.uuid4(), workspace_id=uuid.uuid4()), AT
    )
    value = event.model_dump_json().replace(TYPE_DELETION_REQUESTED, "contact.teleported")
    with pytest.raises(PoisonMessage, match=r"unknown event type 'contact\.teleported'"):
        parse_message(message(value.encode()))


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\xff not json",
        b"{}",
        # data of the other command under this type
        envelope(
            TYPE_DELETION_REQUESTED,
            "s",
            JobExpand(job_id=uuid.uuid4(), workspace_id=uuid.uuid4()),
            AT,
        )
        .model_dump_json()
        .encode(),
        # an envelope that is not CloudEvents 1.0
        envelope(
            TYPE_JOB_EXPAND, "s", JobExpand(job_id=uuid.uuid4(), workspace_id=uuid.uuid4()), AT
        )
        .model_dump_json()
        .replace('"specversion":"1.0"', '"specversion":"0.3"')
        .encode(),
    ],
)
def test_malformed_messages_are_poison(value: bytes) -> None:
    with pytest.raises(PoisonMessage, match="malformed message"):
        parse_message(message(value))


def test_new_ids_are_distinct_random_version_4_uuids() -> None:
    ids = new_ids(2000)
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    for value in ids:
        assert uuid.UUID(str(value)) == value
    _assert_random_version_4(ids)
    assert new_ids(0) == []


def _assert_random_version_4(ids: list[uuid.UUID]) -> None:
    """Version 4, RFC 4122's variant, and every bit outside those two varies."""
    for value in ids:
        assert value.version == 4
        assert value.variant == uuid.RFC_4122
    fixed = (0xF000 << 64) | (0xC000 << 48)
    ones = zeros = 0
    for value in ids:
        ones |= value.int
        zeros |= ~value.int
    assert (ones & zeros) | fixed == (1 << 128) - 1


def test_new_id_texts_are_the_canonical_text_of_distinct_random_version_4_uuids() -> None:
    """The event ids written only as text: what ``str(uuid.uuid4())`` looks like, every bit
    outside the version and variant random."""
    texts = new_id_texts(2000)
    assert len(set(texts)) == 2000
    ids = [uuid.UUID(text) for text in texts]
    assert [str(value) for value in ids] == texts
    _assert_random_version_4(ids)
    assert new_id_texts(0) == []
