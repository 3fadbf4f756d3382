"""pytest plugin: a real Kafka broker for the whole session (``kafka_bootstrap``).

``TEST_KAFKA_BOOTSTRAP=host:port`` points the tests at a broker that already runs;
otherwise one Apache Kafka node is started from the cached jars (see service.localkafka)
and stopped at the end. A broker that cannot start fails the tests; it never skips them.
``kafka_broker`` is that node (None for an external broker), for the outage tests that
stop and restart it in place.
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
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalKafka | None]:
    """The broker this session started, or None when ``TEST_KAFKA_BOOTSTRAP`` names one."""
    if os.environ.get("TEST_KAFKA_BOOTSTRAP"):
        yield None
        return
    # Fixtures run in the main thread, which lives as long as the session: the broker's
    # parent-death signal is tied to the thread that starts it.
    data_dir = tmp_path_factory.mktemp("kafka")
    request.config.stash[KAFKA_LOG_DIR] = data_dir / "kafka-logs"
    kafka = LocalKafka(port=free_port(), data_dir=data_dir)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: LocalKafka | None) -> str:
    """``host:port`` of a running Kafka broker, shared by the session."""
    if kafka_broker is None:
        return os.environ["TEST_KAFKA_BOOTSTRAP"]
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_log_dir(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Path:
    """The broker's ``log.dirs`` (``TEST_KAFKA_LOG_DIR`` with an external broker)."""
    external = os.environ.get("TEST_KAFKA_LOG_DIR")
    if external:
        return Path(external)
    if KAFKA_LOG_DIR not in request.config.stash:
        pytest.fail("TEST_KAFKA_BOOTSTRAP is set: give its log.dirs in TEST_KAFKA_LOG_DIR")
    return request.config.stash[KAFKA_LOG_DIR]
