"""The audit hash chain: canonical JSON, sealing, and what verification catches."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from service.audit.chain import (
    EVENT_FIELDS,
    GENESIS_HASH,
    HASHED_FIELDS,
    ChainVerifier,
    EmailHmac,
    VerifyResult,
    canonical_json,
    email_hmac,
    event_hash,
    event_hash_with_data,
    format_time,
    hashed_before,
    parse_time,
    seal,
    verify_events,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def unsealed(
    seq: int, workspace_id: str = "ws_1", data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An event as the store would build it, before sealing."""
    return {
        "seq": seq,
        "id": f"evt_{seq:05d}",
        "workspace_id": workspace_id,
        "occurred_at": format_time(T0 + timedelta(seconds=seq, microseconds=seq)),
        "actor": {"type": "api_key", "id": "key_abc"},
        "action": "contact.deleted",
        "target": {"type": "contact", "id": f"c_{seq}"},
        "job_id": "job_1",
        "request_id": f"req_{seq}",
        "data": {"email_hmac": "ab" * 32, "n": seq, "note": "héllo ✓"} if data is None else data,
    }


def make_chain(
    n: int = 50,
    *,
    workspace_id: str = "ws_1",
    datas: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A sealed chain of events seq 1..n."""
    events: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for i in range(n):
        data = datas[i] if datas is not None else None
        event = seal(prev, unsealed(i + 1, workspace_id, data))
        events.append(event)
        prev = event["hash"]
    return events


def assert_broken(result: VerifyResult, seq: int | None, reason: str) -> None:
    assert not result.ok
    assert (result.broken_seq, result.reason) == (seq, reason), result


# --- canonical JSON ------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_level_without_whitespace() -> None:
    value = {"b": 1, "a": {"d": [1, 2, {"z": None, "y": True}], "c": "x"}}
    assert canonical_json(value) == b'{"a":{"c":"x","d":[1,2,{"y":true,"z":null}]},"b":1}'


def test_canonical_json_is_independent_of_insertion_order() -> None:
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


def test_canonical_json_keeps_unicode_as_utf8_and_escapes_controls() -> None:
    assert canonical_json({"k": "é✓😀"}) == '{"k":"é✓😀"}'.encode()
    assert canonical_json('a"\\\n\x1f') == b'"a\\"\\\\\\n\\u001f"'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_nan_and_infinities(bad: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": bad})


def test_canonical_json_refuses_non_json_values() -> None:
    with pytest.raises(TypeError):
        canonical_json({"x": b"bytes"})


# --- hashing and sealing -------------------------------------------------------------


def test_event_hash_is_sha256_of_prev_hash_then_canonical_hashed_fields() -> None:
    event = unsealed(1)
    expected = hashlib.sha256(
        GENESIS_HASH.encode("ascii") + canonical_json({k: event[k] for k in HASHED_FIELDS})
    ).hexdigest()
    assert event_hash(GENESIS_HASH, event) == expected


_json_leaf = st.none() | st.booleans() | st.integers() | st.text()
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_party = st.fixed_dictionaries({"type": st.text(), "id": st.text()})


@given(value=_json | st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_json_is_exactly_the_documented_json_dumps(value: Any) -> None:
    """The encoder is built once, not per call: the bytes must not change with that."""
    expected = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    assert canonical_json(value) == expected
    assert canonical_json({"b": value, "a": [value]}) == b'{"a":[%s],"b":%s}' % (expected, expected)


def _documented(value: Any) -> bytes | type[Exception]:
    """What the documented ``json.dumps`` call makes of ``value``: its bytes, or the
    class of the error it raises."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        return TypeError if isinstance(exc, TypeError) else ValueError


def _canonical(value: Any) -> bytes | type[Exception]:
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as exc:
        return TypeError if isinstance(exc, TypeError) else ValueError


class _Text(str):
    pass


class _Colour(enum.Enum):
    RED = "red"


class _Level(enum.IntEnum):
    HIGH = 3


# Every character, lone surrogates and controls included; integers far beyond 64 bits;
# keys that are not strings; floats; subclasses and types orjson knows but json refuses.
_any_text = st.text(st.characters(codec=None, categories=None), max_size=8) | st.sampled_from(
    ["\x00\x1f\x7f\u2028\u2029", '"\\/', "\ud800", "é✓😀", "\x85\xa0"]
)
_wide_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2)
    | st.sampled_from([10**40, -(10**40), 2**64, -(2**63) - 1])
    | _any_text
    | st.floats()
    | st.sampled_from(
        [_Text("x"), _Level.HIGH, _Colour.RED, uuid.UUID(int=7), b"x", datetime(2024, 1, 1)]
    )
)
_wide = st.recursive(
    _wide_leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_any_text, inner, max_size=4)
        | st.dictionaries(st.integers(-3, 3) | st.none() | st.booleans(), inner, max_size=2)
    ),
    max_leaves=20,
)


