"""Webhook receivers for `contact-deletion bench --webhooks K` (one separate process).

``python -m service.bench_receiver --count K`` serves K aiohttp receivers on free
127.0.0.1 ports and prints one JSON line ``{"ports": [...], "pid": ...}`` on stdout once
they listen. Each receiver:

- ``POST /hook`` verifies the delivery with the PyPI ``standardwebhooks`` library (never
  with this service's own signing code) and records ``(webhook-id, job id, arrival)``;
  a delivery that does not verify is counted as invalid and answered 400;
- ``POST /_bench/config`` ``{"secret": "whsec_..."}`` sets the secret to verify with (the
  endpoint, and so its secret, is created after the receiver has its port);
- ``GET /_bench/stats`` answers the counts (``?arrivals=1``: and every arrival as
  ``[webhook-id, job id, unix time]``); ``POST /_bench/reset``
  forgets them (between the service run and the bare-floor run).

On SIGTERM or SIGINT the process writes the final stats of every receiver as one JSON
line on stdout and exits. Without ``standardwebhooks`` it refuses to start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CONFIG_PATH = "/_bench/config"
STATS_PATH = "/_bench/stats"
RESET_PATH = "/_bench/reset"
HOOK_PATH = "/hook"


class VerifierMissing(RuntimeError):
    """PyPI ``standardwebhooks`` is not installed, so nothing could be verified."""


def _verifier_class() -> Any:
    try:
        from standardwebhooks import Webhook
    except ImportError as exc:
        raise VerifierMissing(
            "the bench receiver verifies with PyPI `standardwebhooks`; "
            "install the dev extras (pip install -e '.[dev]')"
        ) from exc
    return Webhook


@dataclass
class Receiver:
    """One receiver: its verifier and what arrived."""

    verifier_class: Any
    verifier: Any = None
    arrivals: list[tuple[str, str | None, float]] = field(default_factory=list)
    invalid: int = 0
    unverified: int = 0  # arrived before the secret was set

    async def hook(self, request: web.Request) -> web.Response:
        arrived = time.time()
        body = await request.read()
        if self.verifier is None:
            self.unverified += 1
            return web.Response(status=503, text="no secret yet")
        headers = dict(request.headers)
        try:
            payload = self.verifier.verify(body, headers)
        except Exception:  # any verification failure (bad signature, headers, timestamp)
            self.invalid += 1
            return web.Response(status=400, text="invalid signature")
        data = payload.get("data") if isinstance(payload, dict) else None
        job_id = data.get("job_id") if isinstance(data, dict) else None
        self.arrivals.append((request.headers["webhook-id"], job_id, arrived))
        return web.Response(status=204)

    async def configure(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.verifier = self.verifier_class(str(body["secret"]))
        return web.Response(status=204)

    def stats(self, *, arrivals: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "received": len(self.arrivals),
            "unique": len({a[0] for a in self.arrivals}),
            "invalid": self.invalid,
            "unverified": self.unverified,
        }
        if arrivals:
            out["arrivals"] = self.arrivals
        return out

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats(arrivals=request.query.get("arrivals") == "1"))

    async def reset(self, _: web.Request) -> web.Response:
        self.arrivals = []
        self.invalid = 0
        self.unverified = 0
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(HOOK_PATH, self.hook)
        app.router.add_post(CONFIG_PATH, self.configure)
        app.router.add_get(STATS_PATH, self.get_stats)
        app.router.add_post(RESET_PATH, self.reset)
        return app


async def serve(count: int) -> list[dict[str, Any]]:
    """Serve `count` receivers until SIGTERM/SIGINT; returns their final stats."""
    verifier_class = _verifier_class()
    receivers = [Receiver(verifier_class) for _ in range(count)]
    runners: list[web.AppRunner] = []
    ports: list[int] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for receiver in receivers:
            runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            # Bound here (port 0: the OS picks) so that the port is known before serving.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
            await web.SockSite(runner, sock, backlog=1024).start()
        _write_line({"ports": ports, "pid": os.getpid()})
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
    return [r.stats() for r in receivers]


def _write_line(value: Any) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench_receiver", description=__doc__)
    parser.add_argument("--count", type=int, default=1, help="how many receivers (ports)")
    args = parser.parse_args(argv)
    try:
        final = asyncio.run(serve(args.count))
    except VerifierMissing as exc:
        sys.stderr.write(f"bench_receiver: {exc}\n")
        return 2
    _write_line({"final": final})
    return 0


if __name__ == "__main__":
    sys.exit(main())
