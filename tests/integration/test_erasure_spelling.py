"""`erasure check --email` looks for the address as the API stored it, however it is spelled.

The API stores an address normalised (stripped, lowercased, Unicode NFC, an IDNA domain
decoded: `service.contacts.models.check_email`); the check looked for the spelling given, so
`a@xn--bcher-kva.example` or a decomposed (NFD) `jürgen@…` of a LIVE contact got "verdict:
nowhere", exit 0: a false proof of erasure (trial 6)."""

from __future__ import annotations

import asyncio
import unicodedata
import uuid

import pytest

from service.cli import main
from service.contacts.models import check_email
from service.contacts.store import contact_row
from service.db import Database, contacts, utcnow
from service.keys import ensure_workspace


@pytest.mark.parametrize(
    ("stored_as", "spelled"),
    [
        ("a-{tag}@bücher.example", "a-{tag}@xn--bcher-kva.example"),
        ("jürgen-{tag}@example.com", unicodedata.normalize("NFD", "jürgen-{tag}@example.com")),
        ("mixed-{tag}@example.com", "  Mixed-{tag}@EXAMPLE.com "),
    ],
)
async def test_a_live_contact_is_found_however_its_address_is_spelled(
    db_url: str,
    db: Database,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stored_as: str,
    spelled: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    stored, spelled = stored_as.format(tag=tag), spelled.format(tag=tag)
    assert check_email(spelled) == stored  # what the API stores for that spelling
    workspace_id = await ensure_workspace(db, f"spelling-{tag}")
    async with db.begin() as conn:
        await conn.execute(
            contacts.insert(), [contact_row(uuid.uuid4(), workspace_id, stored, at=utcnow())]
        )
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", f"t{tag}.")
    capsys.readouterr()

    code = await asyncio.to_thread(
        main, ["erasure", "check", "--email", spelled, "--workspace", f"spelling-{tag}"]
    )

    out = capsys.readouterr().out
    assert code == 1, out
    assert "live rows: contacts: found" in out, out
    assert "verdict: FOUND" in out, out
