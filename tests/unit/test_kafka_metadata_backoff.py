"""A metadata update no broker answers returns only after a back-off (service.kafka).

aiokafka 0.14's producer sender asks for metadata in a loop without back-off while a
partition's leader is unknown; with the broker down each update failed at once, so the
loop spun (a busy core, ~2,300 ERROR lines a second). A real aiokafka client, pointed at
a port where nothing listens, with the wrapper the service's producer gets."""

from __future__ import annotations

import socket
import time

from aiokafka.client import AIOKafkaClient

from service.kafka import METADATA_RETRY_BACKOFF_S, _back_off_failed_metadata


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_failed_metadata_update_returns_after_the_back_off() -> None:
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{_closed_port()}")
    _back_off_failed_metadata(client)
    started = time.monotonic()
    assert await client._metadata_update(client.cluster, []) is False
    assert time.monotonic() - started >= METADATA_RETRY_BACKOFF_S
    await client.close()
