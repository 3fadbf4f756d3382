"""Property tests of the filter language on both databases (hypothesis).

For generated filters (any mix of fields, operators, ``$and``/``$or``, empty objects and
the disguises of "everything"), against a workspace of contacts chosen to sit on and
around the generated values (NULLs, case variants, prefixes, non-ASCII):

- every filter the parser accepts compiles to SQL the database runs;
- the database selects exactly the contacts the filter means (`_means`, the README's rules
  in Python: values compare as stored, case-sensitively, text by code point), the same on
  both databases: SQLite's LIKE ignored ASCII case, so `$startsWith` selected more there;
- simplification keeps the meaning: the simplified tree selects exactly the same rows;
- simplification never says "all" (the bulk-delete refusal) unless every contact matches.

Hypothesis drives a synchronous test; the database work runs on an event loop of its own
thread, so the driver is the one the service uses (aiosqlite, asyncpg).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.contacts.filters import ALL, Combination, compile_filter, parse_filter, simplify
from service.contacts.store import contact_row
from service.db import Database, contacts, workspaces
from service.errors import ValidationFailed

T = TypeVar("T")

NAMES = ["Ada", "ada", "ADA", "Ad", "aD", "Öztürk", "ÖZTÜRK", "x_%", "X*?[", "Zoë", "apple", "B"]
EMAILS = ["a@example.com", "b@example.com", "ada@example.com"]
PHONES = ["+1 555", "+1", "555"]
TIMES = ["2020-01-01T00:00:00Z", "2024-06-01T12:00:00Z", "2030-01-01T00:00:00Z"]
IDS = [str(uuid.UUID(int=i)) for i in (1, 2, 3, 4)]
FIELD_VALUES: dict[str, list[str]] = {
    "id": IDS,
    "email": EMAILS,
    "first_name": NAMES,
    "last_name": NAMES,
    "phone": PHONES,
    "created_at": TIMES,
}


class Loop:
    """An event loop on its own thread, for database work from synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            return await work()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _people(workspace_id: uuid.UUID) -> list[dict[str, Any]]:
    """Contacts on and around every generated value, NULLs included."""
    rows = []
    firsts: list[str | None] = [None, *NAMES]
    lasts: list[str | None] = [*NAMES, None]
    phones: list[str | None] = [None, *PHONES]
    times = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in TIMES]
    times.append(datetime(2024, 6, 1, 11, 59, tzinfo=UTC))
    for i in range(12):
        contact_id = uuid.UUID(IDS[i]) if i < len(IDS) else uuid.uuid4()
        rows.append(
            contact_row(
                contact_id,
                workspace_id,
                EMAILS[i % len(EMAILS)] if i < 6 else f"p{i}@example.org",
                first_name=firsts[i % len(firsts)],
                last_name=lasts[i % len(lasts)],
                phone=phones[i % len(phones)],
                at=times[i % len(times)],
            )
        )
    return rows


