"""What every ``contact-deletion`` command prints, by one rule (README "The command line").

- stdout carries the command's answer only: its lines, or with ``--json`` exactly one JSON
  document, an object for one result (``keys create``, ``erasure check``, ``audit
  verify-export``) or an array for a listing (``keys list``, ``audit verify``, ``dlq
  list``), ``[]`` when the listing is empty;
- stderr carries what went wrong, as ``contact-deletion: error: …`` lines (and the logs
  of a command that serves); a command that cannot start as configured prints one such
  line and exits 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PROG = "contact-deletion"


def out(text: str) -> None:
    """A line of the command's answer (stdout), flushed at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def out_json(document: dict[str, Any] | list[Any]) -> None:
    """The command's whole ``--json`` answer: one document on one line."""
    out(json.dumps(document, sort_keys=True))


def error(text: str) -> None:
    """One ``contact-deletion: error: …`` line on stderr."""
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()
