"""The options of `contact-deletion bench`, apart from the bench itself so that the
command's `--help` does not import the whole service."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `contact-deletion bench` (and `python -m service.bench`)."""
    parser.add_argument("--contacts", type=_positive, default=20_000, help="N (default 20000)")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the backend to measure (default sqlite)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="postgresql only: a server URL (postgresql+asyncpg://...) on which the bench "
        "creates, and afterwards drops, a fresh database; default: a throwaway cluster",
    )
    parser.add_argument(
        "--batch", type=_positive, default=500, help="ids per request (<= 500; default 500)"
    )
    parser.add_argument(
        "--concurrency", type=_positive, default=4, help="concurrent clients (default 4)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace the requests at this many contacts/s (default 0: as fast as accepted)",
    )
    parser.add_argument(
        "--webhooks",
        type=_not_negative,
        default=0,
        help="K receivers, each subscribed to every event (default 0)",
    )
    parser.add_argument(
        "--filter-contacts",
        type=_not_negative,
        default=0,
        help="M: also delete M contacts with one filter job (default 0: skip)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="bound of each wait, in seconds (default 600)"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="run api, relay, worker and dispatcher as four processes (default: one), "
        "with the CPU of each",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--profile-service",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the service under cProfile and write its stats to FILE (slows it down)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value
