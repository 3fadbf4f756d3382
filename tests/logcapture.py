"""Capture the service's JSON log lines in a test, as an operator would read them."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from service.logs import configure_logging


class LogLines:
    """The JSON lines written while the capture was open."""

    def __init__(self, buffer: io.StringIO) -> None:
        self.buffer = buffer

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def all(self) -> list[dict[str, Any]]:
        """Every line, parsed (each must be one JSON object)."""
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """The lines of event `name` whose fields include `fields`."""
        return [
            e
            for e in self.all()
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_for(self, name: str, timeout_s: float = 10.0, **fields: Any) -> None:
        """Wait until a line of event `name` with `fields` is written.

        A component logs what it did once its transaction has committed, so a line can
        trail by a moment the state the API already shows (a finished job, a recorded
        attempt): wait for the line rather than race it. Fails after `timeout_s` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.events(name, **fields):
            assert loop.time() < deadline, f"no {name} line with {fields} in {timeout_s} s"
            await asyncio.sleep(0.02)


@contextmanager
def json_logs(level: str = "INFO") -> Iterator[LogLines]:
    """Route structlog's JSON lines to a buffer; restore the test default afterwards."""
    buffer = io.StringIO()
    configure_logging("json", level)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    try:
        yield LogLines(buffer)
    finally:
        configure_logging("json", "WARNING")
