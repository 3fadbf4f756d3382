"""The audit trail's hash chain: canonical JSON, event hashes, sealing and verification.

Pure functions and one small state machine; no I/O. The store seals each event with the
hash of the one before it, and anyone holding an export can re-verify it offline:

    hash(n)      = hex SHA-256( ascii(prev_hash(n)) ‖ canonical_json(hashed(n)) )
    hashed(n)    = {k: event(n)[k] for k in HASHED_FIELDS}
    prev_hash(1) = GENESIS_HASH;  prev_hash(n) = hash(n - 1)

Editing any hashed field of an event breaks that event's hash; deleting, inserting or
reordering events breaks the ``seq`` sequence or a ``prev_hash`` link. Rewriting the
whole chain from some point on is only caught by comparing the head hash with one that
was recorded elsewhere (for example the head returned by an earlier verify).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

GENESIS_HASH: Final = "0" * 64
"""The ``prev_hash`` of the first event (``seq`` 1) of every workspace's chain."""

HASHED_FIELDS: Final = (
    "seq",
    "id",
    "workspace_id",
    "occurred_at",
    "actor",
    "action",
    "target",
    "job_id",
    "request_id",
    "data",
)
"""The fields of an event covered by its hash: all of them except ``prev_hash`` and ``hash``."""

EVENT_FIELDS: Final = (*HASHED_FIELDS, "prev_hash", "hash")
"""Every field of a sealed event, as stored and exported."""


