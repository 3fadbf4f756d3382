"""`contact-deletion bench`: how fast the running service deletes contacts, against a floor.

A benchmark, not a test: it prints figures and asserts nothing. One run:

1. starts what it needs, in a temporary directory: a Kafka broker (unless the configured
   ``KAFKA_BOOTSTRAP_SERVERS`` answers), a fresh database (a SQLite file, or a new
   PostgreSQL database: a throwaway cluster unless ``--database-url`` names a server),
   migrates it and creates an API key;
2. runs the service as a separate process (``python -m service.cli run``) on a free port,
   with its own topic prefix and consumer groups, and waits for ``/healthz``;
3. seeds N contacts with a timeline (one activity and one note each) by batched inserts;
4. deletes them through ``POST /v1/contacts/bulk-delete`` in ``--batch``-id requests from
   ``--concurrency`` clients, waits until every job has completed, and reads from the
   database when each job item was processed: accepted contacts/s, end-to-end deleted
   contacts/s, the latency from a request's acceptance to each of its deletions, and the
   service's peak RSS (``VmHWM``);
5. with ``--webhooks K``: K receivers in one separate process (service.bench_receiver)
   verify every signature with PyPI ``standardwebhooks``; K endpoints are subscribed to
   ``contact.deleted`` before the deletion, and the bench waits for K*N deliveries:
   deliveries/s, latency from acceptance of the deletion request to arrival, invalid
   signatures; then the floor: the same payloads, signed, POSTed by a plain aiohttp loop
   with the dispatcher's concurrency (4 per endpoint), and the ratio;
6. the bare floor: N more contacts (another workspace, seeded with the N) deleted by a
   plain SQL loop (null the timeline references, delete the contacts, commit; 500 at a
   time; no Kafka, no audit) beside the idle service, with its CPU per contact (the bench
   process; the PostgreSQL server's when the bench started it), and
   ``service_to_floor_ratio``. Until here the database holds what it always did (2N + 1
   contacts): the contacts of 8 and 9 are seeded only now, since a bigger table made the
   floor's deletes of random ids 15-35 % slower;
7. with ``--filter-contacts M``: M contacts deleted by one filter job: its duration and
   the service's peak RSS while it ran;
8. rows per contact, table by table (``rows_per_contact``, untimed): counting triggers
   (service.bench_contract.RowCounter) on every table while the service deletes a sample
   of min(N, 1000) more contacts as in 4 (to their last webhook's recorded outcome), and
   then while the contract floor (9) writes the same number; the service is stopped after
   it, so that the contract floor runs alone (its relay and dispatcher would take the
   contract floor's outbox rows and deliveries for their own);
9. the contract floor (service.bench_contract), over N more contacts of a workspace of its
   own: the rows DESIGN.md §1 requires of any implementation (job, items, outbox rows and
   their publication, the worker's transaction with its audit chain, one delivery per
   endpoint with its attempt and outcome), written by a plain SQL loop, ``--batch``
   contacts per job, with its CPU per contact and its ratios (`contract_figures`): to the
   bare floor, the service's end to end against it, for the whole contract and for its
   deletion part (up to the worker's commit, where end to end counts a contact deleted),
   with the ceilings their CPU sets on this machine's cores. It runs in the bigger
   database (so its ratio to the bare floor leans low, if anything).

Beside the figures it reports what explains them: CPU seconds of each process it started
over the deletion phase and to the last webhook, and per item: ``cpu_ms_per_contact`` (the
service over the deletion phase / N) and ``cpu_ms_per_delivery`` (the dispatcher's share /
deliveries), each with the PostgreSQL server's CPU beside it (``db_cpu_ms_per_*``) when the
bench started the server and the Kafka broker's (``broker_cpu_ms_per_*``) when it started
the broker (see ``cpu_per_item``), and the ceilings that CPU sets on this machine's cores
(``infra_ceiling_contacts_per_s``: the servers alone; ``cpu_ceiling_contacts_per_s``: with
the service; each against the floor, see ``cpu_ceilings``); how fast the dispatcher drains what is
left after the last deletion (``webhook_drain_deliveries_per_s``: its own pace, not capped
by the deletions feeding it); ``--split`` runs the api, relay, worker and dispatcher as
four processes, each measured on its own; the worker's transactions (contacts per
transaction), per outbox topic when the relay published the last row, and the machine's
load average (other work on the machine skews everything). ``--rate`` paces the requests
(latency at a given load); ``--profile-service FILE`` runs the service under cProfile.

It prints a table and then one JSON line with every figure, and stops everything it
started (service, receivers, broker, cluster, temporary files) on success, failure or
Ctrl-C. The service process inherits the environment, so its knobs (``WORKER_BATCH_SIZE``
and the like) can be varied from the shell; the bench sets only what isolates the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import aiohttp
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from service.bench_contract import (
    DELETION_STAGES,
    STAGES,
    RowCounter,
    StageClock,
    add_endpoints,
    contract_floor,
)
from service.bench_options import add_arguments
from service.bench_receiver import CONFIG_PATH, HOOK_PATH, RESET_PATH, STATS_PATH
from service.config import Settings
from service.contacts.store import contact_row
from service.db import (
    Database,
    activities,
    admin_sql,
    contacts,
    deletion_job_items,
    deletion_jobs,
    notes,
    outbox,
    tasks,
    utcnow,
    webhook_deliveries,
)
from service.keys import SCOPES, create_key, ensure_workspace
from service.localkafka import LocalKafka, broker_answers
from service.localpg import LocalPostgres
from service.logs import configure_logging, get_logger
from service.migrate import upgrade_sync
from service.procs import die_with_parent_hook, free_port, read_tail
from service.webhooks.signing import webhook_headers

T = TypeVar("T")
log = get_logger(__name__)

SEED_BATCH = 5000
FLOOR_BATCH = 500
POLL_INTERVAL_S = 0.5
FLOOR_USER_AGENT = "contact-deletion-bench-floor/0.1"
FILTER_LAST_NAME = "bench-filter"
ROWS_SAMPLE = 1000
"""Contacts (at most) of the untimed sample on which the bench counts the rows the service
and the contract floor write per table (``rows_per_contact``)."""


class BenchFailed(Exception):
    """The bench could not run to the end; the message says why."""


# --- figures ---------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max (nearest rank), in the unit given; None when empty."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": ordered[-1]}


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    """Percentiles of seconds, in milliseconds, rounded."""
    return {
        k: (round(v * 1000, 1) if v is not None else None) for k, v in percentiles(values).items()
    }


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# --- processes -------------------------------------------------------------------------------


def _proc_status_kb(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _ticks(fields: list[str]) -> int:
    return sum(int(f) for f in fields[11:15])  # utime stime cutime cstime


def process_tree(root_pid: int) -> tuple[set[int], dict[int, int]]:
    """A process and its live descendants, and the CPU clock ticks each has used (with
    what its exited children left it)."""
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (fields := _stat_fields(entry)) is None:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = _ticks(fields)
    tree = {root_pid}
    grew = True
    while grew:
        grown = {pid for pid, parent in parents.items() if parent in tree} - tree
        grew = bool(grown)
        tree |= grown
    return tree, used


def cpu_seconds(root_pid: int) -> float:
    """CPU time (user + system) of a process and its live descendants, with what their
    exited children left them (cutime, cstime), in seconds."""
    tree, used = process_tree(root_pid)
    return sum(used.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def tree_clock(root_pid: int) -> Callable[[], float]:
    """CPU seconds of the processes of ``root_pid``'s tree as it is now, read from their
    stat files alone (not a walk of /proc: cheap enough to read between two statements);
    a process that started later is not counted."""
    tree, _ = process_tree(root_pid)
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        return sum(_ticks(f) for pid in tree if (f := _stat_fields(pid)) is not None) / tick

    return read


@dataclass
class CpuMeter:
    """CPU seconds used by named processes (and by the bench) between two readings."""

    pids: dict[str, int]
    started: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    last: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        times = os.times()
        now["bench"] = times.user + times.system
        return now

    def start(self) -> None:
        self.started = self._read()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process since start(), and the wall-clock seconds."""
        now = self._read()
        used = {name: round(now[name] - self.started.get(name, 0.0), 2) for name in now}
        self.last = {**used, "wall": round(time.monotonic() - self.wall, 1)}
        return self.last


