"""A service process settles its start-up objects (`service.gctune`): they are frozen out
of the cyclic collector's scans, and young collections run less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from service.gctune import GEN0_THRESHOLD, OLDER_THRESHOLD, settle_startup_objects


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settling_freezes_what_is_alive_and_collects_less_often(restored_gc: None) -> None:
    alive = [[n] for n in range(1000)]  # containers the collector tracks
    assert any(o is alive[0] for o in gc.get_objects())
    settle_startup_objects()
    assert gc.get_freeze_count() >= len(alive)
    assert not any(o is alive[0] for o in gc.get_objects())  # no generation scans it now
    assert gc.get_threshold() == (GEN0_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
