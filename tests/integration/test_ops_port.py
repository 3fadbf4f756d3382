"""OPS_PORT: a relay, worker or dispatcher run apart serves its probes and its own counters
(`GET /healthz`, `/readyz`, `/metrics`, nothing else), so a supervisor can tell a live,
ready one from a stuck one. Before OPS_PORT such a process served no HTTP at all."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from service.config import Settings
from service.migrate import upgrade_sync
from tests.components import COMMAND
from tests.conftest import components_running, make_settings, opened_services
from tests.logcapture import json_logs


async def _get(base: str, path: str) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + path) as response:
        text = await response.text()
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, text, body


@contextlib.asynccontextmanager
async def worker_with_ops_port(settings: Settings, after: str) -> AsyncIterator[str]:
    """A worker running in this process with OPS_PORT=0: the base URL of its ops port, once
    it has logged `after` (component_started, or waiting_for_dependency)."""
    with json_logs() as logs:
        async with opened_services(settings) as services, components_running(services, "worker"):
            await logs.wait_for("ops_listening", timeout_s=30)
            await logs.wait_for(after, timeout_s=30, component="worker")
            yield f"http://127.0.0.1:{logs.events('ops_listening')[0]['port']}"


async def test_a_worker_run_apart_serves_its_probes_and_counters_on_ops_port(
    db_url: str, kafka_bootstrap: str
) -> None:
    settings = make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap, ops_port=0)
    async with worker_with_ops_port(settings, "component_started") as base:
        status, _, body = await _get(base, "/healthz")
        assert (status, body) == (200, {"data": {"status": "ok"}})
        status, _, body = await _get(base, "/readyz")
        assert (status, body) == (
            200,
            {"data": {"status": "ready", "checks": {"database": "ok", "kafka": "ok"}}},
        )
        status, text, _ = await _get(base, "/metrics")
        assert status == 200
        # The worker's own registry: its deletion counter, and the probes just served.
        assert "# TYPE contacts_deleted_total counter" in text
        assert 'http_requests_total{method="GET",route="/readyz",status="200"}' in text
        # Nothing but the probes: the API and its spec are not served here.
        for path in ("/v1/deletion-jobs", "/openapi.json", "/console"):
            status, _, body = await _get(base, path)
            assert status == 404, path
            assert body["error"]["code"] == "not_found", body


async def test_ops_port_readyz_names_what_a_component_waits_for(db_url: str) -> None:
    """A worker with no broker: alive, not ready, and its readiness says why."""
    settings = make_settings(db_url, ops_port=0)  # the broker: 127.0.0.1:1, nothing there
    async with worker_with_ops_port(settings, "waiting_for_dependency") as base:
        status, _, body = await _get(base, "/healthz")
        assert (status, body) == (200, {"data": {"status": "ok"}})
        status, _, body = await _get(base, "/readyz")
        assert status == 503
        assert body["error"]["code"] == "not_ready", body
        assert body["error"]["details"] == {
            "database": "ok",
            "kafka": "unreachable",
            "worker": "waiting for kafka",
        }


def test_an_ops_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cd.db'}"
    upgrade_sync(url)
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.update(
            DATA_DIR=str(tmp_path / "data"),
            DATABASE_URL=url,
            KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
            OPS_PORT=str(port),
        )
        done = subprocess.run(
            [COMMAND, "relay"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("contact-deletion: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(
        f"contact-deletion: error: cannot listen on HTTP_HOST=127.0.0.1 OPS_PORT={port}:"
    ), errors
    assert "address already in use" in errors[0].lower(), errors
