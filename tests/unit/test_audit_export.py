"""NDJSON export lines and offline re-verification of an export file."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.audit.chain import (
    EVENT_FIELDS,
    GENESIS_HASH,
    VerifyResult,
    canonical_json,
    format_time,
    seal,
)
from service.audit.export import export_line, verify_export

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TAMPERED_SEQ = 17


def make_chain(n: int = 50) -> list[dict[str, Any]]:
    """A sealed chain of events seq 1..n, with some unicode and control characters."""
    events: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        event = seal(
            prev,
            {
                "seq": seq,
                "id": f"evt_{seq:05d}",
                "workspace_id": "ws_1",
                "occurred_at": format_time(T0 + timedelta(seconds=seq)),
                "actor": {"type": "system", "id": "worker"},
                "action": "contact.deleted",
                "target": {"type": "contact", "id": f"c_{seq}"},
                "job_id": "job_1",
                "request_id": None,
                "data": {"email_hmac": "cd" * 32, "n": seq * 1009, "note": "Zoë\t✓"},
            },
        )
        events.append(event)
        prev = event["hash"]
    return events


def write_export(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(export_line(e) for e in events))
    return path


def line_span(content: bytes, line_no: int) -> tuple[int, int]:
    """Byte offsets [start, end) of a 1-based line, its newline included."""
    start = 0
    for _ in range(line_no - 1):
        start = content.index(b"\n", start) + 1
    return start, content.index(b"\n", start) + 1


def assert_broken(result: VerifyResult, seq: int | None, reason: str) -> None:
    assert not result.ok
    assert (result.broken_seq, result.reason) == (seq, reason), result


# --- export lines ---------------------------------------------------------------------


def test_export_line_is_the_canonical_json_of_the_event_and_a_newline() -> None:
    event = make_chain(1)[0]
    line = export_line(event)
    assert line == canonical_json(event) + b"\n"
    assert line.count(b"\n") == 1
    assert json.loads(line) == event


def test_export_line_writes_exactly_the_event_fields() -> None:
    event = {**make_chain(1)[0], "internal_row_id": 99}
    assert tuple(json.loads(export_line(event))) == tuple(sorted(EVENT_FIELDS))


# --- verifying intact exports ---------------------------------------------------------


def test_a_good_export_verifies(tmp_path: Path) -> None:
    events = make_chain(50)
    result = verify_export(write_export(tmp_path / "audit.ndjson", events))
    assert result == VerifyResult(
        ok=True, events_checked=50, head_seq=50, head_hash=events[-1]["hash"]
    )


def test_an_empty_export_verifies_with_no_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.ndjson"
    path.write_bytes(b"")
    assert verify_export(path) == VerifyResult(
        ok=True, events_checked=0, head_seq=0, head_hash=GENESIS_HASH
    )


def test_an_export_since_a_later_seq_verifies(tmp_path: Path) -> None:
    events = make_chain(50)
    result = verify_export(write_export(tmp_path / "audit.ndjson", events[19:]))
    assert (result.ok, result.events_checked, result.head_seq) == (True, 31, 50)
    assert result.head_hash == events[-1]["hash"]


def test_the_trusted_first_prev_hash_of_a_partial_export_is_still_hashed(
    tmp_path: Path,
) -> None:
    events = make_chain(50)[19:]
    events[0]["prev_hash"] = "f" * 64
    result = verify_export(write_export(tmp_path / "audit.ndjson", events))
    assert_broken(result, 20, "hash_mismatch")


def test_an_export_starting_at_seq_1_must_start_from_genesis(tmp_path: Path) -> None:
    forged = seal("f" * 64, make_chain(1)[0])
    result = verify_export(write_export(tmp_path / "audit.ndjson", [forged]))
    assert_broken(result, 1, "broken_link")


# --- tampered exports -----------------------------------------------------------------


def test_changing_any_byte_of_a_line_fails_at_that_lines_seq(tmp_path: Path) -> None:
    """Every byte of line 17, each replaced three ways. No change is skipped: one that
    alters the parsed event breaks the chain or the line's fields, and one that parses
    to the same event (e.g. a different escape) leaves a line not in canonical form."""
    content = write_export(tmp_path / "good.ndjson", make_chain(20)).read_bytes()
    start, end = line_span(content, TAMPERED_SEQ)
    path = tmp_path / "tampered.ndjson"
    tried = 0
    for pos in range(start, end):
        original = content[pos]
        for replacement in {original ^ 0x01, original ^ 0x20, ord("0") if original != 48 else 49}:
            path.write_bytes(content[:pos] + bytes([replacement]) + content[pos + 1 :])
            result = verify_export(path)
            assert not result.ok, (pos, replacement)
            assert result.broken_seq == TAMPERED_SEQ, (pos, replacement, result)
            tried += 1
    assert tried >= 2 * (end - start)  # the set merges a replacement that repeats


def test_changing_a_random_byte_anywhere_fails(tmp_path: Path) -> None:
    """200 random positions and values (fixed seed) across the whole file."""
    content = write_export(tmp_path / "good.ndjson", make_chain(50)).read_bytes()
    rng = random.Random(20240501)
    path = tmp_path / "tampered.ndjson"
    for _ in range(200):
        pos = rng.randrange(len(content))
        replacement = rng.choice([b for b in range(256) if b != content[pos]])
        path.write_bytes(content[:pos] + bytes([replacement]) + content[pos + 1 :])
        result = verify_export(path)
        assert not result.ok, (pos, replacement)
        line_no = content[:pos].count(b"\n") + 1
        if line_no > 1:  # line 1 sets the expected seq itself, so its seq may be off
            assert result.broken_seq == line_no, (pos, replacement, result)


def test_editing_a_field_value_is_a_hash_mismatch_at_that_seq(tmp_path: Path) -> None:
    content = write_export(tmp_path / "audit.ndjson", make_chain(50)).read_bytes()
    tampered = content.replace(b'"id":"c_17"', b'"id":"c_71"')
    assert tampered != content
    (tmp_path / "audit.ndjson").write_bytes(tampered)
    assert_broken(verify_export(tmp_path / "audit.ndjson"), 17, "hash_mismatch")


def test_a_deleted_line_is_a_gap_at_its_seq(tmp_path: Path) -> None:
    events = make_chain(50)
    del events[TAMPERED_SEQ - 1]
    result = verify_export(write_export(tmp_path / "audit.ndjson", events))
    assert_broken(result, TAMPERED_SEQ, "gap")


def test_a_truncated_last_line_fails(tmp_path: Path) -> None:
    path = write_export(tmp_path / "audit.ndjson", make_chain(50))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) - 40])
    result = verify_export(path)
    assert_broken(result, 50, "malformed_line")
    assert result.detail is not None and result.detail.startswith("line 50:")
    assert (result.events_checked, result.head_seq) == (49, 49)


def test_a_last_line_without_its_newline_fails(tmp_path: Path) -> None:
    path = write_export(tmp_path / "audit.ndjson", make_chain(5))
    path.write_bytes(path.read_bytes()[:-1])
    assert_broken(verify_export(path), 5, "malformed_line")


def test_a_malformed_first_line_has_no_known_seq(tmp_path: Path) -> None:
    path = tmp_path / "audit.ndjson"
    path.write_bytes(b"not json\n" + b"".join(export_line(e) for e in make_chain(3)))
    result = verify_export(path)
    assert_broken(result, None, "malformed_line")
    assert result.detail is not None and result.detail.startswith("line 1: not valid JSON")


def _reencode(event: dict[str, Any], **dumps_args: Any) -> bytes:
    return json.dumps(event, **dumps_args).encode() + b"\n"


def _with_extra_field(event: dict[str, Any]) -> bytes:
    return canonical_json({**event, "note": "unhashed"}) + b"\n"


def _without_field(event: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in event.items() if k != "target"}) + b"\n"


def _with_duplicate_key(event: dict[str, Any]) -> bytes:
    line = canonical_json(event)
    return line[:-1] + b',"seq":' + str(event["seq"]).encode() + b"}\n"


@pytest.mark.parametrize(
    ("make_line", "detail"),
    [
        (lambda e: _reencode(e, sort_keys=True), "not in canonical form"),
        (lambda e: _reencode(e, separators=(",", ":")), "not in canonical form"),
        (lambda e: _reencode(e, sort_keys=True, separators=(",", ":")), "not in canonical form"),
        (_with_extra_field, "unexpected: ['note']"),
        (_without_field, "fields missing: ['target']"),
        (_with_duplicate_key, "duplicate key"),
        (lambda e: b"\n", "not valid JSON"),
        (lambda e: b"[1,2]\n", "not a JSON object"),
        (lambda e: canonical_json(e)[:-1] + b',"x":NaN}\n', "NaN is not JSON"),
        (lambda e: canonical_json(e).replace(b'"n":', b'"n":1e999,"m":') + b"\n", "canonical"),
        (lambda e: canonical_json(e).replace(b"Zo", b"Z\xff") + b"\n", "not valid JSON"),
        (lambda e: canonical_json({**e, "seq": "17"}) + b"\n", "seq is not a positive integer"),
    ],
)
def test_a_line_that_is_not_one_canonical_event_is_malformed(
    tmp_path: Path, make_line: Any, detail: str
) -> None:
    """Even when it parses to the very same event (ensure_ascii, key order, spaces)."""
    events = make_chain(20)
    lines = [export_line(e) for e in events]
    lines[TAMPERED_SEQ - 1] = make_line(events[TAMPERED_SEQ - 1])
    path = tmp_path / "audit.ndjson"
    path.write_bytes(b"".join(lines))
    result = verify_export(path)
    assert_broken(result, TAMPERED_SEQ, "malformed_line")
    assert result.detail is not None
    assert result.detail.startswith(f"line {TAMPERED_SEQ}:")
    assert detail in result.detail


def test_a_line_longer_than_the_limit_is_malformed(tmp_path: Path) -> None:
    path = write_export(tmp_path / "audit.ndjson", make_chain(3))
    result = verify_export(path, max_line_bytes=100)
    assert_broken(result, None, "malformed_line")
    assert result.detail == "line 1: longer than 100 bytes"