SERVICE_PROCESSES = ("service", "api", "relay", "worker")
"""The names under which CpuMeter counts the deletion side of the service."""


def cpu_per_item(
    cpu: dict[str, float], items: int, item: str, *, before: dict[str, float] | None = None
) -> dict[str, float | None]:
    """CPU milliseconds per item from CpuMeter readings.

    ``cpu_ms_per_<item>``: the service's processes (all-in-one ``service``, or with
    ``--split`` the deletion side for contacts and the ``dispatcher`` for deliveries);
    ``db_cpu_ms_per_<item>``: the PostgreSQL server the bench started, when it started
    one; ``broker_cpu_ms_per_<item>``: the Kafka broker's JVM, when the bench started it
    (a reused broker serves others too, so it is not counted). With ``before`` (a reading
    at the end of the deletion phase) and no separate dispatcher, a delivery's CPU is what
    the service spent beyond the deletion phase: a dispatcher that keeps up with the
    deletions does part of its work inside that phase, so this under-counts it then
    (``--split`` measures it exactly). The servers' figures are always beyond ``before``.
    """
    if items <= 0:
        return {f"cpu_ms_per_{item}": None}

    def per(seconds: float) -> float:
        return round(seconds * 1000 / items, 3)

    out: dict[str, float | None] = {}
    if item == "delivery" and "dispatcher" in cpu:
        out["cpu_ms_per_delivery"] = per(cpu["dispatcher"])
    elif item == "delivery" and before is not None:
        out["cpu_ms_per_delivery"] = per(cpu.get("service", 0.0) - before.get("service", 0.0))
    else:
        names = SERVICE_PROCESSES
        out[f"cpu_ms_per_{item}"] = per(sum(cpu.get(name, 0.0) for name in names))
    for server, prefix in (("postgres", "db"), ("kafka", "broker")):
        if server in cpu:
            spent = cpu[server] - (before or {}).get(server, 0.0)
            out[f"{prefix}_cpu_ms_per_{item}"] = per(spent)
    return out


def _per_second(cores: int, ms_per_item: float) -> float | None:
    return round(cores * 1000 / ms_per_item) if ms_per_item > 0 else None


def cpu_ceilings(figures: dict[str, Any], cores: int) -> dict[str, float | None]:
    """How many contacts/s the CPU measured over the deletion phase allows on ``cores``.

    ``infra_ceiling_contacts_per_s``: ``cores / (db + broker CPU per contact)``, the rate
    at which the PostgreSQL server and the Kafka broker alone would fill every core (a
    service that cost nothing); ``cpu_ceiling_contacts_per_s``: the same with the
    service's CPU added. Each with its ratio to the bare SQL floor of the run
    (``*_to_floor_ratio``): end to end cannot pass it. Both are upper bounds: the bench's
    own clients and the webhook receivers share the cores too and are not counted. Only
    when the bench started the broker (``broker_cpu_ms_per_contact``); on SQLite, whose
    database runs inside the service, the database server's share is 0. Needs
    ``floor_contacts_per_s`` for the ratios (None without it).
    """
    broker = figures.get("broker_cpu_ms_per_contact")
    if broker is None:
        return {}
    servers = broker + (figures.get("db_cpu_ms_per_contact") or 0.0)
    infra = _per_second(cores, servers)
    floor = figures.get("floor_contacts_per_s")
    out: dict[str, float | None] = {
        "infra_ceiling_contacts_per_s": infra,
        "infra_ceiling_to_floor_ratio": _ratio(infra, floor),
    }
    service = figures.get("cpu_ms_per_contact")
    if service is not None:
        everything = _per_second(cores, service + servers)
        out["cpu_ceiling_contacts_per_s"] = everything
        out["cpu_ceiling_to_floor_ratio"] = _ratio(everything, floor)
    return out


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("bench_process_kill", pid=process.pid)
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


class ServiceProcess:
    """The service as child processes, with their output in files: `python -m service.cli
    run` (every component in one process), or with ``split`` one process per component
    (`api`, `relay`, `worker`, `dispatcher`), each measured on its own."""

    def __init__(
        self,
        env: dict[str, str],
        port: int,
        workdir: Path,
        profile: Path | None = None,
        *,
        split: bool = False,
    ) -> None:
        self.env = env
        self.profile = profile
        self.port = port
        self.workdir = workdir
        self.commands = ("api", "relay", "worker", "dispatcher") if split else ("run",)
        self.base = f"http://127.0.0.1:{port}"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._outputs: list[IO[bytes]] = []

    def log_path(self, command: str) -> Path:
        return self.workdir / f"service-{command}.log"

    @property
    def pids(self) -> dict[str, int]:
        """Process name -> pid: ``service`` for the one process, else the components."""
        if not self._processes:
            raise BenchFailed("the service is not running")
        return {
            ("service" if command == "run" else command): process.pid
            for command, process in self._processes.items()
        }

    def start(self) -> None:
        for command in self.commands:
            output = self.log_path(command).open("wb")
            self._outputs.append(output)
            profiler: list[str] = []
            if self.profile is not None:
                path = self.profile if command == "run" else self.profile.with_suffix(f".{command}")
                profiler = ["-m", "cProfile", "-o", str(path.resolve())]
            self._processes[command] = subprocess.Popen(
                [sys.executable, *profiler, "-m", "service.cli", command],
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own group: a Ctrl-C reaches the bench, which then stops it in order.
                process_group=0,
                preexec_fn=die_with_parent_hook(),
            )

    def check_alive(self) -> None:
        for command, process in self._processes.items():
            if process.poll() is not None:
                raise BenchFailed(
                    f"the service ({command}) exited with {process.returncode}; its output:\n"
                    + read_tail(self.log_path(command), 30)
                )

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(self.base + "/healthz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise BenchFailed(
                    f"the service did not answer /healthz within {timeout_s:.0f} s:\n"
                    + read_tail(self.log_path(self.commands[0]), 30)
                )
            await asyncio.sleep(0.1)

    def _sum_kb(self, field_name: str) -> float | None:
        values = [_proc_status_kb(pid, field_name) for pid in self.pids.values()]
        if any(v is None for v in values):
            return None
        return round(sum(v for v in values if v is not None) / 1024, 1)

    def peak_rss_mb(self) -> float | None:
        """The highest resident set size so far (VmHWM), in MiB, summed over the
        processes (with ``split`` the peaks may not have coincided: an upper bound)."""
        return self._sum_kb("VmHWM")

    def rss_mb(self) -> float | None:
        return self._sum_kb("VmRSS")

    def reset_peak_rss(self) -> bool:
        """Restart VmHWM from the current RSS (``clear_refs`` 5); False if refused."""
        try:
            for pid in self.pids.values():
                with open(f"/proc/{pid}/clear_refs", "w") as refs:
                    refs.write("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        processes, self._processes = self._processes, {}
        # The API first, the dispatcher last: nothing is left half-sent by the order.
        for process in processes.values():
            _stop_process(process)
        outputs, self._outputs = self._outputs, []
        for output in outputs:
            output.close()


class ReceiverProcess:
    """`python -m service.bench_receiver --count K`: K verifying webhook receivers."""

    def __init__(self, count: int, workdir: Path) -> None:
        self.count = count
        self.log_path = workdir / "receiver.log"
        self.workdir = workdir
        self.ports: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None

    def start(self) -> None:
        self._errors = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "service.bench_receiver", "--count", str(self.count)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            process_group=0,
            preexec_fn=die_with_parent_hook(),
        )

    async def wait_ready(self, timeout_s: float = 30.0) -> list[int]:
        """Wait for the line with the receivers' ports; the ports."""
        process = self._process
        if process is None:
            raise BenchFailed("the webhook receivers are not started")
        stdout = process.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout_s)
        except TimeoutError:
            raise BenchFailed("the webhook receivers did not start in time") from None
        if not line:
            process.wait(timeout=5)
            raise BenchFailed(
                f"the webhook receivers exited with {process.returncode}:\n"
                + read_tail(self.log_path, 30)
            )
        self.ports = [int(p) for p in json.loads(line)["ports"]]
        return self.ports

    def url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop_process(process, timeout_s=10)
        if self._errors is not None:
            self._errors.close()
            self._errors = None


