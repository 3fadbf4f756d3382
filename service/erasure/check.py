"""``contact-deletion erasure check --email ADDRESS``: is an address gone from everything we write?

An operator answering an erasure request runs it after the deletion (and after
``ERASURE_DELAY_S``). It searches, place by place:

- live rows: contacts (the address, any case), timeline text (activities, notes, tasks),
  and job items that name the address (an emails job whose address matched nothing);
- the database files themselves: SQLite's main file and its WAL; PostgreSQL's relation
  files of the service's tables, indexes and TOAST (when the data directory is readable
  by the user running the check, i.e. on the database host);
- every Kafka topic of the service, from the beginning ("not checked" when the topics
  hold only another deployment's records, by their ``cd-deployment`` stamp: the wrong
  broker or prefix was given, see ``service.deployment``);
- the log files given with ``--log-file`` (the service logs to stderr; where that goes is
  the operator's choice);

for the address as given, lower-cased, and as its unkeyed SHA-256 (hex, of the stripped,
lower-cased address, as in the webhook's ``email_sha256``). The SHA-256 is *by design* in a
``contact.deleted`` event's ``email_sha256`` (on its Kafka topic, in the outbox and in
webhook deliveries): those occurrences are reported as such and are not a finding;
anywhere else it is.

It also answers from the audit trail whether and when the address was deleted (by the
keyed hash the trail keeps). Exit codes: 0 nowhere, 1 found somewhere, 2 nothing found but
some place could not be searched (so nothing is proven).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from service.audit.chain import email_hmac
from service.config import Settings
from service.contacts.store import TIMELINE_TABLES
from service.db import (
    Database,
    audit_events,
    contacts,
    deletion_job_items,
    metadata,
    outbox,
    server_secrets,
    webhook_deliveries,
    workspaces,
)
from service.deployment import stamped, stored_deployment_id
from service.erasure import scan
from service.erasure.redact import TEXT_FIELDS
from service.events import TOPIC_CONTACT_DELETED, TYPE_CONTACT_DELETED
from service.kafka import KafkaUnavailable, UnreadableBatch, read_topics
from service.timefmt import iso
from service.topics import all_topics
from service.webhooks.signing import email_sha256

NOWHERE = 0
FOUND = 1
UNPROVEN = 2

Status = Literal["found", "not found", "not checked"]


@dataclass(frozen=True)
class Needles:
    """The byte forms of one address that the check looks for."""

    forms: dict[str, bytes]

    @classmethod
    def of(cls, address: str) -> Needles:
        clear = address.strip()
        forms = {"clear": clear.encode("utf-8")}
        if clear.lower() != clear:
            forms["lower-cased"] = clear.lower().encode("utf-8")
        forms["sha256"] = email_sha256(clear).encode("ascii")
        return cls(forms)

    @property
    def sha256(self) -> bytes:
        return self.forms["sha256"]

    def count_in(self, data: bytes) -> dict[str, int]:
        """Occurrences of each form in `data` (forms that do not occur are left out)."""
        return {name: n for name, needle in self.forms.items() if (n := data.count(needle))}


@dataclass
class Place:
    """One place searched, and what was found there."""

    place: str
    status: Status
    forms: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    def line(self) -> str:
        text = f"{self.place}: {self.status}"
        if self.forms:
            text += " (" + ", ".join(f"{k} x{v}" for k, v in sorted(self.forms.items())) + ")"
        return text + (f" - {self.detail}" if self.detail else "")


@dataclass
class Deletion:
    """One ``contact.deleted`` audit event whose keyed hash matches the address."""

    workspace: str
    contact_id: str | None
    job_id: str | None
    deleted_at: str
    seq: int


@dataclass
class Report:
    places: list[Place]
    deletions: list[Deletion]
    audit_note: str = ""
    hints: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if any(p.status == "found" for p in self.places):
            return FOUND
        if any(p.status == "not checked" for p in self.places):
            return UNPROVEN
        return NOWHERE

    def lines(self) -> list[str]:
        out = [p.line() for p in self.places]
        if self.deletions:
            for d in self.deletions:
                out.append(
                    f"audit trail: deleted at {d.deleted_at} in workspace {d.workspace} "
                    f"(contact {d.contact_id}, job {d.job_id}, seq {d.seq})"
                )
        else:
            out.append(f"audit trail: no deletion of this address recorded{self.audit_note}")
        out += self.hints
        found = [p.place for p in self.places if p.status == "found"]
        unchecked = [p.place for p in self.places if p.status == "not checked"]
        if found:
            out.append(f"verdict: FOUND in {len(found)} place(s): {'; '.join(found)}")
        elif unchecked:
            out.append(f"verdict: not found, but {len(unchecked)} place(s) not checked")
        elif not self.deletions:
            out.append(
                "verdict: nowhere (and no deletion of it recorded: is it spelled as it was stored?)"
            )
        else:
            out.append("verdict: nowhere")
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "verdict": {NOWHERE: "nowhere", FOUND: "found", UNPROVEN: "unproven"}[
                    self.exit_code
                ],
                "places": [asdict(p) for p in self.places],
                "deletions": [asdict(d) for d in self.deletions],
                "hints": self.hints,
            },
            sort_keys=True,
        )


def scan_file(path: Path, needles: Needles, chunk_size: int = scan.CHUNK) -> dict[str, int]:
    """Occurrences of each form in a file (``service.erasure.scan``), in this process: for
    files that are not a SQLite database this process may have open (logs, PostgreSQL's)."""
    return scan.scan_file(path, needles.forms, chunk_size)


class UnknownWorkspace(LookupError):
    """``--workspace`` names no workspace (by name or id): a typo must not read as a check
    that found nothing, so :meth:`ErasureCheck.run` searches nothing and raises this."""

    def __init__(self, workspace: str) -> None:
        super().__init__(f"no workspace is named {workspace!r} or has that id")


def timeline_text_holds(kind: str, lowered: str) -> sa.ColumnElement[bool]:
    """An item of this timeline kind whose text (``TEXT_FIELDS``) holds ``lowered`` in any
    ASCII case: what the check counts as "timeline content", and what ``erasure redact``
    (``service.erasure.timeline``) rewrites."""
    table = TIMELINE_TABLES[kind]
    return sa.or_(
        *(sa.func.lower(table.c[f]).contains(lowered, autoescape=True) for f in TEXT_FIELDS[kind])
    )


async def workspace_named(db: Database, name: str) -> uuid.UUID | None:
    """The id of the workspace with this name (or id, as text), None if none has it."""
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(workspaces.c.id, workspaces.c.name))).all()
    for row in rows:
        if name in (row.name, str(row.id)):
            return uuid.UUID(str(row.id))
    return None


