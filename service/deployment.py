"""This deployment's identity on a shared broker, and the records of another one.

Two deployments (each with its own database) on one broker must each set their own
``KAFKA_TOPIC_PREFIX`` and ``KAFKA_CONSUMER_GROUP_PREFIX``: with the same ones they share
topics and consumer groups, and each consumes some of the other's records. A consumer
never acts on a record of another deployment (its job, workspace or endpoint is not in
this database), so that deployment's work waits for its backstop, and before, nothing
said why. Now it is said, loudly.

A deployment is its database: a random id created there once (``server_secrets``
``deployment_id``, by whichever process needs it first), stamped by the relay on every
record it publishes as the :data:`DEPLOYMENT_HEADER` header. A consumer reads its own id
at start, and

- skips a record stamped with another id before reading it (:meth:`ForeignRecords.mine`):
  ``case="another_deployment"``;
- notes a command naming a job this database does not have
  (:meth:`ForeignRecords.unknown_jobs`, the worker; only for a batch in which some command
  changed nothing): stamped with its own id, ``case="stale_record"`` (a record of this
  deployment whose job is gone: its database was restored or recreated under the same
  topics); without the header, ``case="unstamped"`` (written before the header existed,
  or by another deployment's older version).

Each is counted in ``/metrics`` (``foreign_records_skipped_total``, by topic and case) and
said in an error line ``foreign_records_skipped`` (topic, partition, count since the last
line, case, the other deployment's id when stamped, the remedy; never a payload), at most
once a minute per topic, partition and case. The header is optional on read: records
written before it have none, and they are handled as before.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter
from sqlalchemy.dialects import postgresql, sqlite

from service.db import Database, deletion_jobs, server_secrets, utcnow
from service.events import DeletionRequested, JobExpand
from service.faults import describe
from service.kafka import InMessage
from service.logs import get_logger

log = get_logger(__name__)

DEPLOYMENT_HEADER = "cd-deployment"
"""The Kafka header naming the deployment that published a record (its id, as text)."""

DEPLOYMENT_ID_NAME = "deployment_id"
"""Its row in ``server_secrets`` (not a secret: an id, written once)."""

LOG_EVERY_S = 60.0
"""At most one ``foreign_records_skipped`` line per topic, partition and case this often."""

REMEDY = (
    "another deployment (another database) uses this broker with the same "
    "KAFKA_TOPIC_PREFIX and KAFKA_CONSUMER_GROUP_PREFIX: give each deployment its own; "
    "records of one are never acted on by the other, and its jobs wait meanwhile"
)
STALE_REMEDY = (
    "a record of this deployment names a job its database does not have: the database "
    "was restored or recreated under the same topics, or another deployment with a copy "
    "of it shares this broker and prefixes (give it its own KAFKA_TOPIC_PREFIX and "
    "KAFKA_CONSUMER_GROUP_PREFIX and its own deployment_id)"
)
UNSTAMPED_REMEDY = (
    "a record without the deployment header names a job this database does not have: "
    "written before the header existed, or by another deployment's older version on this "
    "broker with the same KAFKA_TOPIC_PREFIX and KAFKA_CONSUMER_GROUP_PREFIX (give each "
    "deployment its own)"
)


def _stored() -> sa.Select[Any]:
    return sa.select(server_secrets.c.value).where(server_secrets.c.name == DEPLOYMENT_ID_NAME)


async def stored_deployment_id(db: Database) -> str | None:
    """This database's deployment id, None if none was made yet (no relay ran on it);
    creates nothing (``erasure check`` reads it). Database errors propagate."""
    async with db.read() as conn:
        found = (await conn.execute(_stored())).scalar()
    return None if found is None else str(found)


async def deployment_id(db: Database) -> str:
    """This database's deployment id, created at the first call on it (any process; the
    first to commit wins). Transient errors propagate."""
    found = await stored_deployment_id(db)
    if found is not None:
        return found
    ins: Any = (postgresql.insert if not db.is_sqlite else sqlite.insert)(server_secrets)
    async with db.begin() as conn:
        await conn.execute(
            ins.values(
                name=DEPLOYMENT_ID_NAME, value=secrets.token_hex(8), created_at=utcnow()
            ).on_conflict_do_nothing()
        )
        return str((await conn.execute(_stored())).scalar_one())


def stamp_of(deployment: str) -> tuple[tuple[str, bytes], ...]:
    """The header the relay adds to every record it publishes."""
    return ((DEPLOYMENT_HEADER, deployment.encode()),)


def stamped(headers: Sequence[tuple[str, bytes | None]]) -> bytes | None:
    """The deployment a record's headers name, or None (no header: not stamped)."""
    for name, value in headers:
        if name == DEPLOYMENT_HEADER:
            return value
    return None


