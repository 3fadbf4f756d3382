"""The filter language (Wix-like) and search, shared by contact queries and bulk delete.

    {"last_name": "Smith"}                      equality
    {"email": {"$in": ["a@x.io", "b@x.io"]}}    an operator
    {"$and": [...]}, {"$or": [...]}             combinations
    operators: $eq $ne $in $startsWith $exists $gt $lt
    fields:    id email first_name last_name phone created_at

Parsing is pure and produces a small tree; ``compile_filter`` turns the tree into a
SQLAlchemy clause. Anything unknown is a ``ValidationFailed`` naming its path.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from service.apimodels import parse_instant
from service.contacts.models import check_email
from service.errors import ValidationFailed
from service.limits import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    MAX_FILTER_STRING,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    over_limit,
)

FIELDS = ("id", "email", "first_name", "last_name", "phone", "created_at")
OPERATORS = ("$eq", "$ne", "$in", "$startsWith", "$exists", "$gt", "$lt")
NOT_NULL = ("id", "email", "created_at")
"""Fields every contact has (NOT NULL columns)."""
MAX_IN = MAX_IN_VALUES
MAX_DEPTH = MAX_FILTER_DEPTH


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class Combination:
    op: str  # "$and" | "$or"
    parts: tuple[Node, ...]


Node = Condition | Combination


def _fail(path: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"invalid filter: {message}", [{"field": path, "message": message}])


class _Budget:
    """What a filter has used of its limits while it is parsed."""

    def __init__(self) -> None:
        self.nodes = 0
        self.values = 0

    def node(self, path: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_FILTER_NODES:
            raise over_limit(
                path,
                "max_filter_nodes",
                f"the filter has more than {MAX_FILTER_NODES} conditions and combinations",
            )

    def bind(self, path: str, count: int = 1) -> None:
        self.values += count
        if self.values > MAX_FILTER_VALUES:
            raise over_limit(
                path,
                "max_filter_values",
                f"the filter binds more than {MAX_FILTER_VALUES} values in all",
            )


def parse_filter(raw: Any, path: str = "filter") -> Node:
    """Parse a filter object into a tree, or raise ValidationFailed naming the bad part.

    The limits of `service.limits` hold before anything else happens: depth, nodes,
    ``$in`` values, values bound in all, and the length of each string.
    """
    return _parse(raw, path, 0, _Budget())


def _parse(raw: Any, path: str, depth: int, budget: _Budget) -> Node:
    if depth > MAX_DEPTH:
        raise over_limit(path, "max_filter_depth", f"filter nested deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise _fail(path, "a filter must be an object")
    parts: list[Node] = []
    for key, value in raw.items():
        here = f"{path}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise _fail(here, f"{key} takes a non-empty list of filters")
            budget.node(here)
            subs = tuple(_parse(v, f"{here}[{i}]", depth + 1, budget) for i, v in enumerate(value))
            parts.append(Combination(key, subs))
        elif key.startswith("$"):
            raise _fail(here, f"unknown operator {key!r}; known: $and, $or")
        elif key not in FIELDS:
            raise _fail(here, f"unknown field {key!r}; known: {', '.join(FIELDS)}")
        else:
            parts.extend(_parse_field(key, value, here, budget))
    if not parts:
        return Combination("$and", ())
    return parts[0] if len(parts) == 1 else Combination("$and", tuple(parts))


def _parse_field(field: str, value: Any, path: str, budget: _Budget) -> list[Condition]:
    if not isinstance(value, dict):
        budget.node(path)
        budget.bind(path)
        return [Condition(field, "$eq", _value(field, value, path))]
    if not value:
        raise _fail(path, "an operator object must not be empty")
    conditions = []
    for op, operand in value.items():
        here = f"{path}.{op}"
        if op not in OPERATORS:
            raise _fail(here, f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
        budget.node(here)
        parsed = _operand(field, op, operand, here)  # the $in limit first: it is the nearer
        budget.bind(here, len(parsed) if op == "$in" else 1)
        conditions.append(Condition(field, op, parsed))
    return conditions


def _operand(field: str, op: str, operand: Any, path: str) -> Any:
    if op == "$exists":
        if not isinstance(operand, bool):
            raise _fail(path, "$exists takes true or false")
        if field in ("id", "email", "created_at"):
            raise _fail(path, f"{field} always exists; $exists does not apply")
        return operand
    if op == "$in":
        if not isinstance(operand, list) or not operand:
            raise _fail(path, "$in takes a non-empty list")
        if len(operand) > MAX_IN:
            raise over_limit(path, "max_in_values", f"$in takes at most {MAX_IN} values")
        return tuple(_value(field, v, f"{path}[{i}]") for i, v in enumerate(operand))
    if op == "$startsWith":
        if field in ("id", "created_at"):
            raise _fail(path, f"$startsWith does not apply to {field}")
        if not isinstance(operand, str) or not operand:
            raise _fail(path, "$startsWith takes a non-empty string")
        return _value(field, operand, path)
    return _value(field, operand, path)


def _value(field: str, value: Any, path: str) -> Any:
    if isinstance(value, str) and len(value) > MAX_FILTER_STRING:
        raise over_limit(
            path, "max_filter_string", f"a filter value is at most {MAX_FILTER_STRING} characters"
        )
    if field == "id":
        if not isinstance(value, str):
            raise _fail(path, "id values are UUID strings")
        try:
            return uuid.UUID(value)
        except ValueError:
            raise _fail(path, f"not a UUID: {value!r}") from None
    if field == "created_at":
        if not isinstance(value, str):
            raise _fail(path, "created_at values are RFC 3339 date-times")
        try:  # the one grammar of client-given times (service.apimodels.parse_instant)
            return parse_instant(value).astimezone(UTC)
        except ValueError as exc:
            raise _fail(path, f"{exc}: {value!r}") from None
    if not isinstance(value, str):
        raise _fail(path, f"{field} values are strings")
    return _as_stored_email(value) if field == "email" else value


def _as_stored_email(value: str) -> str:
    """An email filter value spelled as the API stores addresses (`check_email`: stripped,
    lowercased, Unicode NFC, an IDNA domain decoded), so that `a@xn--bcher-kva.example`
    finds `a@bücher.example`; a value that is no address (a `$startsWith` prefix) stripped,
    NFC and lowercased."""
    try:
        return check_email(value)
    except ValueError:
        return unicodedata.normalize("NFC", value.strip()).lower()


ALL: Node = Combination("$and", ())
"""The filter that matches every contact (what ``{}`` parses to)."""
NONE: Node = Combination("$or", ())
"""The filter that matches no contact."""


def simplify(node: Node) -> Node:
    """An equivalent, flatter tree; `ALL` when the filter plainly matches every contact.

    Nested ``$and``/``$or`` of the same kind are flattened, ``ALL`` and ``NONE`` parts are
    absorbed (``{"$or": [{}]}`` is ``ALL``), repeated parts dropped, and an ``$or`` whose
    conditions on one field leave no value out is ``ALL``: ``$exists`` true and false,
    ``$eq``/``$in`` v with ``$ne`` v, two ``$ne`` of different values, ``$ne`` v with any
    condition v surely meets, ``created_at`` after a or before b with b later than a.
    Sound, not complete: ``ALL`` only when every possible contact matches (a property
    test holds it to that).
    """
    if isinstance(node, Condition):
        return node
    unit, absorbing = (ALL, NONE) if node.op == "$and" else (NONE, ALL)
    parts: list[Node] = []
    for part in (simplify(p) for p in node.parts):
        if part == absorbing:
            return absorbing
        flat = part.parts if isinstance(part, Combination) and part.op == node.op else (part,)
        parts.extend(p for p in flat if p != unit and p not in parts)
    if node.op == "$or" and _covers_everything([p for p in parts if isinstance(p, Condition)]):
        return ALL
    if len(parts) == 1:
        return parts[0]
    return Combination(node.op, tuple(parts))


def _covers_everything(conditions: list[Condition]) -> bool:
    """Whether some field's conditions, or-ed, hold for every contact (NULL included)."""
    by_field: dict[str, list[Condition]] = {}
    for c in conditions:
        by_field.setdefault(c.field, []).append(c)
    return any(_field_covered(field, conds) for field, conds in by_field.items())