@given(value=_wide)
def test_canonical_json_matches_json_dumps_on_any_value(value: Any) -> None:
    """canonical_json takes a faster encoder for the plain values; for every value, the
    bytes, or the kind of refusal, must be what the documented json.dumps call gives."""
    assert _canonical(value) == _documented(value)
    assert _canonical({"k": value, "a": [value]}) == _documented({"k": value, "a": [value]})


def test_canonical_json_matches_json_dumps_at_the_edges() -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = [deep, {"k": deep}] if isinstance(deep, str) else [deep]
    looped: dict[str, Any] = {}
    looped["self"] = looped
    for value in (
        deep,
        looped,
        {"\ud800": 1},
        {"a\x00": "\x00", "a": "\x1f", "ä": 1, "z": 2, "Z": 3, "😀": 4, "\uffff": 5},
        [2**64 - 1, 2**64, -(2**63), -(2**63) - 1],
        {"k": 1e16, "j": 1e-7, "i": -0.0},
        {1: "int key", "1": "str key"},
        [_Text("x"), _Level.HIGH],
        {"k": _Colour.RED},
        {"k": uuid.UUID(int=7)},
        {"k": math.nan},
        {"k": datetime(2024, 1, 1)},
    ):
        assert _canonical(value) == _documented(value)


@given(
    data=st.dictionaries(st.text(), _json, max_size=6),
    actor=_party,
    target=st.none() | _party,
    text=st.text(),
    optional=st.none() | st.text(),
    seq=st.integers(min_value=1, max_value=2**31),
)
def test_event_hash_with_encoded_data_is_event_hash(
    data: dict[str, Any],
    actor: dict[str, str],
    target: dict[str, str] | None,
    text: str,
    optional: str | None,
    seq: int,
) -> None:
    """The append path hashes data it encoded once; the bytes hashed must be the same."""
    event = unsealed(seq, workspace_id=text, data=data)
    event |= {"actor": actor, "target": target, "job_id": optional, "request_id": text}
    expected = event_hash(GENESIS_HASH, event)
    spliced = dict(event, data="not read")
    assert event_hash_with_data(GENESIS_HASH, spliced, canonical_json(data)) == expected
    # With the first half given, as append_events gives it once per action and actor.
    before = hashed_before(event)
    assert event_hash_with_data(GENESIS_HASH, spliced, canonical_json(data), before) == expected


def test_event_hash_ignores_prev_hash_and_hash_fields_of_the_event() -> None:
    sealed = seal(GENESIS_HASH, unsealed(1))
    assert event_hash(GENESIS_HASH, sealed) == event_hash(GENESIS_HASH, unsealed(1))


def test_seal_fills_prev_hash_and_hash_and_keeps_exactly_event_fields() -> None:
    sealed = seal(GENESIS_HASH, unsealed(1))
    assert tuple(sealed) == EVENT_FIELDS
    assert sealed["prev_hash"] == GENESIS_HASH
    assert sealed["hash"] == event_hash(GENESIS_HASH, sealed)


def test_seal_refuses_fields_the_hash_would_not_cover() -> None:
    with pytest.raises(ValueError, match="not cover"):
        seal(GENESIS_HASH, {**unsealed(1), "extra": 1})


def test_seal_refuses_missing_fields() -> None:
    event = unsealed(1)
    del event["data"]
    with pytest.raises(ValueError, match="data"):
        seal(GENESIS_HASH, event)


@pytest.mark.parametrize("seq", [0, -1, True, "1", 1.0])
def test_seal_refuses_a_seq_that_is_not_a_positive_int(seq: object) -> None:
    with pytest.raises(ValueError, match="seq"):
        seal(GENESIS_HASH, {**unsealed(1), "seq": seq})


# --- times ---------------------------------------------------------------------------


