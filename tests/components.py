"""Service components as real processes (`contact-deletion <component>`), for crash tests.

Each process gets the test's settings through its environment, writes its output to a
file in the test's tmp dir, and is stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

from service.config import Settings
from service.db import utcnow
from service.events import (
    TYPE_CONTACT_DELETED,
    CloudEvent,
    ContactDeleted,
    OrphanedTimeline,
    envelope,
)

COMMAND = str(Path(sys.executable).with_name("contact-deletion"))


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30.0
) -> None:
    """Send ``sig`` (a polite stop), then SIGKILL if it has not ended within ``timeout_s``;
    reaps it."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def wait_ready(base: str, exited: Callable[[], str | None], timeout_s: float = 60.0) -> None:
    """Poll ``{base}/readyz`` until it answers 200 (every 0.2 s, at most `timeout_s`).

    `exited()` says why the service cannot get ready (its exit and log tail), or None while
    it runs; either that or the time running out fails the test with the reason.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < deadline:
            problem = exited()
            if problem is not None:
                raise AssertionError(f"the service exited before it was ready:\n{problem}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError(f"the service did not get ready in {timeout_s} s")


@dataclass
class Process:
    """One `contact-deletion <component>` process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    async def wait_exit(self, timeout_s: float) -> int:
        """Its return code once it has exited (fails the test if it outlives timeout_s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (code := self.popen.poll()) is None:
            assert loop.time() < deadline, f"{self.name} still running after {timeout_s} s"
            await asyncio.sleep(0.1)
        return code

    def assert_running(self) -> None:
        code = self.popen.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.tail()}"

    def exited(self) -> str | None:
        """None while it runs; else its exit status and the tail of its output."""
        code = self.popen.poll()
        return None if code is None else f"{self.name} exited with {code}:\n{self.tail()}"

    def kill(self) -> int:
        """SIGKILL; returns the exit status."""
        self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        stop_process(self.popen, timeout_s=20)
        self.log_file.close()

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Components:
    """Starts component processes with the test's settings; stops them all at the end."""

    def __init__(
        self, settings: Settings, log_dir: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.started: list[Process] = []

    def env(self, failpoint: str | None) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.pop("FAILPOINT", None)
        env.update(
            DATABASE_URL=s.database_url,
            KAFKA_BOOTSTRAP_SERVERS=s.kafka_bootstrap_servers,
            KAFKA_TOPIC_PREFIX=s.kafka_topic_prefix,
            KAFKA_CONSUMER_GROUP_PREFIX=s.kafka_consumer_group_prefix,
            KAFKA_PARTITIONS=str(s.kafka_partitions),
            WORKER_BATCH_SIZE=str(s.worker_batch),
            RELAY_BATCH_SIZE=str(s.relay_batch),
            WEBHOOK_ALLOW_PRIVATE_NETWORKS=str(s.webhook_allow_private_networks).lower(),
            WEBHOOK_RETRY_SCHEDULE=s.webhook_retry_schedule,
            WEBHOOK_TIMEOUT_S=str(s.webhook_timeout_s),
            LOG_LEVEL="INFO",
            LOG_FORMAT="json",
        )
        env.update(self.extra_env)
        if failpoint is not None:
            env["FAILPOINT"] = failpoint
        return env

    def start(self, component: str, failpoint: str | None = None) -> Process:
        name = f"{component}-{len(self.started) + 1}" + (f"-{failpoint}" if failpoint else "")
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            [COMMAND, component],
            env=self.env(failpoint),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        process = Process(name, popen, log_path, log_file)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def print_tails(self) -> None:
        # pytest shows what a test printed only when it failed.
        for process in self.started:
            print(f"\n----- {process.name} (exit {process.popen.returncode}) -----")
            print(process.tail())


@contextmanager
def components(
    settings: Settings, log_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[Components]:
    """Components for one test; every process is stopped and its log tail shown at the end."""
    group = Components(settings, log_dir, extra_env)
    try:
        yield group
    finally:
        group.stop_all()
        group.print_tails()


def contact_deleted_event(workspace_id: uuid.UUID) -> CloudEvent:
    """A ``contact.deleted`` event of the workspace for a new contact id (empty timeline, a
    zero email hash), as the worker publishes it; its ``subject`` is the contact id."""
    contact_id = uuid.uuid4()
    return envelope(
        TYPE_CONTACT_DELETED,
        str(contact_id),
        ContactDeleted(
            contact_id=contact_id,
            workspace_id=workspace_id,
            job_id=uuid.uuid4(),
            deleted_at=utcnow(),
            email_sha256="0" * 64,
            orphaned_timeline=OrphanedTimeline(activities=0, notes=0, tasks=0),
        ),
        utcnow(),
    )


async def port_from_log(
    log_path: Path,
    exited: Callable[[], str | None],
    event: str = "api_listening",
    timeout_s: float = 60.0,
) -> int:
    """The port a service started with port 0 bound, read from the `event` line of its
    JSON log: no port is probed free first and then raced for by another test's process.
    `exited()` says why it cannot come (its exit and log tail), or None while it runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        problem = exited()
        assert problem is None, f"the service exited before it listened:\n{problem}"
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    return int(record["port"])
        assert loop.time() < deadline, f"no {event} line in {log_path} in {timeout_s} s"
        await asyncio.sleep(0.1)


async def listening_port(process: Process, event: str = "api_listening") -> int:
    """`port_from_log` of a component process."""
    return await port_from_log(process.log_path, process.exited, event)
