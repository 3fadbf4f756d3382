"""The `contact-deletion` command and its subcommands.

The parser is built from this module alone (and the light ``service.scopes``,
``service.bench_options``, ``service.audit.cli`` and ``service.erasure.cli``): the service
itself is imported only once a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

from service import deadletters
from service.bench_options import add_arguments as add_bench_arguments
from service.cliout import PROG, error, out_json
from service.cliout import out as _out
from service.scopes import SCOPES

if TYPE_CHECKING:
    from service.app import Services
    from service.config import Settings
    from service.db import Database

# Exit codes: 2 a configuration the operator must change (a setting, the database's
# schema or name, the audit key); 3 `migrate` gave up waiting for the database.
DATABASE_ERROR = 2
DATABASE_UNREACHABLE = 3
T = TypeVar("T")

# The components `run` starts, with what each does (service.app.components() runs them).
COMPONENTS = {
    "api": "serve the HTTP API on HTTP_HOST:HTTP_PORT (default 127.0.0.1:8080)",
    "relay": "publish outbox rows to Kafka (several relays share the work on PostgreSQL)",
    "worker": "consume contact.deletion-requested and delete contacts (a consumer group)",
    "dispatcher": "fan events out to webhook endpoints and send the signed deliveries",
}

ENVIRONMENT = """\
configuration comes from environment variables (all optional locally), e.g.
  DATA_DIR                 default: <checkout>/data (local state)
  DATABASE_URL             default: SQLite, <DATA_DIR>/contact-deletion.db
  KAFKA_BOOTSTRAP_SERVERS  default: 127.0.0.1:9092
  HTTP_HOST / HTTP_PORT    default: 127.0.0.1 / 8080
  OPS_PORT                 unset; set: /healthz, /readyz, /metrics on it
  LOG_FORMAT / LOG_LEVEL   default: json / INFO
