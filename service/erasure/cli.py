"""``contact-deletion erasure check``: prove, place by place, that an address is gone;
``erasure redact``: cut it out of the timeline text kept after a deletion
(``service.erasure.timeline``).

Prints one line per place searched (found / not found / not checked, with the forms found:
the address as given, lower-cased, or its SHA-256), what the audit trail says about the
address's deletion, and a verdict. Exit codes: 0 nowhere, 1 found somewhere, 2 nothing
found but some place could not be searched, or not an address the API would accept (the
API's own check, `service.contacts.models.check_email`), or a ``--workspace`` that names
no workspace. See ``service.erasure.check``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from service import cliout

# Only the parser is built at start-up; the service is imported once the command runs.
if TYPE_CHECKING:
    from service.config import Settings
    from service.db import Database


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``erasure`` and its subcommands to the ``contact-deletion`` parser."""
    summary = "prove that a deleted address is gone from everything the service writes"
    erasure = subparsers.add_parser("erasure", help=summary, description=summary.capitalize() + ".")
    commands = erasure.add_subparsers(dest="erasure_command", required=True, metavar="SUBCOMMAND")
    summary = (
        "search the database (rows and files), the Kafka topics and log files for an "
        "address; exit 0 when it is nowhere, 1 when found, 2 when a place could not be read"
    )
    check = commands.add_parser(
        "check",
        help=summary,
        description=summary.capitalize()
        + ". Run it with the service's environment (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, "
        "KAFKA_TOPIC_PREFIX), on the database host to have PostgreSQL's files read.",
    )
    check.add_argument("--email", required=True, help="the address to look for")
    check.add_argument(
        "--workspace", help="limit the live-row and audit answers to this workspace (name or id)"
    )
    check.add_argument(
        "--log-file",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="a file the service's log goes to (repeat for several)",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    summary = (
        "cut an address out of the timeline text the service keeps (a contact deleted "
        "without redact_timeline); an audit event per workspace, then a scrub"
    )
    redact = commands.add_parser(
        "redact",
        help=summary,
        description=summary.capitalize()
        + ". Every activity, note and task whose text holds the address (any case, as "
        "`erasure check` finds it) gets [redacted email] in its place. Run it with the "
        "service's environment (DATABASE_URL, AUDIT_HASH_KEY). Exit codes: 0 done (or "
        "nothing held it), 1 redacted but the scrub failed (run it again), 2 an error.",
    )
    redact.add_argument("--email", required=True, help="the address to cut out")
    redact.add_argument("--workspace", help="only this workspace's timeline (name or id)")
    redact.add_argument(
        "--dry-run", action="store_true", help="count the items and fields; change nothing"
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run an ``erasure`` subcommand; returns the exit code."""
    if args.erasure_command == "redact":
        return asyncio.run(run_redact(args, settings))
    return asyncio.run(run(args, settings))


async def _opened(args: argparse.Namespace, settings: Settings) -> tuple[str, Database] | int:
    """The address as the API stores it and the database, or the exit code of an error
    already said (a bad address, a missing schema, another AUDIT_HASH_KEY)."""
    from service.audit.store import hash_key_problem
    from service.contacts.models import check_email
    from service.db import Database
    from service.migrate import schema_problem

    # What the API would refuse to store cannot be anywhere: a mistyped argument would
    # otherwise read as a proof ("nowhere", exit 0).
    # The address as the API stores it (stripped, lowercased, Unicode NFC, an IDNA domain
    # decoded): the spelling given may differ (a@xn--bcher-kva.example is stored as
    # a@bücher.example) and would otherwise be looked for where it never is.
    try:
        email = check_email(args.email)
    except ValueError as exc:
        cliout.error(f"--email: {exc}")
        return 2
    # Like every command that reads the schema: a database that is not there is named and
    # left alone (opening a missing SQLite file would create an empty one).
    problem = await schema_problem(settings.database_url, where=settings.describe_database())
    if problem is not None:
        cliout.error(problem)
        return 2
    db = Database(settings.database_url)
    # Another AUDIT_HASH_KEY than the events' would find no deletion: a false "nowhere".
    key = settings.audit_hash_key
    problem = await hash_key_problem(db, key.get_secret_value() if key else None)
    if problem is not None:
        await db.dispose()
        cliout.error(problem)
        return 2
    return email, db


def _unknown_workspace(exc: Exception) -> int:
    cliout.error(f"--workspace: {exc} (`contact-deletion keys list` names each key's workspace)")
    return 2


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the check and print its report; returns the exit code."""
    from service.erasure.check import ErasureCheck, UnknownWorkspace

    opened = await _opened(args, settings)
    if isinstance(opened, int):
        return opened
    email, db = opened
    try:
        report = await ErasureCheck(
            settings, db, email, workspace=args.workspace, log_files=args.log_file
        ).run()
    except UnknownWorkspace as exc:
        return _unknown_workspace(exc)
    finally:
        await db.dispose()
    if args.json:
        cliout.out(report.to_json())
    else:
        for line in report.lines():
            cliout.out(line)
    return report.exit_code


async def run_redact(args: argparse.Namespace, settings: Settings) -> int:
    """Redact the address from the kept timeline text (``service.erasure.timeline``) and
    say what was done; returns the exit code."""
    from service.audit.store import load_hash_key
    from service.erasure.check import UnknownWorkspace, workspace_named
    from service.erasure.timeline import redact_address

    opened = await _opened(args, settings)
    if isinstance(opened, int):
        return opened
    email, db = opened
    try:
        workspace_id = None
        if args.workspace is not None:
            workspace_id = await workspace_named(db, args.workspace)
            if workspace_id is None:
                raise UnknownWorkspace(args.workspace)
        key = settings.audit_hash_key
        hash_key = await load_hash_key(db, key.get_secret_value() if key else None)
        done = await redact_address(
            settings, db, email, hash_key, workspace_id=workspace_id, dry_run=args.dry_run
        )
    except UnknownWorkspace as exc:
        return _unknown_workspace(exc)
    finally:
        await db.dispose()
    if not done.items:
        cliout.out("no timeline item holds it: nothing to redact")
        return 0
    verb = "would redact" if args.dry_run else "redacted"
    for workspace, summary in sorted(done.workspaces.items()):
        fields = ", ".join(f"{k} {v}" for k, v in sorted((summary.fields or {}).items()))
        cliout.out(f"workspace {workspace}: {verb} {summary.items} item(s) ({fields})")
    if args.dry_run:
        return 0
    if not done.scrubbed:
        cliout.out("the scrub of the old text did not finish (see the log): run this again")
        return 1
    cliout.out("the old text is scrubbed from the database files: `erasure check` can confirm")
    return 0
