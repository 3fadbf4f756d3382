"""``contact-deletion erasure check``: prove, place by place, that an address is gone.

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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Only the parser is built at start-up; the service is imported once the command runs.
if TYPE_CHECKING:
    from service.config import Settings


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


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run an ``erasure`` subcommand; returns the exit code."""
    return asyncio.run(run(args, settings))


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the check and print its report; returns the exit code."""
    from service.audit.store import hash_key_problem
    from service.contacts.models import check_email
    from service.db import Database
    from service.erasure.check import ErasureCheck, UnknownWorkspace
    from service.migrate import schema_problem

    # What the API would refuse to store cannot be anywhere: a mistyped argument would
    # otherwise read as a proof ("nowhere", exit 0).
    # The address as the API stores it (stripped, lowercased, Unicode NFC, an IDNA domain
    # decoded): the spelling given may differ (a@xn--bcher-kva.example is stored as
    # a@bücher.example) and would otherwise be looked for where it never is.
    try:
        email = check_email(args.email)
    except ValueError as exc:
        sys.stderr.write(f"contact-deletion: error: --email: {exc}\n")
        return 2
    # Like every command that reads the schema: a database that is not there is named and
    # left alone (opening a missing SQLite file would create an empty one).
    problem = await schema_problem(settings.database_url, where=settings.describe_database())
    if problem is not None:
        sys.stderr.write(f"contact-deletion: error: {problem}\n")
        return 2
    db = Database(settings.database_url)
    # Another AUDIT_HASH_KEY than the events' would find no deletion: a false "nowhere".
    key = settings.audit_hash_key
    problem = await hash_key_problem(db, key.get_secret_value() if key else None)
    if problem is not None:
        await db.dispose()
        sys.stderr.write(f"contact-deletion: error: {problem}\n")
        return 2
    try:
        report = await ErasureCheck(
            settings, db, email, workspace=args.workspace, log_files=args.log_file
        ).run()
    except UnknownWorkspace as exc:
        sys.stderr.write(
            f"contact-deletion: error: --workspace: {exc} (`contact-deletion keys list` "
            "names each key's workspace)\n"
        )
        return 2
    finally:
        await db.dispose()
    if args.json:
        _out(report.to_json())
    else:
        for line in report.lines():
            _out(line)
    return report.exit_code


def _out(text: str) -> None:
    # What the command prints for its user goes to stdout; logs go to stderr.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
