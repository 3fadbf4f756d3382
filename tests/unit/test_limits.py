"""The structural limits of JSON bodies and the text the databases can store (pure)."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ValidationFailed
from service.limits import MAX_JSON_DEPTH, json_depth, parse_json, storable
from service.webhooks.ssrf import failure_text

quick = settings(database=None, max_examples=300, deadline=None)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [1, 2, 5, MAX_JSON_DEPTH])
def test_bodies_within_the_depth_limit_parse(depth: int) -> None:
    assert parse_json(nested(depth)) is not None


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 977, 200_000])
def test_deeper_bodies_are_a_400_naming_the_limit_not_a_recursion_error(depth: int) -> None:
    with pytest.raises(ValidationFailed) as refused:
        parse_json(nested(depth))

    assert refused.value.details[0]["limit"] == "max_json_depth"


@st.composite
def nested_values(draw: st.DrawFn) -> tuple[object, int]:
    """A value nested `depth` deep in lists and objects, with bracket-laden strings."""
    depth = draw(st.integers(0, MAX_JSON_DEPTH + 8))
    value: object = draw(st.text(alphabet='[]{}"\\ab,:', max_size=8))
    for _ in range(depth):
        sibling = draw(st.text(alphabet='[]{}"\\', max_size=4))
        value = [sibling, value] if draw(st.booleans()) else {sibling: value, "k": [sibling]}
    return value, depth


@quick
@given(nested_values())
def test_the_depth_scan_agrees_with_the_real_nesting(case: tuple[object, int]) -> None:
    """Brackets inside strings (escaped quotes too) do not count; objects and arrays do."""
    value, _ = case

    def nesting(v: object) -> int:
        if isinstance(v, list):
            return 1 + max((nesting(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((nesting(x) for x in v.values()), default=0)
        return 0

    real = nesting(value)

    too_deep = json_depth(json.dumps(value).encode(), MAX_JSON_DEPTH) > MAX_JSON_DEPTH

    assert too_deep == (real > MAX_JSON_DEPTH)


def test_the_depth_scan_stays_fast_on_hostile_bodies() -> None:
    hostile = [
        nested(500_000),
        b"[[]," * 250_000 + b"]" * 250_000,
        b'"\\"' * 300_000,
        b'["' + b"a" * 1_000_000,
    ]
    for raw in hostile:
        started = time.perf_counter()
        json_depth(raw, MAX_JSON_DEPTH)
        assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "raw",
    [b"NaN", b"[Infinity]", b"-Infinity", b"1" * 5000, b'"\\u0000"', b'{"\\ud800": 1}', b"\xff"],
)
def test_json_the_databases_cannot_store_is_refused(raw: bytes) -> None:
    with pytest.raises(ValidationFailed):
        parse_json(raw)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 1, "a": 1}', b'[{"x": {"y": 1, "z": 2, "y": 3}}]', b'{"\\u0061": 1, "a": 2}'],
)
def test_a_name_twice_in_one_object_is_refused_at_any_depth(raw: bytes) -> None:
    with pytest.raises(ValidationFailed):
        parse_json(raw)


def test_the_same_name_in_sibling_objects_is_fine() -> None:
    assert parse_json(b'[{"a": 1}, {"a": 2}, {"b": {"a": 3}}]') == [
        {"a": 1},
        {"a": 2},
        {"b": {"a": 3}},
    ]


def test_storable_replaces_nul_and_lone_surrogates_and_cuts() -> None:
    assert storable("ok\x00nul") == "ok\ufffdnul"
    assert storable("a\ud800b") == "a?b"
    assert storable("abcdef", 3) == "abc"
    assert storable(None) is None
    assert storable("plain") == "plain"


def test_a_connection_failure_does_not_name_the_address_a_host_resolved_to() -> None:
    key = aiohttp.client_reqrep.ConnectionKey(
        "hooks.example.com", 443, True, True, None, None, None
    )
    error = aiohttp.ClientConnectorError(
        key, ConnectionRefusedError(111, "Connect call failed ('10.1.2.3', 443)")
    )

    text = failure_text(error, "https://hooks.example.com/x")

    assert "10.1.2.3" not in text
    assert "hooks.example.com" in text


def test_other_failures_have_addresses_scrubbed_but_keep_a_literal_host() -> None:
    error = OSError("no route to 192.168.7.9 via fe80::1 from 203.0.114.7")

    text = failure_text(error, "https://203.0.114.7/hook")

    assert "192.168.7.9" not in text
    assert "fe80::1" not in text
    assert "203.0.114.7" in text
