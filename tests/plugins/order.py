"""pytest plugin: under pytest-xdist (``make test`` runs ``-n``), the long tests go first.

A few tests take tens of seconds each (a process killed and a lease running out, an
outage, a backlog drained at a slow receiver's pace); the other ~1,800 take a fraction
of a second. Started last, a long test runs alone while the other workers sit idle, and
the run takes as long as its slowest tail. Started first, xdist's load scheduler deals
them out to the workers one by one and the short tests fill in around them.

Only the order changes: no test is added, skipped or deselected. Without xdist (a plain
``pytest``) the order is pytest's own.
"""

from __future__ import annotations

import os

import pytest

# Long tests without the `slow` marker (their files are mostly short tests).
LONG_TESTS = (
    "test_a_second_dispatcher_joining_busy_endpoints_keeps_limits_and_sends_once",
    "test_claim_ahead_is_bounded_by_the_endpoint_s_pace_and_the_lease",
)


def runs_first(item: pytest.Item) -> bool:
    """A long test: marked `slow` (outside the browser tests, which share one service per
    module and backend and stay together) or named in LONG_TESTS."""
    if item.get_closest_marker("slow") is not None:
        return "/browser/" not in item.nodeid and not item.nodeid.startswith("browser/")
    name = getattr(item, "originalname", item.name)
    return name in LONG_TESTS


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by fixture parameter
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # A stable sort: within each part the order stays pytest's (grouped by backend).
    items.sort(key=lambda item: 0 if runs_first(item) else 1)
