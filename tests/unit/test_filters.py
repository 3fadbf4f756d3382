"""The filter language: what parses, what is refused (naming the path), and the SQL it makes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from service.contacts.filters import (
    FIELDS,
    MAX_DEPTH,
    MAX_IN,
    OPERATORS,
    Combination,
    Condition,
    compile_filter,
    compile_search,
    parse_filter,
    selection_clause,
)
from service.db import contacts
from service.errors import ValidationFailed

# database=None: property tests must not write a .hypothesis directory into the tree.
quick = settings(database=None, max_examples=500, deadline=None)

ID = "0b7e4f3a-8a4c-4c8e-9f1e-2d3c4b5a6978"
# The drivers the service runs on, so the SQL is the SQL that runs.
DIALECTS: dict[str, sa.Dialect] = {
    name: sa.make_url(url).get_dialect()()
    for name, url in [("sqlite", "sqlite+aiosqlite://"), ("postgresql", "postgresql+asyncpg://")]
}


LOWER = {
    "sqlite": "unicode_lower({})",
    "postgresql": 'lower(({}) COLLATE "und-x-icu")',
}


def refused(raw: Any) -> ValidationFailed:
    """The ValidationFailed that parsing `raw` raises."""
    with pytest.raises(ValidationFailed) as excinfo:
        parse_filter(raw)
    return excinfo.value


def field_of(error: ValidationFailed) -> str:
    field: str = error.details[0]["field"]
    return field


# --- what parses --------------------------------------------------------------------------


def test_a_bare_value_is_implicit_equality() -> None:
    assert parse_filter({"last_name": "Smith"}) == Condition("last_name", "$eq", "Smith")


def test_several_fields_in_one_object_are_anded() -> None:
    tree = parse_filter({"last_name": "Smith", "first_name": "Ada"})

    assert tree == Combination(
        "$and",
        (Condition("last_name", "$eq", "Smith"), Condition("first_name", "$eq", "Ada")),
    )


def test_an_empty_filter_matches_everything() -> None:
    assert parse_filter({}) == Combination("$and", ())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"email": {"$eq": "Ada@Example.com "}}, Condition("email", "$eq", "ada@example.com")),
        # As the API stores addresses: an IDNA domain decoded, Unicode NFC (trial 6: the
        # stored a@bücher.example was not found by its a@xn--bcher-kva.example spelling).
        (
            {"email": {"$eq": "a@xn--bcher-kva.example"}},
            Condition("email", "$eq", "a@bücher.example"),
        ),
        (
            {"email": {"$in": ["ju\u0308rgen@example.com"]}},
            Condition("email", "$in", ("jürgen@example.com",)),
        ),
        (
            {"email": {"$startsWith": " Ju\u0308"}},
            Condition("email", "$startsWith", "jü"),
        ),
        ({"first_name": {"$ne": "Bob"}}, Condition("first_name", "$ne", "Bob")),
        (
            {"email": {"$in": ["A@x.io", "b@x.io"]}},
            Condition("email", "$in", ("a@x.io", "b@x.io")),
        ),
        ({"phone": {"$startsWith": "+44"}}, Condition("phone", "$startsWith", "+44")),
        ({"phone": {"$exists": False}}, Condition("phone", "$exists", False)),
        ({"last_name": {"$exists": True}}, Condition("last_name", "$exists", True)),
        ({"last_name": {"$gt": "M"}}, Condition("last_name", "$gt", "M")),
        ({"id": ID}, Condition("id", "$eq", uuid.UUID(ID))),
        ({"id": {"$in": [ID]}}, Condition("id", "$in", (uuid.UUID(ID),))),
        (
            {"created_at": {"$gt": "2024-01-02T03:04:05Z"}},
            Condition("created_at", "$gt", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ),
        (
            {"created_at": {"$lt": "2024-01-02T03:04:05+00:00"}},
            Condition("created_at", "$lt", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ),
    ],
)
def test_every_operator_parses_on_the_fields_it_applies_to(
    raw: dict[str, Any], expected: Condition
) -> None:
    assert parse_filter(raw) == expected


def test_and_or_nest() -> None:
    raw = {
        "$or": [
            {"last_name": "Smith"},
            {"$and": [{"email": {"$startsWith": "ada"}}, {"phone": {"$exists": True}}]},
        ]
    }

    assert parse_filter(raw) == Combination(
        "$or",
        (
            Condition("last_name", "$eq", "Smith"),
            Combination(
                "$and",
                (
                    Condition("email", "$startsWith", "ada"),
                    Condition("phone", "$exists", True),
                ),
            ),
        ),
    )


def test_in_accepts_exactly_the_maximum_number_of_values() -> None:
    values = [f"u{i}@x.io" for i in range(MAX_IN)]

    tree = parse_filter({"email": {"$in": values}})

    assert isinstance(tree, Condition)
    assert len(tree.value) == MAX_IN


def test_nesting_up_to_the_limit_is_accepted() -> None:
    raw: dict[str, Any] = {"last_name": "Smith"}
    for _ in range(MAX_DEPTH):
        raw = {"$and": [raw]}

    assert isinstance(parse_filter(raw), Combination)


# --- what is refused, and where -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        # unknown fields, at the top and nested
        ({"nickname": "Ace"}, "filter.nickname"),
        ({"$or": [{"last_name": "A"}, {"password": "x"}]}, "filter.$or[1].password"),
        # unknown operators
        ({"$regex": "a.*"}, "filter.$regex"),
        ({"$where": "1 == 1"}, "filter.$where"),
        ({"$not": {"last_name": "A"}}, "filter.$not"),
        ({"email": {"$regex": ".*"}}, "filter.email.$regex"),
        ({"email": {"$where": "sleep(1)"}}, "filter.email.$where"),
        ({"email": {"$eq": "a@x.io", "$gte": "b"}}, "filter.email.$gte"),
        ({"email": {}}, "filter.email"),
        # wrong value types
        ({"id": "not-a-uuid"}, "filter.id"),
        ({"id": {"$eq": "1234"}}, "filter.id.$eq"),
        ({"id": 42}, "filter.id"),
        ({"id": {"$in": [ID, "nope"]}}, "filter.id.$in[1]"),
        ({"created_at": {"$gt": "yesterday"}}, "filter.created_at.$gt"),
        ({"created_at": {"$lt": 1700000000}}, "filter.created_at.$lt"),
        ({"created_at": {"$gt": "2024-01-02T03:04:05"}}, "filter.created_at.$gt"),
        ({"last_name": 7}, "filter.last_name"),
        ({"last_name": None}, "filter.last_name"),
        ({"last_name": ["Smith"]}, "filter.last_name"),
        ({"email": {"$in": "a@x.io"}}, "filter.email.$in"),
        ({"email": {"$in": []}}, "filter.email.$in"),
        ({"email": {"$in": [f"u{i}@x.io" for i in range(MAX_IN + 1)]}}, "filter.email.$in"),
        ({"email": {"$in": ["a@x.io", 3]}}, "filter.email.$in[1]"),
        ({"phone": {"$exists": "yes"}}, "filter.phone.$exists"),
        ({"phone": {"$exists": 1}}, "filter.phone.$exists"),
        ({"email": {"$exists": False}}, "filter.email.$exists"),
        ({"id": {"$startsWith": "0b7e"}}, "filter.id.$startsWith"),
        ({"created_at": {"$startsWith": "2024"}}, "filter.created_at.$startsWith"),
        ({"phone": {"$startsWith": ""}}, "filter.phone.$startsWith"),
        # malformed combinations
        ({"$and": []}, "filter.$and"),
        ({"$or": {"last_name": "A"}}, "filter.$or"),
        ({"$and": ["last_name"]}, "filter.$and[0]"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_offending_path(raw: dict[str, Any], field: str) -> None:
    error = refused(raw)

    assert error.code == "validation_error"
    assert error.status == 400
    assert field_of(error) == field
    assert error.details[0]["message"]


@pytest.mark.parametrize("raw", [None, "last_name", 3, ["last_name"], True])
def test_a_filter_that_is_not_an_object_is_refused(raw: Any) -> None:
    assert field_of(refused(raw)) == "filter"


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    raw: dict[str, Any] = {"last_name": "Smith"}
    for _ in range(MAX_DEPTH + 1):
        raw = {"$and": [raw]}

    error = refused(raw)

    assert field_of(error) == "filter" + ".$and[0]" * (MAX_DEPTH + 1)
    assert "deeper" in error.details[0]["message"]


# --- compiling ----------------------------------------------------------------------------


def compiled(clause: sa.ColumnElement[bool], dialect: str) -> str:
    stmt = sa.select(contacts.c.id).where(clause)
    return str(stmt.compile(dialect=DIALECTS[dialect]))


EVERY_OPERATOR = {
    "$and": [
        {"email": {"$eq": "a@x.io"}},
        {"first_name": {"$ne": "Bob"}},
        {"id": {"$in": [ID]}},
        {"last_name": {"$startsWith": "Sm_t%h"}},
        {"phone": {"$exists": False}},
        {"created_at": {"$gt": "2024-01-01T00:00:00Z", "$lt": "2025-01-01T00:00:00Z"}},
        {"$or": [{"last_name": "A"}, {"last_name": {"$exists": True}}]},
    ]
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_operator_compiles_against_the_contacts_table(dialect: str) -> None:
    sql = compiled(compile_filter(parse_filter(EVERY_OPERATOR), contacts), dialect)

    for column in FIELDS:
        assert f"contacts.{column}" in sql
    assert " IN " in sql
    assert ("GLOB" if dialect == "sqlite" else "LIKE") in sql  # $startsWith
    assert "IS NULL" in sql
    assert " OR " in sql


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_starts_with_escapes_the_pattern_metacharacters(dialect: str) -> None:
    """PostgreSQL: LIKE with % and _ escaped; SQLite: GLOB (its LIKE ignores case), where %
    and _ are literal and * ? [ are written as one-character classes."""
    raw = {"last_name": {"$startsWith": "50%_off*?["}}
    clause = compile_filter(parse_filter(raw), contacts)

    stmt = sa.select(contacts.c.id).where(clause).compile(dialect=DIALECTS[dialect])

    if dialect == "sqlite":
        assert " GLOB " in str(stmt) and " LIKE " not in str(stmt)
        assert "50%_off[*][?][[]*" in stmt.params.values()
    else:
        assert " LIKE " in str(stmt) and "ESCAPE" in str(stmt)
        assert "50\\%\\_off*?[%" in stmt.params.values()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_ne_also_matches_missing_values(dialect: str) -> None:
    sql = compiled(compile_filter(parse_filter({"phone": {"$ne": "1"}}), contacts), dialect)

    assert "contacts.phone != " in sql
    assert "contacts.phone IS NULL" in sql


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_search_is_a_lowercased_substring_match_over_name_email_and_phone(dialect: str) -> None:
    stmt = (
        sa.select(contacts.c.id)
        .where(compile_search("Sm%ith", contacts))
        .compile(dialect=DIALECTS[dialect])
    )

    sql = str(stmt)
    for column in ("first_name", "last_name", "email", "phone"):
        assert f"{LOWER[dialect].format(f'contacts.{column}')} LIKE" in sql
    # Lowercased in SQL, by the same function as the column (Unicode-aware on both).
    assert set(stmt.params.values()) == {"%Sm\\%ith%"}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_selection_clause_combines_filter_and_search(dialect: str) -> None:
    both = compiled(
        selection_clause(contacts, parse_filter({"last_name": "Smith"}), "ada"), dialect
    )
    neither = compiled(selection_clause(contacts, None, None), dialect)

    assert "contacts.last_name = " in both
    assert f"{LOWER[dialect].format('contacts.email')} LIKE" in both
    assert "WHERE" in neither
    assert "contacts.last_name" not in neither


# --- robustness ---------------------------------------------------------------------------

_KEYS = st.sampled_from([*FIELDS, *OPERATORS, "$and", "$or", "$regex", "nickname"]) | st.text(
    max_size=8
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from([ID, "2024-01-02T03:04:05Z", "2024-13-45T99:99", "a@x.io", ""])
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=30,
)
# Mostly well-formed filters with the odd wrong piece, so valid trees get compiled too.
_OPERAND = _SCALARS | st.lists(_SCALARS, max_size=3)
_FIELD_VALUE = _SCALARS | st.dictionaries(
    st.sampled_from([*OPERATORS, "$regex"]), _OPERAND, min_size=1, max_size=2
)
_FILTERISH = st.recursive(
    st.dictionaries(st.sampled_from([*FIELDS, "nickname"]), _FIELD_VALUE, max_size=3),
    lambda children: st.dictionaries(
        st.sampled_from(["$and", "$or"]), st.lists(children, min_size=1, max_size=3), max_size=2
    ),
    max_leaves=12,
)


@quick
@given(raw=_JSON | _FILTERISH)
def test_parse_filter_raises_nothing_but_validation_failed(raw: Any) -> None:
    """Whatever JSON a client sends, the answer is a tree or a 400, never a crash."""
    try:
        tree = parse_filter(raw)
    except ValidationFailed as exc:
        assert exc.details[0]["field"].startswith("filter")
    else:
        for dialect in DIALECTS:
            compiled(compile_filter(tree, contacts), dialect)