def _field_covered(field: str, conds: list[Condition]) -> bool:
    ops = {c.op for c in conds}
    null_covered = field in NOT_NULL or "$ne" in ops or Condition(field, "$exists", False) in conds
    return null_covered and _values_covered(field, conds)


def _values_covered(field: str, conds: list[Condition]) -> bool:
    """Whether every non-NULL value of the field meets one of `conds`."""
    if Condition(field, "$exists", True) in conds:
        return True
    excluded = {c.value for c in conds if c.op == "$ne"}
    if len(excluded) > 1:
        return True  # every value differs from one of them
    if len(excluded) == 1:
        (value,) = excluded
        return any(_holds(c, value) for c in conds if c.op != "$ne")
    if field == "created_at":
        lows = [c.value for c in conds if c.op == "$gt"]
        highs = [c.value for c in conds if c.op == "$lt"]
        return bool(lows and highs and max(highs) > min(lows))
    return False


def _holds(cond: Condition, value: Any) -> bool:
    """Whether a non-NULL ``value`` surely meets ``cond`` (False when unsure)."""
    match cond.op:
        case "$eq":
            return bool(cond.value == value)
        case "$in":
            return value in cond.value
        case "$exists":
            return bool(cond.value)
        case "$startsWith":
            return isinstance(value, str) and value.startswith(cond.value)
    return False


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def compile_filter(node: Node, table: sa.FromClause) -> sa.ColumnElement[bool]:
    """The SQLAlchemy clause of a parsed filter over the contacts table (or a subquery
    with its columns)."""
    if isinstance(node, Combination):
        clauses = [compile_filter(p, table) for p in node.parts]
        if not clauses:
            return sa.true() if node.op == "$and" else sa.false()
        return sa.and_(*clauses) if node.op == "$and" else sa.or_(*clauses)
    column: sa.ColumnElement[Any] = table.c[node.field]
    clause: sa.ColumnElement[bool]
    match node.op:
        case "$eq":
            clause = column == node.value
        case "$ne":
            clause = sa.or_(column != node.value, column.is_(None))
        case "$in":
            clause = column.in_(node.value)
        case "$startsWith":
            clause = starts_with(column, node.value)
        case "$exists":
            clause = column.is_not(None) if node.value else column.is_(None)
        case "$gt":
            clause = _ordered(column, node.value) > node.value
        case "$lt":
            clause = _ordered(column, node.value) < node.value
        case _:
            raise AssertionError(node.op)
    return clause


