"""`contact-deletion dev`: the local default (a real local Kafka, SQLite, every component).

The broker is started from the main thread before the event loop, because its
die-with-parent signal is tied to the thread that launched it.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from service.app import Services, components, run_components
from service.config import Settings
from service.db import Database
from service.keys import SCOPES, create_key
from service.localkafka import LocalKafka, broker_answers
from service.logs import configure_logging, get_logger
from service.migrate import upgrade

log = get_logger(__name__)

DEMO_WORKSPACE = "demo"


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_dev(settings: Settings, *, start_kafka: bool = True) -> int:
    """Start (or reuse) a local broker, migrate, make a demo key, run everything."""
    settings = settings.model_copy(
        update={"webhook_allow_private_networks": True, "log_format": "console"}
    )
    configure_logging(settings.log_format, settings.log_level)
    host, _, port_text = settings.kafka_bootstrap_servers.split(",")[0].rpartition(":")
    port = int(port_text)
    broker: LocalKafka | None = None
    if start_kafka and not broker_answers(host, port):
        broker = LocalKafka(host=host, port=port, data_dir=settings.data_dir / "kafka")
        _say(f"starting a local Apache Kafka broker on {host}:{port} (first start fetches jars)")
        broker.start()
        _say(f"kafka ready on {broker.bootstrap}")
    elif start_kafka:
        _say(f"a broker already answers on {host}:{port}; using it")
    try:
        return asyncio.run(_dev_main(settings))
    finally:
        if broker is not None:
            broker.stop()
            _say("local broker stopped")


async def _dev_main(settings: Settings) -> int:
    await upgrade(settings.database_url)
    services = Services(settings=settings, db=Database(settings.database_url))
    key = await create_key(services.db, DEMO_WORKSPACE, list(SCOPES))
    base = f"http://{settings.http_host}:{settings.http_port}"
    _say(_banner(base, key.key, str(key.workspace_id)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_components(services, list(components()), stop)
    finally:
        await services.close()
    return 0


def _banner(base: str, key: str, workspace_id: str) -> str:
    return f"""
contact-deletion is running at {base}  (workspace "demo" {workspace_id})
demo API key (all scopes; shown once): {key}

  export KEY={key}
  # create a contact
  curl -s {base}/v1/contacts -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -d '{{"email":"ada@example.com","first_name":"Ada"}}'
  # subscribe a webhook receiver
  curl -s {base}/v1/webhooks/endpoints -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -d '{{"url":"http://127.0.0.1:9000/hook"}}'
  # delete contacts in bulk and wait up to 10 s for the result
  curl -s {base}/v1/contacts/bulk-delete -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' -H 'Prefer: wait=10' \\
       -H "Idempotency-Key: $(uuidgen || date +%s)" -d '{{"emails":["ada@example.com"]}}'
  # query the audit trail
  curl -s "{base}/v1/audit/events?action=contact.deleted" -H "Authorization: Bearer $KEY"

Ctrl-C stops everything (and the local broker).
"""
