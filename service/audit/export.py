"""NDJSON export of the audit trail, and its offline re-verification.

An export is one line per event, in ``seq`` order: the canonical JSON
(``chain.canonical_json``) of the sealed event, exactly its ``EVENT_FIELDS``, then
``\\n``. Because the form is canonical, a verifier can insist on it byte for byte: any
single changed byte is either a different event (a broken chain) or a line that is no
longer in canonical form.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from service.audit.chain import (
    EVENT_FIELDS,
    GENESIS_HASH,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    check_event_shape,
)

MAX_LINE_BYTES: Final = 16 * 1024 * 1024
"""Longest line ``verify_export`` reads; a longer one is malformed (memory stays bounded)."""


def export_line(event: Mapping[str, Any]) -> bytes:
    """One NDJSON line: the canonical JSON of the sealed event's ``EVENT_FIELDS``, ``\\n``."""
    return canonical_json({name: event[name] for name in EVENT_FIELDS}) + b"\n"


class _MalformedLine(Exception):
    """A line that cannot be read as one exported event."""


def verify_export(
    path: Path,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
    anchors: Mapping[int, str] | None = None,
) -> VerifyResult:
    """Re-verify an exported NDJSON file offline, one line at a time.

    The chain may start at any ``seq`` (an export ``since_seq``): the first line's
    ``prev_hash`` is trusted when its ``seq`` is above 1, and must be ``GENESIS_HASH``
    when it is 1. A line that is not UTF-8, not a JSON object with exactly
    ``EVENT_FIELDS``, not in canonical form, or not ended by ``\\n`` (a truncated file)
    fails with ``reason="malformed_line"``, its line number in ``detail``, and
    ``broken_seq`` the seq that line should have had (``None`` for the first line). An
    empty file verifies, with no events.

    Whole events missing from the end of a file cannot be seen here: compare
    ``head_seq`` and ``head_hash`` with the service's own verify.
    """
    verifier: ChainVerifier | None = None
    with path.open("rb") as lines:
        line_no = 0
        while True:
            raw = lines.readline(max_line_bytes + 1)
            if not raw:
                break
            line_no += 1
            try:
                event = _parse_line(raw, max_line_bytes)
            except _MalformedLine as exc:
                if verifier is None:
                    verifier = ChainVerifier(anchors=anchors)
                    broken_seq = None
                else:
                    broken_seq = verifier.expected_seq
                verifier.fail("malformed_line", f"line {line_no}: {exc}", broken_seq=broken_seq)
                break
            if verifier is None:
                first_seq: int = event["seq"]
                verifier = ChainVerifier(
                    start_seq=first_seq,
                    start_prev_hash=GENESIS_HASH if first_seq == 1 else None,
                    anchors=anchors,
                )
            if not verifier.feed(event):
                break
    if verifier is None:
        verifier = ChainVerifier(anchors=anchors)  # no events: an anchor is missing
    return verifier.result()


def _parse_line(raw: bytes, max_line_bytes: int) -> dict[str, Any]:
    if len(raw) > max_line_bytes:
        raise _MalformedLine(f"longer than {max_line_bytes} bytes")
    if not raw.endswith(b"\n"):
        raise _MalformedLine("not ended by a newline (truncated file?)")
    body = raw[:-1]
    try:
        event = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise _MalformedLine(f"not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise _MalformedLine("not a JSON object")
    if set(event) != set(EVENT_FIELDS):
        missing = sorted(set(EVENT_FIELDS) - set(event))
        extra = sorted(set(event) - set(EVENT_FIELDS))
        raise _MalformedLine(f"fields missing: {missing}, unexpected: {extra}")
    shape = check_event_shape(event)
    if shape is not None:
        raise _MalformedLine(shape)
    try:
        canonical = canonical_json(event)
    except (TypeError, ValueError) as exc:  # e.g. 1e999 parses as an infinite float
        raise _MalformedLine(f"not canonical JSON: {exc}") from None
    if canonical != body:
        raise _MalformedLine("not in canonical form")
    return event


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins, so a line with one means nothing certain.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