def test_format_time_is_utc_with_six_fraction_digits_and_z() -> None:
    assert format_time(datetime(2024, 5, 1, 12, 0, tzinfo=UTC)) == "2024-05-01T12:00:00.000000Z"
    plus2 = timezone(timedelta(hours=2))
    assert format_time(datetime(2024, 5, 1, 14, 0, 0, 7, tzinfo=plus2)) == (
        "2024-05-01T12:00:00.000007Z"
    )


def test_format_time_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        format_time(datetime(2024, 5, 1))


@given(st.datetimes(timezones=st.just(UTC)))
def test_parse_time_inverts_format_time(dt: datetime) -> None:
    assert parse_time(format_time(dt)) == dt


@pytest.mark.parametrize(
    "text",
    ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000000+00:00", "2024-05-01 12:00:00.000000Z"],
)
def test_parse_time_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


# --- verification: intact chains ------------------------------------------------------


def test_an_intact_chain_verifies_with_its_head() -> None:
    events = make_chain(50)
    result = verify_events(events)
    assert result == VerifyResult(
        ok=True, events_checked=50, head_seq=50, head_hash=events[-1]["hash"]
    )
    assert result.to_dict() == {
        "ok": True,
        "events_checked": 50,
        "head_seq": 50,
        "head_hash": events[-1]["hash"],
        "broken_seq": None,
        "reason": None,
        "detail": None,
    }


def test_an_empty_chain_verifies_at_genesis() -> None:
    assert verify_events([]) == VerifyResult(
        ok=True, events_checked=0, head_seq=0, head_hash=GENESIS_HASH
    )


def test_a_chain_verifies_from_the_middle_trusting_the_first_prev_hash() -> None:
    events = make_chain(50)
    result = verify_events(events[19:], start_seq=20, start_prev_hash=None)
    assert (result.ok, result.events_checked, result.head_seq) == (True, 31, 50)


def test_a_chain_verifies_from_the_middle_against_a_known_prev_hash() -> None:
    events = make_chain(50)
    good = verify_events(events[19:], start_seq=20, start_prev_hash=events[18]["hash"])
    assert good.ok
    bad = verify_events(events[19:], start_seq=20, start_prev_hash=GENESIS_HASH)
    assert_broken(bad, 20, "broken_link")


def test_a_chain_from_seq_1_must_start_from_genesis() -> None:
    with pytest.raises(ValueError):
        ChainVerifier(start_seq=1, start_prev_hash=None)


def test_the_first_event_must_have_genesis_prev_hash() -> None:
    first = seal("f" * 64, unsealed(1))
    assert_broken(verify_events([first]), 1, "broken_link")


def test_the_first_event_must_have_the_start_seq() -> None:
    events = make_chain(5)
    assert_broken(verify_events(events[1:]), 1, "gap")


def test_verifier_reports_the_first_break_and_ignores_later_events() -> None:
    events = make_chain(10)
    events[3]["data"] = {"tampered": True}
    events[6]["data"] = {"tampered": True}
    verifier = ChainVerifier()
    fed = [verifier.feed(e) for e in events]
    assert fed == [True] * 3 + [False] * 7
    result = verifier.result()
    assert_broken(result, 4, "hash_mismatch")
    assert (result.events_checked, result.head_seq, result.head_hash) == (3, 3, events[2]["hash"])


# --- verification: tampering ----------------------------------------------------------

TAMPERED_SEQ = 17


def _different(value: Any) -> Any:
    """A JSON value that differs from ``value`` (for strings, by one character)."""
    if isinstance(value, str):
        return value[:-1] + ("x" if not value.endswith("x") else "y")
    if isinstance(value, dict):
        return {**value, "tampered": True}
    if value is None:
        return "x"
    raise AssertionError(f"no edit for {value!r}")


