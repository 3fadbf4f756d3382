"""A dispatcher SIGKILLed with requests in flight, and restarted, still delivers everything.

The dispatcher runs as a separate `contact-deletion dispatcher` process against the test's
database and broker. Ten deliveries (five to each of two endpoints) wait for a receiver
that takes 3 s a request; once requests are in flight the process is killed with SIGKILL,
so none of them is ever recorded. A second process must deliver all ten: the ones that
were never claimed at once, the ones that were in flight once their claim lease
(``webhook_timeout_s * 2 + 30`` s) has run out. Duplicates are allowed (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook

from service.config import Settings
from tests.components import Components, components
from tests.conftest import Tenant, make_settings

pytestmark = pytest.mark.slow

ENDPOINTS = "/v1/webhooks/endpoints"
PER_ENDPOINT = 5
RECEIVER_SLEEP_S = 3.0
TIMEOUT_S = 4  # the claim lease is then 4 + 10 = 14 s
DEADLINE_S = 90.0


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(
        db_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        webhook_retry_schedule="0,1,1,1,1",
        webhook_timeout_s=TIMEOUT_S,
    )


# -- the dispatcher process ------------------------------------------------------------


@pytest.fixture
def dispatchers(settings: Settings, tmp_path: Path) -> Iterator[Components]:
    with components(settings, tmp_path) as group:
        yield group


# -- the receiver ----------------------------------------------------------------------


class SlowReceiver:
    """Answers every webhook 200 after RECEIVER_SLEEP_S; records each arrival."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, bytes, dict[str, str]]] = []
        self.in_flight = 0
        self.released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        self.arrivals.append((time.monotonic(), headers["webhook-id"], body, headers))
        self.in_flight += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), timeout=RECEIVER_SLEEP_S)
            return web.Response(status=200, text="ok")
        finally:
            self.in_flight -= 1

    def received(self, since: float = 0.0) -> Counter[str]:
        return Counter(event_id for at, event_id, _, _ in self.arrivals if at >= since)


@pytest.fixture
async def receiver() -> AsyncIterator[SlowReceiver]:
    server = SlowReceiver()
    await server.server.start_server()
    yield server
    server.released.set()
    await server.server.close()


# -- the test --------------------------------------------------------------------------


async def deliveries(tenant: Tenant, endpoint_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every delivery of these endpoints, by event id."""
    out: dict[str, dict[str, Any]] = {}
    for endpoint_id in endpoint_ids:
        status, body, _ = await tenant.call(
            "GET", f"{ENDPOINTS}/{endpoint_id}/deliveries?limit=500"
        )
        assert status == 200, body
        out |= {d["event_id"]: d for d in body["data"]}
    return out


async def test_a_dispatcher_killed_mid_flight_and_restarted_delivers_everything(
    tenant: Tenant, receiver: SlowReceiver, dispatchers: Components
) -> None:
    """SIGKILL with requests in flight loses nothing: after a restart every delivery
    succeeds and every event reaches the receiver (at least once)."""
    loop = asyncio.get_running_loop()
    secrets: dict[str, str] = {}
    for name in ("a", "b"):
        status, body, _ = await tenant.call(
            "POST", ENDPOINTS, {"url": str(receiver.server.make_url(f"/{name}"))}
        )
        assert status == 201, body
        secrets[body["data"]["id"]] = body["data"]["secret"]
    endpoint_ids = list(secrets)
    events: dict[str, str] = {}  # event id -> endpoint id
    for endpoint_id in endpoint_ids:
        for _ in range(PER_ENDPOINT):
            status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{endpoint_id}/test")
            assert status == 202, body
            events[body["data"]["event_id"]] = endpoint_id

    first = dispatchers.start("dispatcher")
    deadline = loop.time() + 30
    while receiver.in_flight == 0:
        first.assert_running()
        assert loop.time() < deadline, "no request reached the receiver in 30 s"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let it fill more slots; none can finish (3 s each)
    in_flight = set(receiver.received())
    assert first.kill() == -signal.SIGKILL
    killed_at = time.monotonic()

    before = await deliveries(tenant, endpoint_ids)
    assert set(before) == set(events)
    # Nothing was recorded: the kill came before any answer.
    assert {d["status"] for d in before.values()} == {"pending"}, before
    assert in_flight <= set(events)
    assert 1 <= len(in_flight) <= 2 * 4  # at most 4 in flight per endpoint

    second = dispatchers.start("dispatcher")
    deadline = loop.time() + DEADLINE_S
    while True:
        now = await deliveries(tenant, endpoint_ids)
        if all(d["status"] == "succeeded" for d in now.values()):
            break
        second.assert_running()
        assert loop.time() < deadline, (
            f"not all delivered {DEADLINE_S} s after the restart: "
            f"{Counter(d['status'] for d in now.values())}"
        )
        await asyncio.sleep(0.25)
    recovered_after_s = time.monotonic() - killed_at
    print(f"all delivered {recovered_after_s:.1f} s after the SIGKILL")

    received = receiver.received()
    assert set(received) == set(events), "an event never reached the receiver"
    # What was in flight at the kill was sent again by the second process.
    after_restart = receiver.received(since=killed_at)
    assert in_flight <= set(after_restart)
    for _at, event_id, body, headers in receiver.arrivals:
        Webhook(secrets[events[event_id]]).verify(body, headers)
    for delivery in now.values():
        assert delivery["attempt_count"] >= 1
    second.assert_running()
