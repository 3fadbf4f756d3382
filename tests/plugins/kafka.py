"""pytest plugin: a real Kafka broker for the whole session (``kafka_bootstrap``).

``TEST_KAFKA_BOOTSTRAP=host:port`` points the tests at a broker that already runs;
otherwise one Apache Kafka node is started from the cached jars (see service.localkafka)
and stopped at the end. A broker that cannot start fails the tests; it never skips them.
``kafka_broker`` is that node (None for an external broker), for the outage tests that
stop and restart it in place.

Under pytest-xdist (``make test`` runs ``-n``) the controller starts the one node and
hands it to the workers as an external broker (``TEST_KAFKA_BOOTSTRAP`` and
``TEST_KAFKA_LOG_DIR`` in their environment): one JVM instead of one per worker, started
while the workers collect (their ``kafka_bootstrap`` waits until it serves, and fails if it
could not start). The tests keep apart on it as they do in one process (topics and
consumer groups unique to each test); a test that stops the broker starts one of its own
(see ``stoppable_kafka``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.localkafka import LocalKafka
from service.logs import configure_logging
from service.procs import free_port

# Where the session's broker keeps its log segments (for tests that read them).
KAFKA_LOG_DIR = pytest.StashKey[Path]()
# A file the xdist controller writes once its broker serves ("ready") or failed to start.
SHARED_STATE_ENV = "TEST_KAFKA_SHARED_STATE"
# A JVM that starts while the workers collect, on a machine other test runs load too (a
# load average of 30 on 2 cores made LocalKafka's default 90 s too short): generous.
SHARED_START_TIMEOUT_S = 300.0
SHARED_READY_TIMEOUT_S = SHARED_START_TIMEOUT_S + 60


class SharedBroker:
    """The xdist controller's broker. A thread that lives as long as the run starts and
    stops it: the broker's parent-death signal is tied to the thread that starts it, and
    the workers start and collect meanwhile."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kafka-shared-"))
        self.kafka = LocalKafka(port=free_port(), data_dir=self.root / "kafka")
        self.state = self.root / "state"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shared-kafka", daemon=True)

    def env(self) -> dict[str, str]:
        return {
            "TEST_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "TEST_KAFKA_LOG_DIR": str(self.root / "kafka" / "kafka-logs"),
            SHARED_STATE_ENV: str(self.state),
        }

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)
        self.kafka.stop()  # a no-op once the thread has stopped it
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self) -> None:
        try:
            self.kafka.start(timeout_s=SHARED_START_TIMEOUT_S)
        except Exception as exc:
            self._write(f"the shared Kafka broker did not start: {exc!r}")
            return
        self._write("ready")
        self._stop.wait()
        self.kafka.stop()

    def _write(self, text: str) -> None:
        partial = self.root / "state.partial"
        partial.write_text(text)
        partial.replace(self.state)


SHARED_BROKER = pytest.StashKey[SharedBroker]()


@pytest.hookimpl(tryfirst=True)  # before xdist's own sessionstart starts the workers
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if os.environ.get("TEST_KAFKA_BOOTSTRAP") or not config.pluginmanager.has_plugin("dsession"):
        return
    configure_logging("json", "WARNING")  # as the workers have it: no info lines in the report
    shared = SharedBroker()
    config.stash[SHARED_BROKER] = shared
    os.environ.update(shared.env())  # the workers, started next, inherit it
    shared.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    # After xdist's sessionfinish has stopped the workers.
    shared = config.stash.get(SHARED_BROKER, None)
    if shared is not None:
        del config.stash[SHARED_BROKER]
        shared.close()


def wait_for_shared_broker(state: Path, timeout_s: float = SHARED_READY_TIMEOUT_S) -> None:
    """Wait until the controller's broker serves; fail the test if it did not start."""
    deadline = time.monotonic() + timeout_s
    while not state.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the shared Kafka broker was not ready within {timeout_s} s")
        time.sleep(0.1)
    text = state.read_text()
    if text != "ready":
        pytest.fail(text)


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
        state = os.environ.get(SHARED_STATE_ENV)
        if state:
            wait_for_shared_broker(Path(state))
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
