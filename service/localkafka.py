"""Fetching and running Apache Kafka (one KRaft node) for `contact-deletion dev` and the tests.

There is no Docker here, but Maven Central is reachable and a JDK is installed, so the broker
runs from the jars Apache Kafka publishes there (see docs: LOCAL-STACK.md):

* :func:`ensure_jars` copies the runtime jar closure of ``kafka_2.13`` (named by the
  ``kafka-pom.xml`` package data beside this module) into a per-version cache outside the
  checkout, once;
* :class:`LocalKafka` formats a data directory and runs ``kafka.Kafka`` as a child process
  that cannot outlive the process that started it;
* ``python -m service.localkafka`` runs one broker until SIGTERM/SIGINT (the tests use it
  to check that killing the parent also ends the broker).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import importlib.resources
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from service.procs import die_with_parent_hook, free_port, read_tail, run_until_signalled, tail

log = structlog.get_logger(__name__)

KAFKA_VERSION = "3.9.1"
STARTED_MESSAGE = b"Kafka Server started"

_POM_RESOURCE = "kafka-pom.xml"
_COMPLETE_MARKER = "libs.complete"
_MVN_TIMEOUT_S = 15 * 60
_FORMAT_TIMEOUT_S = 120.0


DEFAULT_PORT = 9092
"""Kafka's own default port, where `make dev` looks for (or starts) a broker."""


class LocalKafkaError(RuntimeError):
    """The broker could not be fetched, formatted, started or stopped."""


# --- jars ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/contact-deletion`` (``~/.cache/contact-deletion`` when unset)."""
    # A developer-tool path, like pip's or mvn's caches; not a setting of the service.
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "contact-deletion"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an fcntl lock on ``path`` so that concurrent processes fetch one at a time."""
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _jars_complete(base: Path) -> bool:
    return (base / _COMPLETE_MARKER).is_file() and (base / "libs").is_dir()


def jars_cached(version: str = KAFKA_VERSION, *, cache_dir: Path | None = None) -> bool:
    """Whether `ensure_jars` has the jars already (False: it will fetch them with mvn)."""
    return _jars_complete((cache_dir or default_cache_dir()) / f"kafka-{version}")


def ensure_jars(version: str = KAFKA_VERSION, *, cache_dir: Path | None = None) -> Path:
    """Return the directory holding the broker's jars, fetching them with mvn if needed.

    The jars land in ``<cache>/kafka-<version>/libs``. A fetch goes to a temporary directory
    that is renamed into place, and a marker written afterwards says the copy is complete:
    a fetch killed halfway is redone by the next call. Concurrent callers (two test runs,
    ``dev`` and a test run) wait on a file lock instead of fetching twice.
    """
    base = (cache_dir or default_cache_dir()) / f"kafka-{version}"
    libs = base / "libs"
    if _jars_complete(base):
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(base / ".lock"):
        if _jars_complete(base):  # another process fetched while we waited
            return libs
        _fetch_jars(version, base)
    return libs


def _fetch_jars(version: str, base: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "mvn was not found on PATH; it is needed once to fetch the Apache Kafka jars"
        )
    libs = base / "libs"
    (base / _COMPLETE_MARKER).unlink(missing_ok=True)
    started = time.monotonic()
    log.info("kafka_jars_fetch_started", version=version, into=str(libs))
    with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as work_name:
        work = Path(work_name)
        # mvn runs on a copy of the pom so that nothing is written beside the package
        # (which may be read-only when installed).
        pom = work / "pom.xml"
        pom.write_bytes(importlib.resources.files("service").joinpath(_POM_RESOURCE).read_bytes())
        fetched = work / "libs"
        command = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={fetched}",
            f"-Dkafka.version={version}",
        ]
        try:
            result = subprocess.run(
                command,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=_MVN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(f"mvn did not finish within {_MVN_TIMEOUT_S} s") from exc
        if result.returncode != 0:
            raise LocalKafkaError(
                f"mvn failed to fetch the Kafka {version} jars (exit {result.returncode}):\n"
                + tail(result.stdout + result.stderr)
            )
        if not (fetched / f"kafka_2.13-{version}.jar").is_file():
            raise LocalKafkaError(f"mvn succeeded but kafka_2.13-{version}.jar is missing")
        if libs.exists():  # a copy left without its marker: incomplete, replace it
            shutil.rmtree(libs)
        fetched.rename(libs)
    (base / _COMPLETE_MARKER).write_text(f"kafka {version}\n")
    log.info(
        "kafka_jars_fetched",
        version=version,
        jars=len(list(libs.glob("*.jar"))),
        seconds=round(time.monotonic() - started, 1),
    )


# --- the broker process ----------------------------------------------------------------------


def broker_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def new_cluster_id() -> str:
    """A KRaft cluster id: base64url of 16 random bytes, without padding (22 characters).

    Never one that starts with "-": the storage tool's argument parser would take it for
    an option (1 start in 64 failed that way).
    """
    while True:
        value = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")
        if not value.startswith("-"):
            return value


JVM_OPTIONS = (
    # The C1 compiler only. A local broker lives for a test session, a `dev` session or a
    # bench run, and spends little on requests (a bench of 20,000 deletions on
    # PostgreSQL: 0.6-0.9 s in its request threads) but about as much again in C2's
    # threads optimising code that then runs a few thousand times, and as much on
    # start-up: on a 2-core machine taken from the service and the database. With C1
    # alone its CPU per contact went from 0.115 to 0.045 ms (start-up CPU 3.3 -> 1.5 s),
    # its request threads no slower.
    "-XX:TieredStopAtLevel=1",
    # One collector thread, no concurrent marking: a heap of a few hundred MB collects
    # in milliseconds, and G1's parallel and concurrent threads only contend for the
    # cores the service and the database need.
    "-XX:+UseSerialGC",
    # No hsperfdata file to update (jstat's counters; nothing here reads them).
    "-XX:-UsePerfData",
)
"""The broker JVM's flags beside the heap (see :meth:`LocalKafka._java_command`)."""


_LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
# Says "Kafka Server started" once the broker serves requests: start() waits for that line.
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


class LocalKafka:
    """One Apache Kafka broker+controller (KRaft) on ``host:port``, run from the cached jars.

    ``data_dir`` keeps the log segments and the broker's output between runs; without one a
    temporary directory is used and removed by :meth:`stop`. The broker is started in its
    own process group (a Ctrl-C in the terminal reaches our process, which then stops the
    broker in order) and is SIGKILLed by the kernel if our process dies first.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        data_dir: Path | None = None,
        heap_mb: int = 384,
        *,
        version: str = KAFKA_VERSION,
    ) -> None:
        self.host = host
        self.port = port
        self.heap_mb = heap_mb
        self.version = version
        # Absolute: the broker runs with another working directory than ours.
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self._own_data_dir = False
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def data_dir(self) -> Path | None:
        """Where the logs, the properties and the broker's output live (once started)."""
        return self._data_dir

    @property
    def output_path(self) -> Path | None:
        """The broker's stdout and stderr."""
        return self._data_dir / "broker.out" if self._data_dir is not None else None

    def start(self, timeout_s: float = 90.0) -> None:
        """Fetch the jars if needed, format storage once, launch the broker, wait until ready.

        Call it from the main thread (see :func:`service.procs.die_with_parent_hook`). Raises
        :class:`LocalKafkaError`, with the tail of the broker's output, if the broker exits
        or is not ready within ``timeout_s``.
        """
        if self._process is not None:
            raise LocalKafkaError("this broker is already started")
        if broker_answers(self.host, self.port, timeout_s=0.5):
            raise LocalKafkaError(f"{self.bootstrap} is already in use")
        libs = ensure_jars(self.version)
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="localkafka-"))
            self._own_data_dir = True
        data_dir = self._data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        log_dir = data_dir / "kafka-logs"
        props = data_dir / "server.properties"
        log4j = data_dir / "log4j.properties"
        props.write_text(self._server_properties(log_dir, free_port(self.host)))
        log4j.write_text(_LOG4J_PROPERTIES)
        java = self._java_command(libs, log4j)
        if not (log_dir / "meta.properties").is_file():
            self._format(java, props)

        started = time.monotonic()
        output_path = data_dir / "broker.out"
        self._output = output_path.open("wb")
        try:
            self._process = subprocess.Popen(
                [*java, "kafka.Kafka", str(props)],
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                process_group=0,
                preexec_fn=die_with_parent_hook(),  # see the hook for the thread caveat
            )
            self._wait_until_ready(output_path, started + timeout_s)
        except BaseException:
            self._kill()
            raise
        log.info(
            "kafka_started",
            bootstrap=self.bootstrap,
            pid=self._process.pid,
            seconds=round(time.monotonic() - started, 1),
        )

    def _server_properties(self, log_dir: Path, controller_port: int) -> str:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(log_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            # Without this every new consumer group waits 3 s before its first assignment.
            "group.initial.rebalance.delay.ms": "0",
            # The default 128 MB dedupe buffer does not fit a small heap.
            "log.cleaner.dedupe.buffer.size": "16777216",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.hours": "24",
            "log.retention.bytes": str(256 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "delete.topic.enable": "true",
        }
        return "".join(f"{name}={value}\n" for name, value in settings.items())

    def _java_command(self, libs: Path, log4j: Path) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise LocalKafkaError("java was not found on PATH; Kafka needs a JDK (17)")
        return [
            java,
            f"-Xmx{self.heap_mb}m",
            *JVM_OPTIONS,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            "-cp",
            f"{libs}/*",
        ]

    def _format(self, java: list[str], props: Path) -> None:
        cluster_id = new_cluster_id()
        command = [
            *java,
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(props),
        ]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_FORMAT_TIMEOUT_S,
                check=False,
                preexec_fn=die_with_parent_hook(),
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError("formatting Kafka storage timed out") from exc
        if result.returncode != 0:
            raise LocalKafkaError(
                f"formatting Kafka storage failed (exit {result.returncode}):\n"
                + tail(result.stdout + result.stderr)
            )
        log.info("kafka_storage_formatted", cluster_id=cluster_id, data_dir=str(self._data_dir))

    def _wait_until_ready(self, output_path: Path, deadline: float) -> None:
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise LocalKafkaError(
                    f"Kafka exited with code {code} while starting; its output:\n"
                    + read_tail(output_path)
                )
            if STARTED_MESSAGE in output_path.read_bytes() and broker_answers(self.host, self.port):
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"Kafka was not ready on {self.bootstrap} in time; its output:\n"
                    + read_tail(output_path)
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the broker (a clean shutdown), SIGKILL it after ``timeout_s``; idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("kafka_stop_timed_out", pid=process.pid, timeout_s=timeout_s)
        self._kill()
        if process is not None:
            log.info("kafka_stopped", bootstrap=self.bootstrap, pid=process.pid)
        if self._own_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._own_data_dir = False

    def _kill(self) -> None:
        """SIGKILL the broker if it still runs, reap it and close its output file."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- python -m service.localkafka ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one broker until SIGTERM/SIGINT; print ``READY host:port pid=<pid>`` when ready."""
    from service.logs import configure_logging  # logs go to stderr; stdout is the READY line

    parser = argparse.ArgumentParser(prog="python -m service.localkafka", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--heap-mb", type=int, default=384)
    parser.add_argument("--timeout", type=float, default=90.0, help="start-up timeout (s)")
    args = parser.parse_args(argv)
    configure_logging("console", "INFO")

    kafka = LocalKafka(args.host, args.port, args.data_dir, args.heap_mb)

    def start() -> str:
        kafka.start(timeout_s=args.timeout)
        return f"{kafka.bootstrap} pid={kafka.pid}"

    return run_until_signalled(start, kafka.stop, (LocalKafkaError,))


if __name__ == "__main__":
    sys.exit(main())
