"""pytest plugin: a throwaway PostgreSQL cluster for the whole session (``postgres_url``).

``TEST_DATABASE_URL`` points the tests at an existing database; otherwise Debian's server
binaries (``/usr/lib/postgresql/<major>/bin``, from ``make postgres``) start a cluster in a
temporary directory on a free port, with durability turned off for speed. ``initdb`` and
``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` system user. A
cluster that cannot start fails the tests; it never skips them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.localkafka import free_port

DATABASE = "contact_deletion_test"
_SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The throwaway cluster could not be set up."""


def _bin_dir() -> Path:
    """The ``bin`` directory of the highest installed PostgreSQL major version."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def major(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else -1

    if not candidates:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; "
            "run `make postgres` (apt-get install postgresql) or set TEST_DATABASE_URL"
        )
    return Path(max(candidates, key=major)).parent


class _Cluster:
    """One cluster in ``root`` (data/, log, and the unix socket)."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "log"
        # initdb and pg_ctl refuse root; run them as the postgres system user then.
        self.as_user = ["runuser", "-u", _SUPERUSER, "--"] if os.geteuid() == 0 else []

    def run(self, tool: str, *args: str, timeout_s: float = 60.0) -> None:
        command = [*self.as_user, str(self.bin_dir / tool), *args]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{tool} could not run: {exc}\n{self.log_tail()}") from exc
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(command)} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "server log:\n" + "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        self.run("initdb", "-A", "trust", "-U", _SUPERUSER, "-E", "UTF8", "-D", str(self.data))
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
            " -c max_connections=200"
        )
        self.run("pg_ctl", "-w", "-D", str(self.data), "-l", str(self.log), "start", "-o", options)
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", _SUPERUSER, DATABASE)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-w", "-D", str(self.data), "-m", "fast", "stop")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (asyncpg) of an empty database, shared by the session."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    bin_dir = _bin_dir()
    # Directly under the temp dir: the socket path must stay short (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))
    try:
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_SUPERUSER)
            except KeyError as exc:
                raise PostgresUnavailable("there is no `postgres` system user") from exc
            # mkdtemp makes the directory 0700 and root's: hand the directory itself over.
            shutil.chown(root, user=_SUPERUSER, group=_SUPERUSER)
        cluster = _Cluster(bin_dir, root, free_port())
        try:
            cluster.start()
            yield f"postgresql+asyncpg://{_SUPERUSER}@127.0.0.1:{cluster.port}/{DATABASE}"
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
