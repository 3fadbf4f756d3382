"""The SSRF guard: only public addresses receive webhooks unless private ones are allowed.

Hostnames other than ``localhost`` are resolved by a fake resolver (there is no network
here); literal addresses and ``localhost`` go through the real system resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from service.webhooks.ssrf import (
    MAX_URL_LENGTH,
    BlockedDestination,
    PinnedResolver,
    check_url,
    is_public_address,
    resolve_checked,
    validate_endpoint_url,
)

FAKE_DNS: dict[str, list[str]] = {
    "internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "loopback6.example": ["::1"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"],
    "mixed-v6.example": ["2606:4700::1111", "fd12::1"],
    "public.example": ["93.184.216.34", "2606:4700::1111"],
    "public-dupes.example": ["8.8.8.8", "8.8.8.8"],
    "empty.example": [],
    "pinned.test": ["127.0.0.1"],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    """A DNS that knows only FAKE_DNS."""
    try:
        return list(FAKE_DNS[host])
    except KeyError:
        raise socket.gaierror(socket.EAI_NONAME, f"unknown host {host}") from None


async def no_dns(host: str, port: int) -> list[str]:
    """A resolver that must not be asked: literal addresses need no DNS."""
    raise AssertionError(f"DNS was asked about {host!r}")


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


NON_PUBLIC_V4 = [
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.0.1",
    "169.254.169.254",  # cloud metadata
    "0.0.0.0",
    "0.1.2.3",
    "100.64.0.1",
    "100.127.255.254",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "198.18.0.1",
    "198.19.255.254",
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "192.0.0.9",
    "192.88.99.1",
]
NON_PUBLIC_V6 = [
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12::1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::1",  # local-use NAT64
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2001::1",  # Teredo
    "2001:db8::1",
    "3fff::1",
    "100::1",
    "::a00:1",  # deprecated IPv4-compatible
    "::808:808",  # even when it embeds a public address
    "4000::1",  # outside 2000::/3
]
PUBLIC = [
    "93.184.216.34",
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::",
]
ODD_LOOPBACK_FORMS = [
    "2130706433",
    "0x7f000001",
    "127.1",
    "017700000001",
    "0x7f.0.0.1",
    "0177.0.0.1",
]


def test_enough_non_public_addresses_are_covered() -> None:
    assert len(set(NON_PUBLIC_V4 + NON_PUBLIC_V6)) >= 30


@pytest.mark.parametrize("address", NON_PUBLIC_V4 + NON_PUBLIC_V6)
def test_non_public_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_global_unicast_addresses_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", NON_PUBLIC_V4 + NON_PUBLIC_V6)
async def test_a_url_with_a_non_public_literal_address_is_refused(address: str) -> None:
    with pytest.raises(BlockedDestination) as refused:
        await check_url(f"http://{_url_host(address)}:8080/hook", allow_private=False)

    assert refused.value.address == str(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", NON_PUBLIC_V4 + NON_PUBLIC_V6)
async def test_literal_addresses_are_judged_without_dns(address: str) -> None:
    with pytest.raises(BlockedDestination):
        await check_url(f"https://{_url_host(address)}/", allow_private=False, resolver=no_dns)


@pytest.mark.parametrize("host", ODD_LOOPBACK_FORMS)
async def test_odd_spellings_of_loopback_are_refused(host: str) -> None:
    with pytest.raises(BlockedDestination) as refused:
        await check_url(f"http://{host}/", allow_private=False)

    assert refused.value.address == "127.0.0.1"


@pytest.mark.parametrize("host", ODD_LOOPBACK_FORMS)
async def test_odd_spellings_are_read_as_the_system_resolver_reads_them(host: str) -> None:
    """The guard reads them without DNS; getaddrinfo must agree on the address."""
    system = {info[4][0] for info in socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)}

    checked = await resolve_checked(host, 80, allow_private=True, resolver=no_dns)

    assert set(checked) == system == {"127.0.0.1"}


async def test_localhost_is_refused() -> None:
    with pytest.raises(BlockedDestination) as refused:
        await check_url("http://localhost:8080/hook", allow_private=False)

    assert refused.value.host == "localhost"
    assert not is_public_address(ipaddress.ip_address(refused.value.address))


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("internal.example", "10.0.0.5"),
        ("metadata.example", "169.254.169.254"),
        ("loopback6.example", "::1"),
        ("mixed.example", "10.0.0.5"),
        ("mixed-v6.example", "fd12::1"),
    ],
)
async def test_a_name_resolving_to_any_non_public_address_is_refused(
    host: str, address: str
) -> None:
    with pytest.raises(BlockedDestination) as refused:
        await check_url(f"https://{host}/hook", allow_private=False, resolver=fake_resolve)

    assert refused.value.host == host
    assert refused.value.address == address
    assert host in str(refused.value)
    # The text a key holder can read never says what the name resolved to.
    assert address not in str(refused.value)


@pytest.mark.parametrize("address", PUBLIC)
async def test_a_public_literal_address_passes(address: str) -> None:
    await check_url(f"https://{_url_host(address)}/hook", allow_private=False, resolver=no_dns)


async def test_a_name_resolving_only_to_public_addresses_passes() -> None:
    await check_url("https://public.example/hook", allow_private=False, resolver=fake_resolve)

    checked = await resolve_checked(
        "public.example", 443, allow_private=False, resolver=fake_resolve
    )
    assert checked == ["93.184.216.34", "2606:4700::1111"]


async def test_duplicate_answers_are_returned_once() -> None:
    checked = await resolve_checked(
        "public-dupes.example", 443, allow_private=False, resolver=fake_resolve
    )

    assert checked == ["8.8.8.8"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/",
        "http://[::1]/",
        "http://localhost/",
        "http://2130706433/",
        "https://internal.example/",
        "https://mixed.example/",
    ],
)
async def test_allow_private_lets_private_destinations_through(url: str) -> None:
    resolver = fake_resolve if ".example" in url else None  # localhost: the real one
    await check_url(url, allow_private=True, resolver=resolver)


async def test_allow_private_still_returns_the_checked_addresses() -> None:
    checked = await resolve_checked("0x7f.0.0.1", 80, allow_private=True)

    assert checked == ["127.0.0.1"]


async def test_a_name_that_does_not_resolve_is_an_os_error() -> None:
    with pytest.raises(OSError):
        await check_url("https://nowhere.example/", allow_private=False, resolver=fake_resolve)
    with pytest.raises(OSError, match="no address"):
        await check_url("https://empty.example/", allow_private=False, resolver=fake_resolve)


@pytest.mark.parametrize("url", ["ftp://x/", "/relative", "http://", "javascript:alert(1)"])
async def test_check_url_refuses_what_is_not_an_http_url(url: str) -> None:
    with pytest.raises(ValueError):
        await check_url(url, allow_private=True, resolver=no_dns)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/webhooks",
        "http://example.com:8080/hooks?source=crm",
        "HTTPS://Example.COM/Hook",
        "https://[2606:4700::1111]/hook",
        "http://127.0.0.1:9000/",  # the form is fine; the address is check_url's business
        "http://[::ffff:127.0.0.1]:9000/",  # an IPv6 literal ending in a dotted quad
        "https://1password.example/hook",  # a label that starts with digits, not the last
        "https://hooks.example.com.:8443/",
        "https://xn--bcher-kva.example/hook",
        "https://invalid.example.com/hook",  # "invalid" as a label, not the top-level name
        "http://localhost.test:1/hook",
        "https://example.com/" + "a" * (MAX_URL_LENGTH - len("https://example.com/")),
    ],
)
def test_validate_endpoint_url_accepts_absolute_http_urls(url: str) -> None:
    assert validate_endpoint_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("/relative", "absolute"),
        ("example.com/hook", "missing scheme"),
        ("", "absolute"),
        ("http://", "no host"),
        ("http://user:pw@host/", "credentials"),
        ("http://user@host/", "credentials"),
        ("http://@host/", "credentials"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\nX-Injected: 1", "whitespace"),
        ("http://exa!mple.com/", "host"),
        ("http://host:99999/", "not a valid URL"),
        ("http://127.0.0.1:0/x", "port 0"),
        ("https://hooks.example.com/in#crm", "fragment"),
        ("https://hooks.example.com/in#", "fragment"),
        ("https://hooks.example.com:0/", "port 0"),
        ("https://hooks.invalid/x", "never resolves"),
        ("https://a.b.INVALID./x", "never resolves"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, "longer than 2048"),
        # IPv4 shorthands (WHATWG "ends in a number"): accepted, then every attempt failed
        # ("127.1 - is not a canonical IPv4 address") until the endpoint was disabled.
        ("http://127.1:18200/x", "shorthand"),
        ("http://2130706433:18200/x", "shorthand"),
        ("http://0x7f000001/x", "shorthand"),
        ("http://0x7f.0.0.1/x", "shorthand"),
        ("http://0177.0.0.1/x", "shorthand"),
        ("http://127.000.0.1/x", "shorthand"),
        ("http://127.0.0.1./x", "shorthand"),
        ("http://hooks.example.1/x", "shorthand"),
    ],
)
def test_validate_endpoint_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_endpoint_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # a URL parser reads these host:port shapes as a scheme ("127.0.0.1", "localhost"):
        # the answer was "the URL scheme must be http or https, not '127.0.0.1'"
        ("127.0.0.1:9001/x", "missing scheme: use http://127.0.0.1:9001/… (or https://)"),
        ("localhost:8000", "missing scheme: use http://localhost:8000 (or https://)"),
        ("hooks.example.com:443/in?t=1", "missing scheme: use http://hooks.example.com:443/…"),
        ("[::1]:80/x", "missing scheme: use http://[::1]:80/… (or https://)"),
        # and these as URLs without a scheme, or with a scheme but no host
        ("//host/x", "missing scheme: use http://host/… (or https://)"),
        ("host/x", "missing scheme: use http://host/… (or https://)"),
        ("example.com", "missing scheme: use http://example.com (or https://)"),
        ("http//host/x", "missing ':' after 'http': use http://host/…"),
        ("https:host/x", "missing // after 'https:': use https://host/…"),
        ("http:/host/x", "missing // after 'http:': use http://host/…"),
        ("http:\\\\host\\x", "missing // after 'http:': use http://host/…"),
        ("http:", "the URL has no host"),
        ("http:///x", "the URL has no host"),
    ],
)
def test_a_url_that_parses_oddly_is_refused_for_what_it_lacks(url: str, message: str) -> None:
    """Each refusal names what the URL lacks and shows the host with the scheme it needs,
    never what a parser made of it (a scheme "127.0.0.1"), nor the URL's path or query."""
    with pytest.raises(ValueError) as refused:
        validate_endpoint_url(url)
    assert str(refused.value).startswith(message), str(refused.value)
    assert "t=1" not in str(refused.value) and "/x" not in str(refused.value)


