"""A throwaway PostgreSQL cluster for the tests and `contact-deletion bench`.

Debian's server binaries (``/usr/lib/postgresql/<major>/bin``, from ``make postgres``)
start a cluster in a temporary directory on a free port, with durability turned off for
speed (``fsync``, ``full_page_writes`` and ``synchronous_commit`` off: a crash may lose
the cluster, which is thrown away anyway). ``initdb`` and ``pg_ctl`` refuse to run as
root, so as root they run as the ``postgres`` system user.

``python -m service.localpg`` runs one cluster until SIGTERM/SIGINT and prints
``READY <url>`` when it accepts connections.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import structlog

from service.procs import free_port, read_tail, run_until_signalled

log = structlog.get_logger(__name__)

SUPERUSER = "postgres"
DEFAULT_DATABASE = "contact_deletion"
_TOOL_TIMEOUT_S = 60.0


class LocalPostgresError(RuntimeError):
    """The throwaway cluster could not be set up, started or stopped."""


def bin_dir() -> Path:
    """The ``bin`` directory of the highest installed PostgreSQL major version."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def major(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else -1

    if not candidates:
        raise LocalPostgresError(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; "
            "run `make postgres` (apt-get install postgresql)"
        )
    return Path(max(candidates, key=major)).parent


class LocalPostgres:
    """One PostgreSQL cluster in a temporary directory, with one empty database.

    :meth:`start` runs ``initdb``, starts the server on 127.0.0.1 (and a unix socket in
    the cluster directory) and creates ``database``; :meth:`stop` stops the server and
    removes the directory. ``url`` is the SQLAlchemy (asyncpg) URL of the database.
    Unlike the Kafka child, ``pg_ctl`` daemonises the server, so it is not tied to our
    process: call :meth:`stop` (a ``finally`` or the context manager) to end it.
    """

    def __init__(
        self,
        database: str = DEFAULT_DATABASE,
        *,
        port: int | None = None,
        max_connections: int = 200,
    ) -> None:
        self.database = database
        self.port = port
        self.max_connections = max_connections
        self._root: Path | None = None
        self._bin: Path | None = None
        # initdb and pg_ctl refuse root; run them as the postgres system user then.
        self._as_user = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """``postgresql+asyncpg://postgres@127.0.0.1:<port>/<database>`` (once started)."""
        if self.port is None or self._root is None:
            raise LocalPostgresError("the cluster is not started")
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        """The URL of another database of this cluster."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs (from ``postmaster.pid``)."""
        if self._root is None:
            return None
        try:
            first = (self._root / "data" / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    @property
    def root(self) -> Path | None:
        """The cluster directory (data/, log, the unix socket) while it exists."""
        return self._root

    def start(self) -> None:
        """Create, start and open the cluster; raises :class:`LocalPostgresError`."""
        if self._root is not None:
            raise LocalPostgresError("this cluster is already started")
        self._bin = bin_dir()
        # Directly under the temp dir: the socket path must stay short (107 bytes).
        root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self._root = root
        try:
            if os.geteuid() == 0:
                try:
                    pwd.getpwnam(SUPERUSER)
                except KeyError as exc:
                    raise LocalPostgresError("there is no `postgres` system user") from exc
                # mkdtemp makes the directory 0700 and root's: hand the directory over.
                shutil.chown(root, user=SUPERUSER, group=SUPERUSER)
            if self.port is None:
                self.port = free_port()
            self._run("initdb", "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "-D", str(self._data))
            self.start_server()
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        log.info("postgres_started", port=self.port, root=str(root))

    def start_server(self) -> None:
        """``pg_ctl start`` on the existing cluster (after :meth:`stop_server`), same port."""
        root = self._started_root()
        options = (
            f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
            f" -c max_connections={self.max_connections}"
        )
        self._run(
            "pg_ctl", "-w", "-D", str(self._data), "-l", str(self._log), "start", "-o", options
        )

    def stop_server(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``, keeping the cluster for :meth:`start_server`."""
        self._run("pg_ctl", "-w", "-D", str(self._data), "-m", mode, "stop")

    def create_database(self, name: str) -> None:
        """``createdb name`` in this cluster."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove the cluster directory; idempotent."""
        root, self._root = self._root, None
        if root is None:
            return
        try:
            if (root / "data" / "postmaster.pid").exists():
                self._run_in(root, "pg_ctl", "-w", "-D", str(root / "data"), "-m", "fast", "stop")
                log.info("postgres_stopped", port=self.port)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @property
    def _data(self) -> Path:
        return self._started_root() / "data"

    @property
    def _log(self) -> Path:
        return self._started_root() / "log"

    def _started_root(self) -> Path:
        if self._root is None:
            raise LocalPostgresError("the cluster is not started")
        return self._root

    def _run(self, tool: str, *args: str) -> None:
        self._run_in(self._started_root(), tool, *args)

    def _run_in(self, root: Path, tool: str, *args: str) -> None:
        if self._bin is None:
            raise LocalPostgresError("the cluster is not started")
        command = [*self._as_user, str(self._bin / tool), *args]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalPostgresError(
                f"{tool} could not run: {exc}\nserver log:\n{read_tail(root / 'log', 30)}"
            ) from exc
        if result.returncode != 0:
            raise LocalPostgresError(
                f"{' '.join(command)} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\nserver log:\n{read_tail(root / 'log', 30)}"
            )

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- python -m service.localpg ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one cluster until SIGTERM/SIGINT; print ``READY <url>`` when it is ready."""
    from service.logs import configure_logging  # logs go to stderr; stdout is the READY line

    parser = argparse.ArgumentParser(prog="python -m service.localpg", description=__doc__)
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    configure_logging("console", "INFO")

    cluster = LocalPostgres(args.database, port=args.port)

    def start() -> str:
        cluster.start()
        return cluster.url

    return run_until_signalled(start, cluster.stop, (LocalPostgresError,))


if __name__ == "__main__":
    sys.exit(main())