class ForeignRecords:
    """A consumer's view of records that are not its deployment's (see the module)."""

    def __init__(self, deployment: str, counter: Counter, component: str) -> None:
        self.deployment = deployment
        self.own = deployment.encode()
        self.counter = counter
        self.component = component
        self.clock: Callable[[], float] = time.monotonic
        # (topic, partition, case, other) -> [records not said yet, when it was last said]
        self._said: dict[tuple[str, int, str, str | None], list[float]] = {}

    @classmethod
    async def load(cls, db: Database, counter: Counter, component: str) -> ForeignRecords:
        """For a consumer: this database's deployment id (created if need be)."""
        return cls(await deployment_id(db), counter, component)

    def mine(self, messages: Sequence[InMessage]) -> Sequence[InMessage]:
        """``messages`` less those stamped by another deployment, which are counted and
        said (never read); ``messages`` itself when there is none."""
        own = self.own
        foreign = None
        for m in messages:
            headers = m.headers
            if headers and headers[-1][0] == DEPLOYMENT_HEADER:  # where the relay puts it
                if headers[-1][1] == own:
                    continue
            elif stamped(headers) in (None, own):
                continue
            foreign = foreign or []
            foreign.append(m)
        if foreign is None:
            return messages
        for m in foreign:
            other = stamped(m.headers) or b""
            self._note(m.topic, m.partition, "another_deployment", other.decode(errors="replace"))
        self._say()
        gone = {id(m) for m in foreign}
        return [m for m in messages if id(m) not in gone]

    async def unknown_jobs(
        self,
        db: Database,
        commands: Sequence[tuple[InMessage, DeletionRequested | JobExpand]],
        progressed: Collection[uuid.UUID],
    ) -> None:
        """Note the commands (message, command) whose job this database does not have:
        called with the jobs a batch made progress on (``progressed``), it reads only when
        some command made none (a repeat, a stale expansion, or an unknown job). Never
        raises: an error is a debug line (it only decides what to say)."""
        idle = [(m, c.job_id) for m, c in commands if c.job_id not in progressed]
        if not idle:
            return
        wanted = sorted({job for _, job in idle}, key=str)
        try:
            async with db.read() as conn:
                known = set(
                    (
                        await conn.execute(
                            sa.select(deletion_jobs.c.id).where(deletion_jobs.c.id.in_(wanted))
                        )
                    ).scalars()
                )
        except Exception as exc:
            log.debug("foreign_records_not_checked", error=describe(exc))
            return
        for m, job in idle:
            if job in known:
                continue
            other = stamped(m.headers)
            if other is None:
                self._note(m.topic, m.partition, "unstamped", None)
            elif other == self.own:
                self._note(m.topic, m.partition, "stale_record", None)
            else:  # (`mine` left it out unless it was not used)
                self._note(m.topic, m.partition, "another_deployment", other.decode())
        self._say()

    def _note(self, topic: str, partition: int, case: str, other: str | None) -> None:
        self.counter.labels(topic, case).inc()
        said = self._said.setdefault((topic, partition, case, other), [0.0, -LOG_EVERY_S])
        said[0] += 1

    def _say(self) -> None:
        """One line per topic, partition and case noted since its last line, unless that
        line is under `LOG_EVERY_S` old (its records are in the next one)."""
        now = self.clock()
        for (topic, partition, case, other), said in self._said.items():
            if not said[0] or now - said[1] < LOG_EVERY_S:
                continue
            remedy = {"stale_record": STALE_REMEDY, "unstamped": UNSTAMPED_REMEDY}.get(case, REMEDY)
            log.error(
                "foreign_records_skipped",
                component=self.component,
                topic=topic,
                partition=partition,
                count=int(said[0]),
                case=case,
                deployment=self.deployment,
                other_deployment=other,
                remedy=remedy,
            )
            said[0], said[1] = 0.0, now