class ErasureCheck:
    """Searches every place the service writes for one address."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        address: str,
        *,
        workspace: str | None = None,
        log_files: Iterable[Path] = (),
    ) -> None:
        self.settings = settings
        self.db = db
        self.address = address.strip()
        self.needles = Needles.of(address)
        self.workspace = workspace
        self.log_files = list(log_files)
        self.workspace_id: uuid.UUID | None = None

    async def run(self) -> Report:
        """Search everything; never raises for a place it cannot read (that place says so).

        Raises :class:`UnknownWorkspace` when ``workspace`` was given and names none.
        """
        places: list[Place] = []
        try:
            if self.workspace is not None:
                self.workspace_id = await workspace_named(self.db, self.workspace)
                if self.workspace_id is None:
                    raise UnknownWorkspace(self.workspace)
            places += await self.live_rows()
            places += await self.database_files()
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            reason = f"the database did not answer: {_first_line(exc)}"
            places.append(Place("database", "not checked", {}, reason))
        places += await self.kafka_topics()
        places += [self.log_file(p) for p in self.log_files]
        try:
            deletions, note = await self.audit_trail()
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            deletions, note = [], f" (the audit trail could not be read: {_first_line(exc)})"
        if not deletions and not note and self.workspace is not None:
            note = f" in workspace {self.workspace} (run without --workspace to search all)"
        return Report(places, deletions, note, self._hints(places, deletions))

    def _hints(self, places: list[Place], deletions: list[Deletion]) -> list[str]:
        """What a FOUND means and what removes it: live rows (no scrub removes them; kept
        timeline text has its own remedy, ``erasure redact``), or in the database files
        alone, a deletion so recent that the scrubber's run (at most ``ERASURE_DELAY_S``
        after it, DESIGN "Erasure") is due."""
        found = {p.place for p in places if p.status == "found"}
        if "live rows: timeline content" in found:
            scope = f" --workspace {self.workspace}" if self.workspace else ""
            return [
                "timeline items the service keeps (by design, after their contact's "
                "deletion) hold the address in their text: no scrub removes a live row; "
                f"`contact-deletion erasure redact --email ADDRESS{scope}` cuts it out "
                "(or delete with redact_timeline next time)"
            ]
        if any(p.startswith("live rows") for p in found):
            return []  # the place says what holds it; waiting will not change that
        in_files = any(p.startswith(("database file", "postgresql")) for p in found)
        if not in_files or not deletions:
            return []
        last = max(_instant(d.deleted_at) for d in deletions)
        delay = self.settings.erasure_delay_s
        due = last + timedelta(seconds=delay)
        if datetime.now(UTC) > due + timedelta(seconds=delay):
            return []
        return [
            f"the last deletion of it was at {_second(last)}: the service scrubs the database "
            f"files within ERASURE_DELAY_S ({delay:g} s) of a deletion; check again after "
            f"{_second(due + timedelta(seconds=5))}"
        ]

    def _in_workspace(self, table: sa.Table) -> list[sa.ColumnElement[bool]]:
        return [table.c.workspace_id == self.workspace_id] if self.workspace_id else []

    async def live_rows(self) -> list[Place]:
        """Contacts with the address, timeline text and job items that contain it."""
        lowered = self.address.lower()
        async with self.db.read() as conn:
            n_contacts = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(contacts)
                    .where(
                        sa.func.lower(contacts.c.email) == lowered, *self._in_workspace(contacts)
                    )
                )
            ).scalar_one()
            n_items = 0
            for kind, table in TIMELINE_TABLES.items():
                n_items += (
                    await conn.execute(
                        sa.select(sa.func.count())
                        .select_from(table)
                        .where(timeline_text_holds(kind, lowered), *self._in_workspace(table))
                    )
                ).scalar_one()
            n_refs = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(deletion_job_items)
                    .where(sa.func.lower(deletion_job_items.c.ref) == lowered)
                )
            ).scalar_one()

        def place(name: str, n: int, what: str) -> Place:
            return Place(name, "found" if n else "not found", {}, f"{n} {what}" if n else "")

        return [
            place("live rows: contacts", n_contacts, "contact(s) with this address"),
            place("live rows: timeline content", n_items, "item(s) whose text holds it"),
            place("live rows: job items", n_refs, "job item(s) naming it (matched nothing)"),
            await self._other_rows(lowered),
        ]

    async def _other_rows(self, lowered: str) -> Place:
        """Every other table of the service, every column that can hold text (strings,
        JSON, bytes), for the address in clear: a copy kept where no one thought to look
        (an operator's trial found a deleted contact's answer kept for replay) is found
        without this list naming the table. Bytes are read as UTF-8 (what the service
        writes there is JSON)."""
        searched = {
            contacts.name,
            deletion_job_items.name,
            *(t.name for t in TIMELINE_TABLES.values()),
        }
        found: dict[str, int] = {}
        async with self.db.read() as conn:
            for table in metadata.sorted_tables:
                columns = [c for c in table.c if isinstance(c.type, _TEXTUAL)]
                if table.name in searched or not columns:
                    continue
                holds = [_holds(conn.dialect.name, c, lowered) for c in columns]
                scope = self._in_workspace(table) if "workspace_id" in table.c else []
                n = (
                    await conn.execute(
                        sa.select(sa.func.count()).select_from(table).where(sa.or_(*holds), *scope)
                    )
                ).scalar_one()
                if n:
                    found[table.name] = n
        detail = ", ".join(f"{name}: {n} row(s)" for name, n in sorted(found.items()))
        return Place("live rows: other tables", "found" if found else "not found", {}, detail)

    async def database_files(self) -> list[Place]:
        if self.db.is_sqlite:
            return await self._sqlite_files(await self._designed_sha256_rows())
        return [await self._postgres_files()]

    async def _sqlite_files(self, designed_sha256: int) -> list[Place]:
        """The main file, its WAL and journal, read in a child process: this one holds
        SQLite connections to them (``service.erasure.scan``)."""
        path = sa.engine.make_url(self.db.url).database
        if not path or path == ":memory:":
            return [Place("database file", "not checked", {}, "in-memory database")]
        files = [Path(path + s) for s in ("", "-wal", "-journal")]
        files = [f for f in files if f == files[0] or f.exists()]
        try:
            scanned = await scan.scan_apart(files, self.needles.forms)
        except (OSError, RuntimeError) as exc:
            return [Place(f"database file {f}", "not checked", {}, str(exc)) for f in files]
        return [
            self._counted(f"database file {file}", counts, designed_sha256)
            for file, counts in scanned.items()
        ]

    def _file_place(self, name: str, file: Path, designed_sha256: int = 0) -> Place:
        try:
            counts: dict[str, int] | OSError = scan_file(file, self.needles)
        except OSError as exc:
            counts = exc
        return self._counted(name, counts, designed_sha256)

    def _counted(self, name: str, counts: dict[str, int] | OSError, designed_sha256: int) -> Place:
        if isinstance(counts, OSError):
            return Place(name, "not checked", {}, counts.strerror or str(counts))
        return self._judge(name, counts, designed_sha256)

    def _judge(self, name: str, counts: dict[str, int], designed_sha256: int) -> Place:
        """Found unless the only occurrences are the SHA-256 where the design puts it."""
        if not counts:
            return Place(name, "not found")
        if set(counts) == {"sha256"} and designed_sha256:
            return Place(
                name,
                "not found",
                counts,
                "only the SHA-256, in contact.deleted events' email_sha256 (by design)",
            )
        return Place(name, "found", counts)

    async def _designed_sha256_rows(self) -> int:
        """Outbox rows and webhook deliveries carrying the hash (contact.deleted events)."""
        needle = self.needles.sha256
        total = 0
        async with self.db.read() as conn:
            for table in (outbox, webhook_deliveries):
                if self.db.is_sqlite:
                    hit = sa.func.instr(table.c.payload, needle) > 0
                else:
                    text = sa.func.encode(table.c.payload, "escape")
                    hit = text.contains(needle.decode("ascii"), autoescape=True)
                total += (
                    await conn.execute(sa.select(sa.func.count()).select_from(table).where(hit))
                ).scalar_one()
        return total

    async def _postgres_files(self) -> Place:
        name = "postgresql relation files"
        query = sa.text(
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND c.relkind IN ('r', 'i', 't', 'm')"
            " AND pg_relation_filepath(c.oid) IS NOT NULL"
            # Where ANALYZE keeps sample values (the service turns it off for its personal
            # columns, see migration 0003; an older sample would still show here).
            " UNION ALL SELECT pg_relation_filepath('pg_catalog.pg_statistic')"
        )
        try:
            async with self.db.read() as conn:
                data_dir = (await conn.execute(sa.text("SHOW data_directory"))).scalar_one()
                paths = list((await conn.execute(query)).scalars())
            # Flush dirty pages so the files show what the database holds (needs superuser or
            # pg_checkpoint; without it the files may lag by one checkpoint interval).
            async with self.db.engine.connect() as conn:
                auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await auto.exec_driver_sql("CHECKPOINT")
        except sa.exc.DBAPIError as exc:
            return Place(name, "not checked", {}, f"the database refused: {exc.orig}")
        base = Path(str(data_dir))
        if not os.access(base, os.R_OK | os.X_OK):
            return Place(name, "not checked", {}, f"{base} is not readable here")
        counts: dict[str, int] = {}
        files = 0
        for rel in paths:
            main = base / rel
            for file in [main, *sorted(main.parent.glob(main.name + ".*"))]:
                if not file.is_file() or not file.name.split(".")[0].isdigit():
                    continue
                try:
                    found = scan_file(file, self.needles)
                except OSError as exc:
                    return Place(name, "not checked", {}, f"{file}: {exc.strerror or exc}")
                files += 1
                for k, v in found.items():
                    counts[k] = counts.get(k, 0) + v
        place = self._judge(
            f"{name} ({files} files under {base})",
            counts,
            await self._designed_sha256_rows() if "sha256" in counts else 0,
        )
        return place

    async def kafka_topics(self) -> list[Place]:
        topics = all_topics(self.settings)
        counts: dict[str, dict[str, int]] = {t: {} for t in topics}
        designed: dict[str, int] = {t: 0 for t in topics}
        deleted_topic = self.settings.topic(TOPIC_CONTACT_DELETED)
        ours = await self._deployment()
        # Records stamped by this deployment, and by another (the relay stamps each).
        stamps = {"ours": 0, "other": 0}
        try:
            async for message in read_topics(self.settings.kafka_bootstrap_servers, topics):
                stamp = stamped(message.headers)
                if stamp is not None:
                    stamps["ours" if stamp.decode("utf-8", "replace") == ours else "other"] += 1
                data = b"".join(
                    [message.key or b"", message.value, *(v for _, v in message.headers)]
                )
                found = self.needles.count_in(data)
                if not found:
                    continue
                if (
                    message.topic == deleted_topic
                    and found == {"sha256": 1}
                    and _email_sha256_of(message.value) == self.needles.sha256.decode()
                ):
                    designed[message.topic] += 1
                for k, v in found.items():
                    counts[message.topic][k] = counts[message.topic].get(k, 0) + v
        except (KafkaUnavailable, UnreadableBatch) as exc:
            return [Place(f"kafka topic {t}", "not checked", {}, str(exc)) for t in topics]
        if ours is not None and stamps["other"] and not stamps["ours"]:
            # Another deployment's broker or topics (a second setup's environment not
            # given): its "not found" would prove nothing about this database's records.
            reason = (
                f"these topics hold {stamps['other']} record(s) of another deployment and "
                f"none of this one's ({ours}): run the check with this deployment's "
                "KAFKA_BOOTSTRAP_SERVERS and KAFKA_TOPIC_PREFIX"
            )
            return [Place(f"kafka topic {t}", "not checked", {}, reason) for t in topics]
        places = []
        for t in topics:
            sha = counts[t].get("sha256", 0)
            places.append(
                self._judge(f"kafka topic {t}", counts[t], designed[t] if designed[t] == sha else 0)
            )
        return places

    async def _deployment(self) -> str | None:
        """This database's deployment id (``service.deployment``), None if it has none
        yet (no relay ever ran on it) or the database did not answer."""
        try:
            return await stored_deployment_id(self.db)
        except (sa.exc.SQLAlchemyError, OSError):
            return None

    def log_file(self, path: Path) -> Place:
        return self._file_place(f"log file {path}", path)

    async def audit_trail(self) -> tuple[list[Deletion], str]:
        """The ``contact.deleted`` events whose keyed email hash matches the address."""
        key = (
            self.settings.audit_hash_key.get_secret_value().encode("utf-8")
            if self.settings.audit_hash_key
            else None
        )
        async with self.db.read() as conn:
            if key is None:
                stored = (
                    await conn.execute(
                        sa.select(server_secrets.c.value).where(
                            server_secrets.c.name == "audit_hash_key"
                        )
                    )
                ).scalar_one_or_none()
                if stored is None:
                    return [], " (the audit trail has no hash key yet: nothing was deleted)"
                key = str(stored).encode("utf-8")
            e = audit_events.c
            rows = (
                await conn.execute(
                    sa.select(
                        e.workspace_id,
                        e.seq,
                        e.occurred_at,
                        e.target_id,
                        e.job_id,
                        workspaces.c.name,
                    )
                    .select_from(
                        audit_events.outerjoin(workspaces, workspaces.c.id == e.workspace_id)
                    )
                    .where(
                        e.email_hmac == email_hmac(key, self.address),
                        e.action == "contact.deleted",
                        *self._in_workspace(audit_events),
                    )
                    .order_by(e.occurred_at, e.seq)
                )
            ).all()
        return [
            Deletion(
                workspace=r.name or str(r.workspace_id),
                contact_id=r.target_id,
                job_id=r.job_id,
                deleted_at=r.occurred_at,
                seq=int(r.seq),
            )
            for r in rows
        ], ""


_TEXTUAL = (sa.String, sa.JSON, sa.LargeBinary)


def _holds(dialect: str, column: sa.Column[Any], lowered: str) -> sa.ColumnElement[bool]:
    """``column`` holds ``lowered`` in any ASCII case, as text whatever its type. On
    PostgreSQL bytes are compared in ``encode(…, 'escape')`` form (any bytes, valid UTF-8 or
    not: ``convert_from`` refuses a column holding one invalid sequence, and the check then
    read nothing), the needle written the same way (`_escape_form`)."""
    if isinstance(column.type, sa.LargeBinary) and dialect == "postgresql":
        text = sa.func.lower(sa.func.encode(column, "escape"))
        return text.contains(_escape_form(lowered), autoescape=True)
    return sa.func.lower(sa.cast(column, sa.Text)).contains(lowered, autoescape=True)


def _escape_form(text: str) -> str:
    """``text``'s UTF-8 bytes as PostgreSQL's ``encode(bytes, 'escape')`` writes them: a
    zero byte or one with the high bit set as ``\\nnn`` (octal), a backslash doubled, the
    rest as they are."""
    out = []
    for byte in text.encode():
        if byte == 0 or byte >= 0x80:
            out.append(f"\\{byte:03o}")
        elif byte == 0x5C:
            out.append("\\\\")
        else:
            out.append(chr(byte))
    return "".join(out)


def _email_sha256_of(value: bytes) -> str | None:
    """The ``email_sha256`` of a ``contact.deleted`` CloudEvent, if that is what this is."""
    try:
        event: Any = json.loads(value)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != TYPE_CONTACT_DELETED:
        return None
    data = event.get("data")
    digest = data.get("email_sha256") if isinstance(data, dict) else None
    return digest if isinstance(digest, str) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _second(moment: datetime) -> str | None:
    """A moment as the API writes it (`service.timefmt.iso`), to the second."""
    return iso(moment.astimezone(UTC).replace(microsecond=0))


def _instant(text: str) -> datetime:
    """An audit ``occurred_at`` (ISO 8601, UTC) as an aware datetime."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
