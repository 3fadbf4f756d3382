"""Running the Alembic migrations from code (`migrate`, and on start of `dev` and `run`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_sync(url: str, revision: str = "head") -> None:
    """Upgrade the database to `revision` (blocking; runs its own event loop)."""
    command.upgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database from async code (Alembic runs in a worker thread)."""
    await asyncio.to_thread(upgrade_sync, url, revision)


async def schema_problem(url: str, *, where: str) -> str | None:
    """Why the database at `url` cannot serve a command, or None when its schema is there.

    Never creates anything: a missing SQLite file is reported, not made. `where` names the
    database for the message (the file, or host and name without the password).
    """
    from service.config import sqlite_file  # here: keeps `--help` fast

    hint = "run `contact-deletion migrate` first (or set DATABASE_URL to another database)"
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        return f"no database at {where}: {hint}"
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    except (OSError, sa.exc.DBAPIError) as exc:
        return f"cannot open the database at {where}: {type(exc).__name__}"
    finally:
        await engine.dispose()
    if "alembic_version" not in tables or "api_keys" not in tables:
        return f"the database at {where} has no schema: {hint}"
    return None
