"""The scrubber: after deletions commit, no byte of a deleted row stays in the database files.

Deleting a row does not remove its bytes from disk by itself:

- SQLite (``secure_delete`` on, see ``service.db``) zeroes the deleted cells, but the write-
  ahead log still holds the page images written *before* the deletion until a checkpoint
  copies the WAL into the main file and ``TRUNCATE`` cuts the log to zero bytes;
- PostgreSQL keeps dead tuples in its heap and index pages until a vacuum; a plain
  ``VACUUM`` frees them but leaves their bytes in the page's free space (measured: a third
  of deleted addresses survived one), so the default is ``VACUUM FULL``, which rewrites the
  touched tables into new files and truncates the old ones.

The worker tells the scrubber which tables a committed batch touched (:meth:`Scrubber.note`);
the scrubber runs at most ``erasure_delay_s`` after the first such note and never more often
than once per ``erasure_delay_s``, which bounds both the delay and the cost. A failed run
(database down, lock not granted within ``erasure_lock_timeout_s``, a reader holding the WAL)
is logged and retried one delay later; it never stops the worker. A run the database refuses
for good (service.faults: say, ``VACUUM`` not permitted to the service's role) is not an
outage and is not logged as one (``erasure_scrub_refused``, an error): the scrubber still
keeps the tables pending and tries again one delay later, since giving up would leave the
deleted values in the files, which is what it is for. ``VACUUM`` cannot run inside a
transaction block, so it runs on an autocommit connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from service.aio import wait_any
from service.config import Settings
from service.db import Database
from service.errors import RetryLater
from service.faults import describe, is_transient
from service.logs import get_logger

log = get_logger(__name__)

# Batches that commit close together are scrubbed together: wait this long (at most the
# delay) after the first one before running.
SETTLE_S = 1.0


# SQLite refuses a checkpoint at once (busy), without waiting, while another connection
# checkpoints; every process checkpoints its commits in the background
# (service.db._WalCheckpointer), so the TRUNCATE is tried again this many times, this far
# apart, when it was refused that quickly, before the run is left to the next one.
BUSY_RETRIES = 40
BUSY_PAUSE_S = 0.05
BUSY_QUICK_S = 0.5


class ScrubIncomplete(RetryLater):
    """SQLite could not checkpoint the whole WAL (a reader still holds an old snapshot):
    transient, the next run may get through."""


class Scrubber:
    """Runs the erasure housekeeping of one process, within a bounded delay of deletions."""

    def __init__(
        self, settings: Settings, db: Database, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.db = db
        self.delay_s = settings.erasure_delay_s
        self.pg_mode = settings.erasure_pg_vacuum
        self.lock_timeout_ms = int(settings.erasure_lock_timeout_s * 1000)
        self.clock = clock
        self.runs = 0
        self._pending: set[str] = set()
        self._since: float | None = None
        self._last_run = float("-inf")
        self._wake = asyncio.Event()

    def note(self, tables: Iterable[str]) -> None:
        """Deletions (or redactions) in these tables have committed: scrub them soon."""
        if self._since is None:
            self._since = self.clock()
        self._pending.update(tables)
        self._wake.set()

    def due_at(self) -> float | None:
        """When the next run should start (clock seconds), or None when nothing waits."""
        if self._since is None:
            return None
        return max(self._since + min(SETTLE_S, self.delay_s), self._last_run + self.delay_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Scrub whenever a run is due, until `stop` is set; a last run on the way out."""
        while not stop.is_set():
            due = self.due_at()
            if due is None:
                self._wake.clear()
                await wait_any(3600.0, self._wake, stop)
                continue
            remaining = due - self.clock()
            if remaining > 0:
                await wait_any(remaining, stop)
                continue
            await self.scrub()
        if self._since is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.scrub(), timeout=10)

    async def scrub(self) -> bool:
        """Scrub what is pending now; False (and still pending) when it did not work."""
        tables, since = self._pending, self._since
        self._pending, self._since = set(), None
        started = self.clock()
        try:
            if self.db.is_sqlite:
                await self._checkpoint()
            elif self.pg_mode != "off":
                await self._vacuum(sorted(tables))
        except Exception as exc:
            self._pending |= tables
            self._since = since if self._since is None else min(self._since, since or started)
            if is_transient(exc):
                log.warning("erasure_scrub_failed", error=repr(exc), retry_in_s=self.delay_s)
            else:
                log.error(
                    "erasure_scrub_refused",
                    error=describe(exc),
                    tables=sorted(tables),
                    retry_in_s=self.delay_s,
                    reason="not an outage: the tables stay pending, their old row versions kept",
                )
            return False
        finally:
            self._last_run = self.clock()
        self.runs += 1
        log.info(
            "erasure_scrubbed",
            backend="sqlite" if self.db.is_sqlite else "postgresql",
            tables=sorted(tables),
            mode="wal_checkpoint_truncate" if self.db.is_sqlite else f"vacuum_{self.pg_mode}",
            duration_ms=round((self._last_run - started) * 1000, 1),
        )
        return True

    async def _checkpoint(self) -> None:
        for _ in range(BUSY_RETRIES):
            started = time.monotonic()
            row = await self._truncate()
            if row is not None and row[0] == 0:
                return
            if time.monotonic() - started > BUSY_QUICK_S:
                break  # it waited (busy_timeout) for a reader: the next run tries again
            await asyncio.sleep(BUSY_PAUSE_S)  # another process was checkpointing
        raise ScrubIncomplete(f"wal_checkpoint(TRUNCATE) was blocked: {row}")

    async def _truncate(self) -> Any:
        # On the writer's only connection, outside any transaction: no write of this process
        # can slip in, and the checkpoint waits (busy_timeout) for other processes' readers.
        # This process's background checkpoints wait meanwhile (SQLite would refuse this one
        # while another runs: service.db._WalCheckpointer).
        async with self.db.checkpoint_turn(), self.db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            cursor = await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            row = await cursor.fetchone()
            await cursor.close()
        return row

    async def _vacuum(self, tables: list[str]) -> None:
        command = "VACUUM (FULL)" if self.pg_mode == "full" else "VACUUM"
        # No bound on a statement's answer: VACUUM FULL of a big table takes minutes.
        async with self.db.unbounded() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.exec_driver_sql(f"SET lock_timeout = {self.lock_timeout_ms}")
            try:
                for table in tables:
                    # Names come from our own metadata, never from input; quoted anyway.
                    quoted = auto.dialect.identifier_preparer.quote(table)
                    await auto.exec_driver_sql(f"{command} {quoted}")
            finally:
                await auto.exec_driver_sql("RESET lock_timeout")


def touched_tables(deleted: bool, redacted: Iterable[sa.Table]) -> set[str]:
    """The tables whose old row versions hold a deleted contact's values."""
    names = {t.name for t in redacted}
    if deleted:
        names.add("contacts")
    return names
