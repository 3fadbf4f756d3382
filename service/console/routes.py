"""Routes of the console and the API reference: pages, their assets, and ``/`` → ``/console``.

Every page goes out with a strict Content-Security-Policy: scripts and styles only from
this origin, no inline script, no framing, fetches only to this origin. Assets are served
from a fixed allow-list of names (no path from the request ever reaches the file system).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from service.errors import NotFound
from service.routing import Answer, Call, Operation

STATIC_DIR = Path(__file__).with_name("static")

# The console: no inline code at all. `img-src data:` for the favicon only.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
# Swagger UI sets element styles from script (React style props go through the CSSOM, but
# its syntax highlighter writes style attributes), hence 'unsafe-inline' for styles only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'"
)

_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Swagger UI's files used by /docs, from the swagger-ui-py wheel.
_SWAGGER_FILES = frozenset(
    {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"}
)


def swagger_ui_dir() -> Path:
    """The directory of Swagger UI's files inside the installed ``swagger_ui`` package.

    Located without importing the package (its import pulls in template engines we do
    not use). Raises RuntimeError when the package is not installed.
    """
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _headers(csp: str, *, cache: str = "no-cache") -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": cache,
    }


def _file(path: Path, csp: str) -> web.Response:
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        headers=_headers(csp),
    )


def _console_assets() -> dict[str, Path]:
    return {
        p.name: p
        for p in STATIC_DIR.iterdir()
        if p.is_file() and p.suffix in (".js", ".css", ".svg") and not p.name.startswith(".")
    }


async def root(_: Call) -> web.StreamResponse:
    """``/``: a redirect to the console."""
    return web.Response(status=302, headers={"Location": "/console"})


async def console_page(_: Call) -> web.StreamResponse:
    return _file(STATIC_DIR / "console.html", CONSOLE_CSP)


async def docs_page(_: Call) -> web.StreamResponse:
    return _file(STATIC_DIR / "docs.html", DOCS_CSP)


TAG = "Console"
ROUTES: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/",
        root,
        "root",
        "Redirects to the console",
        tag=TAG,
        scope=None,
        answers=(Answer(302, None, "Location: /console"),),
    ),
    Operation(
        "GET",
        "/console",
        console_page,
        "console",
        "The web console: sign in with an API key",
        tag=TAG,
        scope=None,
        answers=(Answer(200, None, "The page", media_type="text/html"),),
    ),
    Operation(
        "GET",
        "/docs",
        docs_page,
        "docs",
        "This document, rendered by Swagger UI",
        tag=TAG,
        scope=None,
        answers=(Answer(200, None, "The page", media_type="text/html"),),
    ),
)
"""The pages (their files are served by `add_asset_routes`)."""

ASSET_PATHS = ("/console/assets/{name}", "/docs/assets/{name}")
"""Files of the pages, by name from an allow-list: not API operations, so not documented."""


def _asset_handler(
    files: dict[str, Path], csp: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def asset(request: web.Request) -> web.Response:
        path = files.get(request.match_info["name"])
        if path is None:
            raise NotFound("no such file")
        return _file(path, csp)

    return asset


PAGE_ALIASES = ("/console/", "/docs/")
"""The pages with a trailing slash, as people type them: a redirect to the page."""


async def _to_page(request: web.Request) -> web.Response:
    return web.Response(status=301, headers={"Location": request.path.rstrip("/")})


def add_asset_routes(app: web.Application) -> None:
    """The console's own files and Swagger UI's (from the swagger-ui-py package), and
    the pages' trailing-slash aliases."""
    for alias in PAGE_ALIASES:
        app.router.add_get(alias, _to_page, allow_head=True)
    swagger = swagger_ui_dir()
    console_assets, docs_assets = ASSET_PATHS
    app.router.add_get(console_assets, _asset_handler(_console_assets(), CONSOLE_CSP))
    app.router.add_get(
        docs_assets, _asset_handler({n: swagger / n for n in _SWAGGER_FILES}, DOCS_CSP)
    )
