"""`contact-deletion dev`: the local default (a real local Kafka, SQLite, every component).

Before anything is printed or started it checks that it can listen where it is told
(`service.app.listen_problem`), so that a second `make dev` says so in the one-line
start-up error every command uses (``contact-deletion: error: …``, exit 2: a
``StartupError``) instead of printing a banner and dying. The demo
key is made once and kept in ``<data_dir>/demo-key`` (mode 0600), so every `make dev`
shows the same key instead of adding another live one; ``--new-key`` replaces it.

The broker is started from the main thread before the event loop, because its
die-with-parent signal is tied to the thread that launched it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from pathlib import Path

from service.app import Services, components, listen_problem
from service.config import Settings, StartupError
from service.db import Database
from service.keys import SCOPES, authenticate, create_key, revoke_key
from service.localkafka import (
    DEFAULT_PORT,
    LocalKafka,
    LocalKafkaError,
    broker_answers,
    jars_cached,
)
from service.logs import configure_logging

DEMO_WORKSPACE = "demo"
DEMO_KEY_FILE = "demo-key"


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (nothing is left bound)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def run_dev(settings: Settings, *, start_kafka: bool = True, new_key: bool = False) -> int:
    """Start (or reuse) a local broker, migrate, reuse the demo key, run everything.

    Raises StartupError (before anything starts) when it cannot listen on HTTP_HOST:
    HTTP_PORT (or OPS_PORT), and when the local broker does not start."""
    settings = settings.model_copy(
        update={"webhook_allow_private_networks": True, "log_format": "console"}
    )
    cannot_listen = listen_problem(settings, list(components()))
    if cannot_listen is not None:
        if port_in_use(settings.http_host, settings.http_port):
            cannot_listen += (
                " (is another `make dev` running? Stop it, or choose another port: "
                f"HTTP_PORT={settings.http_port + 1} make dev)"
            )
        raise StartupError(cannot_listen)
    configure_logging(settings.log_format, settings.log_level)
    # DATA_DIR=/a/new/folder make dev: made here, as `run` and `migrate` make it.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    host, _, port_text = settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")
    port = int(port_text)
    broker: LocalKafka | None = None
    if start_kafka and not broker_answers(host, port):
        folder = broker_dir(settings.data_dir, port)
        broker = LocalKafka(host=host, port=port, data_dir=folder)
        _say(starting_broker(host, port, cached=jars_cached()))
        try:
            broker.start()
        except LocalKafkaError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StartupError(
                f"the local broker on {host}:{port} did not start: {first} (its output: "
                f"{folder / 'broker.out'}; or use a running one: KAFKA_BOOTSTRAP_SERVERS="
                "host:port contact-deletion dev --no-kafka)"
            ) from None
        _say(f"kafka ready on {broker.bootstrap}")
    elif start_kafka:
        _say(f"a broker already answers on {host}:{port}; using it")
    try:
        return asyncio.run(_dev_main(settings, new_key=new_key, owns_broker=broker is not None))
    finally:
        if broker is not None:
            broker.stop()
            _say("local broker stopped")


def starting_broker(host: str, port: int, *, cached: bool) -> str:
    """The line `dev` prints as it starts its broker: it names the one-time fetch of the
    jars only when they are not cached yet (it said "first start fetches jars" every time)."""
    fetch = "" if cached else " (fetching its jars from Maven Central first, once)"
    return f"starting a local Apache Kafka broker on {host}:{port}{fetch}"


def broker_dir(data_dir: Path, port: int) -> Path:
    """The local broker's folder: ``kafka`` for the default port, ``kafka-<port>`` for any
    other, so a second broker started from the same DATA_DIR (README: its own broker on
    another port) neither takes the first one's lock nor rewrites its configuration."""
    return data_dir / ("kafka" if port == DEFAULT_PORT else f"kafka-{port}")


async def demo_key(db: Database, key_file: Path, *, new_key: bool) -> tuple[str, bool]:
    """The demo workspace's key: the stored one while it still works, else a new one
    (stored). Returns the key and whether it is new."""
    stored = _read_key(key_file)
    if stored:
        who = await authenticate(db, stored)
        if who is not None and not new_key:
            return stored, False
        if who is not None:
            await revoke_key(db, who.key_id)
    created = await create_key(db, DEMO_WORKSPACE, list(SCOPES))
    _write_key(key_file, created.key)
    return created.key, True


def _read_key(key_file: Path) -> str:
    return key_file.read_text().strip() if key_file.is_file() else ""


def _write_key(key_file: Path, key: str) -> None:
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")


async def _dev_main(settings: Settings, *, new_key: bool, owns_broker: bool) -> int:
    """`run`'s start-up (the same waits and one-line errors, `service.cli.serve`), with
    the demo key made once the database is migrated and the banner once the api listens."""
    from service.cli import serve

    key_file = settings.data_dir / DEMO_KEY_FILE
    base = f"http://{settings.http_host}:{settings.http_port}"
    announced: set[asyncio.Task[None]] = set()

    async def greet(services: Services) -> None:
        key, is_new = await demo_key(services.db, key_file, new_key=new_key)
        banner = _banner(base, key, key_file, is_new, settings.describe_database(), owns_broker)

        async def announce() -> None:
            await services.listening.wait()
            _say(banner)

        announced.add(asyncio.create_task(announce()))

    try:
        return await serve(settings, list(components()), migrate=True, prepare=greet)
    finally:
        for task in announced:
            task.cancel()


def _banner(
    base: str, key: str, key_file: Path, is_new: bool, database: str, owns_broker: bool = True
) -> str:
    made = "new: any earlier demo key is revoked" if is_new else "the same as last time"
    return f"""
contact-deletion is running at {base}  (database {database})
demo API key, workspace "demo", all scopes ({made}; kept in {key_file}):

  export KEY={key}
  # create a contact
  curl -s {base}/v1/contacts -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -d '{{"email":"ada@example.com","first_name":"Ada"}}'
  # list contacts
  curl -s {base}/v1/contacts -H "Authorization: Bearer $KEY"
  # delete contacts in bulk and wait up to 10 s for the result
  curl -s {base}/v1/contacts/bulk-delete -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -H 'Prefer: wait=10' \\
       -H "Idempotency-Key: $(python3 -c 'import uuid; print(uuid.uuid4())')" \\
       -d '{{"emails":["ada@example.com"]}}'
  # was it deleted? (the address stays out of the URL)
  curl -s {base}/v1/audit/events/query -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -d '{{"email":"ada@example.com"}}'

Web console (sign in with the key above): {base}/console   API reference: {base}/docs
Ctrl-C stops everything{" (and the local broker)" if owns_broker else ""}. The README has the rest.
"""