# A filter selects the same contacts on both databases: text compares by code point and
# case-sensitively ("Values compare as stored", README), whatever the database's settings.


class _starts_with(sa.sql.functions.FunctionElement[bool]):
    """``column`` begins with a prefix, case-sensitively, on both databases: its arguments
    are the column, the prefix as a GLOB pattern and as a LIKE pattern (see `starts_with`)."""

    type = sa.Boolean()
    inherit_cache = True


def starts_with(column: sa.ColumnElement[Any], prefix: str) -> sa.ColumnElement[bool]:
    """``column`` begins with ``prefix``, case-sensitively, on both databases.

    SQLite's LIKE ignores ASCII case (unless ``PRAGMA case_sensitive_like``), so there the
    test is GLOB, which is case-sensitive and can use an index on the column, with the
    prefix's GLOB metacharacters (``*``, ``?``, ``[``) written as one-character classes.
    PostgreSQL's LIKE is case-sensitive: the prefix with ``%``, ``_`` and ``\\`` escaped.
    """
    glob = "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"
    like = _escape_like(prefix) + "%"
    return _starts_with(column, sa.literal(glob, sa.Text), sa.literal(like, sa.Text))


@compiles(_starts_with, "sqlite")
def _starts_with_sqlite(element: _starts_with, compiler: Any, **kw: Any) -> str:
    column, glob, _ = element.clauses
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)})"


@compiles(_starts_with)
def _starts_with_default(element: _starts_with, compiler: Any, **kw: Any) -> str:
    column, _, like = element.clauses
    return f"({compiler.process(column, **kw)} LIKE {compiler.process(like, **kw)} ESCAPE '\\')"


class binary_order(sa.sql.functions.FunctionElement[str]):
    """A text column ordered by code point, as SQLite's default BINARY collation orders it:
    on PostgreSQL under ``COLLATE "C"`` (byte order of UTF-8, which is code point order),
    since a database's default collation (say ``en_US.UTF-8``) puts ``"apple"`` before
    ``"Banana"``, where code point order puts it after."""

    type = sa.String()
    inherit_cache = True


@compiles(binary_order, "sqlite")
def _binary_order_sqlite(element: binary_order, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(binary_order, "postgresql")
def _binary_order_postgresql(element: binary_order, compiler: Any, **kw: Any) -> str:
    return f'({compiler.process(element.clauses, **kw)}) COLLATE "C"'


def _ordered(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[Any]:
    """The column as `$gt`/`$lt` compare it: text by code point, other types as they are."""
    return binary_order(column) if isinstance(value, str) else column


class unicode_lower(sa.sql.functions.FunctionElement[str]):
    """Unicode's default lowercase mapping of a text, the same on both databases.

    SQLite's own ``lower()`` (and its LIKE) fold ASCII only, and PostgreSQL's ``lower()``
    follows the database's locale (ASCII only under ``C``). So: on SQLite a function
    registered on every connection (`service.db`) runs Python's ``str.lower``; on
    PostgreSQL ``lower()`` runs under the ICU root collation ``und-x-icu``, which maps
    the same way (ÖZTÜRK → öztürk, ΣΑΣ → σας, İ → i̇; ß stays ß: no case *folding*).
    """

    type = sa.String()
    inherit_cache = True


@compiles(unicode_lower, "sqlite")
def _lower_sqlite(element: unicode_lower, compiler: Any, **kw: Any) -> str:
    return f"unicode_lower({compiler.process(element.clauses, **kw)})"


@compiles(unicode_lower, "postgresql")
def _lower_postgresql(element: unicode_lower, compiler: Any, **kw: Any) -> str:
    return f'lower(({compiler.process(element.clauses, **kw)}) COLLATE "und-x-icu")'


def compile_search(text: str, table: sa.FromClause) -> sa.ColumnElement[bool]:
    """Case-insensitive substring search over name, email and phone (`unicode_lower`)."""
    pattern = unicode_lower(sa.cast(sa.literal("%" + _escape_like(text) + "%"), sa.Text))
    columns = ("first_name", "last_name", "email", "phone")
    return sa.or_(*(unicode_lower(table.c[c]).like(pattern, escape="\\") for c in columns))


def selection_clause(
    table: sa.FromClause, filter_tree: Node | None, search: str | None
) -> sa.ColumnElement[bool]:
    """The clause of a filter and/or search (both must match when both are given)."""
    clauses = []
    if filter_tree is not None:
        clauses.append(compile_filter(filter_tree, table))
    if search:
        clauses.append(compile_search(search, table))
    return sa.and_(*clauses) if clauses else sa.true()