World = tuple[Loop, Database, uuid.UUID, set[uuid.UUID], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def world(db_url: str) -> Iterator[World]:
    """A workspace of hand-picked contacts, and a loop to query it from sync tests."""
    loop = Loop()
    db = Database(db_url)
    workspace_id = uuid.uuid4()
    people = _people(workspace_id)

    async def setup() -> None:
        async with db.begin() as conn:
            await conn.execute(
                workspaces.insert().values(
                    id=workspace_id,
                    name=f"props-{workspace_id.hex[:8]}",
                    created_at=datetime.now(UTC),
                )
            )
            await conn.execute(contacts.insert(), people)

    loop.run(setup)
    try:
        yield loop, db, workspace_id, {p["id"] for p in people}, people
    finally:
        loop.run(db.dispose)
        loop.close()


def _condition(field: str) -> st.SearchStrategy[Any]:
    values = st.sampled_from(FIELD_VALUES[field])
    ops: list[st.SearchStrategy[Any]] = [
        values,
        values.map(lambda v: {"$eq": v}),
        values.map(lambda v: {"$ne": v}),
        st.lists(values, min_size=1, max_size=3).map(lambda vs: {"$in": vs}),
        values.map(lambda v: {"$gt": v}),
        values.map(lambda v: {"$lt": v}),
    ]
    if field not in ("id", "created_at"):
        ops.append(values.filter(bool).map(lambda v: {"$startsWith": v}))
    if field not in ("id", "email", "created_at"):
        ops.append(st.booleans().map(lambda b: {"$exists": b}))
    return st.fixed_dictionaries({field: st.one_of(ops)})


LEAF = st.one_of(st.just({}), *(_condition(f) for f in FIELD_VALUES))
FILTERS = st.recursive(
    LEAF,
    lambda kids: st.one_of(
        st.lists(kids, min_size=1, max_size=4).map(lambda xs: {"$and": xs}),
        st.lists(kids, min_size=1, max_size=4).map(lambda xs: {"$or": xs}),
        st.lists(kids, min_size=2, max_size=3).map(
            lambda xs: {k: v for x in xs for k, v in x.items()}
        ),
    ),
    max_leaves=8,
)

PROPERTY = settings(
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _matches(world: World, tree: Any) -> set[uuid.UUID]:
    loop, db, workspace_id, _, _ = world

    async def query() -> set[uuid.UUID]:
        stmt = sa.select(contacts.c.id).where(
            contacts.c.workspace_id == workspace_id, compile_filter(tree, contacts)
        )
        async with db.read() as conn:
            return {uuid.UUID(str(i)) for i in (await conn.execute(stmt)).scalars()}

    return loop.run(query)


def _means(node: Any, contact: dict[str, Any]) -> bool:
    """Whether a parsed filter selects `contact` (a row as stored), by the README's rules:
    values compare as stored (names and phones case-sensitively, emails lowercased on both
    sides: the parser lowers the value), text ordered by code point, NULL meets only
    `$ne` and `$exists: false`."""
    if isinstance(node, Combination):
        results = (_means(p, contact) for p in node.parts)
        return all(results) if node.op == "$and" else any(results)
    stored, value = contact[node.field], node.value
    match node.op:
        case "$eq":
            return bool(stored == value)
        case "$ne":
            return stored is None or bool(stored != value)
        case "$in":
            return stored in value
        case "$startsWith":
            return stored is not None and str(stored).startswith(value)
        case "$exists":
            return (stored is not None) is value
        case "$gt":
            return stored is not None and bool(stored > value)
        case "$lt":
            return stored is not None and bool(stored < value)
    raise AssertionError(node.op)


@PROPERTY
@given(raw=FILTERS)
def test_the_database_selects_what_the_filter_means(world: World, raw: Any) -> None:
    try:
        tree = parse_filter(raw)
    except ValidationFailed:
        return
    meant = {c["id"] for c in world[4] if _means(tree, c)}
    assert _matches(world, tree) == meant, raw


@pytest.mark.parametrize(
    ("raw", "selected"),
    [
        # SQLite's LIKE ignored ASCII case: "Ad" selected ada, ADA and aD too (trial, SQLite).
        ({"last_name": {"$startsWith": "Ad"}}, {"Ada", "Ad"}),
        ({"last_name": {"$startsWith": "ad"}}, {"ada"}),
        ({"last_name": {"$startsWith": "Ö"}}, {"Öztürk", "ÖZTÜRK"}),
        # GLOB's and LIKE's metacharacters are literal in a prefix.
        ({"last_name": {"$startsWith": "X*?["}}, {"X*?["}),
        ({"last_name": {"$startsWith": "x_"}}, {"x_%"}),
        ({"last_name": {"$startsWith": "X*"}}, {"X*?["}),
    ],
)
def test_starts_with_is_case_sensitive_and_literal_on_both_databases(
    world: World, raw: Any, selected: set[str]
) -> None:
    names = {c["id"]: c["last_name"] for c in world[4]}
    assert {names[i] for i in _matches(world, parse_filter(raw))} == selected


@PROPERTY
@given(raw=FILTERS)
def test_simplification_keeps_the_meaning_and_says_all_only_when_all_match(
    world: World, raw: Any
) -> None:
    try:
        tree = parse_filter(raw)
    except ValidationFailed:
        return  # refused at the edge: no SQL at all
    simple = simplify(tree)

    original = _matches(world, tree)  # every accepted filter runs
    assert _matches(world, simple) == original, (raw, simple)
    if simple == ALL:
        assert original == world[3], f"{raw} was simplified to 'all' but not all match"


@pytest.mark.parametrize(
    "raw",
    [
        {"$or": [{}]},
        {"$or": [{"phone": {"$exists": True}}, {"phone": {"$exists": False}}]},
        {"$or": [{"email": "a@example.com"}, {"email": {"$ne": "a@example.com"}}]},
        {"$or": [{"last_name": {"$ne": "Ada"}}, {"last_name": {"$ne": "ada"}}]},
        {"$or": [{"created_at": {"$gt": TIMES[1]}}, {"created_at": {"$lt": TIMES[2]}}]},
    ],
)
def test_each_disguise_of_all_is_simplified_to_all_and_does_match_all(
    world: World, raw: Any
) -> None:
    tree = parse_filter(raw)

    assert simplify(tree) == ALL
    assert _matches(world, tree) == world[3]
