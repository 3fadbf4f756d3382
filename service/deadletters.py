"""``contact-deletion dlq list``: what the dead-letter topics hold, without the Kafka scripts.

A record no consumer could process is copied to its topic's dead-letter topic
(``<topic>.dlq``, README "Outages") with value-free headers saying why and where it came
from. Reading those needed Kafka's console tools, which a pip install does not have. This
lists every dead letter of this deployment's topics (``KAFKA_TOPIC_PREFIX``), oldest first
per partition, one line each (with ``--json``, one JSON array of objects, ``[]`` when
there are none, as every ``--json`` listing prints: ``service.cli``):

    <dead-letter topic> <partition>/<offset> reason=<dlq-reason> source=<dlq-source> ...

plus the other ``dlq-*`` headers a stub carries (``dlq-source-end`` for an unreadable
batch, ``dlq-refused`` and the original's size and SHA-256 for a copy the broker refused),
and the value's size. Never the value itself: a dead letter is a command or an event that
could not be read, and what it holds is not for a terminal or a log.

No consumer group is used: nothing is committed, and the service's consumers are not
disturbed. Exit codes: 0 (whether or not there are dead letters; the last line counts
them), 2 when the broker does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from service.cliout import error, out, out_json

if TYPE_CHECKING:
    from service.config import Settings

OK = 0
UNAVAILABLE = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dlq`` and its subcommand to the ``contact-deletion`` parser."""
    dlq = subparsers.add_parser(
        "dlq",
        help="list the dead letters (records no consumer could process)",
        description="Read the dead-letter topics (<topic>.dlq) of this deployment's topics: "
        "why each record was set aside and where it came from (never its contents).",
    )
    commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="SUBCOMMAND")
    summary = "list every dead letter, oldest first per partition, and count them"
    listing = commands.add_parser("list", help=summary, description=summary.capitalize() + ".")
    listing.add_argument(
        "--json", action="store_true", help="print one JSON array ([] when there are none)"
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run a ``dlq`` subcommand; returns the exit code."""
    return asyncio.run(list_dead_letters(settings, as_json=args.json))


async def list_dead_letters(settings: Settings, *, as_json: bool) -> int:
    """Print every dead letter of this deployment's topics; see the module."""
    from service.events import DLQ_SUFFIX
    from service.kafka import KafkaUnavailable, read_topics
    from service.topics import all_topics

    topics = [t for t in all_topics(settings) if t.endswith(DLQ_SUFFIX)]
    letters: list[dict[str, Any]] = []  # with --json: one document, printed once all are read
    count = 0
    try:
        async for message in read_topics(settings.kafka_bootstrap_servers, topics):
            count += 1
            letter = describe(
                message.topic, message.partition, message.offset, message.headers, message.value
            )
            if as_json:
                letters.append(letter)
            else:
                out(_line(letter))
    except KafkaUnavailable as exc:
        error(str(exc))
        return UNAVAILABLE
    if as_json:
        out_json(letters)
    else:
        out(f"{count} dead letter(s) in {', '.join(topics)}")
    return OK


def describe(topic: str, partition: int, offset: int, headers: Any, value: bytes) -> dict[str, Any]:
    """One dead letter as plain values: where it is, its ``dlq-*`` headers (decoded as
    UTF-8, replacing what is not), and the size of its value (never the value)."""
    letter: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "value_bytes": len(value),
    }
    for name, raw in headers:
        if isinstance(name, str) and name.startswith("dlq-"):
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            letter[name.removeprefix("dlq-").replace("-", "_")] = text
    return letter


def _line(letter: dict[str, Any]) -> str:
    where = f"{letter['topic']} {letter['partition']}/{letter['offset']}"
    rest = [
        f"{k}={v}"
        for k, v in letter.items()
        if k not in ("topic", "partition", "offset", "value_bytes")
    ]
    return " ".join([where, *rest, f"value_bytes={letter['value_bytes']}"])
