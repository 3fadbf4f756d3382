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

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from service.errors import ValidationFailed

FIELDS = ("id", "email", "first_name", "last_name", "phone", "created_at")
OPERATORS = ("$eq", "$ne", "$in", "$startsWith", "$exists", "$gt", "$lt")
MAX_IN = 1000
MAX_DEPTH = 8


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


def parse_filter(raw: Any, path: str = "filter", depth: int = 0) -> Node:
    """Parse a filter object into a tree, or raise ValidationFailed naming the bad part."""
    if depth > MAX_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise _fail(path, "a filter must be an object")
    parts: list[Node] = []
    for key, value in raw.items():
        here = f"{path}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise _fail(here, f"{key} takes a non-empty list of filters")
            subs = tuple(parse_filter(v, f"{here}[{i}]", depth + 1) for i, v in enumerate(value))
            parts.append(Combination(key, subs))
        elif key.startswith("$"):
            raise _fail(here, f"unknown operator {key!r}; known: $and, $or")
        elif key not in FIELDS:
            raise _fail(here, f"unknown field {key!r}; known: {', '.join(FIELDS)}")
        else:
            parts.extend(_parse_field(key, value, here))
    if not parts:
        return Combination("$and", ())
    return parts[0] if len(parts) == 1 else Combination("$and", tuple(parts))


def _parse_field(field: str, value: Any, path: str) -> list[Condition]:
    if not isinstance(value, dict):
        return [Condition(field, "$eq", _value(field, value, path))]
    if not value:
        raise _fail(path, "an operator object must not be empty")
    conditions = []
    for op, operand in value.items():
        here = f"{path}.{op}"
        if op not in OPERATORS:
            raise _fail(here, f"unknown operator {op!r}; known: {', '.join(OPERATORS)}")
        conditions.append(Condition(field, op, _operand(field, op, operand, here)))
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
            raise _fail(path, f"$in takes at most {MAX_IN} values")
        return tuple(_value(field, v, f"{path}[{i}]") for i, v in enumerate(operand))
    if op == "$startsWith":
        if field in ("id", "created_at"):
            raise _fail(path, f"$startsWith does not apply to {field}")
        if not isinstance(operand, str) or not operand:
            raise _fail(path, "$startsWith takes a non-empty string")
        return _value(field, operand, path)
    return _value(field, operand, path)


def _value(field: str, value: Any, path: str) -> Any:
    if field == "id":
        if not isinstance(value, str):
            raise _fail(path, "id values are UUID strings")
        try:
            return uuid.UUID(value)
        except ValueError:
            raise _fail(path, f"not a UUID: {value!r}") from None
    if field == "created_at":
        if not isinstance(value, str):
            raise _fail(path, "created_at values are ISO-8601 date-times")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _fail(path, f"not an ISO-8601 date-time: {value!r}") from None
        if parsed.tzinfo is None:
            raise _fail(path, "created_at values need a timezone (e.g. Z)")
        return parsed
    if not isinstance(value, str):
        raise _fail(path, f"{field} values are strings")
    # Emails are stored lowercased, so compare them that way.
    return value.strip().lower() if field == "email" else value


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def compile_filter(node: Node, table: sa.Table) -> sa.ColumnElement[bool]:
    """The SQLAlchemy clause of a parsed filter over the contacts table."""
    if isinstance(node, Combination):
        clauses = [compile_filter(p, table) for p in node.parts]
        if not clauses:
            return sa.true()
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
            clause = column.like(_escape_like(node.value) + "%", escape="\\")
        case "$exists":
            clause = column.is_not(None) if node.value else column.is_(None)
        case "$gt":
            clause = column > node.value
        case "$lt":
            clause = column < node.value
        case _:
            raise AssertionError(node.op)
    return clause


def compile_search(text: str, table: sa.Table) -> sa.ColumnElement[bool]:
    """Case-insensitive substring search over name, email and phone."""
    pattern = "%" + _escape_like(text.lower()) + "%"
    columns = ("first_name", "last_name", "email", "phone")
    return sa.or_(*(sa.func.lower(table.c[c]).like(pattern, escape="\\") for c in columns))


def selection_clause(
    table: sa.Table, filter_tree: Node | None, search: str | None
) -> sa.ColumnElement[bool]:
    """The clause of a filter and/or search (both must match when both are given)."""
    clauses = []
    if filter_tree is not None:
        clauses.append(compile_filter(filter_tree, table))
    if search:
        clauses.append(compile_search(search, table))
    return sa.and_(*clauses) if clauses else sa.true()