# Editing any field of event 17 is reported at seq 17. The reason depends on the field:
# seq is checked first (editing it is a gap), then workspace_id (all events share one),
# then prev_hash (the link to event 16); every other hashed field, and the stored hash
# itself, shows as event 17's hash no longer matching.
EDITS: list[tuple[str, Callable[[Any], Any], str]] = [
    ("seq", lambda v: v + 1000, "gap"),
    ("id", _different, "hash_mismatch"),
    ("workspace_id", _different, "workspace_mismatch"),
    ("occurred_at", lambda v: v.replace(".000017Z", ".000018Z"), "hash_mismatch"),
    ("actor", lambda v: {**v, "type": "system"}, "hash_mismatch"),
    ("action", lambda v: "contact.deletion_failed", "hash_mismatch"),
    ("target", lambda v: {**v, "id": "c_other"}, "hash_mismatch"),
    ("job_id", lambda v: None, "hash_mismatch"),
    ("request_id", _different, "hash_mismatch"),
    ("data", _different, "hash_mismatch"),
    ("prev_hash", lambda v: "0" + v[1:] if v[0] != "0" else "1" + v[1:], "broken_link"),
    ("hash", lambda v: "0" + v[1:] if v[0] != "0" else "1" + v[1:], "hash_mismatch"),
]


def test_edits_cover_every_field() -> None:
    assert {field for field, _, _ in EDITS} == set(EVENT_FIELDS)


@pytest.mark.parametrize(("field", "edit", "reason"), EDITS, ids=[e[0] for e in EDITS])
def test_editing_any_field_of_an_event_is_reported_at_that_seq(
    field: str, edit: Callable[[Any], Any], reason: str
) -> None:
    events = make_chain(50)
    event = events[TAMPERED_SEQ - 1]
    event[field] = edit(event[field])
    assert event[field] != make_chain(50)[TAMPERED_SEQ - 1][field]
    result = verify_events(events)
    assert_broken(result, TAMPERED_SEQ, reason)
    assert (result.events_checked, result.head_seq) == (16, 16)


def test_editing_the_first_events_workspace_is_a_hash_mismatch() -> None:
    """The first event sets the workspace, so only its hash gives the edit away."""
    events = make_chain(5)
    events[0]["workspace_id"] = "ws_2"
    assert_broken(verify_events(events), 1, "hash_mismatch")


def test_editing_an_event_and_resealing_it_breaks_the_next_link() -> None:
    events = make_chain(50)
    events[16] = seal(events[16]["prev_hash"], {**events[16], "data": {"forged": True}})
    assert_broken(verify_events(events), 18, "broken_link")


def test_an_expected_workspace_is_enforced_from_the_first_event() -> None:
    assert_broken(verify_events(make_chain(3), workspace_id="ws_2"), 1, "workspace_mismatch")
    assert verify_events(make_chain(3), workspace_id="ws_1").ok


def test_events_from_two_workspaces_do_not_verify_as_one_chain() -> None:
    """Even when each half is a valid chain, linked in seq order."""
    first = make_chain(3, workspace_id="ws_1")
    second = seal(first[-1]["hash"], unsealed(4, workspace_id="ws_2"))
    assert_broken(verify_events([*first, second]), 4, "workspace_mismatch")


def test_deleting_an_event_is_a_gap_at_the_missing_seq() -> None:
    """Event 17 is deleted: 18 arrives where 17 was expected, and 17 is reported."""
    events = make_chain(50)
    del events[TAMPERED_SEQ - 1]
    result = verify_events(events)
    assert_broken(result, TAMPERED_SEQ, "gap")
    assert result.detail == "expected seq 17, got 18"


def test_duplicating_an_event_is_a_gap_at_the_next_seq() -> None:
    events = make_chain(50)
    events.insert(TAMPERED_SEQ, dict(events[TAMPERED_SEQ - 1]))
    result = verify_events(events)
    assert_broken(result, TAMPERED_SEQ + 1, "gap")
    assert result.detail == "expected seq 18, got 17"


@pytest.mark.parametrize("other_seq", [18, 40])
def test_swapping_two_events_is_reported_at_the_first_position(other_seq: int) -> None:
    """Rows swapped as they are: the stream's seq jumps at the first position."""
    events = make_chain(50)
    a, b = TAMPERED_SEQ - 1, other_seq - 1
    events[a], events[b] = events[b], events[a]
    assert_broken(verify_events(events), TAMPERED_SEQ, "gap")


