"""The garbage collector's settings for a long-running service process (`service.cli`).

CPython's cyclic collector runs a young collection every ``threshold0`` (700) container
allocations and, every so often, a full one over every tracked object of the process:
the modules, the schema, SQLAlchemy's and pydantic's compiled forms, the clients, all
alive for as long as the process. The worker's batches allocate hundreds of thousands of
short-lived containers (rows, audit records, payloads) which reference counting frees, so
these collections find almost nothing. In a SQLite filter job (a harness running the real
relay and worker without Kafka, 50,000 contacts) they took 13 % of the process's CPU (full
collections 10 %); with the objects that exist at start-up frozen and young collections
every 10,000 allocations, 2 % (issue 8).
"""

from __future__ import annotations

import gc

# Young collections every this many net container allocations (CPython's default: 700);
# the older generations are collected after 20 of the younger one (default: 10).
GEN0_THRESHOLD = 10_000
OLDER_THRESHOLD = 20


def settle_startup_objects() -> None:
    """Collect once, then move every object alive now into the collector's permanent
    generation (``gc.freeze``: never scanned again; freed by reference counting as usual
    when unused, though a cycle among them is never collected, which start-up objects,
    alive as long as the process, do not form in numbers) and collect less often. For a process that has finished starting up and
    is about to run its components."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