def test_an_odd_url_never_shows_its_credentials() -> None:
    with pytest.raises(ValueError) as refused:
        validate_endpoint_url("//user:secret@host/x")
    assert str(refused.value) == "missing scheme: use http://host/… (or https://)"


async def test_pinned_resolver_returns_exactly_the_checked_addresses() -> None:
    resolver = PinnedResolver(allow_private=False, resolver=fake_resolve)

    any_family = await resolver.resolve("public.example", 443, family=socket.AF_UNSPEC)
    only_v4 = await resolver.resolve("public.example", 443, family=socket.AF_INET)
    only_v6 = await resolver.resolve("public.example", 443, family=socket.AF_INET6)

    assert [r["host"] for r in any_family] == ["93.184.216.34", "2606:4700::1111"]
    assert [(r["host"], r["family"]) for r in only_v4] == [("93.184.216.34", socket.AF_INET)]
    assert [(r["host"], r["family"]) for r in only_v6] == [("2606:4700::1111", socket.AF_INET6)]
    assert all(r["hostname"] == "public.example" and r["port"] == 443 for r in any_family)
    await resolver.close()


async def test_pinned_resolver_without_an_address_of_the_family_is_an_os_error() -> None:
    resolver = PinnedResolver(allow_private=True, resolver=fake_resolve)

    with pytest.raises(OSError, match="AF_INET6"):
        await resolver.resolve("internal.example", 443, family=socket.AF_INET6)


