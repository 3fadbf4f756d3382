"""The input limits of the HTTP API, and the safe JSON reader that enforces the structural ones.

Every input is bounded before any SQL runs (DESIGN §3). The numbers live here so that the
models, the filter parser, the README and the OpenAPI document all say the same thing;
over a limit is a 400 ``validation_error`` whose details name the limit.

Why these numbers: each is far above what a CRM integration sends by hand or by script
(a filter of a few dozen conditions, an ``$in`` of a page of addresses), and each keeps
the worst request cheap: a filter binds at most ``MAX_FILTER_VALUES`` SQL parameters,
well under SQLite's 32,766 and PostgreSQL's 32,767 per statement, so no accepted filter
can fail in the database for its size.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from service.errors import ValidationFailed

MAX_BODY_BYTES: Final = 1024 * 1024
"""A request body (413 above it)."""
MAX_JSON_DEPTH: Final = 32
"""Nesting of arrays and objects in a body (the filter has its own, smaller, limit)."""
MAX_FILTER_DEPTH: Final = 8
"""Nesting of ``$and``/``$or`` in a filter."""
MAX_FILTER_NODES: Final = 200
"""Conditions plus ``$and``/``$or`` combinations in a filter."""
MAX_IN_VALUES: Final = 1000
"""Values of one ``$in``."""
MAX_FILTER_VALUES: Final = 1000
"""Values bound by a whole filter (each condition binds one, an ``$in`` one per value)."""
MAX_FILTER_STRING: Final = 320
"""Characters of one filter value (an email address is at most 254)."""
MAX_SEARCH_LENGTH: Final = 200
"""Characters of ``search``."""
MAX_CURSOR_LENGTH: Final = 512
"""Characters of a ``cursor`` (ours are under 200)."""
MAX_PROPERTIES: Final = 100
"""Keys of a contact's ``properties``."""
MAX_PROPERTIES_BYTES: Final = 16 * 1024
"""A contact's ``properties`` as compact JSON."""
MAX_INT64: Final = 2**63 - 1
"""The largest integer a query parameter or cursor may carry (a database BIGINT)."""

# A JSON string, or the rest of the body when a string is never closed: matching either
# way keeps the scan linear (no retry from every quote of a malformed body).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
# Depth does not care which kind of bracket: objects become arrays, everything else goes.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def limits_table() -> dict[str, int]:
    """Every limit by name, as the README and the OpenAPI document publish them."""
    return {
        "max_body_bytes": MAX_BODY_BYTES,
        "max_json_depth": MAX_JSON_DEPTH,
        "max_filter_depth": MAX_FILTER_DEPTH,
        "max_filter_nodes": MAX_FILTER_NODES,
        "max_in_values": MAX_IN_VALUES,
        "max_filter_values": MAX_FILTER_VALUES,
        "max_filter_string": MAX_FILTER_STRING,
        "max_search_length": MAX_SEARCH_LENGTH,
        "max_cursor_length": MAX_CURSOR_LENGTH,
        "max_properties": MAX_PROPERTIES,
        "max_properties_bytes": MAX_PROPERTIES_BYTES,
    }


def over_limit(field: str, limit: str, message: str) -> ValidationFailed:
    """The 400 for input over a limit: details name the field and the limit."""
    return ValidationFailed(message, [{"field": field, "message": message, "limit": limit}])


def json_depth(raw: bytes, ceiling: int) -> int:
    """How deeply `raw` nests: at most ``ceiling`` when within it, else ``ceiling + 1``.

    Works on the bytes without recursion: strings are removed, then each pass deletes the
    innermost empty pairs; the passes needed to empty it are the depth. Brackets that never
    pair up (malformed JSON) stop the passes early and are left to the JSON parser.
    """
    if raw.count(b"[") + raw.count(b"{") <= ceiling:
        return ceiling  # too few brackets to nest deeper (the common case: no scan)
    brackets = _JSON_STRING.sub(b"", raw).translate(_AS_BRACKETS, _NOT_BRACKETS)
    if b"[" * (ceiling + 1) in brackets:
        return ceiling + 1  # a run of openers is already too deep
    depth = 0
    while brackets and depth <= ceiling:
        # bytes.replace does not rescan what it joins: one pass removes one level.
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
        depth += 1
    return depth


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def bad_text(value: str) -> str | None:
    """Why a string cannot be stored (NUL or a lone surrogate), or None when it can."""
    if "\x00" in value:
        return "must not contain the NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain a lone UTF-16 surrogate"
    return None


