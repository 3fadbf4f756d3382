"""Migration 0008 on a database with deletion-request outbox rows written before the
``job-id`` header existed (SQLite and PostgreSQL): each unpublished row whose job can be
known gets the header, so that an unreadable one still fails its item
(service.deletion.giveup.unreadable_commands) instead of leaving it pending forever."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

from service.migrate import upgrade_sync
from tests.integration.test_migration_0002 import _execute, _rows, fresh_url  # noqa: F401

CONTENT = ["content-type", "application/cloudevents+json"]
REQUESTED = ["ce_type", "contact.deletion_requested"]


def test_0008_names_the_job_of_each_unpublished_deletion_request_it_can(fresh_url: str) -> None:  # noqa: F811
    upgrade_sync(fresh_url, "0007")
    sqlite = fresh_url.startswith("sqlite")
    now = datetime.now(UTC).replace(tzinfo=None) if sqlite else datetime.now(UTC)
    job = {n: uuid.uuid4() for n in ("one", "two", "three", "payload", "given")}
    contact = {n: uuid.uuid4() for n in ("alone", "shared", "none")}

    def uid(value: uuid.UUID) -> object:
        return value.hex if sqlite else value

    for job_name, contact_name in (("one", "alone"), ("two", "shared"), ("three", "shared")):
        asyncio.run(
            _execute(
                fresh_url,
                "INSERT INTO deletion_job_items (job_id, ref, position, contact_id, status) "
                "VALUES (:job, :ref, 0, :contact, 'pending')",
                {"job": uid(job[job_name]), "ref": "r", "contact": uid(contact[contact_name])},
            )
        )
    corrupt = b"\xff corrupt"
    readable = json.dumps({"data": {"job_id": str(job["payload"])}}).encode()
    rows = {
        # name: (key, payload, headers, published)
        "by_item": (contact["alone"], corrupt, [CONTENT, REQUESTED], False),
        "by_payload": (contact["none"], readable, [CONTENT, REQUESTED], False),
        "ambiguous": (contact["shared"], corrupt, [CONTENT, REQUESTED], False),
        "no_item": (contact["none"], corrupt, [CONTENT, REQUESTED], False),
        "has_it": (contact["alone"], corrupt, [REQUESTED, ["job-id", str(job["given"])]], False),
        "published": (contact["alone"], corrupt, [CONTENT, REQUESTED], True),
        "other_type": (contact["alone"], corrupt, [["ce_type", "contact.deleted"]], False),
    }
    cast = "" if sqlite else "CAST(:headers AS JSONB)"
    for name, (key, payload, headers, published) in rows.items():
        asyncio.run(
            _execute(
                fresh_url,
                "INSERT INTO outbox (topic, key, payload, headers, created_at, published_at) "
                f"VALUES (:topic, :key, :payload, {cast or ':headers'}, :now, :published)",
                {
                    "topic": name,  # the row's name, to find it again
                    "key": str(key),
                    "payload": payload,
                    "headers": json.dumps(headers),
                    "now": now,
                    "published": now if published else None,
                },
            )
        )

    upgrade_sync(fresh_url, "head")

    got = {
        r["topic"]: json.loads(r["headers"]) if isinstance(r["headers"], str) else r["headers"]
        for r in asyncio.run(_rows(fresh_url, "SELECT topic, headers FROM outbox"))
    }
    named = {"by_item": job["one"], "by_payload": job["payload"]}
    for name, (_, _, headers, _) in rows.items():
        expected = [*headers, ["job-id", str(named[name])]] if name in named else headers
        assert got[name] == expected, name
