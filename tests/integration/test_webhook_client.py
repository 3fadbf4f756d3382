"""The sender's HTTP/1.1 client (service.webhooks.post) against real receivers on 127.0.0.1:
aiohttp servers, and raw sockets for the answers aiohttp would not give (interim 1xx, a
body that runs to the close, garbage, silence)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from service.webhooks.post import ProtocolError, Target, WebhookClient, target
from service.webhooks.signing import generate_secret, signature_header
from service.webhooks.ssrf import BlockedDestination, ConnectError, PinnedResolver

UA = "test-client/1"
BODY = b'{"type":"webhook.test","data":{}}'


def client(
    *, allow_private: bool = True, timeout_s: float = 5.0, dns: bool = False
) -> WebhookClient:
    async def fake_dns(host: str, port: int) -> list[str]:
        assert host == "pinned.test"
        return ["127.0.0.1"]

    resolver = PinnedResolver(allow_private=allow_private, resolver=fake_dns if dns else None)
    return WebhookClient(resolver, timeout_s=timeout_s, connect_timeout_s=2.0, body_limit=4096)


def signed(url: str, secret: str, event_id: str = "evt_1") -> tuple[Target, bytes]:
    to = target(url, UA)
    now = int(time.time())
    headers = {
        "webhook-id": event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": signature_header([secret], event_id, now, BODY),
    }
    return to, to.request(headers, BODY)


@dataclass
class Seen:
    """What an aiohttp receiver saw: each request's peer port (its connection), headers
    and body."""

    ports: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def aiohttp_receiver() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, Seen]]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> tuple[str, Seen]:
        seen = Seen()

        async def handle(request: web.Request) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            seen.ports.append(peer[1] if peer else -1)
            seen.requests.append((dict(request.headers), await request.read()))
            return await handler(request)

        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/hook", seen

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def raw_receiver() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """A socket server that answers each request (read up to its body) with the next of
    the given raw answers; None: close the connection instead of answering. With
    `close_after`, it closes each connection after its answer (without saying so);
    `connections` counts the connections it accepted."""
    servers: list[asyncio.Server] = []

    async def start(
        answers: list[bytes | None], close_after: bool = False, connections: list[int] | None = None
    ) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if connections is not None:
                connections.append(1)
            try:
                while answers:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    answer = answers.pop(0)
                    if answer is None:
                        break
                    writer.write(answer)
                    await writer.drain()
                    if close_after:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def ok(text: str = "ok", **headers: str) -> Handler:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, headers=headers)

    return reply


async def test_a_signed_post_verifies_and_one_connection_carries_a_sequence_of_them(
    aiohttp_receiver: Callable[[Handler], Awaitable[tuple[str, Seen]]],
) -> None:
    url, seen = await aiohttp_receiver(ok())
    secret = generate_secret()
    sender = client()
    try:
        for n in range(5):
            to, request = signed(url, secret, f"evt_{n}")
            answer = await sender.post(to, request)
            assert (answer.status, answer.body) == (200, b"ok")
    finally:
        await sender.close()
    assert len(set(seen.ports)) == 1, seen.ports  # kept alive
    for n, (headers, body) in enumerate(seen.requests):
        assert body == BODY
        assert headers["webhook-id"] == f"evt_{n}"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == UA
        Webhook(secret).verify(body, headers)


async def test_connection_close_chunked_and_long_answers_keep_or_drop_the_connection(
    aiohttp_receiver: Callable[[Handler], Awaitable[tuple[str, Seen]]],
) -> None:
    """Connection: close and a body past REUSE_BODY_MAX open a new connection next time;
    a chunked body is decoded (its first 4 KiB kept) and its connection kept."""
    replies: list[Handler] = []

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=202)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"a" * 3000, b"b" * 3000):
            await response.write(part)
        await response.write_eof()
        return response

    async def reply(request: web.Request) -> web.StreamResponse:
        return await replies.pop(0)(request)

    replies += [ok("closing", Connection="close"), chunked, ok("x" * 100_000), ok("y" * 10_000)]
    replies += [ok("last")]
    url, seen = await aiohttp_receiver(reply)
    sender = client()
    secret = generate_secret()
    answers = []
    try:
        for _ in range(5):
            to, request = signed(url, secret)
            answers.append(await sender.post(to, request))
    finally:
        await sender.close()
    assert [a.status for a in answers] == [200, 202, 200, 200, 200]
    assert answers[0].body == b"closing"
    assert answers[1].body == b"a" * 3000 + b"b" * 1096
    assert answers[2].body == b"x" * 4096
    assert answers[3].body == b"y" * 4096
    assert answers[4].body == b"last"
    # 1 closed by the receiver; 2 kept (chunked, read to its end) for 3; 3 closed (too
    # long to read through); 4 (10 KB, read through) kept for 5.
    a, b, c, d, e = seen.ports
    assert a != b and b == c and c != d and d == e, seen.ports


async def test_interim_answers_a_body_to_the_close_and_odd_headers(
    raw_receiver: Callable[..., Awaitable[str]],
) -> None:
    url = await raw_receiver(
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: 4\r\n\r\nbusy",
            b"HTTP/1.1 307 Elsewhere\r\nLocation: http://example.com/\r\n\r\nmoved",
        ]
    )
    sender = client()
    try:
        to, request = signed(url, generate_secret())
        first = await sender.post(to, request)
        second = await sender.post(to, request)
    finally:
        await sender.close()
    assert (first.status, first.body, first.headers["retry-after"]) == (503, b"busy", "7")
    assert first.headers["x-a"] == "1"  # the first of a repeated header
    assert (second.status, second.body) == (307, b"moved")
    assert second.headers["location"] == "http://example.com/"


async def test_a_receiver_that_closes_or_answers_garbage_is_a_protocol_error(
    raw_receiver: Callable[..., Awaitable[str]],
) -> None:
    sender = client()
    try:
        for answers in ([None], [b"SSH-2.0-OpenSSH\r\n\r\n"], [b"HTTP/1.1 200 OK\r\nbad\r\n\r\n"]):
            to, request = signed(await raw_receiver(answers), generate_secret())
            with pytest.raises(ProtocolError):
                await sender.post(to, request)
    finally:
        await sender.close()


async def test_a_connection_the_receiver_closed_while_idle_is_not_reused(
    raw_receiver: Callable[..., Awaitable[str]],
) -> None:
    """The receiver closes after answering (without saying so): the next post opens a
    new connection instead of failing on the dead one."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections: list[int] = []
    url = await raw_receiver([answer, answer], close_after=True, connections=connections)
    sender = client()
    try:
        to, request = signed(url, generate_secret())
        assert (await sender.post(to, request)).status == 200
        await asyncio.sleep(0.2)  # the receiver's close arrives
        assert (await sender.post(to, request)).status == 200
    finally:
        await sender.close()
    assert len(connections) == 2


