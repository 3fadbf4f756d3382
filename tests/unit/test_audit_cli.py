"""`contact-deletion audit verify-export FILE`: offline, no database, exit code 0 or 1."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.audit import cli as audit_cli
from service.audit.chain import GENESIS_HASH, format_time, seal
from service.audit.export import export_line
from service.config import Settings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# Never used: verify-export must not touch a database.
NO_DATABASE = Settings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")


def write_export(path: Path, n: int = 20) -> bytes:
    """A sealed chain of n events written as the export endpoint writes it."""
    prev = GENESIS_HASH
    lines = []
    for seq in range(1, n + 1):
        event = seal(
            prev,
            {
                "seq": seq,
                "id": f"evt_{seq}",
                "workspace_id": "ws_1",
                "occurred_at": format_time(T0 + timedelta(seconds=seq)),
                "actor": {"type": "api_key", "id": "key_1"},
                "action": "contact.deleted",
                "target": {"type": "contact", "id": f"c_{seq}"},
                "job_id": "job_1",
                "request_id": "req_1",
                "data": {"email_hmac": "ab" * 32, "note": "ünïcödé"},
            },
        )
        prev = event["hash"]
        lines.append(export_line(event))
    body = b"".join(lines)
    path.write_bytes(body)
    return body


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="contact-deletion")
    audit_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify-export", *argv])
    return audit_cli.main(args, NO_DATABASE)


def test_a_good_export_exits_0_and_says_how_far_it_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    assert run(str(path)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok, 20 events (seq 1..20), head hash ")


def test_json_output_is_the_verify_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    assert run(str(path), "--json") == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["events_checked"], result["head_seq"]) == (True, 20, 20)
    assert result["broken_seq"] is None


@pytest.mark.parametrize("where", ["a hash", "the data", "a seq", "a key", "a newline", "a brace"])
def test_one_changed_byte_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    path = tmp_path / "audit.ndjson"
    body = bytearray(write_export(path))
    line_7 = sum(len(line) + 1 for line in body.split(b"\n")[:6])
    needle = {
        "a hash": b'"hash":"',
        "the data": b"n\xc3\xafc",
        "a seq": b'"seq":',
        "a key": b'"target"',
        "a newline": b"}\n",
        "a brace": b"{",
    }[where]
    offset = body.index(needle, line_7) + len(needle) - 1
    if where in ("a hash", "a seq"):
        offset += 1  # the first character of the value
    body[offset] ^= 0x01
    path.write_bytes(bytes(body))
    assert run(str(path)) == 1
    out = capsys.readouterr().out
    assert "BROKEN at seq 7" in out


def test_every_single_changed_byte_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.ndjson"
    good = write_export(path, n=3)
    for offset in range(len(good)):
        body = bytearray(good)
        body[offset] ^= 0x01
        path.write_bytes(bytes(body))
        assert audit_cli.verify_export_file(path, as_json=True) == 1, offset


def test_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(str(tmp_path / "nope.ndjson")) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("contact-deletion: error: cannot read"), (out, err)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (
            b'{"error":{"code":"invalid_key","message":"the API key is not valid","details":null}}',
            "invalid_key",
        ),
        (b'{"error": {"code": "service_unavailable", "message": "x", "details": {}}}\n', "503"),
    ],
    ids=["empty", "blank", "error-answer", "error-answer-newline"],
)
def test_a_file_that_holds_no_export_exits_2_not_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, why: str
) -> None:
    """`curl … > data/audit.ndjson` with a wrong key saves the error envelope: that is
    nothing to verify (2, as --help says), not a tampered trail (1); nor is an empty file
    (an export with since_seq past the end)."""
    path = tmp_path / "audit.ndjson"
    path.write_bytes(content)
    assert run(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == "", out  # an error is never the answer: stderr, one line
    assert err.startswith("contact-deletion: error: ") and err.count("\n") == 1, err
    assert "nothing to verify" in err and "BROKEN" not in err, err
    if why == "invalid_key":
        assert "invalid_key" in err


def test_a_good_export_says_how_to_know_nothing_is_missing_at_its_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    assert run(str(path)) == 0
    assert "GET /v1/audit/verify" in capsys.readouterr().out


# --- anchors: a head kept outside the service -------------------------------------------


def _rewrite(path: Path, *, at: int, keep: int) -> None:
    """What whoever can write the database can do (trial 6): edit event `at`'s actor,
    recompute every later hash, and drop the events after `keep`. The chain verifies."""
    events = [json.loads(line) for line in path.read_bytes().splitlines()]
    prev = GENESIS_HASH
    lines = []
    for event in events[:keep]:
        if event["seq"] == at:
            event["actor"] = {"type": "api_key", "id": "key_someone_else"}
        body = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        sealed = seal(prev, body)
        prev = sealed["hash"]
        lines.append(export_line(sealed))
    path.write_bytes(b"".join(lines))


def _head(path: Path, seq: int) -> str:
    event = json.loads(path.read_bytes().splitlines()[seq - 1])
    return f"{seq}:{event['hash']}"


def test_an_anchor_kept_elsewhere_catches_a_rewrite_that_recomputed_the_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    anchor = _head(path, 15)
    assert run(str(path), "--anchor", anchor) == 0
    assert " ok, 20 events" in capsys.readouterr().out

    _rewrite(path, at=4, keep=20)
    assert run(str(path)) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert run(str(path), "--anchor", anchor) == 1
    out = capsys.readouterr().out
    assert "BROKEN at seq 15: anchor_mismatch" in out and "rewritten" in out, out


def test_an_anchor_past_the_end_catches_events_cut_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    anchor = _head(path, 20)
    _rewrite(path, at=0, keep=12)  # the last 8 events dropped, nothing else changed
    assert run(str(path)) == 0
    capsys.readouterr()
    assert run(str(path), "--anchor", anchor, "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["reason"], result["broken_seq"], result["head_seq"]) == (
        "anchor_missing",
        13,
        12,
    )


@pytest.mark.parametrize("bad", ["15", "x:ab", "0:" + "a" * 64, "3:" + "A" * 64, "3:abc"])
def test_a_malformed_anchor_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "audit.ndjson"
    write_export(path)
    with pytest.raises(SystemExit) as exited:
        run(str(path), "--anchor", bad)
    assert exited.value.code == 2
