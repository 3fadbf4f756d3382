"""Erasure, the pure parts: timeline redaction, the scrubber's timing, the byte search."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.db import Database
from service.erasure import check
from service.erasure.check import Needles, Place, Report, scan_file
from service.erasure.redact import RedactionSummary, Redactor
from service.erasure.scrubber import SETTLE_S, Scrubber
from service.logs import configure_logging


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr() -> None:
    # The scrubber logs; an earlier test may have left structlog writing to a closed stream.
    configure_logging("json", "WARNING")


ADA = {
    "email": "ada.lovelace@example.com",
    "phone": "+44 20 7946 0018",
    "first_name": "Ada",
    "last_name": "Lovelace",
}


def test_redaction_replaces_every_value_of_the_contact_in_any_case_and_format() -> None:
    text = (
        "Ada LOVELACE wrote from Ada.Lovelace@Example.com; call +44 (20) 7946-0018 "
        "or 442079460018. Ada's notes."
    )
    redacted, found = Redactor.of(ADA).redact(text)
    assert redacted == (
        "[redacted name] [redacted name] wrote from [redacted email]; call [redacted phone] "
        "or [redacted phone]. [redacted name]'s notes."
    )
    assert found == {"email", "phone", "first_name", "last_name"}


def test_redaction_leaves_words_that_only_contain_a_name_and_other_numbers() -> None:
    redactor = Redactor.of(ADA | {"first_name": "Al", "phone": "555-0100"})
    text = "Also call Alan at 555-01000 or 1555-0100; Al agreed."
    redacted, found = redactor.redact(text)
    assert redacted == "Also call Alan at 555-01000 or 1555-0100; [redacted name] agreed."
    assert found == {"first_name"}


@pytest.mark.parametrize(
    ("stored", "written"),
    [
        ("+1 (555) 010-2031", "(555) 010-2031"),
        ("+1 (555) 010-2031", "555.010.2031"),
        ("+44 20 7946 0018", "020 7946 0018"),
        ("+44 20 7946 0018", "20-7946-0018"),
        ("+33 1 23 45 67 89", "01 23 45 67 89"),
        ("+7 495 123-45-67", "8 (495) 123-45-67"),
        ("+39 06 1234 5678", "06 1234 5678"),
    ],
)
def test_redaction_finds_an_international_number_written_in_its_national_forms(
    stored: str, written: str
) -> None:
    """A CRM stores "+1 (555) 010-2031"; the note says "call (555) 010-2031"."""
    redactor = Redactor.of({"email": "x@example.com", "phone": stored})
    assert redactor.redact(f"call {written} today") == (
        "call [redacted phone] today",
        frozenset({"phone"}),
    )
    # Other numbers stay, a longer one that starts with this one included.
    kept = f"call {written}9 or 999 000 1111"
    assert redactor.redact(kept) == (kept, frozenset())


def test_a_number_stored_without_its_country_code_is_matched_as_written() -> None:
    """No country is known for a national number, so only its own digits are looked for."""
    redactor = Redactor.of({"email": "x@example.com", "phone": "020 7946 0018"})
    text = "call 020 7946 0018 or 2079460018"
    assert redactor.redact(text)[0] == "call [redacted phone] or 2079460018"


def test_redaction_ignores_values_too_short_to_be_safe_and_missing_ones() -> None:
    redactor = Redactor.of({"email": "x@example.com", "phone": "12", "first_name": "A"})
    assert redactor.redact("A 12 a")[0] == "A 12 a"
    assert Redactor.of({"email": ""}).redact("anything") == ("anything", frozenset())


def test_the_summary_of_a_redaction_names_kinds_items_and_fields_never_values() -> None:
    redactor = Redactor.of(ADA)
    summary = RedactionSummary()
    note = {"body": "Ada said hi"}
    task = {"title": "Call Ada", "body": None}
    activity = {"subject": "nothing here", "body": "mail ada.lovelace@example.com"}
    for kind, item in (("note", note), ("task", task), ("activity", activity)):
        changed, values = redactor.redact_item(kind, item)
        summary.add(kind, changed, values)
    untouched, _ = redactor.redact_item("note", {"body": "someone else"})
    summary.add("note", untouched, frozenset())
    audit = summary.to_audit()
    assert audit == {
        "items_redacted": 3,
        "values": ["email", "first_name"],
        "fields": {"activities.body": 1, "notes.body": 1, "tasks.title": 1},
    }
    assert "Ada" not in str(audit) and "lovelace" not in str(audit).lower()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrubber(clock: FakeClock, delay_s: float = 30.0) -> Scrubber:
    settings = Settings(database_url="sqlite+aiosqlite:///:memory:", erasure_delay_s=delay_s)
    return Scrubber(settings, Database(settings.database_url), clock=clock)


async def test_a_scrub_is_due_soon_after_a_deletion_and_at_most_once_per_delay() -> None:
    clock = FakeClock()
    s = scrubber(clock, delay_s=30.0)
    assert s.due_at() is None  # nothing deleted, nothing to do
    s.note({"contacts"})
    assert s.due_at() == 1000.0 + SETTLE_S
    clock.now += SETTLE_S
    assert await s.scrub() is True  # an in-memory SQLite checkpoints at once
    assert s.runs == 1 and s.due_at() is None
    clock.now += 5
    s.note({"contacts"})
    # Rate-limited: the next run waits for the delay since the last one, and no longer.
    assert s.due_at() == 1000.0 + SETTLE_S + 30.0
    await s.db.dispose()


async def test_a_failed_scrub_stays_pending_and_is_retried_one_delay_later() -> None:
    clock = FakeClock()
    s = scrubber(clock, delay_s=10.0)

    async def broken() -> None:
        raise OSError("disk gone")

    s._checkpoint = broken  # type: ignore[method-assign]
    s.note({"contacts", "notes"})
    clock.now += SETTLE_S
    assert await s.scrub() is False
    assert s.runs == 0
    assert s.due_at() == clock.now + 10.0
    await s.db.dispose()


def test_the_delay_is_bounded_by_settings() -> None:
    assert Settings().erasure_delay_s <= 60
    with pytest.raises(ValueError):
        Settings(erasure_delay_s=0)


def test_needles_are_the_address_as_given_lower_cased_and_its_unkeyed_sha256() -> None:
    needles = Needles.of(" Ada@Example.com ")
    assert needles.forms == {
        "clear": b"Ada@Example.com",
        "lower-cased": b"ada@example.com",
        "sha256": hashlib.sha256(b"ada@example.com").hexdigest().encode(),
    }
    assert set(Needles.of("ada@example.com").forms) == {"clear", "sha256"}


def test_a_file_scan_finds_matches_across_chunk_boundaries_once(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_bytes(b"x" * 10 + b"ada@example.com" + b"y" * 30 + b"ADA@example.com" + b"ada@ex")
    assert scan_file(file, Needles.of("ada@example.com"), 16) == {"clear": 1}
    assert scan_file(file, Needles.of("ADA@example.com"), 16) == {"clear": 1, "lower-cased": 1}


def report(*places: Place, **kwargs: Any) -> Report:
    return Report(list(places), [], **kwargs)


def test_the_exit_code_is_0_nowhere_1_found_2_unproven() -> None:
    clean = Place("a", "not found")
    assert report(clean).exit_code == 0
    assert report(clean, Place("b", "found", {"clear": 1})).exit_code == 1
    assert report(clean, Place("c", "not checked", {}, "unreadable")).exit_code == 2
    assert report(Place("b", "found"), Place("c", "not checked")).exit_code == 1
    lines = report(clean, Place("b", "found", {"clear": 2})).lines()
    assert lines[1] == "b: found (clear x2)"
    assert lines[-1] == "verdict: FOUND in 1 place(s): b"


@pytest.mark.parametrize(
    ("ago_s", "where", "hinted"),
    [
        (5, "database file /d/x.db-wal", True),
        (5, "postgresql relation files", True),
        (3600, "database file /d/x.db-wal", False),
        (5, "live rows: contacts", False),
    ],
)
def test_a_find_in_the_database_files_right_after_a_deletion_says_when_to_check_again(
    tmp_path: Path, ago_s: int, where: str, hinted: bool
) -> None:
    """Checked in the first seconds after a deletion, the files still hold the address
    (the scrubber runs within ERASURE_DELAY_S): the report says so and when to look again;
    long after, or found in live rows, it says nothing of the kind."""
    settings = Settings(erasure_delay_s=30)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    probe = check.ErasureCheck(settings, db, "ada@example.com")
    at = (datetime.now(UTC) - timedelta(seconds=ago_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    deletions = [check.Deletion("demo", None, None, at, 7)]
    hints = probe._hints([Place(where, "found", {"as_given": 1})], deletions)
    assert bool(hints) == hinted, hints
    if hinted:
        report = Report([Place(where, "found", {"as_given": 1})], deletions, "", hints)
        text = "\n".join(report.lines())
        assert "ERASURE_DELAY_S (30 s)" in text and "check again after" in text, text
    assert probe._hints([Place(where, "not found")], deletions) == []


def test_text_kept_in_the_timeline_is_named_with_its_remedy_not_a_wait(tmp_path: Path) -> None:
    """A new user's trial (trial 9): an address in a preserved timeline item, with the files
    holding it too, got "check again after" the scrub, which never removes a live row. The
    hint names `erasure redact` instead, and promises no wait."""
    settings = Settings(erasure_delay_s=30)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    probe = check.ErasureCheck(settings, db, "ada@example.com", workspace="demo")
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    places = [
        Place("live rows: timeline content", "found", {}, "1 item(s) whose text holds it"),
        Place("database file /d/x.db", "found", {"as_given": 1}),
    ]
    [hint] = probe._hints(places, [check.Deletion("demo", None, None, at, 7)])
    assert "erasure redact --email ADDRESS --workspace demo" in hint, hint
    assert "check again" not in hint
