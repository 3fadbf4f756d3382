"""pytest plugin: a real Kafka broker for the whole session (``kafka_bootstrap``).

``TEST_KAFKA_BOOTSTRAP=host:port`` points the tests at a broker that already runs;
otherwise one Apache Kafka node is started from the cached jars (see service.localkafka)
and stopped at the end. A broker that cannot start fails the tests; it never skips them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from service.localkafka import LocalKafka
from service.procs import free_port


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running Kafka broker, shared by the session."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    # Fixtures run in the main thread, which lives as long as the session: the broker's
    # parent-death signal is tied to the thread that starts it.
    kafka = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"))
    kafka.start()
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()