async def test_silence_times_out_and_a_closed_port_is_a_connect_error(
    raw_receiver: Callable[..., Awaitable[str]],
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    sender = client(timeout_s=0.5)
    try:
        to, request = signed(f"http://127.0.0.1:{port}/hook", generate_secret())
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await sender.post(to, request)
        assert 0.4 <= time.monotonic() - started < 2
        silent.close()
        await silent.wait_closed()
        with pytest.raises(ConnectError, match=f"could not connect to 127.0.0.1:{port}"):
            await sender.post(to, request)
    finally:
        await sender.close()
        for writer in held:
            writer.close()


async def test_connections_go_only_to_checked_addresses(
    aiohttp_receiver: Callable[[Handler], Awaitable[tuple[str, Seen]]],
) -> None:
    """A name is resolved through PinnedResolver (here a fake DNS that knows it) and a
    literal private address is refused too when private networks are not allowed."""
    url, seen = await aiohttp_receiver(ok())
    port = int(url.split(":")[2].split("/")[0])
    pinned = f"http://pinned.test:{port}/hook"
    allowed, guarded = client(dns=True), client(dns=True, allow_private=False)
    try:
        to, request = signed(pinned, generate_secret())
        assert (await allowed.post(to, request)).status == 200
        for refused in (pinned, url):
            to, request = signed(refused, generate_secret())
            with pytest.raises(BlockedDestination):
                await guarded.post(to, request)
    finally:
        await allowed.close()
        await guarded.close()
    assert len(seen.requests) == 1
    assert seen.requests[0][0]["Host"] == f"pinned.test:{port}"


def test_a_header_or_url_that_could_split_the_request_is_refused() -> None:
    to = target("http://127.0.0.1:9/hook", UA)
    with pytest.raises(ValueError, match="line break"):
        to.request({"webhook-id": "evt\r\nX-Injected: 1"}, BODY)
    with pytest.raises(ValueError):
        target("ftp://127.0.0.1/hook", UA)


async def test_https_verifies_the_receiver_s_certificate(tmp_path: Path) -> None:
    """TLS with the URL's host as the server name: a certificate the client trusts is
    served and the answer read; the same receiver under the default trust is refused."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_post("/hook", ok("tls"))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=served).start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    resolver = PinnedResolver(allow_private=True)
    trusting = WebhookClient(
        resolver,
        timeout_s=5,
        connect_timeout_s=2,
        body_limit=4096,
        ssl_context=ssl.create_default_context(cafile=str(cert)),
    )
    default = WebhookClient(resolver, timeout_s=5, connect_timeout_s=2, body_limit=4096)
    try:
        to, request = signed(url, generate_secret())
        answer = await trusting.post(to, request)
        assert (answer.status, answer.body) == (200, b"tls")
        with pytest.raises(ConnectError, match="certificate"):
            await default.post(to, request)
    finally:
        await trusting.close()
        await default.close()
        await runner.cleanup()