@pytest.fixture
async def local_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A real aiohttp server on 127.0.0.1; yields its port and the Host headers it saw."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.host)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def test_pinned_resolver_connects_aiohttp_to_the_checked_address(
    local_server: tuple[int, list[str]],
) -> None:
    port, seen = local_server
    asked: list[tuple[str, int]] = []

    async def recording_resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return await fake_resolve(host, port)

    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(allow_private=True, resolver=recording_resolve)
    )
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://pinned.test:{port}/") as response,
    ):
        assert response.status == 200
        assert await response.text() == "ok"

    # "pinned.test" exists only in the fake DNS: the connection went to its checked answer.
    assert asked == [("pinned.test", port)]
    assert seen == [f"pinned.test:{port}"]


async def test_pinned_resolver_refuses_a_private_answer_before_connecting(
    local_server: tuple[int, list[str]],
) -> None:
    port, seen = local_server
    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(allow_private=False, resolver=fake_resolve)
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        # aiohttp lets the resolver's exception through as it is (it wraps only OSError).
        with pytest.raises(BlockedDestination) as refused:
            await session.get(f"http://pinned.test:{port}/")

    assert refused.value.host == "pinned.test"
    assert refused.value.address == "127.0.0.1"
    assert seen == []


async def test_aiohttp_skips_the_resolver_for_literal_ips_so_check_url_is_needed(
    local_server: tuple[int, list[str]],
) -> None:
    """Why the sender calls check_url before every request, PinnedResolver or not."""
    port, _seen = local_server
    url = f"http://127.0.0.1:{port}/"
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(allow_private=False, resolver=no_dns))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as response,
    ):
        assert response.status == 200

    with pytest.raises(BlockedDestination):
        await check_url(url, allow_private=False)
