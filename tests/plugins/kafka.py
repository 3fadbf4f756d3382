"""pytest plugin: a real Kafka broker for the whole session (``kafka_bootstrap``).

``TEST_KAFKA_BOOTSTRAP=host:port`` points the tests at a broker that already runs;
otherwise one Apache Kafka node is started from the cached jars (see service.localkafka)
and stopped at the end. A broker that cannot start fails the tests; it never skips them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.localkafka import LocalKafka
from service.procs import free_port

# Where the session's broker keeps its log segments (for tests that read them).
KAFKA_LOG_DIR = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def kafka_bootstrap(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """``host:port`` of a running Kafka broker, shared by the session."""
    external = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    # Fixtures run in the main thread, which lives as long as the session: the broker's
    # parent-death signal is tied to the thread that starts it.
    data_dir = tmp_path_factory.mktemp("kafka")
    request.config.stash[KAFKA_LOG_DIR] = data_dir / "kafka-logs"
    kafka = LocalKafka(port=free_port(), data_dir=data_dir)
    kafka.start()
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_log_dir(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Path:
    """The broker's ``log.dirs`` (``TEST_KAFKA_LOG_DIR`` with an external broker)."""
    external = os.environ.get("TEST_KAFKA_LOG_DIR")
    if external:
        return Path(external)
    if KAFKA_LOG_DIR not in request.config.stash:
        pytest.fail("TEST_KAFKA_BOOTSTRAP is set: give its log.dirs in TEST_KAFKA_LOG_DIR")
    return request.config.stash[KAFKA_LOG_DIR]