def canonical_json(value: Any) -> bytes:
    """Encode a JSON-ready value as the canonical bytes that the audit hash covers.

    Exactly ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False).encode("utf-8")`` with Python's ``json`` module, that is:

    - object keys sorted by code point (Python string order), at every level;
    - no whitespace at all: ``,`` between items and ``:`` between key and value;
    - strings as UTF-8, not ``\\uXXXX`` escapes; only ``"``, ``\\`` and control characters
      are escaped (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``, and
      ``\\u00XX`` with lowercase hex for the other characters below U+0020);
    - integers in decimal; ``true``, ``false``, ``null``;
    - NaN and infinities refused (``ValueError``), as are strings that are not valid
      Unicode (lone surrogates) and anything that is not a dict, list, tuple, str, int,
      float, bool or None (``TypeError``).

    Floats are written as Python's shortest round-trip ``repr``, which other languages
    do not always reproduce (``1e+16`` vs ``10000000000000000``); event ``data`` should
    therefore hold integers and strings, not floats.

    How: values made only of dicts with string keys, lists, tuples, strings, integers,
    booleans and None (exactly those types, not subclasses; at most 64 levels deep) are
    encoded by ``orjson`` with ``OPT_SORT_KEYS``, which writes the same bytes for them
    (tests/unit/test_audit_chain.py holds the two equal, property-tested) at a tenth of
    the cost; what orjson refuses among them (integers beyond 64 bits, lone surrogates)
    and every other value go to ``json``, which decides as documented above. orjson is
    never asked about a float (it writes ``1e16``, not ``1e+16``, and NaN as ``null``),
    a UUID or an Enum (which it would accept where ``json`` refuses them).
    """
    if _plain(value, 0):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return _CANONICAL.encode(value).encode("utf-8")


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` is made only of the exact types orjson encodes as ``json`` does."""
    kind = type(value)
    if kind in _LEAVES:
        return True
    if depth >= 64:
        return False
    # A container's leaves are checked here rather than by a call each: most of an audit
    # event's values are strings in dicts, and the call per leaf was half of the walk.
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _LEAVES and not _plain(item, depth + 1)):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            if type(item) not in _LEAVES and not _plain(item, depth + 1):
                return False
        return True
    return False


# The exact types (not subclasses) that orjson writes as ``json`` does: None's type too.
_LEAVES: Final = frozenset({str, int, bool, type(None)})


# What ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# allow_nan=False)`` builds on every call, built once: the append path encodes three
# objects per event, and for the small ones constructing the encoder cost as much as
# encoding (an encoder keeps no state between calls).
_CANONICAL: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def event_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    """Hex SHA-256 of ``prev_hash`` (its ASCII bytes) followed by the canonical JSON of the
    event's ``HASHED_FIELDS`` (an object with exactly those keys; other keys are ignored)."""
    body = canonical_json({name: event[name] for name in HASHED_FIELDS})
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


# The hashed keys in canonical (sorted) order fall on either side of "data".
_BEFORE_DATA: Final = tuple(sorted(n for n in HASHED_FIELDS if n < "data"))
_AFTER_DATA: Final = tuple(sorted(n for n in HASHED_FIELDS if n > "data"))


def event_hash_with_data(
    prev_hash: str, event: Mapping[str, Any], data_json: bytes, before: bytes | None = None
) -> str:
    """``event_hash(prev_hash, event)`` for an event whose ``data`` is already encoded.

    ``data_json`` must be ``canonical_json(event["data"])``; ``event["data"]`` itself is
    not read. The canonical object is the sorted keys before ``data``, then ``data``, then
    the rest, so it is spliced from the canonical encodings of the two halves: the same
    bytes as ``event_hash`` hashes (tests/unit/test_audit_chain.py holds them equal),
    without encoding a large ``data`` a second time on the append path. ``before``: the
    event's `hashed_before`, when the caller has it already (the events of a batch share
    their action and actor, all that it covers).
    """
    if before is None:
        before = hashed_before(event)
    after = canonical_json({name: event[name] for name in _AFTER_DATA})
    body = b"".join((before[:-1], b',"data":', data_json, b",", after[1:]))
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def hashed_before(event: Mapping[str, Any]) -> bytes:
    """The canonical JSON of the hashed fields that sort before ``data`` (``action`` and
    ``actor``): the first half that `event_hash_with_data` splices."""
    return canonical_json({name: event[name] for name in _BEFORE_DATA})


def seal(prev_hash: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the event (its ``HASHED_FIELDS``) with ``prev_hash`` and ``hash`` filled in.

    Any ``prev_hash`` or ``hash`` already in ``event`` is replaced. A field that the hash
    would not cover is refused rather than stored unprotected.
    """
    missing = [name for name in HASHED_FIELDS if name not in event]
    if missing:
        raise ValueError(f"audit event lacks fields: {', '.join(missing)}")
    unknown = sorted(set(event) - set(EVENT_FIELDS))
    if unknown:
        raise ValueError(f"audit event has fields the hash does not cover: {', '.join(unknown)}")
    seq = event["seq"]
    if not _is_int(seq) or seq < 1:
        raise ValueError(f"audit event seq must be a positive integer, got {seq!r}")
    sealed = {name: event[name] for name in HASHED_FIELDS}
    sealed["prev_hash"] = prev_hash
    sealed["hash"] = event_hash(prev_hash, sealed)
    return sealed


def format_time(dt: datetime) -> str:
    """``occurred_at`` as hashed: UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always 6 digits).

    Naive datetimes are refused: their instant is ambiguous.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """The inverse of ``format_time``: an aware UTC datetime; refuses any other form."""
    if len(text) != 27 or not text.endswith("Z") or text[19] != ".":
        raise ValueError(f"not an audit time (YYYY-MM-DDTHH:MM:SS.ffffffZ): {text!r}")
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    if format_time(parsed) != text:
        raise ValueError(f"not an audit time (YYYY-MM-DDTHH:MM:SS.ffffffZ): {text!r}")
    return parsed


def email_hmac(key: bytes, email: str) -> str:
    """Hex HMAC-SHA256, under a server-held key, of the email stripped and lowercased.

    Lets the trail answer "was this address deleted?" without holding the address; the
    key stops anyone with the trail alone from confirming guesses.
    """
    return EmailHmac(key)(email)


class EmailHmac:
    """`email_hmac` under one key, for many addresses: the key's HMAC state is made once
    and copied per address (the worker hashes one address per deleted contact; a copy
    costs about half of keying a new HMAC). ValueError for an empty key."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("email_hmac needs a non-empty key")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def __call__(self, email: str) -> str:
        """The hex HMAC of ``email`` stripped and lowercased (its UTF-8 bytes)."""
        mac = self._keyed.copy()
        mac.update(email.strip().lower().encode("utf-8"))
        return mac.hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking a chain.

    ``events_checked``, ``head_seq`` and ``head_hash`` describe the events that verified:
    on failure they stop just before ``broken_seq``, the first sequence number at which
    the chain is not what it should be (``None`` when not even that is known, such as a
    malformed first line of an export). ``reason`` is a code, one of ``gap``,
    ``workspace_mismatch``, ``broken_link``, ``hash_mismatch``, ``malformed_event``,
    ``malformed_line``, and with anchors (a seq and its hash saved outside the service
    earlier) ``anchor_mismatch`` (that seq now has another hash: rewritten),
    ``anchor_missing`` (the chain ends before it: cut) and ``anchor_outside`` (the walk
    starts after it); ``detail`` says the same for a person (expected and found seq,
    line number, ...).
    """

    ok: bool
    events_checked: int
    head_seq: int
    head_hash: str
    broken_seq: int | None = None
    reason: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the verify endpoint and the CLI."""
        return asdict(self)


def check_event_shape(event: Mapping[str, Any]) -> str | None:
    """Describe what keeps ``event`` from being verified at all, or ``None`` if nothing.

    Only the fields the verifier itself reads are typed here; every other field is
    covered by the hash.
    """
    missing = [name for name in EVENT_FIELDS if name not in event]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    if not _is_int(event["seq"]) or event["seq"] < 1:
        return f"seq is not a positive integer: {event['seq']!r}"
    for name in ("prev_hash", "hash"):
        if not isinstance(event[name], str):
            return f"{name} is not a string"
    return None


class ChainVerifier:
    """Verifies a workspace's events fed one at a time in ``seq`` order, in constant memory.

    Each event is checked, in this order, for: its shape (``malformed_event``); being the
    next ``seq`` (``gap``: a missing, duplicate or out-of-order event); belonging to the
    same workspace as the first event, or to ``workspace_id`` when given
    (``workspace_mismatch``); its ``prev_hash`` being the previous event's ``hash``
    (``broken_link``); and its recomputed hash matching the stored one
    (``hash_mismatch``). The first failure is kept and later events are ignored.

    The first event must have ``seq == start_seq``. Its ``prev_hash`` must equal
    ``start_prev_hash``, or is trusted when that is ``None`` (verifying from the middle of
    a chain, as with an export from ``since_seq``). A chain starting at ``seq`` 1 always
    starts from ``GENESIS_HASH``.
    """

    def __init__(
        self,
        *,
        start_seq: int = 1,
        start_prev_hash: str | None = GENESIS_HASH,
        workspace_id: str | None = None,
        anchors: Mapping[int, str] | None = None,
    ) -> None:
        if start_seq < 1:
            raise ValueError("start_seq must be at least 1")
        if start_seq == 1 and start_prev_hash != GENESIS_HASH:
            raise ValueError("a chain starting at seq 1 starts from GENESIS_HASH")
        self._expected_seq = start_seq
        self._prev_hash = start_prev_hash
        self._workspace_id = workspace_id
        self._workspace_known = workspace_id is not None
        self._checked = 0
        self._head_seq = start_seq - 1
        # An empty mid-chain walk with a trusted start has no known head hash.
        self._head_hash = start_prev_hash if start_prev_hash is not None else ""
        self._failure: VerifyResult | None = None
        self._start_seq = start_seq
        # seq -> hash saved outside the service earlier (`parse_anchor`): the chain must
        # still hold that hash at that seq, or it was rewritten (or cut) since.
        self._anchors = dict(anchors or {})

    @property
    def broken(self) -> bool:
        """Whether a failure has been found."""
        return self._failure is not None

    def feed(self, event: Mapping[str, Any]) -> bool:
        """Check the next event; ``False`` once the chain is broken (here or earlier)."""
        if self._failure is not None:
            return False
        problem = self._problem(event)
        if problem is not None:
            self.fail(*problem, broken_seq=self._expected_seq)
            return False
        anchored = self._anchors.get(event["seq"])
        if anchored is not None and anchored != event["hash"]:
            self.fail(
                "anchor_mismatch",
                f"seq {event['seq']} has hash {event['hash']}, the anchor says {anchored}: the"
                " trail was rewritten after the anchor was taken",
                broken_seq=event["seq"],
            )
            return False
        self._checked += 1
        self._head_seq = event["seq"]
        self._head_hash = event["hash"]
        self._prev_hash = event["hash"]
        self._expected_seq += 1
        return True

    def fail(self, reason: str, detail: str, *, broken_seq: int | None) -> None:
        """Record a failure found outside the chain itself (e.g. an unreadable line).

        Ignored if the chain is already broken: the first failure is the one reported.
        """
        if self._failure is None:
            self._failure = VerifyResult(
                ok=False,
                events_checked=self._checked,
                head_seq=self._head_seq,
                head_hash=self._head_hash,
                broken_seq=broken_seq,
                reason=reason,
                detail=detail,
            )

    @property
    def expected_seq(self) -> int:
        """The ``seq`` the next event must have."""
        return self._expected_seq

    def result(self) -> VerifyResult:
        """The first failure, or ok with the head of what was fed (every anchor met)."""
        for seq in sorted(self._anchors):
            if seq < self._start_seq:
                self.fail(
                    "anchor_outside",
                    f"the anchor's seq {seq} is before the first event checked"
                    f" (seq {self._start_seq}): export from since_seq={seq} or earlier",
                    broken_seq=None,
                )
            elif seq > self._head_seq:
                self.fail(
                    "anchor_missing",
                    f"no event at the anchor's seq {seq} (the chain ends at seq"
                    f" {self._head_seq}): events were removed after the anchor was taken"
                    " (or the anchor's seq is mistyped: check it against the head you kept)",
                    broken_seq=self._head_seq + 1,
                )
        if self._failure is not None:
            return self._failure
        return VerifyResult(
            ok=True,
            events_checked=self._checked,
            head_seq=self._head_seq,
            head_hash=self._head_hash,
        )

    def _problem(self, event: Mapping[str, Any]) -> tuple[str, str] | None:
        shape = check_event_shape(event)
        if shape is not None:
            return "malformed_event", shape
        seq = event["seq"]
        if seq != self._expected_seq:
            return "gap", f"expected seq {self._expected_seq}, got {seq}"
        if not self._workspace_known:
            self._workspace_id = event["workspace_id"]
            self._workspace_known = True
        elif event["workspace_id"] != self._workspace_id:
            return (
                "workspace_mismatch",
                f"expected workspace {self._workspace_id!r}, got {event['workspace_id']!r}",
            )
        if self._prev_hash is not None and event["prev_hash"] != self._prev_hash:
            return "broken_link", "prev_hash is not the previous event's hash"
        try:
            recomputed = event_hash(event["prev_hash"], event)
        except (TypeError, ValueError) as exc:  # non-JSON value, NaN, non-ASCII prev_hash
            return "malformed_event", f"cannot hash: {exc}"
        if recomputed != event["hash"]:
            return "hash_mismatch", "recomputed hash differs from the stored hash"
        return None


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (a chain's head as `audit verify` prints it, saved elsewhere) as
    ``(seq, hash)``; ValueError naming the expected form otherwise."""
    seq, sep, digest = text.strip().partition(":")
    if not sep or not seq.isdigit() or int(seq) < 1 or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"an anchor is SEQ:HASH (a seq and its 64 hex digit hash), not {text!r}")
    return int(seq), digest


def verify_events(
    events: Iterable[Mapping[str, Any]],
    *,
    start_seq: int = 1,
    start_prev_hash: str | None = GENESIS_HASH,
    workspace_id: str | None = None,
    anchors: Mapping[int, str] | None = None,
) -> VerifyResult:
    """Verify an iterable of events (consumed lazily, stopping at the first break)."""
    verifier = ChainVerifier(
        start_seq=start_seq,
        start_prev_hash=start_prev_hash,
        workspace_id=workspace_id,
        anchors=anchors,
    )
    for event in events:
        if not verifier.feed(event):
            break
    return verifier.result()


def _is_int(value: Any) -> bool:
    # bool is an int subclass, and True must not pass for seq 1.
    return isinstance(value, int) and not isinstance(value, bool)
