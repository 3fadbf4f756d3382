"""The throwaway PostgreSQL cluster of tests/plugins/postgres.py accepts SQLAlchemy+asyncpg."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


async def test_postgres_url_reaches_an_empty_writable_database(postgres_url: str) -> None:
    """The URL connects through asyncpg to a database where tables can be made and used."""
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            assert await conn.scalar(text("select current_database()")) == "contact_deletion_test"
            await conn.execute(text("create temporary table probe (n int)"))
            await conn.execute(text("insert into probe values (1), (2)"))
            assert await conn.scalar(text("select sum(n) from probe")) == 3
            assert (await conn.scalar(text("show server_version_num"))) is not None
    finally:
        await engine.dispose()
