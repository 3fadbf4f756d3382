"""structlog set-up: JSON lines (console for `dev`), context vars bound per request/job."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_SECRET_KEYS = frozenset({"secret", "key", "authorization", "password", "api_key", "token"})


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Never let a secret-looking field reach a log line."""
    for name in list(event_dict):
        if name.lower() in _SECRET_KEYS:
            event_dict[name] = "[redacted]"
    return event_dict


# aiokafka reports a group coordinator that is not elected yet (a fresh broker, a new
# group) as errors and warnings, every retry, while it waits for one: expected at start-up
# and retried by aiokafka itself, so they are dropped (kept at DEBUG).
_KAFKA_STARTUP_NOISE = (
    "Group Coordinator Request failed",
    "Marking the coordinator dead",
)


_HANDLER_NAME = "contact-deletion"


class _KafkaStartupNoise(logging.Filter):
    """Drop aiokafka's retried coordinator-lookup messages unless the level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return True
        message = str(record.msg)
        if record.levelno >= logging.ERROR and any(
            name in record.getMessage() for name in _KAFKA_RETRIABLE
        ):
            # aiokafka logs these at ERROR and then retries them itself (a partition's leader
            # moving, a topic's metadata not there yet): a passing broker state, a warning.
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return not any(message.startswith(prefix) for prefix in _KAFKA_STARTUP_NOISE)


# Retriable broker errors (Kafka protocol error codes marked retriable) that aiokafka's
# fetcher and coordinator report at ERROR level before retrying on their own.
_KAFKA_RETRIABLE = (
    "NotLeaderForPartitionError",
    "LeaderNotAvailableError",
    "UnknownTopicOrPartitionError",
    "GroupCoordinatorNotAvailableError",
    "NotCoordinatorForGroupError",
    "CoordinatorLoadInProgressError",
    "RequestTimedOutError",
)


REPEAT_WINDOW_S = 10.0
"""A library's same warning or error is written at most once per this many seconds."""


class _RepeatsCollapsed(logging.Filter):
    """A library's warning or error repeated word for word (aiokafka retrying a broker that
    is down: "Unable connect to node with id 1", many times a second) is written once per
    `REPEAT_WINDOW_S`; the first one written after that says how many were left out ("…
    (repeated N times)"). Our own events are never collapsed (each is one job, batch,
    delivery or state change), and a message that changes (another node, another partition)
    is its own line. Kept per message: at most `_REPEAT_KEYS` of them (then the oldest
    go)."""

    _REPEAT_KEYS = 256

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.startswith("service"):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < REPEAT_WINDOW_S:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg, record.args = f"{record.getMessage()} (repeated {seen[1]} times)", None
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        if len(self._seen) > self._REPEAT_KEYS:
            del self._seen[next(iter(self._seen))]
        return True


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is written, not when logging was
    configured: a stream swapped later (a test's capture, a daemon's redirection) and then
    closed never leaves the loggers writing to a dead file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR: Any = _CurrentStderr()


def configure_logging(fmt: str = "json", level: str = "INFO", *, libraries: bool = True) -> None:
    """Configure structlog and the stdlib root logger once, at start-up.

    Every line goes to stderr in one format: structlog's own events, and records of
    libraries (aiokafka, aiohttp, alembic) at WARNING and above, rendered by the same
    processors. The console format uses colours only when stderr is a terminal.

    ``libraries=False`` (a one-shot command: ``keys``, ``dlq list``, ``erasure check``)
    leaves the libraries' records out unless ``level`` is DEBUG: such a command reports
    what went wrong itself, in its own words (aiokafka's "Unable connect to …" came before
    ``dlq list``'s one error line); its own events (``waiting_for_dependency``) stay.
    """
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    if level != "DEBUG":
        handler.addFilter(_KafkaStartupNoise())
        handler.addFilter(_RepeatsCollapsed())
        if not libraries:
            handler.addFilter(lambda record: record.name.startswith("service"))
    root = logging.getLogger()
    # Replace only our own handler from an earlier call (tests configure more than once).
    for old in [h for h in root.handlers if getattr(h, "name", None) == _HANDLER_NAME]:
        root.removeHandler(old)
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_malformed_http_is_the_clients)


def _malformed_http_is_the_clients(record: logging.LogRecord) -> bool:
    """aiohttp answers malformed HTTP (a NUL in a header, a bad request line) with 400
    itself and logs it with a traceback; that is the client's error, not ours: one line."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
        record.exc_info = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "malformed_http_request %s", (str(exc.message)[:200],)
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.INFO)
    return True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger named after its module."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