@pytest.mark.parametrize("other_seq", [18, 40])
def test_swapping_two_events_and_their_seqs_is_reported_at_the_first_position(
    other_seq: int,
) -> None:
    """Seqs swapped back into order: the first position's prev_hash no longer links."""
    events = make_chain(50)
    a, b = TAMPERED_SEQ - 1, other_seq - 1
    events[a], events[b] = events[b], events[a]
    events[a]["seq"], events[b]["seq"] = events[b]["seq"], events[a]["seq"]
    assert [e["seq"] for e in events] == list(range(1, 51))
    assert_broken(verify_events(events), TAMPERED_SEQ, "broken_link")


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        (lambda e: e.pop("hash"), "missing fields: hash"),
        (lambda e: e.update(seq="17"), "seq is not a positive integer: '17'"),
        (lambda e: e.update(seq=True), "seq is not a positive integer: True"),
        (lambda e: e.update(prev_hash=None), "prev_hash is not a string"),
    ],
)
def test_an_event_that_cannot_be_checked_is_malformed(
    edit: Callable[[dict[str, Any]], object], detail: str
) -> None:
    events = make_chain(20)
    edit(events[TAMPERED_SEQ - 1])
    result = verify_events(events)
    assert_broken(result, TAMPERED_SEQ, "malformed_event")
    assert result.detail == detail


def test_an_event_with_an_unhashable_value_is_malformed_not_a_crash() -> None:
    events = make_chain(20)
    events[TAMPERED_SEQ - 1]["data"] = {"x": math.nan}
    assert_broken(verify_events(events), TAMPERED_SEQ, "malformed_event")


# --- property: random data ------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
data_dicts = st.dictionaries(st.text(), json_values, max_size=5)


@st.composite
def data_mutations(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with one key added, removed or given another value; never the same JSON."""
    kind = draw(st.sampled_from(["add", "remove", "replace"]))
    mutated = dict(data)
    if kind == "add" or not data:
        key = draw(st.text().filter(lambda k: k not in data))
        mutated[key] = draw(json_values)
    elif kind == "remove":
        del mutated[draw(st.sampled_from(sorted(data)))]
    else:
        key = draw(st.sampled_from(sorted(data)))
        mutated[key] = draw(
            json_values.filter(lambda v: canonical_json(v) != canonical_json(data[key]))
        )
    return mutated


@given(datas=st.lists(data_dicts, min_size=1, max_size=8), pick=st.data())
def test_any_sealed_chain_of_random_data_verifies_and_any_data_mutation_breaks_it(
    datas: list[dict[str, Any]], pick: st.DataObject
) -> None:
    events = make_chain(len(datas), datas=datas)
    result = verify_events(events)
    assert result.ok
    assert result.head_seq == len(datas)

    index = pick.draw(st.integers(0, len(datas) - 1))
    mutated = pick.draw(data_mutations(events[index]["data"]))
    assume(canonical_json(mutated) != canonical_json(events[index]["data"]))
    events[index]["data"] = mutated
    assert_broken(verify_events(events), index + 1, "hash_mismatch")


# --- email HMAC -----------------------------------------------------------------------


def test_email_hmac_is_keyed() -> None:
    assert email_hmac(b"key-one", "a@example.com") != email_hmac(b"key-two", "a@example.com")


def test_email_hmac_ignores_case_and_surrounding_space() -> None:
    assert email_hmac(b"k", "  Alice@Example.COM\n") == email_hmac(b"k", "alice@example.com")


def test_email_hmac_differs_between_addresses() -> None:
    assert email_hmac(b"k", "alice@example.com") != email_hmac(b"k", "bob@example.com")


def test_email_hmac_is_not_a_plain_sha256_of_the_address() -> None:
    digest = email_hmac(b"k", "alice@example.com")
    assert len(digest) == 64
    assert digest != hashlib.sha256(b"alice@example.com").hexdigest()
    assert digest != hashlib.sha256(b"kalice@example.com").hexdigest()


def test_email_hmac_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError):
        email_hmac(b"", "alice@example.com")


@given(key=st.binary(min_size=1, max_size=80), emails=st.lists(st.text(), max_size=4))
def test_email_hmac_of_a_reused_key_is_the_one_shot_hmac(key: bytes, emails: list[str]) -> None:
    """The worker's keyed HMAC, copied per address, gives what keying anew gives: the hex
    HMAC-SHA256 of the address stripped and lowercased, whatever came before it."""
    keyed = EmailHmac(key)
    for email in emails:
        normalised = email.strip().lower().encode("utf-8")
        expected = hmac.new(key, normalised, hashlib.sha256).hexdigest()
        assert keyed(email) == expected == email_hmac(key, email)


def test_a_reused_email_hmac_key_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="non-empty key"):
        EmailHmac(b"")
