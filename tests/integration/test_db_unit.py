"""`Database.unit` on SQLite and PostgreSQL: one transaction that the block's `begin` and
`read` join (service.idempotency stores an answer in its change's own transaction)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa

from service.db import Database, contacts, utcnow
from tests.conftest import contact_row


async def _exists(db: Database, contact_id: uuid.UUID) -> bool:
    async with db.read() as conn:
        stmt = sa.select(contacts.c.id).where(contacts.c.id == contact_id)
        return (await conn.execute(stmt)).first() is not None


async def _insert(db: Database, contact_id: uuid.UUID) -> None:
    async with db.begin() as conn:
        await conn.execute(
            contacts.insert().values(**contact_row(uuid.uuid4(), contact_id, utcnow()))
        )


async def test_a_unit_commits_its_writes_together_and_its_reads_see_them(db: Database) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    other = Database(db.url)
    try:
        async with db.unit():
            await _insert(db, first)
            await _insert(db, second)
            seen_inside = await _exists(db, first) and await _exists(db, second)
            seen_outside = await _exists(other, first)
    finally:
        await other.dispose()

    assert seen_inside and not seen_outside
    assert await _exists(db, first) and await _exists(db, second)


async def test_a_unit_that_raises_leaves_nothing(db: Database) -> None:
    contact_id = uuid.uuid4()

    with pytest.raises(RuntimeError):
        async with db.unit():
            await _insert(db, contact_id)
            raise RuntimeError("the work failed")

    assert not await _exists(db, contact_id)


async def test_a_begin_that_fails_inside_a_unit_undoes_only_its_own_writes(db: Database) -> None:
    """Each `begin` inside is a savepoint: a caller that handles its block's error keeps
    the unit's other writes, as it kept its earlier transactions before."""
    kept, dropped = uuid.uuid4(), uuid.uuid4()

    async with db.unit():
        await _insert(db, kept)
        with pytest.raises(sa.exc.IntegrityError):
            async with db.begin() as conn:
                row = contact_row(uuid.uuid4(), dropped, utcnow())
                await conn.execute(contacts.insert().values(**row))
                await conn.execute(contacts.insert().values(**row))  # the same id again

    assert await _exists(db, kept) and not await _exists(db, dropped)


async def test_news_of_a_units_writes_waits_for_its_commit(db: Database) -> None:
    """`after_commit` inside a unit runs once the unit committed, with the rows visible to
    another connection (what a dispatcher told of a change reads), and never after a roll
    back; outside a unit at once."""
    seen: list[tuple[str, bool]] = []
    other = Database(db.url)
    committed, rolled_back = uuid.uuid4(), uuid.uuid4()
    try:

        async def visible(contact_id: uuid.UUID) -> bool:
            return await _exists(other, contact_id)

        pending: list[asyncio.Task[bool]] = []
        async with db.unit():
            await _insert(db, committed)
            db.after_commit(lambda: pending.append(asyncio.ensure_future(visible(committed))))
            assert pending == []  # not yet: the unit has not committed
        assert len(pending) == 1 and await pending[0]  # told after the commit: it sees it

        with pytest.raises(RuntimeError):
            async with db.unit():
                await _insert(db, rolled_back)
                db.after_commit(lambda: seen.append(("rolled back", True)))
                raise RuntimeError("the work failed")
        db.after_commit(lambda: seen.append(("outside", True)))
    finally:
        await other.dispose()
    assert seen == [("outside", True)]
