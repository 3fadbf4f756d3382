"""Real exception instances of the drivers, for tests of the error classification.

Made by the drivers themselves where that is cheap (SQLite: a real lock, a real statement
it refuses), or as instances of the drivers' own classes (asyncpg, aiokafka) with the
messages and codes those libraries give them; wrapped the way SQLAlchemy wraps them.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import sqlalchemy.exc as sa_exc


def sqlite_busy() -> sqlite3.OperationalError:
    """ "database is locked" (SQLITE_BUSY), from a real second writer with no busy timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "locked.db"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            return exc
        finally:
            other.close()
            holder.close()
    raise AssertionError("the second writer was not refused")


def sqlite_too_many_variables() -> sqlite3.OperationalError:
    """ "too many SQL variables" (SQLITE_ERROR): a statement SQLite refuses."""
    conn = sqlite3.connect(":memory:")
    try:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        conn.execute("SELECT " + ",".join("?" * (limit + 1)), [0] * (limit + 1))
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("SQLite accepted too many variables")


def wrapped(orig: BaseException, statement: str = "SELECT 1") -> sa_exc.DBAPIError:
    """``orig`` as SQLAlchemy raises it from a statement."""
    error = sa_exc.DBAPIError.instance(statement, {}, orig, Exception)
    assert isinstance(error, sa_exc.DBAPIError)
    return error


def sqlite_full() -> sqlite3.OperationalError:
    """ "database or disk is full" (SQLITE_FULL), from a real database at its page limit
    (``max_page_count``: what a full disk gives the writer)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "full.db", isolation_level=None)
        try:
            conn.execute("CREATE TABLE t (x)")
            conn.execute("PRAGMA max_page_count = 1")
            for _ in range(10_000):
                conn.execute("INSERT INTO t VALUES (randomblob(500))")
        except sqlite3.OperationalError as exc:
            return exc
        finally:
            conn.close()
    raise AssertionError("SQLite never ran out of pages")