see the README for the full list."""


class _Parser(argparse.ArgumentParser):
    """Usage errors are the one error line every command prints (``service.cliout``:
    ``contact-deletion: error: keys create: argument --scope: …``, after the usage),
    exit 2; a command group run without its subcommand (``contact-deletion keys``)
    prints its help, which lists them, instead of the usage."""

    def error(self, message: str) -> NoReturn:
        if "required" in message and message.endswith("COMMAND"):
            self.print_help(sys.stderr)
            sys.stderr.write("\n")
        else:
            self.print_usage(sys.stderr)
        command = self.prog.removeprefix(PROG).strip()
        error(f"{command}: {message}" if command else message)
        sys.exit(2)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description to the terminal, but keeps a paragraph that
    has its own line breaks (the environment table) as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            "\n".join(indent + line for line in p.splitlines())
            if "\n" in p
            else super(_HelpFormatter, self)._fill_text(p, width, indent)
            for p in paragraphs
        )


def _every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _every_parser(sub)


def _workspace_name(value: str) -> str:
    from service.keys import check_workspace_name

    try:
        return check_workspace_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(text: str) -> int:
    error(text)
    return DATABASE_ERROR


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("contact-deletion")
    except PackageNotFoundError:
        return "unknown"


async def _with_db(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int | str:
    """Run `work` on the configured database once its schema is known to be there;
    otherwise the reason, naming the database (nothing is created)."""
    from service.db import Database
    from service.migrate import schema_problem

    problem = await schema_problem(settings.database_url, where=settings.describe_database())
    if problem is not None:
        return problem
    db = Database.from_settings(settings)
    try:
        return await work(db)
    finally:
        await db.dispose()


async def serve(
    settings: Settings,
    names: Sequence[str],
    *,
    migrate: bool,
    prepare: Callable[[Services], Awaitable[None]] | None = None,
) -> int:
    """Run components until SIGINT/SIGTERM; `prepare` runs once the database is ready,
    before the components start (`dev` makes its demo key there).

    A database that is down (or still starting) at start-up is waited for, with back-off
    and a `waiting_for_dependency` log line, rather than ending the process. One that
    cannot serve as configured (no such database, a refused login, no schema, another
    AUDIT_HASH_KEY), or an address it cannot listen on, is one line on stderr and exit 2;
    the address is checked first, so `run` with its port taken neither migrates nor logs.
    """
    import signal

    from service import gcpolicy
    from service.aio import Stopped, wait_for_dependency
    from service.app import Services, listen_problem, run_components
    from service.audit.store import load_hash_key
    from service.db import Database
    from service.logs import get_logger
    from service.migrate import schema_problem

    cannot_listen = listen_problem(settings, names)
    if cannot_listen is not None:
        return _fail(cannot_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    where = settings.describe_database()
    try:
        if migrate:
            before, after = await _upgrade_waiting(settings, stop)
            get_logger(__name__).info("migrated", **_migration_fields(before, after))
        else:
            if not settings.is_sqlite:  # (opening SQLite would create a missing file)
                probe = Database.from_settings(settings)
                try:
                    await _database_step(
                        settings,
                        wait_for_dependency(
                            probe.ping, stop, dependency="database", component="+".join(names)
                        ),
                    )
                finally:
                    await probe.dispose()
            problem = await schema_problem(settings.database_url, where=where)
            if problem is not None:
                return _fail(problem)
    except Stopped:
        return 0
    db = Database.from_settings(settings)
    services = Services(settings=settings, db=db)
    gcpolicy.settle_after_start()
    try:
        if "api" in names or "worker" in names:
            # Refuses to start (HashKeyMismatch) rather than key events nobody can find.
            configured = settings.audit_hash_key
            await load_hash_key(db, configured.get_secret_value() if configured else None)
        if prepare is not None:
            await prepare(services)
        await run_components(services, names, stop)
    finally:
        await services.close()
    get_logger(__name__).info("stopped", components=list(names))
    return 0


async def _database_step(settings: Settings, step: Awaitable[T]) -> T:
    """Await a start-up step on the database; an error that is the operator's to fix
    (service.migrate.database_problem) becomes a StartupError naming what to do."""
    from service.config import StartupError
    from service.migrate import database_problem

    try:
        return await step
    except Exception as exc:
        problem = database_problem(
            exc, where=settings.describe_database(), url=settings.database_url
        )
        if problem is None:
            raise
        raise StartupError(problem) from None


async def _upgrade_waiting(
    settings: Settings, stop: asyncio.Event
) -> tuple[str | None, str | None]:
    """Migrate, waiting (with back-off and `waiting_for_dependency` lines) while the
    database does not answer, until `stop` (then `Stopped`); (revision before, after)."""
    from service.aio import wait_for_dependency
    from service.migrate import upgrade_reporting

    return await _database_step(
        settings,
        wait_for_dependency(
            lambda: upgrade_reporting(settings.database_url),
            stop,
            dependency="database",
            component="migrate",
        ),
    )


def _migration_fields(before: str | None, after: str | None) -> dict[str, str | None]:
    return {"from_revision": before, "to_revision": after, "changed": str(before != after)}


def _migration_report(where: str, before: str | None, after: str | None) -> str:
    if before is None:
        return f"database {where}: schema created; now at the latest schema (revision {after})"
    if before == after:
        return (
            f"database {where} was already at the latest schema (revision {after}): nothing to do"
        )
    return (
        f"database {where}: upgraded from revision {before}; "
        f"now at the latest schema (revision {after})"
    )


async def _migrate(settings: Settings, wait_s: float) -> int:
    """`migrate`: apply the migrations, waiting up to `wait_s` for a database that does
    not answer yet (a container starting), with `waiting_for_dependency` lines; exit 3
    if it still does not."""
    import signal

    from service.aio import Stopped

    stop = asyncio.Event()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        interrupted.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(sig, interrupt)
    timer = loop.call_later(wait_s, stop.set)
    try:
        before, after = await _upgrade_waiting(settings, stop)
    except Stopped:
        if interrupted.is_set():
            return 130
        _fail(
            f"the database {settings.describe_database()} did not answer within "
            f"{wait_s:g} s: start it, or check DATABASE_URL's host and port"
        )
        return DATABASE_UNREACHABLE
    finally:
        timer.cancel()
    _out(_migration_report(settings.describe_database(), before, after))
    return 0


async def _keys_create(settings: Settings, args: argparse.Namespace) -> int | str:
    from service.keys import create_key

    async def work(db: Database) -> int:
        created = await create_key(db, args.workspace, args.scope)
        if args.json:
            out_json(
                {
                    "key": created.key,
                    "key_id": str(created.key_id),
                    "workspace_id": str(created.workspace_id),
                    "new_workspace": created.new_workspace,
                }
            )
        else:
            _out(f"key:          {created.key}")
            _out(f"key_id:       {created.key_id}")
            new = " (a new workspace: no key named it before)" if created.new_workspace else ""
            _out(f"workspace_id: {created.workspace_id}{new}")
            _out(f"scopes:       {' '.join(created.scopes)}")
            _out("Store the key now: it is not shown again.")
        return 0

    return await _with_db(settings, work)


async def _keys_list(settings: Settings, args: argparse.Namespace) -> int | str:
    from service.keys import list_keys

    async def work(db: Database) -> int:
        keys = await list_keys(db)
        if args.json:
            out_json(keys)
        else:
            rows = [
                (
                    k["key_id"],
                    f"{k['prefix']}…",
                    k["workspace"],
                    "revoked" if k["revoked_at"] else "live",
                    " ".join(k["scopes"]),
                )
                for k in keys
            ]
            if rows:
                rows.insert(0, ("key_id", "prefix", "workspace", "state", "scopes"))
                widths = [max(len(row[i]) for row in rows) for i in range(4)]
                for row in rows:
                    cells = [row[i].ljust(widths[i]) for i in range(4)]
                    _out("  ".join([*cells, row[4]]))
        return 0

    return await _with_db(settings, work)


async def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int | str:
    import uuid

    from service.keys import list_keys, revoke_key

    try:
        key_id = uuid.UUID(args.key_id)
    except ValueError:
        error(f"not a key id: {args.key_id!r} (`contact-deletion keys list` shows each key_id)")
        return 2

    async def work(db: Database) -> int:
        if await revoke_key(db, key_id):
            _out(f"revoked {key_id}")
            return 0
        known = [k for k in await list_keys(db) if k["key_id"] == str(key_id)]
        error(
            f"key {key_id} was already revoked at {known[0]['revoked_at']}"
            if known
            else f"no key {key_id} (`contact-deletion keys list` shows each key_id)"
        )
        return 1

    return await _with_db(settings, work)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, with help on every subcommand and option."""
    from service.audit import cli as audit_cli
    from service.erasure import cli as erasure_cli

    parser = _Parser(
        prog=PROG,
        description="Bulk contact deletion with signed webhooks and an audit trail.\n\n"
        "Every command prints its answer on stdout; with --json, exactly one JSON\n"
        "document: an object for one result, an array for a list ([] when empty).\n"
        "What went wrong goes to stderr as 'contact-deletion: error: ...' lines; a\n"
        "command that cannot start as configured prints one and exits with 2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    # Every parser under it is a _Parser too (argparse makes subparsers of the root's class);
    # the modules that add their commands take the base type.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )

    def command(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description or summary,
        )

    command(
        "run",
        "run every component (api, relay, worker, dispatcher) in one process",
        "Migrate the database, then run the api, relay, worker and dispatcher in one "
        "process until Ctrl-C or SIGTERM. Needs a Kafka broker at KAFKA_BOOTSTRAP_SERVERS.",
    )
    for name, what in COMPONENTS.items():
        command(
            name,
            f"run the {name} alone: {what}",
            f"Run only the {name}: {what}. It runs until Ctrl-C or SIGTERM; start as many as you "
            "like. The database must be migrated first (`contact-deletion migrate`).",
        )
    command(
        "migrate",
        "create or upgrade the database schema (Alembic migrations)",
        "Apply every Alembic migration to DATABASE_URL (creating the SQLite file if needed) "
        "and say whether it created, upgraded or left the schema. A database that does not "
        "answer yet is waited for (see --wait); exit 3 if it never does, 2 if it cannot "
        "serve as configured (no such database, a refused login).",
    ).add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for a database that does not answer (default: %(default)g)",
    )
    dev = command(
        "dev",
        "local Kafka + SQLite + every component, with a demo key (what `make dev` runs)",
        "Start a local Apache Kafka broker (unless one answers at KAFKA_BOOTSTRAP_SERVERS), "
        "migrate, make or reuse the demo workspace's key, and run everything until Ctrl-C.",
    )
    dev.add_argument(
        "--no-kafka",
        action="store_true",
        help="do not start a local broker; use the one at KAFKA_BOOTSTRAP_SERVERS",
    )
    dev.add_argument(
        "--new-key",
        action="store_true",
        help="revoke the stored demo key and make a new one",
    )

    keys = command("keys", "create, list and revoke API keys").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND"
    )
    create = keys.add_parser(
        "create",
        help="create a key (and its workspace when new); the key is printed once",
        description="Create an API key. Only its SHA-256 is stored: copy the key now.",
    )
    create.add_argument(
        "--workspace",
        required=True,
        type=_workspace_name,
        metavar="NAME",
        help="the workspace the key belongs to (created when no workspace has this name)",
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        metavar="SCOPE",
        help="a scope the key holds; repeat for several (%(choices)s)",
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    summary = "list every key (id, prefix, workspace, live/revoked, scopes)"
    lst = keys.add_parser("list", help=summary, description=summary.capitalize() + ".")
    lst.add_argument(
        "--json", action="store_true", help="print one JSON array ([] when there are none)"
    )
    summary = "revoke a key; it stops working at once"
    revoke = keys.add_parser("revoke", help=summary, description=summary.capitalize() + ".")
    revoke.add_argument("key_id", help="the key's id (from `keys create` or `keys list`)")

    audit_cli.add_parser(sub)
    erasure_cli.add_parser(sub)
    deadletters.add_parser(sub)
    add_bench_arguments(
        command(
            "bench",
            "benchmark the service against its bare floor (prints figures)",
            "Start a broker, a database and the service in a temporary directory, delete "
            "contacts through the API and report throughput, latency and memory.",
        )
    )
    # Every command, down to each subcommand (keys create, audit verify, erasure check),
    # says where its configuration comes from.
    for each in _every_parser(parser):
        each.epilog = ENVIRONMENT
        each.formatter_class = _HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a configuration the operator must change (service.config.
    StartupError: an invalid setting, a missing database, another audit key, an address
    it cannot listen on) is one line on stderr and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    from service.config import StartupError, load_settings

    try:
        return _run(args, load_settings())
    except StartupError as exc:
        return _fail(str(exc))


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "bench":
        from service import bench

        return bench.run_bench(args)
    if args.command == "dev":
        from service.dev import run_dev

        return run_dev(settings, start_kafka=not args.no_kafka, new_key=args.new_key)
    from service.logs import configure_logging

    # A component's log is its output; a one-shot command prints its own results and errors.
    serves = args.command == "run" or args.command in COMPONENTS
    configure_logging(settings.log_format, settings.log_level, libraries=serves)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings, args.wait))
    if args.command == "keys":
        handler = {"create": _keys_create, "list": _keys_list, "revoke": _keys_revoke}
        result = asyncio.run(handler[args.keys_command](settings, args))
        return _fail(result) if isinstance(result, str) else result
    if args.command == "audit":
        from service.audit import cli as audit_cli

        return audit_cli.main(args, settings)
    if args.command == "erasure":
        from service.erasure import cli as erasure_cli

        return erasure_cli.main(args, settings)
    if args.command == "dlq":
        return deadletters.main(args, settings)
    if args.command == "run":
        return asyncio.run(serve(settings, list(COMPONENTS), migrate=True))
    if args.command in COMPONENTS:
        return asyncio.run(serve(settings, [args.command], migrate=False))
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