def storable(value: str | None, limit: int | None = None) -> str | None:
    """Text from outside (a receiver's body, headers, reason phrase, an error message) made
    safe for both databases: NUL and lone surrogates become U+FFFD; cut to `limit`."""
    if value is None:
        return None
    if limit is not None:
        value = value[:limit]
    if bad_text(value) is not None:
        value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value


def check_text(value: Any, path: str = "body") -> None:
    """Refuse (400) any string in a parsed JSON value, key or not, that cannot be stored."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            why = bad_text(item)
            if why is not None:
                raise ValidationFailed(f"{where} {why}", [{"field": where, "message": why}])
        elif isinstance(item, dict):
            for key, sub in item.items():
                why = bad_text(key)
                if why is not None:
                    raise ValidationFailed(
                        f"a key in {where} {why}", [{"field": where, "message": why}]
                    )
                stack.append((sub, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))


class _DuplicateName(ValueError):
    """A JSON object named a member twice (`parse_json` refuses it)."""


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict, refusing a name given twice."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                shown = json.dumps(name[:100])
                raise _DuplicateName(f"the name {shown} appears twice in one object")
            seen.add(name)
    return value


def parse_json(raw: bytes) -> Any:
    """A JSON body, refused with a 400 unless it is JSON within the limits that can be stored.

    Refused: malformed JSON or UTF-8; an object naming a member twice (RFC 8259 §4 leaves
    the meaning to each parser: ``{"dry_run": true, "dry_run": false}`` or a filter field
    given twice would be read one way by a client's tooling and the other by us, and a
    deletion must never be wider than the sender read it); ``NaN``/``Infinity``; integers
    beyond Python's 4,300-digit conversion limit; nesting deeper than ``MAX_JSON_DEPTH``; a
    string holding NUL or a lone surrogate. Never a RecursionError, whatever the body.
    """
    if json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise over_limit(
            "body", "max_json_depth", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        value = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique_names)
    except _DuplicateName as exc:
        raise ValidationFailed(
            "the body names a member twice in one object",
            [{"field": "body", "message": str(exc)}],
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValidationFailed(
            "the body is not valid JSON", [{"field": "body", "message": str(exc)[:200]}]
        ) from None
    check_text(value)
    return value


def not_null_in_schema(schema: dict[str, Any], fields: tuple[str, ...]) -> None:
    """The JSON Schema side of :func:`refuse_nulls`: these properties offer no ``null``."""
    for name in fields:
        prop = schema["properties"][name]
        options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
        if len(options) == 1:
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options


def refuse_nulls(data: Any, fields: tuple[str, ...]) -> Any:
    """A ``mode="before"`` model check: an explicit JSON ``null`` for one of ``fields`` (the
    selectors and filters of a query or a deletion) is a 400 naming each such field.

    Read as "absent", ``{"email": null}`` would answer every audit event and
    ``{"filter": null, "match_all": true}`` would select every contact: a client whose
    variable happened to be empty would get a wider answer, or deletion, than it asked for.
    Leaving the field out still means "no such condition". Other values pass unchanged.
    """
    if isinstance(data, dict):
        nulls = [name for name in fields if name in data and data[name] is None]
        if nulls:
            raise ValidationFailed(
                "the request body is invalid",
                [
                    {"field": name, "message": f"null is not a condition: leave {name} out"}
                    for name in nulls
                ],
            )
    return data
