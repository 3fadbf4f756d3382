"""``contact-deletion erasure redact --email ADDRESS``: cut an address out of kept timeline text.

A deleted contact's timeline (activities, notes, tasks) survives it by design (DESIGN §1),
text and all. Deleted without ``redact_timeline``, that text may still hold the contact's
address: ``erasure check`` reports it (``live rows: timeline content: found``), no scrub
removes it (it is a live row), and the API cannot change a preserved item (its contact is
gone). A new user's trial (trial 9) found an erasure request that could not be completed.

This is the remedy, for an operator answering that request: every timeline item (of one
workspace, or of all) whose text holds the address, in any letter case, has it replaced by
``[redacted email]`` with the matching ``redact_timeline`` uses (``service.erasure.redact``),
and each workspace touched gets one audit event, ``timeline.redacted`` (how many items and
which fields, and the address's keyed hash as ``contact.deleted`` carries it, never the
address), all in one transaction. Then the timeline tables are scrubbed at once
(``service.erasure.scrubber``: SQLite's WAL checkpointed and truncated, PostgreSQL vacuumed
per ``ERASURE_PG_VACUUM``), so that ``erasure check`` can answer "nowhere" right away.

Only the address: an address names one person, while a name or a phone number written in
someone else's note may be another's (those are redacted per contact, at deletion, by
``redact_timeline``). Items are matched as ``erasure check`` matches them (SQL ``lower``:
ASCII letters on SQLite), so what the check finds is what this redacts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa

from service.audit.chain import email_hmac
from service.audit.store import AuditRecord, append_events
from service.config import Settings
from service.contacts.store import TIMELINE_TABLES
from service.db import Database
from service.erasure.check import timeline_text_holds
from service.erasure.redact import TEXT_FIELDS, RedactionSummary, Redactor
from service.erasure.scrubber import Scrubber
from service.logs import get_logger

log = get_logger(__name__)

ACTOR = {"type": "system", "id": "cli"}


@dataclass
class TimelineRedaction:
    """What :func:`redact_address` did (or, in a dry run, would do), per workspace."""

    workspaces: dict[uuid.UUID, RedactionSummary] = field(default_factory=dict)
    tables: set[str] = field(default_factory=set)
    scrubbed: bool | None = None  # None: nothing changed, or a dry run

    @property
    def items(self) -> int:
        """Timeline items whose text held the address."""
        return sum(s.items for s in self.workspaces.values())


async def redact_address(
    settings: Settings,
    db: Database,
    address: str,
    hash_key: bytes,
    *,
    workspace_id: uuid.UUID | None = None,
    dry_run: bool = False,
) -> TimelineRedaction:
    """Replace ``address`` (as the API stores it: ``check_email``'s form) in every timeline
    item's text fields (``TEXT_FIELDS``), in ``workspace_id`` or everywhere; one
    ``timeline.redacted`` audit event per workspace (its ``email_hmac`` keyed with
    ``hash_key``); then scrub the tables changed. ``dry_run``: count, change nothing.

    Raises what the database raises (the CLI reports it); a scrub that fails is not raised
    (``scrubbed`` False: the service's own scrubber is not told, so the operator runs the
    check again after the next deletion's scrub or runs this again).
    """
    redactor = Redactor.of({"email": address})
    lowered = address.lower()
    done = TimelineRedaction()
    async with db.begin() as conn:
        for kind, table in TIMELINE_TABLES.items():
            fields = TEXT_FIELDS[kind]
            scope = [table.c.workspace_id == workspace_id] if workspace_id is not None else []
            stmt = sa.select(table.c.id, table.c.workspace_id, *(table.c[f] for f in fields))
            holds = timeline_text_holds(kind, lowered)
            rows = (await conn.execute(db.for_update(stmt.where(holds, *scope)))).all()
            for row in rows:
                changed, found = redactor.redact_item(kind, row._mapping)
                if not changed:
                    continue
                workspace = uuid.UUID(str(row.workspace_id))
                done.workspaces.setdefault(workspace, RedactionSummary()).add(kind, changed, found)
                done.tables.add(table.name)
                if not dry_run:
                    await conn.execute(table.update().where(table.c.id == row.id).values(**changed))
        if dry_run or not done.workspaces:
            return done
        keyed = email_hmac(hash_key, address)
        await append_events(
            conn,
            db,
            [
                AuditRecord(
                    workspace_id=workspace,
                    actor=ACTOR,
                    action="timeline.redacted",
                    data={"email_hmac": keyed, "timeline_redaction": summary.to_audit()},
                    email_hmac=keyed,
                )
                for workspace, summary in sorted(done.workspaces.items())
            ],
        )
    for workspace, summary in sorted(done.workspaces.items()):
        log.info(
            "timeline_redacted",
            workspace_id=str(workspace),
            items=summary.items,
            fields=summary.fields,
        )
    scrubber = Scrubber(settings, db)
    scrubber.note(done.tables)
    done.scrubbed = await scrubber.scrub()
    return done
