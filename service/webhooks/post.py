"""The sender's HTTP/1.1 client: one signed webhook POST per call, on kept-alive connections.

Why not aiohttp's ``ClientSession``: a webhook attempt needs little of it (one method, a
body already in bytes, a handful of headers, no cookies, no redirects, no proxies, no
decompression: the first 4 KiB of the answer, its status and two of its headers), and a
``session.post`` cost ~90 us of the event loop's time per request on this machine where
writing the same request to a kept-alive connection and reading its answer costs ~30 us
(issue 8: in the one-process service the request path was more than half of the
dispatcher's time per delivery, and the drain waited on it).

What it keeps of a careful client:

- **The SSRF pin.** A new connection resolves its host through the sender's
  `PinnedResolver` (every address checked, `ssrf.resolve_checked`) and connects only to
  the addresses it was handed; a literal IP host is checked the same way. Pooled
  connections stay on the address they were opened to. (The dispatcher still calls
  `check_url` before every send, as it did.)
- **Bounds.** The whole attempt (connecting included) within ``timeout_s``, connecting
  within ``connect_timeout_s``: ``TimeoutError``. An answer's head is at most
  ``MAX_HEAD`` bytes; of its body at most ``body_limit`` bytes are kept, and at most
  ``REUSE_BODY_MAX`` are read through to keep the connection (a longer body closes it).
- **HTTP/1.1 framing** (RFC 9112 §6.3): interim 1xx answers skipped; no body for 204, 304
  and 1xx; ``Transfer-Encoding: chunked`` decoded; ``Content-Length``; otherwise the body
  runs to the connection's close. A connection is reused only when the answer was
  HTTP/1.1, did not say ``Connection: close``, was read to its end and nothing followed it.
  Idle connections are closed after ``KEEPALIVE_S`` (aiohttp's default, 15 s).
- **TLS** for https URLs with the default verifying context (``ssl.create_default_context``,
  as aiohttp uses), the URL's host as the server name.
- **No header injection.** A value with CR, LF or NUL is refused (``ValueError``) before
  anything is written, as aiohttp refuses it.

Errors: ``TimeoutError``; `ConnectError` (an ``OSError``: no connection to any checked
address); `BlockedDestination` and ``OSError`` from the resolver; `ProtocolError` (a
``ValueError``: the receiver closed before answering, or answered something that is not
HTTP/1.x). Never anything for a status code: every status is an answer.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp.abc import AbstractResolver
from yarl import URL

from service.webhooks.ssrf import ConnectError

MAX_HEAD = 65536
"""The longest status line and header block read of an answer (bytes)."""
REUSE_BODY_MAX = 65536
"""An answer's body up to this long is read to its end so that its connection is reused;
a longer one is cut at ``body_limit`` and its connection closed."""
KEEPALIVE_S = 15.0
"""An idle connection is closed after this long (aiohttp's default keep-alive)."""
MAX_LINE = 8192
"""The longest chunk-size or trailer line of a chunked body (bytes)."""
_UNSAFE = ("\r", "\n", "\0")
_JOINED = frozenset(("connection", "content-length", "transfer-encoding"))
"""Headers whose repeated lines are read as one list (RFC 9110 §5.3): the framing ones.
Of any other header the first line counts (a Retry-After date has a comma of its own)."""


class ProtocolError(ValueError):
    """The receiver closed the connection before answering, or its answer is not HTTP/1.x."""


class Answer(NamedTuple):
    """A receiver's answer: its status, its headers (names lowercased; of a repeated one
    the first value, but the framing ones', `_JOINED`, joined by ``", "``) and the first
    ``body_limit`` bytes of its body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Target:
    """Where a webhook URL's requests go, parsed once per URL (`target`): the pool key,
    the host to resolve and to name in TLS, and the request's fixed opening lines."""

    tls: bool
    host: str  # as resolved (an IPv6 literal without brackets)
    port: int
    opening: bytes  # "POST <path> HTTP/1.1", Host and the fixed headers, CRLF-ended

    def request(self, headers: Mapping[str, str], body: bytes) -> bytes:
        """The whole request: the opening, these headers, Content-Length and the body.
        ValueError for a header with CR, LF or NUL in its name or value."""
        parts = [self.opening]
        for name, value in headers.items():
            if any(c in value or c in name for c in _UNSAFE):
                raise ValueError(f"the {name} header cannot carry a line break or NUL")
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
        return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def target(url: str, user_agent: str) -> Target:
    """The `Target` of an http(s) URL. ValueError if it is not one with a host, or if it
    would need characters a request line cannot carry."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
        raise ValueError("the URL is not an absolute http(s) URL with a host")
    path = parsed.raw_path_qs or "/"
    authority = parsed.host_port_subcomponent or parsed.raw_host
    opening = (
        f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {user_agent}\r\n"
        "Content-Type: application/json\r\nAccept-Encoding: identity\r\n"
    )
    if any(c in path or c in authority for c in (*_UNSAFE, " ")):
        raise ValueError("the URL has characters that cannot travel in a request line")
    return Target(parsed.scheme == "https", parsed.raw_host, parsed.port, opening.encode("ascii"))


class _Connection(asyncio.Protocol):
    """One connection: what arrived (`buffer`), whether it ended, and a waiter woken by
    news (data, EOF, loss)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more data or the end; ProtocolError if it had already ended."""
        if self.ended:
            raise ProtocolError("the receiver closed the connection in the middle of its answer")
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()


class WebhookClient:
    """Signed POSTs to webhook receivers (module docstring). Close it when done."""

    def __init__(
        self,
        resolver: AbstractResolver,
        *,
        timeout_s: float,
        connect_timeout_s: float | None,
        body_limit: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = resolver
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._body_limit = body_limit
        self._ssl = ssl_context
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._swept = time.monotonic()
        self._closed = False

    async def post(self, to: Target, request: bytes) -> Answer:
        """Send `request` (`Target.request`) to `to` and read the answer, within the
        timeout. Errors: see the module docstring."""
        async with asyncio.timeout(self._timeout_s):
            key = (to.tls, to.host, to.port)
            conn = self._pooled(key)
            if conn is None:
                conn = await self._connect(to)
            try:
                assert conn.transport is not None
                conn.transport.write(request)
                answer, reusable = await self._answer(conn)
            except BaseException:
                conn.close()
                raise
        if reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        return answer

    def _pooled(self, key: tuple[bool, str, int]) -> _Connection | None:
        now = time.monotonic()
        if now - self._swept >= KEEPALIVE_S:
            self._sweep(now)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.ended and not conn.buffer and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    def _sweep(self, now: float) -> None:
        """Close the connections idle for KEEPALIVE_S or closed by their receivers."""
        self._swept = now
        for key, idle in list(self._idle.items()):
            kept = []
            for conn in idle:
                if conn.ended or now - conn.idle_since >= KEEPALIVE_S:
                    conn.close()
                else:
                    kept.append(conn)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    async def _connect(self, to: Target) -> _Connection:
        """A new connection to one of the host's checked addresses (`PinnedResolver`)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            addresses = await self._resolver.resolve(to.host, to.port, socket.AF_UNSPEC)
            failure: OSError | None = None
            for address in addresses:
                try:
                    _transport, conn = await loop.create_connection(
                        lambda: _Connection(loop),
                        address["host"],
                        address["port"],
                        ssl=self._tls() if to.tls else None,
                        server_hostname=to.host if to.tls else None,
                    )
                except OSError as exc:
                    failure = exc
                    continue
                return conn
        raise ConnectError(to.host, to.port, failure)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _answer(self, conn: _Connection) -> tuple[Answer, bool]:
        """Read one answer (interim 1xx ones skipped); whether the connection is reusable."""
        while True:
            version, status, headers = await self._head(conn)
            if status == 101:
                raise ProtocolError("the receiver switched protocols")
            if not 100 <= status < 200:
                break
        keep = version == b"HTTP/1.1" and "close" not in _tokens(headers.get("connection", ""))
        coding = headers.get("transfer-encoding")
        if status in (204, 304):
            body, done = b"", True
        elif coding is not None:
            keep = keep and "content-length" not in headers  # RFC 9112 §6.3: smuggling
            if _tokens(coding)[-1:] == ["chunked"]:
                body, done = await self._chunked(conn)
            else:
                body, done = await self._to_close(conn)
        elif "content-length" in headers:
            lengths = {v.strip() for v in headers["content-length"].split(",")}
            length = lengths.pop() if len(lengths) == 1 else ""
            if not length.isdigit():
                raise ProtocolError("the answer's Content-Length is not one number")
            body, done = await self._sized(conn, int(length))
        else:
            body, done = await self._to_close(conn)
        return Answer(status, headers, body), keep and done and not conn.buffer and not conn.ended

    @staticmethod
    async def _head(conn: _Connection) -> tuple[bytes, int, dict[str, str]]:
        buffer = conn.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEAD:
                raise ProtocolError(f"the answer's head is longer than {MAX_HEAD} bytes")
            if conn.ended and not buffer:
                raise ProtocolError("the receiver closed the connection without answering")
            await conn.more()
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        first = lines[0].split(b" ", 2)
        if len(first) < 2 or not first[0].startswith(b"HTTP/1.") or not first[1].isdigit():
            raise ProtocolError("the answer is not HTTP/1.x")
        status = int(first[1])
        if not 100 <= status <= 999:
            raise ProtocolError("the answer's status is not a 3-digit code")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError("the answer has a malformed header line")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            if key not in headers:
                headers[key] = text
            elif key in _JOINED:
                headers[key] = f"{headers[key]}, {text}"
        return first[0], status, headers

    async def _sized(self, conn: _Connection, length: int) -> tuple[bytes, bool]:
        """A body of `length` bytes: read through (and the connection kept) up to
        REUSE_BODY_MAX, else its first `body_limit` bytes."""
        buffer = conn.buffer
        want = length if length <= REUSE_BODY_MAX else min(length, self._body_limit)
        while len(buffer) < want and not conn.ended:
            await conn.more()
        body = bytes(buffer[: min(length, self._body_limit)])
        if len(buffer) >= length:
            del buffer[:length]
            return body, True
        return body, False

    async def _to_close(self, conn: _Connection) -> tuple[bytes, bool]:
        """A body that runs to the connection's close: what came of it, once there is
        any (or the end), up to `body_limit` bytes. The connection is not kept."""
        buffer = conn.buffer
        while not buffer and not conn.ended:
            await conn.more()
        return bytes(buffer[: self._body_limit]), False

    async def _chunked(self, conn: _Connection) -> tuple[bytes, bool]:
        """A chunked body, decoded: read to its last chunk (and the connection kept) up
        to REUSE_BODY_MAX, else cut at `body_limit`."""
        buffer = conn.buffer
        kept = bytearray()
        total = 0
        while True:
            line = await self._line(conn)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("the answer has a malformed chunk size") from None
            if size == 0:
                trailer = await self._line(conn)
                while trailer:  # the trailer fields, up to an empty line
                    trailer = await self._line(conn)
                return bytes(kept), True
            total += size
            if total > REUSE_BODY_MAX:
                need = max(0, min(size, self._body_limit - len(kept)))
                while len(buffer) < need and not conn.ended:
                    await conn.more()
                kept += buffer[:need]
                return bytes(kept), False
            while len(buffer) < size + 2:
                await conn.more()
            if buffer[size : size + 2] != b"\r\n":
                raise ProtocolError("the answer has a malformed chunk")
            if len(kept) < self._body_limit:
                kept += buffer[: min(size, self._body_limit - len(kept))]
            del buffer[: size + 2]

    @staticmethod
    async def _line(conn: _Connection) -> bytes:
        buffer = conn.buffer
        while (end := buffer.find(b"\r\n")) < 0:
            if len(buffer) > MAX_LINE:
                raise ProtocolError("the answer has a chunk line that is too long")
            await conn.more()
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line

    async def close(self) -> None:
        """Close every idle connection; requests under way close theirs as they end."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # the transports' close callbacks run


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]
