"""The running service, as a user meets it: `contact-deletion run` driven over HTTP.

The service runs as its own process (all four components), keys come from the real
`keys create --json` command against the same database, and a real receiver on 127.0.0.1
verifies every webhook with the independent `standardwebhooks` library.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook

from tests.components import port_from_log, stop_process, wait_ready

pytestmark = pytest.mark.slow


@dataclass
class RunningService:
    base: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def exited(self) -> str | None:
        """None while it runs; else its log's tail."""
        return None if self.process.poll() is None else self.log.read_text()[-3000:]


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode()


@pytest.fixture
def service_env(db_url: str, kafka_bootstrap: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": db_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": f"e2e{uuid.uuid4().hex[:8]}.",
        "KAFKA_CONSUMER_GROUP_PREFIX": f"e2e{uuid.uuid4().hex[:8]}",
        "KAFKA_PARTITIONS": "2",
        "HTTP_PORT": "0",  # the port it binds is read from its api_listening line
        "LOG_FORMAT": "json",
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def running(service_env: dict[str, str], tmp_path: Path) -> Iterator[RunningService]:
    log = tmp_path / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"],
            env=service_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def exited() -> str | None:
        return None if process.poll() is None else log.read_text()[-3000:]

    try:
        base = f"http://127.0.0.1:{asyncio.run(port_from_log(log, exited))}"
        yield RunningService(base, service_env, process, log)
    finally:
        stop_process(process)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=200, text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/hook")), received
    await server.close()


async def test_a_user_deletes_contacts_and_is_told_by_a_signed_webhook(
    running: RunningService,
    receiver: tuple[str, list[tuple[bytes, dict[str, str]]]],
) -> None:
    """Keys from the CLI, contacts with a timeline, a webhook, a bulk delete, the audit trail."""
    url, received = receiver
    async with aiohttp.ClientSession() as http:
        await wait_ready(running.base, running.exited)
        created = json.loads(
            await asyncio.to_thread(
                _cli,
                running.env,
                "keys",
                "create",
                "--workspace",
                "e2e",
                "--json",
                "--scope",
                "contacts:read",
                "--scope",
                "contacts:write",
                "--scope",
                "webhooks:manage",
                "--scope",
                "audit:read",
            )
        )
        auth = {"Authorization": f"Bearer {created['key']}"}

        async def call(method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
            async with http.request(
                method, running.base + path, json=body, headers={**auth, **headers}
            ) as response:
                return response.status, await response.json()

        status, endpoint = await call("POST", "/v1/webhooks/endpoints", {"url": url})
        assert status == 201
        secret = endpoint["data"]["secret"]

        ids = []
        for n in range(5):
            status, contact = await call(
                "POST", "/v1/contacts", {"email": f"E2E{n}@Example.com", "last_name": "Gone"}
            )
            assert status == 201
            ids.append(contact["data"]["id"])
            status, _ = await call(
                "POST", f"/v1/contacts/{contact['data']['id']}/notes", {"body": f"note {n}"}
            )
            assert status == 201
        status, survivor = await call("POST", "/v1/contacts", {"email": "stay@example.com"})

        status, job = await call(
            "POST",
            "/v1/contacts/bulk-delete",
            {"filter": {"last_name": "Gone"}},
            Prefer="wait=30",
        )
        assert status == 200, job
        assert job["data"]["deleted_count"] == 5
        assert job["data"]["status"] == "completed"

        for contact_id in ids:
            status, _ = await call("GET", f"/v1/contacts/{contact_id}")
            assert status == 404
        status, _ = await call("GET", f"/v1/contacts/{survivor['data']['id']}")
        assert status == 200

        # Five contact.deleted and one deletion_job.completed, each signed.
        for _ in range(200):
            if len(received) >= 6:
                break
            await asyncio.sleep(0.1)
        types = []
        for raw, headers in received:
            payload = Webhook(secret).verify(raw, headers)
            types.append(payload["type"])
            assert b"example.com" not in raw.lower()
        assert sorted(types) == ["contact.deleted"] * 5 + ["deletion_job.completed"]
        deleted = {
            json.loads(raw)["data"]["contact_id"]
            for raw, _ in received
            if json.loads(raw)["type"] == "contact.deleted"
        }
        assert deleted == set(ids)

        # The audit trail keeps each deleted contact's note, and the chain verifies.
        status, timeline = await call("GET", f"/v1/audit/contacts/{ids[0]}/timeline")
        assert status == 200, timeline
        assert [item["body"] for item in timeline["data"]["timeline"]] == ["note 0"]
        assert timeline["data"]["requested_by"]["job_id"] == job["data"]["job_id"]
        status, verified = await call("GET", "/v1/audit/verify")
        assert status == 200
        assert verified["data"]["ok"] is True
        status, found = await call(
            "GET", "/v1/audit/events?action=contact.deleted&email=E2E3%40example.com"
        )
        assert status == 200, found
        assert [e["target"]["id"] for e in found["data"]] == [ids[3]]
