"""The `contact-deletion` command and its subcommands.

The parser is built from this module alone (and the light ``service.scopes``,
``service.bench_options``, ``service.audit.cli`` and ``service.erasure.cli``): the service
itself is imported only once a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn, cast

from service.bench_options import add_arguments as add_bench_arguments
from service.scopes import SCOPES

if TYPE_CHECKING:
    from service.config import Settings
    from service.db import Database

PROG = "contact-deletion"
DATABASE_ERROR = 2

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
  LOG_FORMAT / LOG_LEVEL   default: json / INFO
see the README for the full list."""


class _Parser(argparse.ArgumentParser):
    """A command group run without its subcommand (``contact-deletion keys``) prints its
    help, which lists them, before argparse's one-line error."""

    def error(self, message: str) -> NoReturn:
        if "required" in message and message.endswith("COMMAND"):
            self.print_help(sys.stderr)
            sys.stderr.write("\n")
        super().error(message)


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


def _out(text: str) -> None:
    """What a command prints for its user (stdout), as opposed to logs (stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fail(text: str) -> int:
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()
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
    db = Database(settings.database_url)
    try:
        return await work(db)
    finally:
        await db.dispose()


async def serve(settings: Settings, names: Sequence[str], *, migrate: bool) -> int:
    """Run components until SIGINT/SIGTERM.

    A database that is down (or still starting) at start-up is waited for, with back-off
    and a `waiting_for_dependency` log line, rather than ending the process.
    """
    import signal

    from service.aio import Stopped, wait_for_dependency
    from service.app import Services, run_components
    from service.db import Database
    from service.logs import get_logger
    from service.migrate import schema_problem, upgrade

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if migrate:
            await wait_for_dependency(
                lambda: upgrade(settings.database_url),
                stop,
                dependency="database",
                component="migrate",
            )
        else:
            if not settings.is_sqlite:  # (opening SQLite would create a missing file)
                probe = Database(settings.database_url)
                try:
                    await wait_for_dependency(
                        probe.ping, stop, dependency="database", component="+".join(names)
                    )
                finally:
                    await probe.dispose()
            problem = await schema_problem(
                settings.database_url, where=settings.describe_database()
            )
            if problem is not None:
                return _fail(problem)
    except Stopped:
        return 0
    db = Database(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    services = Services(settings=settings, db=db)
    try:
        await run_components(services, names, stop)
    finally:
        await services.close()
    get_logger(__name__).info("stopped", components=list(names))
    return 0


async def _keys_create(settings: Settings, args: argparse.Namespace) -> int | str:
    from service.keys import create_key

    async def work(db: Database) -> int:
        created = await create_key(db, args.workspace, args.scope)
        if args.json:
            _out(
                json.dumps(
                    {
                        "key": created.key,
                        "key_id": str(created.key_id),
                        "workspace_id": str(created.workspace_id),
                        "new_workspace": created.new_workspace,
                    }
                )
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
            _out(json.dumps(keys))
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
        _out(f"not a key id: {args.key_id}")
        return 2

    async def work(db: Database) -> int:
        if await revoke_key(db, key_id):
            _out(f"revoked {key_id}")
            return 0
        known = [k for k in await list_keys(db) if k["key_id"] == str(key_id)]
        _out(
            f"key {key_id} was already revoked at {known[0]['revoked_at']}"
            if known
            else f"no key {key_id}"
        )
        return 1

    return await _with_db(settings, work)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, with help on every subcommand and option."""
    from service.audit import cli as audit_cli
    from service.erasure import cli as erasure_cli

    parser = _Parser(
        prog=PROG,
        description="Bulk contact deletion with signed webhooks and an audit trail.",
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
        "Apply every Alembic migration to DATABASE_URL (creating the SQLite file if needed).",
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
    create.add_argument("--json", action="store_true", help="print one JSON line")
    summary = "list every key (id, prefix, workspace, live/revoked, scopes)"
    lst = keys.add_parser("list", help=summary, description=summary.capitalize() + ".")
    lst.add_argument("--json", action="store_true", help="print a JSON array")
    summary = "revoke a key; it stops working at once"
    revoke = keys.add_parser("revoke", help=summary, description=summary.capitalize() + ".")
    revoke.add_argument("key_id", help="the key's id (from `keys create` or `keys list`)")

    audit_cli.add_parser(sub)
    erasure_cli.add_parser(sub)
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
    args = build_parser().parse_args(argv)
    from service.config import Settings

    settings = Settings()
    if args.command == "bench":
        from service import bench

        return bench.run_bench(args)
    if args.command == "dev":
        from service.dev import run_dev

        return run_dev(settings, start_kafka=not args.no_kafka, new_key=args.new_key)
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if args.command == "migrate":
        from service.migrate import upgrade

        asyncio.run(upgrade(settings.database_url))
        _out(f"database {settings.describe_database()} is at the latest schema")
        return 0
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
    if args.command == "run":
        return asyncio.run(serve(settings, list(COMPONENTS), migrate=True))
    if args.command in COMPONENTS:
        return asyncio.run(serve(settings, [args.command], migrate=False))
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
