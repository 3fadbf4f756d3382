"""A service process, once started, leaves its start-up objects out of the collector's
walks and collects its young generation less often (service.gcpolicy, issue 8)."""

from __future__ import annotations

import json
import subprocess
import sys

from service.gcpolicy import GEN0_THRESHOLD, OLDER_THRESHOLD

PROBE = """
import gc, json
import service.webhooks.dispatcher  # a service's imports: what start-up builds
from service.gcpolicy import settle_after_start
before = gc.get_freeze_count()
settle_after_start()
print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))
"""


def test_settling_freezes_what_start_up_built_and_raises_the_thresholds() -> None:
    """(In a process of its own: freezing is for the whole process.)"""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before, frozen, threshold = json.loads(out)
    assert before == 0
    assert frozen > 10_000  # the imported modules' objects, at least
    assert threshold == [GEN0_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD]
