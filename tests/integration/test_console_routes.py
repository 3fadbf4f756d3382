"""The console's server side: GET /v1/me, the pages, their assets and their headers."""

from __future__ import annotations

import re
import uuid

import aiohttp
import pytest

from service.app import Services
from service.console.routes import STATIC_DIR
from tests.conftest import Tenant, new_tenant


async def test_me_names_the_workspace_and_the_scopes_of_the_key(tenant: Tenant) -> None:
    status, body, headers = await tenant.call("GET", "/v1/me")
    assert status == 200, body
    assert body["data"]["workspace_id"] == str(tenant.workspace_id)
    assert body["data"]["key_id"] == str(tenant.key_id)
    assert body["data"]["workspace_name"].startswith("ws-")
    assert body["data"]["scopes"] == [
        "contacts:read",
        "contacts:write",
        "webhooks:manage",
        "audit:read",
    ]
    assert "X-RateLimit-Limit" in headers


async def test_me_needs_no_scope_and_lists_only_the_key_s_own(
    services: Services, api: str, http: aiohttp.ClientSession
) -> None:
    narrow = await new_tenant(services, api, http, ["audit:read", "contacts:read"])
    status, body, _ = await narrow.call("GET", "/v1/me")
    assert status == 200, body
    assert body["data"]["scopes"] == ["contacts:read", "audit:read"]


async def test_me_without_a_valid_key_is_401(api: str, http: aiohttp.ClientSession) -> None:
    for headers in ({}, {"Authorization": f"Bearer cdk_{uuid.uuid4().hex}"}):
        async with http.get(api + "/v1/me", headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_key"


async def test_root_redirects_to_the_console(api: str, http: aiohttp.ClientSession) -> None:
    async with http.get(api + "/", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/console"


async def test_pages_carry_a_strict_content_security_policy(
    api: str, http: aiohttp.ClientSession
) -> None:
    for path in ("/console", "/docs"):
        async with http.get(api + path) as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            csp = dict(
                part.strip().split(" ", 1)
                for part in response.headers["Content-Security-Policy"].split(";")
            )
            assert csp["script-src"] == "'self'", path  # no inline or remote script
            assert csp["default-src"] == "'none'"
            assert csp["connect-src"] == "'self'"
            assert csp["frame-ancestors"] == "'none'"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_every_file_a_page_or_module_names_is_served(
    api: str, http: aiohttp.ClientSession
) -> None:
    """Pages name only local files, and every one of them (and every ES import) answers."""
    wanted: set[str] = set()
    for page in ("console.html", "docs.html"):
        html = (STATIC_DIR / page).read_text()
        refs = re.findall(r'(?:src|href)="([^"#]+)"', html)
        assert all(r.startswith("/") or r.startswith("data:") for r in refs), refs
        wanted |= {r for r in refs if r.startswith("/") and r.count("/") > 1}
    for module in STATIC_DIR.glob("*.js"):
        for name in re.findall(r'from "\./([\w.-]+)"', module.read_text()):
            wanted.add(f"/console/assets/{name}")
    assert "/docs/assets/swagger-ui-bundle.js" in wanted
    for path in sorted(wanted):
        async with http.get(api + path) as response:
            assert response.status == 200, path
            if path.endswith(".js"):
                assert response.content_type == "text/javascript", path


async def test_only_listed_files_are_served(api: str, http: aiohttp.ClientSession) -> None:
    for path in (
        "/console/assets/nothing.js",
        "/console/assets/console.html",
        "/console/assets/%2E%2E%2Froutes.py",
        "/docs/assets/swagger-editor-bundle.js",
        "/docs/assets/index.css",
    ):
        async with http.get(api + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("page", ["/console", "/docs"])
async def test_a_page_typed_with_a_trailing_slash_redirects_to_it(
    api: str, http: aiohttp.ClientSession, page: str
) -> None:
    async with http.get(api + page + "/", allow_redirects=False) as response:
        assert response.status == 301
        assert response.headers["Location"] == page
    async with http.get(api + page + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
    async with http.post(api + page + "/") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