# --- the database ----------------------------------------------------------------------------


async def seed(
    db: Database,
    workspace_id: uuid.UUID,
    count: int,
    *,
    tag: str,
    keep_ids: bool = True,
) -> list[uuid.UUID]:
    """Insert ``count`` contacts with one activity and one note each; their ids."""
    ids: list[uuid.UUID] = []
    now = utcnow()
    for start in range(0, count, SEED_BATCH):
        people: list[dict[str, Any]] = []
        acts: list[dict[str, Any]] = []
        texts: list[dict[str, Any]] = []
        for i in range(start, min(count, start + SEED_BATCH)):
            contact_id = uuid.uuid4()
            if keep_ids:
                ids.append(contact_id)
            people.append(
                contact_row(
                    contact_id,
                    workspace_id,
                    f"{tag}-{i}@bench.example.com",
                    first_name="Bench",
                    last_name=tag,
                    at=now,
                )
            )
            acts.append(
                {
                    "id": uuid.uuid4(),
                    "workspace_id": workspace_id,
                    "contact_id": contact_id,
                    "type": "email",
                    "subject": "Welcome",
                    "body": "A bench activity.",
                    "occurred_at": now,
                    "created_at": now,
                }
            )
            texts.append(
                {
                    "id": uuid.uuid4(),
                    "workspace_id": workspace_id,
                    "contact_id": contact_id,
                    "body": "A bench note.",
                    "created_at": now,
                }
            )
        async with db.begin() as conn:
            await _bulk_insert(conn, contacts, people)
            await _bulk_insert(conn, activities, acts)
            await _bulk_insert(conn, notes, texts)
    if not db.is_sqlite:
        # COPY leaves PostgreSQL without statistics until autovacuum comes by (~40 s into a
        # run): until then it planned the worker's timeline reads as whole-table scans.
        async with db.begin() as conn:
            await conn.exec_driver_sql("ANALYZE contacts, activities, notes, tasks")
    return ids


