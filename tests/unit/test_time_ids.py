"""`service.db.new_time_ids`: the time-ordered ids of webhook deliveries and attempts."""

from __future__ import annotations

import time
import uuid

from service.db import new_time_ids


def test_time_ids_are_distinct_version_7_uuids_ascending_within_a_batch() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_time_ids(3000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 3000
    for value in ids:
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert before <= value.int >> 80 <= after  # RFC 9562 §5.7: unix milliseconds first
    # The place in the batch follows the time (12 bits): the ids of a batch go to an
    # index's end in the order they were made.
    assert ids[:4096] == sorted(ids[:4096])
    # Their text sorts as they do (SQLite keeps them as 32 hex digits).
    assert [v.hex for v in ids] == sorted(v.hex for v in ids)
    # The 62 bits after the variant vary.
    ones = zeros = 0
    for value in ids:
        ones |= value.int
        zeros |= ~value.int
    tail = (1 << 62) - 1
    assert ones & zeros & tail == tail
    assert new_time_ids(0) == []


def test_a_later_batch_sorts_after_an_earlier_one() -> None:
    first = new_time_ids(10)
    time.sleep(0.002)
    assert max(first) < min(new_time_ids(10))


def test_a_batch_past_4096_ids_still_ascends() -> None:
    """The 12-bit place carries into the millisecond field (a fan-out of many events to
    many endpoints asks for more than 4,096 ids at once)."""
    ids = new_time_ids(9000)
    assert ids == sorted(ids) and len(set(ids)) == 9000
    assert all(v.version == 7 for v in ids)
