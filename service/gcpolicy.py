"""Garbage-collector settings for a service process (`contact-deletion run` and each
component run alone).

CPython's cyclic collector runs its young generation every 700 net new container objects
and, every 100 of those, a full collection that walks every tracked object: in a service
process most of them are what the imports and the start-up built (modules, SQLAlchemy's
tables and compiled statements, schemas, clients), alive as long as the process. Measured
in `contact-deletion bench` (N = 20,000, one receiver, SQLite): the collector took ~10 % of
the service's CPU (1.9 s of 19 s, 18 full collections of ~135,000 objects), 0.4 s with
the settings below (issue 8).

So, once the process has started: collect once, then freeze what is left (`gc.freeze`:
moved out of the collector's sight for good; a cycle among those objects that became
garbage later would be kept, and start-up objects live as long as the process anyway),
and collect the young generation every GEN0_THRESHOLD objects (the per-batch objects of
the pipeline's loops mostly die before that, by reference counting) and the older ones
every OLDER_THRESHOLD collections of the one below.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 5000
OLDER_THRESHOLD = 20


def settle_after_start() -> None:
    """Apply the settings above to this process; call once, after start-up, in a process
    that runs the service (not in a test process shared by many services)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