async def _bulk_insert(conn: AsyncConnection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows at the driver level: PostgreSQL's COPY, SQLite's executemany (a million
    contacts seed in seconds, not minutes). The values go through the columns' own bind
    processing first, so they are stored exactly as a SQLAlchemy insert would store them."""
    names = list(rows[0])
    dialect = conn.dialect
    processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
    # Most values are the same object row after row (the workspace, the time): process
    # each such run once.
    last_in: list[Any] = [object()] * len(names)
    last_out: list[Any] = [None] * len(names)
    records = []
    for row in rows:
        record = []
        for i, name in enumerate(names):
            value = row[name]
            if value is not last_in[i]:
                process = processors[i]
                last_in[i], last_out[i] = value, process(value) if process else value
            record.append(last_out[i])
        records.append(tuple(record))
    if dialect.name == "postgresql":
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None  # an asyncpg connection, inside this transaction
        await driver.copy_records_to_table(table.name, records=records, columns=names)
        return
    marks = ", ".join("?" for _ in names)
    await conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})", records
    )


async def bare_floor(db: Database, ids: Sequence[uuid.UUID]) -> float:
    """Delete these contacts with a plain SQL loop; the seconds it took."""
    started = time.perf_counter()
    for start in range(0, len(ids), FLOOR_BATCH):
        chunk = list(ids[start : start + FLOOR_BATCH])
        async with db.begin() as conn:
            for table in (activities, notes, tasks):
                await conn.execute(
                    table.update().where(table.c.contact_id.in_(chunk)).values(contact_id=None)
                )
            await conn.execute(contacts.delete().where(contacts.c.id.in_(chunk)))
    return time.perf_counter() - started


async def count_contacts(db: Database, workspace_id: uuid.UUID) -> int:
    async with db.read() as conn:
        stmt = sa.select(sa.func.count()).select_from(contacts)
        return int(
            (await conn.execute(stmt.where(contacts.c.workspace_id == workspace_id))).scalar_one()
        )


async def unfinished_jobs(db: Database, workspace_id: uuid.UUID) -> int:
    c = deletion_jobs.c
    stmt = sa.select(sa.func.count()).where(
        c.workspace_id == workspace_id, c.completed_at.is_(None)
    )
    async with db.read() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def processed_items(
    db: Database, job_ids: Sequence[uuid.UUID]
) -> list[tuple[uuid.UUID, str, float | None]]:
    """(job id, status, processed_at as unix time) of every item of these jobs."""
    c = deletion_job_items.c
    out: list[tuple[uuid.UUID, str, float | None]] = []
    for start in range(0, len(job_ids), 200):
        chunk = list(job_ids[start : start + 200])
        async with db.read() as conn:
            rows = await conn.execute(
                sa.select(c.job_id, c.status, c.processed_at).where(c.job_id.in_(chunk))
            )
            out.extend(
                (r.job_id, r.status, r.processed_at.timestamp() if r.processed_at else None)
                for r in rows
            )
    return out


async def outbox_figures(db: Database, since: float) -> dict[str, dict[str, Any]]:
    """Per topic, the outbox rows written since ``since`` (unix s): how many, in how many
    relay batches, and when the last was published (seconds after ``since``)."""
    o = outbox.c
    start = datetime.fromtimestamp(since, UTC)
    stmt = (
        sa.select(
            o.topic,
            sa.func.count(),
            sa.func.count(sa.distinct(o.published_at)),
            sa.func.max(o.published_at),
        )
        .where(o.created_at >= start)
        .group_by(o.topic)
    )
    async with db.read() as conn:
        rows = (await conn.execute(stmt)).all()
    return {
        topic.split(".", 1)[-1]: {
            "rows": count,
            "relay_batches": batches,
            "last_published_s": round(last.timestamp() - since, 3) if last else None,
        }
        for topic, count, batches, last in rows
    }


@contextlib.contextmanager
def fresh_database(
    backend: str, server_url: str | None, workdir: Path
) -> Iterator[tuple[str, int | None]]:
    """The URL of an empty database for this run, and the pid of a server the bench
    started (None otherwise); everything made for it goes at the end."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'bench.db'}", None
        return
    if server_url is None:
        with LocalPostgres("contact_deletion_bench") as cluster:
            yield cluster.url, cluster.pid
        return
    name = f"cdbench_{secrets.token_hex(6)}"
    asyncio.run(admin_sql(server_url, f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        yield url, None
    finally:
        asyncio.run(admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class Api:
    """The service's HTTP API with the bench's key."""

    base: str
    key: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with self.http.request(
            method, self.base + path, json=body, headers=headers
        ) as response:
            raw = await response.read()
            return response.status, json.loads(raw) if raw else None


@dataclass(frozen=True)
class Request:
    """One bulk-delete request: its job, when it was sent and when it was accepted (unix s)."""

    job_id: uuid.UUID
    count: int
    sent: float
    accepted: float


async def delete_through_api(
    api: Api, ids: Sequence[uuid.UUID], batch: int, concurrency: int, rate: float
) -> list[Request]:
    """POST the ids in ``batch``-id requests from ``concurrency`` clients (paced if rate>0)."""
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    pending = iter(enumerate(chunks))
    done: list[Request] = []
    started = time.time()

    async def client() -> None:
        for index, chunk in pending:
            if rate > 0:
                await asyncio.sleep(max(0.0, started + index * batch / rate - time.time()))
            sent = time.time()
            status, body = await api.call(
                "POST", "/v1/contacts/bulk-delete", {"contact_ids": [str(i) for i in chunk]}
            )
            accepted = time.time()
            if status != 202:
                raise BenchFailed(f"bulk-delete answered {status}: {body}")
            done.append(Request(uuid.UUID(body["data"]["job_id"]), len(chunk), sent, accepted))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


# --- webhooks --------------------------------------------------------------------------------


@dataclass
class Webhooks:
    """The receivers and the endpoints that point at them."""

    receivers: ReceiverProcess
    endpoint_ids: list[uuid.UUID] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    async def subscribe(self, api: Api) -> None:
        """One endpoint (contact.deleted) per receiver; the receiver learns its secret."""
        for index in range(self.receivers.count):
            status, body = await api.call(
                "POST",
                "/v1/webhooks/endpoints",
                {
                    "url": self.receivers.url(index, HOOK_PATH),
                    "event_types": ["contact.deleted"],
                    "description": f"bench receiver {index}",
                },
            )
            if status != 201:
                raise BenchFailed(f"creating a webhook endpoint answered {status}: {body}")
            self.endpoint_ids.append(uuid.UUID(body["data"]["id"]))
            self.secrets.append(body["data"]["secret"])
            async with api.http.post(
                self.receivers.url(index, CONFIG_PATH), json={"secret": body["data"]["secret"]}
            ) as response:
                if response.status != 204:
                    raise BenchFailed(f"the receiver refused its secret ({response.status})")

    async def stats(self, http: aiohttp.ClientSession, *, arrivals: bool) -> list[dict[str, Any]]:
        out = []
        for index in range(self.receivers.count):
            url = self.receivers.url(index, STATS_PATH) + ("?arrivals=1" if arrivals else "")
            async with http.get(url) as response:
                out.append(await response.json())
        return out

    async def reset(self, http: aiohttp.ClientSession) -> None:
        for index in range(self.receivers.count):
            async with http.post(self.receivers.url(index, RESET_PATH)) as response:
                response.raise_for_status()

    async def wait_for(
        self, http: aiohttp.ClientSession, each: int, timeout_s: float, service: ServiceProcess
    ) -> bool:
        """Wait until every receiver has ``each`` distinct deliveries; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self.stats(http, arrivals=False)
            if all(s["unique"] >= each for s in stats):
                return True
            if time.monotonic() > deadline:
                return False
            service.check_alive()
            await asyncio.sleep(POLL_INTERVAL_S)


async def webhook_floor(
    http: aiohttp.ClientSession,
    hooks: Webhooks,
    db: Database,
    per_endpoint: int,
    delivered: Sequence[set[str]],
) -> tuple[int, float]:
    """The payloads of these deliveries (event ids, per receiver) again, signed and POSTed
    by a plain loop with ``per_endpoint`` senders per receiver; (count, seconds)."""
    d = webhook_deliveries.c
    work: list[tuple[int, str, bytes]] = []
    async with db.read() as conn:
        for index, endpoint_id in enumerate(hooks.endpoint_ids):
            rows = await conn.execute(
                sa.select(d.event_id, d.payload).where(d.endpoint_id == endpoint_id)
            )
            work.extend(
                (index, r.event_id, bytes(r.payload))
                for r in rows
                if r.event_id in delivered[index]
            )
    queues: list[list[tuple[int, str, bytes]]] = [[] for _ in hooks.endpoint_ids]
    for item in work:
        queues[item[0]].append(item)
    failures: list[str] = []

    async def sender(queue: list[tuple[int, str, bytes]]) -> None:
        while queue:
            index, event_id, body = queue.pop()
            headers = webhook_headers(
                [hooks.secrets[index]], event_id, int(time.time()), body, FLOOR_USER_AGENT
            )
            async with http.post(
                hooks.receivers.url(index, HOOK_PATH), data=body, headers=headers
            ) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    failures.append(f"{response.status} for {event_id}")

    started = time.perf_counter()
    await asyncio.gather(*(sender(q) for q in queues for _ in range(per_endpoint)))
    elapsed = time.perf_counter() - started
    if failures:
        raise BenchFailed(f"{len(failures)} floor webhook POSTs failed, e.g. {failures[0]}")
    return len(work), elapsed


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Environment:
    """What the bench started before the service: broker and database."""

    workdir: Path
    kafka_bootstrap: str
    kafka_started: bool
    database_url: str
    # Processes whose CPU time the figures account for (those the bench started).
    pids: dict[str, int | None] = field(default_factory=dict)


def _service_env(env: Environment, port: int) -> dict[str, str]:
    run = secrets.token_hex(4)
    # The child inherits the shell's environment (PATH, and any service knob being tuned);
    # only what isolates this run is set here.
    values = dict(os.environ)
    values.pop("FAILPOINT", None)
    values.update(
        {
            "DATABASE_URL": env.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap,
            "KAFKA_TOPIC_PREFIX": f"bench-{run}.",
            "KAFKA_CONSUMER_GROUP_PREFIX": f"bench-{run}",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(port),
            "RATE_LIMIT_PER_S": "1000000",
            "RATE_LIMIT_BURST": "1000000",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "DATA_DIR": str(env.workdir / "data"),
        }
    )
    return values


async def measure(args: argparse.Namespace, env: Environment) -> dict[str, Any]:
    """Everything after the broker and the database are up; returns the figures."""
    n: int = args.contacts
    figures: dict[str, Any] = {
        "contacts": n,
        "database": args.database,
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "concurrency": args.concurrency,
        "rate_limit_contacts_per_s": args.rate or None,
        "webhooks": args.webhooks,
        "processes": "split" if args.split else "one",
        "kafka": "reused" if not env.kafka_started else "local",
        # Other work on the machine skews every figure; this says how busy it was.
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    db = Database(env.database_url)
    port = free_port()
    service = ServiceProcess(
        _service_env(env, port), port, env.workdir, args.profile_service, split=args.split
    )
    receivers = ReceiverProcess(args.webhooks, env.workdir) if args.webhooks else None
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            key = await create_key(db, "bench-service", list(SCOPES))
            floor_workspace = await ensure_workspace(db, "bench-floor")
            log.info("bench_seeding", contacts=2 * n)
            started = time.perf_counter()
            ids = await seed(db, key.workspace_id, n + 1, tag="bench-service")
            warm_up_id = ids.pop()
            floor_ids = await seed(db, floor_workspace, n, tag="bench-floor")
            figures["seed_contacts_per_s"] = _rate(2 * n + 1, time.perf_counter() - started)
            contract_workspace = await ensure_workspace(db, "bench-contract")

            log.info("bench_service_starting", port=service.port)
            service.start()
            await service.wait_healthy(http, timeout_s=120)
            figures["service_rss_idle_mb"] = service.rss_mb()
            api = Api(service.base, key.key, http)

            hooks: Webhooks | None = None
            if receivers is not None:
                receivers.start()
                await receivers.wait_ready()
                hooks = Webhooks(receivers)
                await hooks.subscribe(api)

            # One job of one contact first, so that the relay, the worker and the
            # dispatcher have joined their groups before anything is timed.
            await _warm_up(api, warm_up_id, hooks, service, args.timeout)
            log.info("bench_deleting", contacts=n, batch=args.batch, concurrency=args.concurrency)
            meter = CpuMeter(
                service.pids | {name: pid for name, pid in env.pids.items() if pid is not None}
            )
            meter.start()
            requests = await delete_through_api(api, ids, args.batch, args.concurrency, args.rate)
            await _wait(
                lambda: unfinished_jobs(db, key.workspace_id), args.timeout, service, "jobs"
            )
            figures["cpu_seconds"] = meter.stop()
            figures |= cpu_per_item(figures["cpu_seconds"], n, "contact")
            deletion = await _deletion_figures(db, requests, n)
            deletion_ended = deletion.pop("last_done_at")
            figures |= deletion
            figures["outbox"] = await outbox_figures(db, min(r.sent for r in requests))
            figures["contacts_left"] = await count_contacts(db, key.workspace_id)

            if hooks is not None:
                figures |= await _webhook_figures(
                    http, hooks, requests, n, args, service, db, meter, deletion_ended
                )
            figures["service_peak_rss_mb"] = service.peak_rss_mb()
            servers = {name: pid for name, pid in env.pids.items() if pid is not None}
            log.info("bench_floor", contacts=n)
            meter = CpuMeter(servers)
            meter.start()
            floor_s = await bare_floor(db, floor_ids)
            floor_cpu = meter.stop()
            figures["floor_contacts_per_s"] = _rate(n, floor_s)
            figures["floor_seconds"] = round(floor_s, 3)
            figures |= _floor_cpu("floor", floor_cpu, n)
            figures["service_to_floor_ratio"] = _ratio(
                figures["end_to_end_contacts_per_s"], figures["floor_contacts_per_s"]
            )
            # Seeded only now: the timed phase and the bare floor run in a database of the
            # size they always did (2N contacts), beside the idle service, as before the
            # contract floor existed. Seeded first, these N + 2 min(N, 1000) more contacts made
            # the bare floor's deletes of random ids 15-35 % slower (more pages per batch),
            # and the floor ratios incomparable with earlier runs.
            sample = min(n, ROWS_SAMPLE)
            sample_ids = await seed(db, key.workspace_id, sample, tag="bench-sample")
            contract_ids = await seed(db, contract_workspace, n + sample + 1, tag="bench-contract")
            contract_warm_up = contract_ids.pop()
            if args.filter_contacts:
                figures |= await _filter_figures(db, http, service, args, servers)

            # What the service writes per contact, table by table, on a sample (untimed:
            # the counting triggers slow every writer); then the same for the contract floor.
            counter = RowCounter(db)
            await counter.install()
            try:
                service_rows = await _service_rows(
                    db, api, hooks, service, counter, sample_ids, key.workspace_id, args
                )
                # The floors run alone: the service's relay and dispatcher would take the
                # contract floor's outbox rows and deliveries for their own.
                service.stop()
                endpoints = await add_endpoints(db, contract_workspace, args.webhooks)
                hash_key = secrets.token_bytes(32)
                # One contact first, as the service's warm-up: it starts the audit chain.
                await contract_floor(
                    db, contract_workspace, [contract_warm_up], endpoints, hash_key
                )
                await counter.counts(sample)  # the warm-up's rows are not the sample's
                await contract_floor(
                    db, contract_workspace, contract_ids[n:], endpoints, hash_key, batch=args.batch
                )
                figures["rows_per_contact"] = {
                    "sample_contacts": sample,
                    "service": service_rows,
                    "contract_floor": await counter.counts(sample),
                }
            finally:
                await counter.remove()

            meter = CpuMeter(servers)
            log.info("bench_contract_floor", contacts=n, endpoints=args.webhooks)
            clock = StageClock(tree_clock(servers["postgres"]) if "postgres" in servers else None)
            meter.start()
            await contract_floor(
                db,
                contract_workspace,
                contract_ids[:n],
                endpoints,
                hash_key,
                clock,
                batch=args.batch,
            )
            figures |= contract_figures(figures, meter.stop(), clock, n, os.cpu_count() or 1)
            figures |= cpu_ceilings(figures, os.cpu_count() or 1)
            figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        service.stop()
        if receivers is not None:
            receivers.stop()
        await db.dispose()
    return figures


async def _service_rows(
    db: Database,
    api: Api,
    hooks: Webhooks | None,
    service: ServiceProcess,
    counter: RowCounter,
    ids: Sequence[uuid.UUID],
    workspace_id: uuid.UUID,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """Rows per contact per table (`RowCounter.counts`) the service writes deleting these
    contacts as the timed phase did (``--batch``-id requests from ``--concurrency``
    clients), until every job has finished, every outbox row is published and every
    webhook's outcome is recorded."""
    if hooks is not None:
        await hooks.reset(api.http)
    # What the service still had to write for the timed phase (a delivery's outcome is
    # recorded after its receiver got it) is not the sample's.
    await _wait(lambda: _unsettled(db, workspace_id), args.timeout, service, "rows")
    await counter.counts(len(ids))
    await delete_through_api(api, ids, args.batch, args.concurrency, 0.0)
    await _wait(lambda: unfinished_jobs(db, workspace_id), args.timeout, service, "jobs")
    if hooks is not None and not await hooks.wait_for(api.http, len(ids), args.timeout, service):
        raise BenchFailed("the sample's webhooks did not all arrive in time")
    await _wait(lambda: _unsettled(db, workspace_id), args.timeout, service, "rows")
    return await counter.counts(len(ids))


async def _unsettled(db: Database, workspace_id: uuid.UUID) -> int:
    """Outbox rows not yet published, and the workspace's deliveries not yet finished."""
    d = webhook_deliveries.c
    async with db.read() as conn:
        waiting = await conn.execute(
            sa.select(sa.func.count()).where(
                outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None)
            )
        )
        sending = await conn.execute(
            sa.select(sa.func.count()).where(
                d.workspace_id == workspace_id, d.completed_at.is_(None)
            )
        )
        return int(waiting.scalar_one()) + int(sending.scalar_one())


def _floor_cpu(name: str, cpu: dict[str, float], n: int) -> dict[str, float]:
    """A floor's CPU per contact: the bench process's (``<name>_cpu_ms_per_contact``: the
    SQL loop's Python, and on SQLite the database engine) and, when the bench started it,
    the PostgreSQL server's (``<name>_db_cpu_ms_per_contact``)."""
    out = {f"{name}_cpu_ms_per_contact": round(cpu["bench"] * 1000 / n, 3)}
    if "postgres" in cpu:
        out[f"{name}_db_cpu_ms_per_contact"] = round(cpu["postgres"] * 1000 / n, 3)
    return out


def contract_figures(
    figures: dict[str, Any], cpu: dict[str, float], clock: StageClock, n: int, cores: int
) -> dict[str, Any]:
    """The contract floor's figures from its run over ``n`` contacts (``cpu``: CpuMeter's
    reading over it; ``clock``: its stages).

    For the whole contract (``contract_floor_*``) and for its deletion part alone
    (``contract_floor_deletion_*``: the API's, the relay's and the worker's transactions,
    up to the point where the service's end to end counts a contact deleted, the
    dispatcher's rows left out as an implementation could defer them): the rate, the CPU
    per contact (`_floor_cpu`: the bench process, the PostgreSQL server), the ratio to
    the bare floor of the run, the service's end to end against it, and the ceiling its
    CPU sets on ``cores`` (``*_cpu_ceiling_contacts_per_s``: the rate at which these writes
    alone, issued as this loop issues them, would fill every core; a sequential loop
    leaves a core idle part of the time, so an implementation that overlapped its work
    could pass the loop's rate, but not this). ``contract_floor_stages``: seconds and CPU
    per contact of each transaction kind (service.bench_contract.STAGES).
    """
    floor = figures.get("floor_contacts_per_s")
    end_to_end = figures.get("end_to_end_contacts_per_s")
    whole = sum(clock.seconds.values())
    server = "postgres" in cpu
    out: dict[str, Any] = {}
    for name, stages in (("contract_floor", STAGES), ("contract_floor_deletion", DELETION_STAGES)):
        seconds = sum(clock.seconds[s] for s in stages)
        share = seconds / whole if whole > 0 else 0.0
        # CpuMeter's totals (every server process), split as the stage clock saw them.
        spent = {"bench": cpu["bench"] * _part(clock.cpu, stages)}
        if server:
            spent["postgres"] = cpu["postgres"] * _part(clock.server, stages, share)
        rate = _rate(n, seconds)
        per = _floor_cpu(name, spent, n)
        ceiling = _per_second(cores, sum(per.values()))
        out |= {
            f"{name}_contacts_per_s": rate,
            f"{name}_seconds": round(seconds, 3),
            **per,
            f"{name}_to_floor_ratio": _ratio(rate, floor),
            f"service_to_{name}_ratio": _ratio(end_to_end, rate),
            f"{name}_cpu_ceiling_contacts_per_s": ceiling,
            f"{name}_cpu_ceiling_to_floor_ratio": _ratio(ceiling, floor),
        }
    out["contract_floor_stages"] = {
        stage: {
            "seconds": round(clock.seconds[stage], 3),
            "cpu_ms_per_contact": round(clock.cpu[stage] * 1000 / n, 3),
            **(
                {"db_cpu_ms_per_contact": round(clock.server[stage] * 1000 / n, 3)}
                if server
                else {}
            ),
        }
        for stage in STAGES
    }
    return out


def _part(spent: dict[str, float], stages: Sequence[str], default: float = 1.0) -> float:
    """The share of ``spent`` that went to ``stages`` (``default`` when nothing was)."""
    total = sum(spent.values())
    return sum(spent[s] for s in stages) / total if total > 0 else default


async def _warm_up(
    api: Api,
    contact_id: uuid.UUID,
    hooks: Webhooks | None,
    service: ServiceProcess,
    timeout_s: float,
) -> None:
    """Delete one contact and wait for its job (and its webhooks) to finish."""
    log.info("bench_warming_up")
    status, body = await api.call("DELETE", f"/v1/contacts/{contact_id}")
    if status != 202:
        raise BenchFailed(f"the warm-up deletion answered {status}: {body}")
    job_path = f"/v1/bulk-jobs/{body['data']['job_id']}"
    deadline = time.monotonic() + timeout_s
    while body["data"]["completed_at"] is None:
        service.check_alive()
        if time.monotonic() > deadline:
            raise BenchFailed("the warm-up deletion did not finish in time")
        await asyncio.sleep(0.1)
        status, body = await api.call("GET", job_path)
    if body["data"]["deleted_count"] != 1:
        raise BenchFailed(f"the warm-up deletion did not delete its contact: {body}")
    if hooks is not None:
        if not await hooks.wait_for(api.http, 1, timeout_s, service):
            raise BenchFailed("the warm-up webhook did not arrive in time")
        await hooks.reset(api.http)


async def _wait(
    probe: Callable[[], Awaitable[int]], timeout_s: float, service: ServiceProcess, what: str
) -> None:
    """Poll ``probe()`` (a count of what is left) until it is 0."""
    deadline = time.monotonic() + timeout_s
    while (left := await probe()) > 0:
        service.check_alive()
        if time.monotonic() > deadline:
            raise BenchFailed(f"{left} {what} still unfinished after {timeout_s:.0f} s")
        await asyncio.sleep(POLL_INTERVAL_S)


async def _deletion_figures(db: Database, requests: list[Request], n: int) -> dict[str, Any]:
    first_sent = min(r.sent for r in requests)
    last_accepted = max(r.accepted for r in requests)
    accepted_at = {r.job_id: r.accepted for r in requests}
    items = await processed_items(db, list(accepted_at))
    done_at = [at for _, _, at in items if at is not None]
    deleted = sum(1 for _, status, _ in items if status == "deleted")
    last_done = max(done_at) if done_at else first_sent
    # Each worker transaction stamps its items with one processed_at.
    transactions = len(set(done_at))
    return {
        "worker_transactions": transactions,
        "contacts_per_worker_transaction": round(len(done_at) / transactions, 1)
        if transactions
        else None,
        "deleted": deleted,
        "accept_seconds": round(last_accepted - first_sent, 3),
        "accepted_contacts_per_s": _rate(n, last_accepted - first_sent),
        "request_latency_ms": _ms([r.accepted - r.sent for r in requests]),
        "end_to_end_seconds": round(last_done - first_sent, 3),
        "end_to_end_contacts_per_s": _rate(n, last_done - first_sent),
        "deletion_latency_ms": _ms(
            [at - accepted_at[job] for job, _, at in items if at is not None]
        ),
        "last_done_at": last_done,
    }


async def _webhook_figures(
    http: aiohttp.ClientSession,
    hooks: Webhooks,
    requests: list[Request],
    n: int,
    args: argparse.Namespace,
    service: ServiceProcess,
    db: Database,
    meter: CpuMeter,
    deletion_ended: float,
) -> dict[str, Any]:
    """Deliveries, their latency, CPU and the floor. ``deletion_ended``: unix time of the
    last deletion, after which what arrives is the backlog the dispatcher drains."""
    k = hooks.receivers.count
    deletion_cpu = meter.last
    complete = await hooks.wait_for(http, n, args.timeout, service)
    # From the first deletion request to the last webhook (the receivers included).
    cpu = meter.stop()
    stats = await hooks.stats(http, arrivals=True)
    first_sent = min(r.sent for r in requests)
    accepted_at = {str(r.job_id): r.accepted for r in requests}
    latencies: list[float] = []
    last_arrival = first_sent
    unique = 0
    drained = 0
    delivered: list[set[str]] = []
    for receiver in stats:
        first_seen: dict[str, tuple[str | None, float]] = {}
        for webhook_id, job_id, arrived in receiver["arrivals"]:
            first_seen.setdefault(webhook_id, (job_id, arrived))
        unique += len(first_seen)
        delivered.append(set(first_seen))
        for job_id, arrived in first_seen.values():
            last_arrival = max(last_arrival, arrived)
            drained += arrived > deletion_ended
            if job_id in accepted_at:
                latencies.append(arrived - accepted_at[job_id])
    elapsed = last_arrival - first_sent
    # After the last deletion the dispatcher drains its backlog alone: its own pace, not
    # capped by the deletions feeding it.
    drain_s = last_arrival - deletion_ended
    out: dict[str, Any] = {
        "webhook_deliveries_expected": k * n,
        "webhook_deliveries": unique,
        "webhook_deliveries_complete": complete,
        "webhook_duplicates": sum(s["received"] for s in stats) - unique,
        "webhook_invalid_signatures": sum(s["invalid"] + s["unverified"] for s in stats),
        "webhook_seconds": round(elapsed, 3),
        "webhook_deliveries_per_s": _rate(unique, elapsed),
        "webhook_contacts_per_s": _rate(n, elapsed) if complete else None,
        "webhook_latency_ms": _ms(latencies),
        "webhook_drained_after_deletion": drained,
        "webhook_drain_deliveries_per_s": _rate(drained, drain_s) if drained > k else None,
        "webhook_cpu_seconds": cpu,
        **cpu_per_item(cpu, unique, "delivery", before=deletion_cpu),
    }
    await hooks.reset(http)
    per_endpoint = Settings().webhook_max_in_flight_per_endpoint
    log.info("bench_webhook_floor", deliveries=unique, concurrency=per_endpoint * k)
    count, floor_s = await webhook_floor(http, hooks, db, per_endpoint, delivered)
    floor_stats = await hooks.stats(http, arrivals=False)
    out |= {
        "webhook_floor_concurrency": per_endpoint * k,
        "webhook_floor_deliveries": count,
        "webhook_floor_invalid_signatures": sum(s["invalid"] for s in floor_stats),
        "webhook_floor_deliveries_per_s": _rate(count, floor_s),
    }
    out["webhook_to_floor_ratio"] = _ratio(
        out["webhook_deliveries_per_s"], out["webhook_floor_deliveries_per_s"]
    )
    out["webhook_drain_to_floor_ratio"] = _ratio(
        out["webhook_drain_deliveries_per_s"], out["webhook_floor_deliveries_per_s"]
    )
    return out


async def _filter_figures(
    db: Database,
    http: aiohttp.ClientSession,
    service: ServiceProcess,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:
    """One filter job over M contacts: its rate, the service's peak RSS while it ran, and
    the CPU it cost per contact (the service's, and with ``pids`` the database server's)."""
    m: int = args.filter_contacts
    key = await create_key(db, "bench-filter", list(SCOPES))
    log.info("bench_filter_seeding", contacts=m)
    await seed(db, key.workspace_id, m, tag=FILTER_LAST_NAME, keep_ids=False)
    api = Api(service.base, key.key, http)
    reset = service.reset_peak_rss()
    rss_before = service.rss_mb()
    log.info("bench_filter_deleting", contacts=m)
    meter = CpuMeter(service.pids | pids)
    meter.start()
    sent = time.time()
    status, body = await api.call(
        "POST",
        "/v1/contacts/bulk-delete",
        # The workspace holds only these contacts, so the filter selects them all: say so.
        {"filter": {"last_name": FILTER_LAST_NAME}, "match_all": True},
    )
    if status != 202:
        raise BenchFailed(f"the filter bulk-delete answered {status}: {body}")
    job_id = uuid.UUID(body["data"]["job_id"])
    deadline = time.monotonic() + args.timeout + m / 500
    sampled_peak = rss_before or 0.0
    while True:
        service.check_alive()
        sampled_peak = max(sampled_peak, service.rss_mb() or 0.0)
        async with db.read() as conn:
            job = (
                (await conn.execute(sa.select(deletion_jobs).where(deletion_jobs.c.id == job_id)))
                .mappings()
                .one()
            )
        if job["completed_at"] is not None:
            break
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"the filter job processed {job['processed_count']} of {m} in time; giving up"
            )
        await asyncio.sleep(1.0)
    cpu = meter.stop()
    seconds = job["completed_at"].timestamp() - sent
    # Service CPU per contact, and the PostgreSQL server's beside it (as the issue asks).
    per_contact = cpu_per_item(cpu, m, "contact")
    return {
        "filter_contacts": m,
        "filter_status": job["status"],
        "filter_deleted": job["deleted_count"],
        "filter_seconds": round(seconds, 1),
        "filter_contacts_per_s": _rate(m, seconds),
        "filter_rss_before_mb": rss_before,
        # VmHWM restarted just before the job, so this is the peak while it ran.
        "filter_peak_rss_mb": service.peak_rss_mb() if reset else None,
        "filter_sampled_peak_rss_mb": round(sampled_peak, 1),
        "filter_cpu_seconds": cpu,
        **{f"filter_{name}": value for name, value in per_contact.items()},
    }


# --- output ----------------------------------------------------------------------------------

_TABLE: list[tuple[str, str, str]] = [
    ("contacts (N)", "contacts", ""),
    ("database", "database", ""),
    ("cpu count", "cpu_count", ""),
    ("load average at start", "load_average_start", ""),
    ("batch x concurrency", "batch", ""),
    ("seed rate", "seed_contacts_per_s", "contacts/s"),
    ("accepted", "accepted_contacts_per_s", "contacts/s"),
    ("request latency", "request_latency_ms", "ms"),
    ("end-to-end deleted", "end_to_end_contacts_per_s", "contacts/s"),
    ("end-to-end time", "end_to_end_seconds", "s"),
    ("deleted", "deleted", ""),
    ("acceptance -> deletion", "deletion_latency_ms", "ms"),
    ("bare floor (SQL loop)", "floor_contacts_per_s", "contacts/s"),
    ("  CPU ms per contact", "floor_cpu_ms_per_contact", "ms"),
    ("  + PostgreSQL server", "floor_db_cpu_ms_per_contact", "ms"),
    ("service / floor", "service_to_floor_ratio", ""),
    ("contract floor (SQL loop)", "contract_floor_contacts_per_s", "contacts/s"),
    ("  CPU ms per contact", "contract_floor_cpu_ms_per_contact", "ms"),
    ("  + PostgreSQL server", "contract_floor_db_cpu_ms_per_contact", "ms"),
    ("  contract / bare floor", "contract_floor_to_floor_ratio", ""),
    ("  ceiling: its CPU", "contract_floor_cpu_ceiling_contacts_per_s", "contacts/s"),
    ("  ceiling / bare floor", "contract_floor_cpu_ceiling_to_floor_ratio", ""),
    ("service / contract floor", "service_to_contract_floor_ratio", ""),
    ("contract, deletion part", "contract_floor_deletion_contacts_per_s", "contacts/s"),
    ("  CPU ms per contact", "contract_floor_deletion_cpu_ms_per_contact", "ms"),
    ("  + PostgreSQL server", "contract_floor_deletion_db_cpu_ms_per_contact", "ms"),
    ("  deletion / bare floor", "contract_floor_deletion_to_floor_ratio", ""),
    ("  ceiling: its CPU", "contract_floor_deletion_cpu_ceiling_contacts_per_s", "contacts/s"),
    ("  ceiling / bare floor", "contract_floor_deletion_cpu_ceiling_to_floor_ratio", ""),
    ("service / deletion part", "service_to_contract_floor_deletion_ratio", ""),
    ("contract floor stages", "contract_floor_stages", ""),
    ("rows per contact", "rows_per_contact", ""),
    ("contacts / worker tx", "contacts_per_worker_transaction", ""),
    ("CPU s, deletion phase", "cpu_seconds", ""),
    ("CPU ms per contact", "cpu_ms_per_contact", "ms"),
    ("  + PostgreSQL server", "db_cpu_ms_per_contact", "ms"),
    ("  + Kafka broker", "broker_cpu_ms_per_contact", "ms"),
    ("ceiling: db + broker CPU", "infra_ceiling_contacts_per_s", "contacts/s"),
    ("  ceiling / floor", "infra_ceiling_to_floor_ratio", ""),
    ("ceiling: all CPU", "cpu_ceiling_contacts_per_s", "contacts/s"),
    ("  ceiling / floor", "cpu_ceiling_to_floor_ratio", ""),
    ("service RSS idle", "service_rss_idle_mb", "MiB"),
    ("service peak RSS", "service_peak_rss_mb", "MiB"),
    ("webhook deliveries", "webhook_deliveries", ""),
    ("webhook deliveries/s", "webhook_deliveries_per_s", "/s"),
    ("webhook contacts/s", "webhook_contacts_per_s", "contacts/s"),
    ("acceptance -> webhook", "webhook_latency_ms", "ms"),
    ("invalid signatures", "webhook_invalid_signatures", ""),
    ("webhook duplicates", "webhook_duplicates", ""),
    ("webhook floor /s", "webhook_floor_deliveries_per_s", "/s"),
    ("webhook / floor", "webhook_to_floor_ratio", ""),
    ("CPU s, to last webhook", "webhook_cpu_seconds", ""),
    ("CPU ms per delivery", "cpu_ms_per_delivery", "ms"),
    ("  + PostgreSQL server", "db_cpu_ms_per_delivery", "ms"),
    ("  + Kafka broker", "broker_cpu_ms_per_delivery", "ms"),
    ("drained after deletion", "webhook_drained_after_deletion", ""),
    ("drain rate", "webhook_drain_deliveries_per_s", "/s"),
    ("drain / floor", "webhook_drain_to_floor_ratio", ""),
    ("filter job contacts (M)", "filter_contacts", ""),
    ("filter job time", "filter_seconds", "s"),
    ("filter job rate", "filter_contacts_per_s", "contacts/s"),
    ("filter job peak RSS", "filter_peak_rss_mb", "MiB"),
]


def render_table(figures: dict[str, Any]) -> str:
    lines = []
    for label, name, unit in _TABLE:
        if name not in figures:
            continue
        value = figures[name]
        if name == "batch":
            text = f"{value} x {figures['concurrency']}"
        elif name == "rows_per_contact":
            lines.extend(_rows_lines(value))
            continue
        elif name == "contract_floor_stages":
            lines.append(f"{label}: s, CPU ms per contact (+ PostgreSQL server)")
            for stage, spent in value.items():
                server = spent.get("db_cpu_ms_per_contact")
                plus = f" + {server}" if server is not None else ""
                lines.append(
                    f"  {stage:<24} {spent['seconds']} s  {spent['cpu_ms_per_contact']}{plus} ms"
                )
            continue
        elif isinstance(value, list):
            text = " ".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = "  ".join(f"{k} {v}" for k, v in value.items())
        else:
            text = str(value)
        lines.append(f"{label:<26} {text} {unit}".rstrip())
    return "\n".join(lines)


def _rows_lines(rows: dict[str, Any]) -> list[str]:
    """``rows_per_contact`` as one line per table: inserted, updated, deleted distinct rows
    and row versions written (i/u/d/w), the service's beside the contract floor's."""

    def cell(ops: dict[str, float] | None) -> str:
        ops = ops or {}
        return "/".join(f"{ops.get(k, 0):g}" for k in ("insert", "update", "delete", "writes"))

    service, contract = rows["service"], rows["contract_floor"]
    lines = [f"rows per contact, i/u/d/w  sample of {rows['sample_contacts']}: service | contract"]
    for table in sorted(set(service) | set(contract)):
        lines.append(f"  {table:<24} {cell(service.get(table)):<24} {cell(contract.get(table))}")
    return lines


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- entry points ----------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside the event loop (starting or stopping the broker and the database):
    like Ctrl-C there."""
    raise KeyboardInterrupt


async def _cancelled_by_sigterm(work: Awaitable[T]) -> T:
    """Await ``work``; SIGTERM meanwhile cancels it, so every ``finally`` in it runs.

    Inside the loop a signal must not raise where the main thread happens to be: raised
    inside a socket write, asyncpg's transport swallowed it ("Fatal write error on socket
    transport") and the bench went on. Nor can it lean on SIGINT, which a process started
    in the background of a non-interactive shell ignores (so does its handler in
    ``asyncio.run``). The loop's own handler runs between callbacks."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


def _kafka_to_reuse() -> str | None:
    """The configured broker, if KAFKA_BOOTSTRAP_SERVERS is set and it answers."""
    settings = Settings()
    if "kafka_bootstrap_servers" not in settings.model_fields_set:
        return None
    first = settings.kafka_bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if host and port.isdigit() and broker_answers(host, int(port)):
        return settings.kafka_bootstrap_servers
    return None


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench and print its figures; 0 on success, 1 on failure, 130 if stopped."""
    if args.database == "sqlite" and args.database_url:
        raise SystemExit("--database-url goes with --database postgresql")
    if not 1 <= args.batch <= 500:
        raise SystemExit("--batch must be between 1 and 500")
    # Progress goes to stderr for a human; stdout carries only the table and the JSON line.
    configure_logging("console", Settings().log_level)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="cdbench-"))
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            pids: dict[str, int | None] = {}
            reused = _kafka_to_reuse()
            bootstrap = reused
            if bootstrap is None:
                # Started from the main thread, which outlives it (see LocalKafka.start).
                kafka = LocalKafka(port=free_port(), data_dir=workdir / "kafka")
                kafka.start()
                stack.callback(kafka.stop)
                bootstrap = kafka.bootstrap
                pids["kafka"] = kafka.pid
            url, pids["postgres"] = stack.enter_context(
                fresh_database(args.database, args.database_url, workdir)
            )
            upgrade_sync(url)
            env = Environment(
                workdir=workdir,
                kafka_bootstrap=bootstrap,
                kafka_started=reused is None,
                database_url=url,
                pids=pids,
            )
            figures = asyncio.run(_cancelled_by_sigterm(measure(args, env)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write("bench: interrupted; everything it started is stopped\n")
        return 130
    except BenchFailed as exc:
        sys.stderr.write(f"bench: failed: {exc}\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.json_only:
        _out(render_table(figures))
    _out(json.dumps(figures, separators=(",", ":"), sort_keys=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.bench``: the same as ``contact-deletion bench``."""
    parser = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
