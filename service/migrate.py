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


async def current_revision(url: str) -> str | None:
    """The Alembic revision the database is at; None when it has no schema (or, for
    SQLite, no file: nothing is created). Errors of the connection propagate."""
    from service.config import sqlite_file

    path = sqlite_file(url)
    if path is not None and not path.is_file():
        return None
    import sqlalchemy as sa

    from service.db import migration_engine

    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
            if "alembic_version" not in tables:
                return None
            found = await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
            return found.scalar_one_or_none()
    finally:
        await engine.dispose()


async def upgrade_reporting(url: str) -> tuple[str | None, str | None]:
    """Upgrade to the latest revision; (revision before, revision after) for the report.
    An SQLite file is created, with its directory (DATA_DIR on a fresh machine)."""
    from service.config import sqlite_file

    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    before = await current_revision(url)
    await upgrade(url)
    return before, await current_revision(url)


def _chain(exc: BaseException) -> list[BaseException]:
    links: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in links:
        links.append(link)
        link = getattr(link, "orig", None) or link.__cause__ or link.__context__
    return links


def database_problem(exc: BaseException, *, where: str, url: str) -> str | None:
    """One line for an operator when `exc` (opening the database) is a configuration
    problem: the database does not exist, the login is refused, the SQLite file cannot be
    opened. None for any other error (an outage is waited for, not reported here)."""
    from sqlalchemy.engine import make_url

    names = {type(link).__name__ for link in _chain(exc)}
    parsed = make_url(url)
    if "InvalidCatalogNameError" in names:
        user = f" -U {parsed.username}" if parsed.username else ""
        port = f" -p {parsed.port}" if parsed.port else ""
        return (
            f"the database {parsed.database!r} does not exist on {parsed.host}: create it "
            f"(`createdb -h {parsed.host}{port}{user} {parsed.database}`, or CREATE DATABASE "
            f"{parsed.database}), then run `contact-deletion migrate`"
        )
    if names & {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
        return (
            f"PostgreSQL at {where} refused the login of user {parsed.username!r}: check the "
            "user and password in DATABASE_URL"
        )
    for link in _chain(exc):
        if type(link).__name__ == "OperationalError" and "unable to open" in str(link):
            return (
                f"cannot open the SQLite database {where}: its directory is missing or not "
                "writable (set DATA_DIR or DATABASE_URL to a writable place)"
            )
    return None


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

    from service.db import migration_engine

    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    except Exception as exc:
        known = database_problem(exc, where=where, url=url)
        if known is not None:
            return known
        if (
            not isinstance(exc, OSError | sa.exc.DBAPIError)
            and "asyncpg" not in type(exc).__module__
        ):
            raise
        return f"cannot open the database at {where}: {type(exc).__name__}"
    finally:
        await engine.dispose()
    if "alembic_version" not in tables or "api_keys" not in tables:
        return f"the database at {where} has no schema: {hint}"
    return None
