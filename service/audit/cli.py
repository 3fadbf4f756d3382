"""``contact-deletion audit``: verify the hash chains in the database, or an export offline.

- ``audit verify [--workspace NAME] [--json]`` walks every workspace's chain (or one, by
  name or id) and prints one line per workspace, with the first break of a broken one;
- ``audit verify-export FILE [--json]`` re-verifies an exported NDJSON file without the
  database (``service.audit.export.verify_export``);
- ``--anchor SEQ:HASH`` (either, repeatable): a head printed earlier and kept outside the
  service must still be in the chain. A hash chain alone shows an edit only to someone who
  did not recompute the hashes after it; an anchor kept elsewhere shows that too.

Exit codes: 0 when everything verifies, 1 when something does not, 2 when there is
nothing to verify (an unknown workspace, an unreadable or empty file, or a file that holds
the API's error answer instead of an export: a wrong key writes one with ``curl > file``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cliout import error, out_json
from service.cliout import out as _out

if TYPE_CHECKING:
    # Imported where used, so that `contact-deletion --help` stays fast.
    from service.audit.chain import VerifyResult
    from service.config import Settings
    from service.db import Database

OK = 0
BROKEN = 1
USAGE = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` and its subcommands to the ``contact-deletion`` parser."""
    audit = subparsers.add_parser(
        "audit",
        help="verify the tamper-evident audit trail",
        description="Verify the audit trail's hash chains: exit 0 intact, 1 broken, 2 nothing to "
        "verify (no database, an unknown workspace, an unreadable or empty file, an API error "
        "answer saved instead of an export).",
    )
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    summary = "walk the hash chain of every workspace (or one) in the database"
    verify = commands.add_parser("verify", help=summary, description=summary.capitalize() + ".")
    verify.add_argument("--workspace", help="the name or id of one workspace (default: all)")
    verify.add_argument(
        "--json",
        action="store_true",
        help="print one JSON array, an object per workspace ([] when there is none)",
    )
    verify.add_argument(
        *_ANCHOR_ARGS,
        **_ANCHOR_OPTIONS,
        help=_ANCHOR_HELP + " (name the --workspace it belongs to)",
    )
    summary = "re-verify an exported NDJSON file offline, without the database"
    offline = commands.add_parser(
        "verify-export", help=summary, description=summary.capitalize() + "."
    )
    offline.add_argument("file", type=Path, help="the file from GET /v1/audit/export")
    offline.add_argument("--json", action="store_true", help="print one JSON object")
    offline.add_argument(*_ANCHOR_ARGS, **_ANCHOR_OPTIONS, help=_ANCHOR_HELP)


def _anchor(text: str) -> tuple[int, str]:
    from service.audit.chain import parse_anchor

    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The hash chain shows an edited event only to someone who does not recompute the hashes
# after it: whoever can write the database can. A head (seq and hash) saved outside the
# service earlier must still be in the chain: a rewrite or a cut since then is BROKEN.
_ANCHOR_ARGS = ("--anchor",)
_ANCHOR_OPTIONS: dict[str, Any] = {
    "metavar": "SEQ:HASH",
    "type": _anchor,
    "action": "append",
    "default": [],
}
_ANCHOR_HELP = (
    "a head that verify printed before and you kept outside the service (repeat for"
    " several): the chain must still hold that hash at that seq, else it was rewritten or"
    " cut since (exit 1)"
)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run an ``audit`` subcommand; returns the exit code."""
    return asyncio.run(run(args, settings))


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run an ``audit`` subcommand inside a running event loop; returns the exit code."""
    anchors = dict(args.anchor)
    if args.audit_command == "verify-export":
        return verify_export_file(args.file, as_json=args.json, anchors=anchors)
    from service.db import Database
    from service.migrate import schema_problem

    problem = await schema_problem(settings.database_url, where=settings.describe_database())
    if problem is not None:
        error(problem)
        return USAGE
    db = Database(settings.database_url)
    try:
        return await verify_database(db, args.workspace, as_json=args.json, anchors=anchors)
    finally:
        await db.dispose()


async def verify_database(
    db: Database,
    workspace: str | None,
    *,
    as_json: bool,
    anchors: Mapping[int, str] | None = None,
) -> int:
    """Verify the chains of every workspace, or of the one named; print a line for each.
    ``anchors`` (seq -> hash) belong to one chain: with them a workspace must be named."""
    from service.audit.store import audited_workspaces, verify_workspace

    if anchors and workspace is None:
        error("--anchor belongs to one workspace's chain: name it with --workspace")
        return USAGE
    chosen = await audited_workspaces(db)
    if workspace is not None:
        chosen = [(wid, name) for wid, name in chosen if workspace in (name, str(wid))]
        if not chosen:
            error(f"--workspace: no workspace named {workspace!r} (nor with that id)")
            return USAGE
    broken = 0
    verdicts = []  # with --json: one array, printed once every chain is walked
    for workspace_id, name in chosen:
        result = await verify_workspace(db, workspace_id, anchors=anchors)
        broken += not result.ok
        if as_json:
            verdicts.append(
                {"workspace": name, "workspace_id": str(workspace_id), **result.to_dict()}
            )
        else:
            _out(f"{name or '(unnamed)'} ({workspace_id}): {_describe(result)}")
    if as_json:
        out_json(verdicts)
    else:
        _out(f"{len(chosen)} workspace(s) verified, {broken} broken")
    return BROKEN if broken else OK


def verify_export_file(
    path: Path, *, as_json: bool, anchors: Mapping[int, str] | None = None
) -> int:
    """Re-verify an export file offline and print the result."""
    from service.audit.export import verify_export

    try:
        not_export = _not_an_export(path)
        result = verify_export(path, anchors=anchors) if not_export is None else None
    except OSError as exc:
        error(f"cannot read {path}: {exc.strerror or exc}")
        return USAGE
    if result is None:
        error(f"{path}: nothing to verify: {not_export}")
        return USAGE
    if as_json:
        out_json(result.to_dict())
    else:
        _out(f"{path}: {_describe(result)}")
    if result.ok and not as_json:
        _out(
            "an export cut short at a line boundary verifies too: compare head_seq and "
            "head_hash with GET /v1/audit/verify to know that nothing is missing at its end"
        )
    return OK if result.ok else BROKEN


def _not_an_export(path: Path) -> str | None:
    """Why the file holds no export at all, or None: an empty file, or the API's error
    envelope (``{"error": {"code", "message", ...}}``, what ``curl > file`` saves when the
    key is wrong). Anything else is read as an export: a damaged one is BROKEN, not this."""
    with path.open("rb") as handle:
        head = handle.read(64 * 1024)
    if not head.strip():
        return "the file is empty (an export with since_seq past the last event is empty)"
    try:
        answer = json.loads(head)
    except ValueError:
        return None
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and set(answer) == {"error"}:
        return (
            f"the file holds an error answer from the API, not an export: "
            f"{error.get('code')}: {error.get('message')}"
        )
    return None


def _describe(result: VerifyResult) -> str:
    if result.ok:
        if result.events_checked == 0:
            return "ok, no events"
        first = result.head_seq - result.events_checked + 1
        events = f"{result.events_checked} event{'s' if result.events_checked != 1 else ''}"
        return f"ok, {events} (seq {first}..{result.head_seq}), head hash {result.head_hash}"
    where = f"seq {result.broken_seq}" if result.broken_seq is not None else "the first line"
    return f"BROKEN at {where}: {result.reason} ({result.detail})"
