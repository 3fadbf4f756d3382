"""The `contact-deletion` command and its subcommands."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence

from service import bench
from service.aio import Stopped, wait_for_dependency
from service.app import Services, components, run_components
from service.audit import cli as audit_cli
from service.config import Settings
from service.db import Database
from service.dev import run_dev
from service.keys import SCOPES, create_key, list_keys, revoke_key
from service.logs import configure_logging, get_logger
from service.migrate import upgrade

log = get_logger(__name__)


def _out(text: str) -> None:
    """What a command prints for its user (stdout), as opposed to logs (stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _with_db(settings: Settings, work: Callable[[Database], Awaitable[int]]) -> int:
    db = Database(settings.database_url)
    try:
        return await work(db)
    finally:
        await db.dispose()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings, names: Sequence[str], *, migrate: bool) -> int:
    """Run components until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    _stop_on_signals(stop)
    if migrate:
        # A database that is down (or still starting) at start-up is waited for.
        try:
            await wait_for_dependency(
                lambda: upgrade(settings.database_url),
                stop,
                dependency="database",
                component="migrate",
            )
        except Stopped:
            return 0
    db = Database(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    services = Services(settings=settings, db=db)
    try:
        await run_components(services, names, stop)
    finally:
        await services.close()
    log.info("stopped", components=list(names))
    return 0


async def _keys_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        created = await create_key(db, args.workspace, args.scope)
        if args.json:
            _out(
                json.dumps(
                    {
                        "key": created.key,
                        "key_id": str(created.key_id),
                        "workspace_id": str(created.workspace_id),
                    }
                )
            )
        else:
            _out(f"key:          {created.key}")
            _out(f"key_id:       {created.key_id}")
            _out(f"workspace_id: {created.workspace_id}")
            _out(f"scopes:       {' '.join(created.scopes)}")
            _out("Store the key now: it is not shown again.")
        return 0

    return await _with_db(settings, work)


async def _keys_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        keys = await list_keys(db)
        if args.json:
            _out(json.dumps(keys))
        else:
            for k in keys:
                state = "revoked" if k["revoked_at"] else "live"
                _out(
                    f"{k['key_id']}  {k['prefix']}…  {k['workspace']}  {state}  "
                    f"{' '.join(k['scopes'])}"
                )
        return 0

    return await _with_db(settings, work)


async def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    try:
        key_id = uuid.UUID(args.key_id)
    except ValueError:
        _out(f"not a key id: {args.key_id}")
        return 2

    async def work(db: Database) -> int:
        if await revoke_key(db, key_id):
            _out(f"revoked {key_id}")
            return 0
        _out(f"no live key {key_id}")
        return 1

    return await _with_db(settings, work)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contact-deletion",
        description="Bulk contact deletion with signed webhooks and an audit trail.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run every component (api, relay, worker, dispatcher)")
    for name in components():
        sub.add_parser(name, help=f"run the {name} alone")
    sub.add_parser("migrate", help="apply database migrations")
    dev = sub.add_parser("dev", help="local Kafka + SQLite + everything, with a demo key")
    dev.add_argument("--no-kafka", action="store_true", help="do not start a local broker")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key (and its workspace when new)")
    create.add_argument("--workspace", required=True)
    create.add_argument("--scope", action="append", required=True, choices=SCOPES)
    create.add_argument("--json", action="store_true", help="print one JSON line")
    lst = keys.add_parser("list", help="list keys")
    lst.add_argument("--json", action="store_true")
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")

    audit_cli.add_parser(sub)
    bench.add_arguments(
        sub.add_parser(
            "bench", help="benchmark the service against its bare floor (prints figures)"
        )
    )

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.command == "bench":
        return bench.run_bench(args)
    if args.command == "dev":
        return run_dev(settings, start_kafka=not args.no_kafka)
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "migrate":
        asyncio.run(upgrade(settings.database_url))
        _out("database is at the latest schema")
        return 0
    if args.command == "keys":
        handler = {"create": _keys_create, "list": _keys_list, "revoke": _keys_revoke}
        return asyncio.run(handler[args.keys_command](settings, args))
    if args.command == "audit":
        return audit_cli.main(args, settings)
    if args.command == "run":
        return asyncio.run(serve(settings, list(components()), migrate=True))
    if args.command in components():
        return asyncio.run(serve(settings, [args.command], migrate=False))
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
