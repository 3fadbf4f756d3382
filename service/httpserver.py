"""The HTTP server under the API: the answers aiohttp gives by itself, in the envelope.

aiohttp answers some requests before the app's middlewares (service.http) see them: one it
cannot parse (a header line over 8 KB, too many headers, an invalid method, a malformed
request line or URL, broken chunked encoding or Content-Length) with a ``text/plain`` 400
from ``RequestHandler.handle_error``; an ``Expect`` other than ``100-continue`` with a
``text/plain`` 417 from the router's expect handler; and anything that escapes the app with
a ``text/plain`` 500. `EnvelopeRunner` serves an app with all of them in the error envelope
(``{"error": {"code", "message", "details"}}``) with an ``X-Request-ID``, one log line
(``http_protocol_error``: status, code and the part that was wrong, never a header value:
aiohttp's own messages quote the offending bytes, an ``Authorization`` line among them) and
one count in ``http_requests_total`` (route ``unparsed``).

- the request line (method and URL) over `MAX_REQUEST_LINE_BYTES`: 414 ``uri_too_long``;
- a header field over `MAX_HEADER_FIELD_BYTES`, or more than `MAX_HEADERS` of them: 431
  ``header_too_large``;
- anything else that is not HTTP/1.1 (method, version, URL, header syntax, body framing):
  400 ``malformed_request``, ``details.part`` naming the part.

The hooks (``RequestHandler.handle_error``, ``Server.__call__``, ``AppRunner._make_server``)
are aiohttp's internals: they are used here and nowhere else, pyproject.toml pins the
aiohttp versions they were checked against, and tests/integration/test_protocol_errors.py
sends every member over a raw socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from service.errors import HeaderTooLarge, MalformedRequest, ServiceError, UriTooLong
from service.http import REQUEST_ID_HEADER, error_response, from_http_exception, new_request_id
from service.logs import get_logger
from service.metrics import Metrics

log = get_logger(__name__)

# The request line (method, target, version) and one header field (name and value), in
# bytes. They differ by design: aiohttp's LineTooLong says only which limit it crossed.
MAX_REQUEST_LINE_BYTES = 8192
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADERS = 128
# What aiohttp's parser says when there are more than MAX_HEADERS fields.
_TOO_MANY_HEADERS = "Too many headers"

Report = Callable[[int], None]


def protocol_error(exc: BaseException | None) -> tuple[ServiceError, str]:
    """The envelope's error for a request aiohttp could not parse, and the part of the
    request that was wrong (request_line, url, header, body): logged, and in ``details``."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE_BYTES,):
            error: ServiceError = UriTooLong(
                f"the request line is over {MAX_REQUEST_LINE_BYTES} bytes",
                {"max_bytes": MAX_REQUEST_LINE_BYTES},
            )
            return error, "request_line"
        error = HeaderTooLarge(
            f"a header field is over {MAX_HEADER_FIELD_BYTES} bytes (name and value)",
            {"max_bytes": MAX_HEADER_FIELD_BYTES},
        )
        return error, "header"
    if isinstance(exc, HttpProcessingError) and exc.message.startswith(_TOO_MANY_HEADERS):
        error = HeaderTooLarge(
            f"more than {MAX_HEADERS} header fields", {"max_headers": MAX_HEADERS}
        )
        return error, "header"
    if isinstance(exc, BadStatusLine):  # BadHttpMethod among them
        part = "method" if isinstance(exc, BadHttpMethod) else "request_line"
        return _malformed(f"the request line is not valid HTTP/1.1 (its {part})", part), part
    if isinstance(exc, InvalidURLError):
        return _malformed("the request target is not a valid URL", "url"), "url"
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    part = "body" if any(w in text for w in ("chunk", "Content-Length", "Transfer")) else "header"
    return _malformed(f"the request is not valid HTTP/1.1 (its {part})", part), part


def _malformed(message: str, part: str) -> MalformedRequest:
    return MalformedRequest(message, {"part": part})


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, with its own error answers in the envelope."""

    def __init__(self, *args: Any, report: Report, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report = report

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A parse error (status 400) or a failure outside the app (500, 504) as the
        envelope; the connection is closed after it, as aiohttp does."""
        if request.writer.output_size > 0:
            # Part of an answer already went out: no second one can follow.
            raise ConnectionError("response already started")
        if status == 400:
            error, part = protocol_error(exc)
        else:
            error, part = ServiceError("an unexpected error occurred"), "server"
            error.status = status
        rid = new_request_id(request)
        log.info(
            "http_protocol_error",
            status=error.status,
            code=error.code,
            part=part,
            error=type(exc).__name__ if exc is not None else None,
            request_id=rid,
        )
        self._report(error.status)
        response = error_response(error)
        response.headers[REQUEST_ID_HEADER] = rid
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    """`web.Server` whose connections are `EnvelopeRequestHandler`s."""

    report: Report

    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(
            self,
            loop=self._loop,
            report=self.report,
            **self._kwargs,
        )


class EnvelopeRunner(web.AppRunner):
    """`web.AppRunner` for the service's apps: aiohttp's own answers in the envelope (see
    the module), and the request-line and header limits above."""

    def __init__(self, app: web.Application, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(
            app,
            access_log=None,
            handle_signals=False,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=MAX_HEADER_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            **kwargs,
        )
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        inner = server.request_handler

        async def enveloped(request: web.BaseRequest) -> web.StreamResponse:
            # An HTTPException raised before the middlewares (the expect handler's 417)
            # or past them would leave as aiohttp's text/plain: it gets the envelope too.
            try:
                return await inner(request)
            except web.HTTPException as exc:
                error = from_http_exception(exc, request.path)
            response = error_response(error)
            response.headers[REQUEST_ID_HEADER] = new_request_id(request)
            log.info("http_refused_before_app", status=error.status, code=error.code)
            self._report(error.status)
            return response

        server.request_handler = enveloped
        server.__class__ = _EnvelopeServer
        assert isinstance(server, _EnvelopeServer)
        server.report = self._report
        return server

    def _report(self, status: int) -> None:
        self._metrics.requests.labels("unknown", "unparsed", str(status)).inc()
