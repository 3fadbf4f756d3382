"""The SSRF guard: webhooks go only to public addresses, unless the operator allows private ones.

A webhook URL is chosen by a user, and the dispatcher POSTs to it from inside our network,
so a URL naming (or resolving to) ``127.0.0.1``, ``10.x``, ``169.254.169.254`` (cloud
metadata) and the like would let that user reach our internals. Three layers close this:

- ``validate_endpoint_url`` (pure) refuses what is not an absolute http(s) URL with a host
  and no credentials, when an endpoint is created or changed.
- ``check_url`` is called by the sender before every request. It resolves the host and
  refuses it if ANY address is not public. It is what covers literal IP hosts (in every
  spelling: ``[::1]``, ``2130706433``, ``0x7f.0.0.1``, ``127.1``), for which aiohttp never
  calls a resolver.
- ``PinnedResolver`` is the resolver of the sender's HTTP client
  (``service.webhooks.post.WebhookClient``, which asks it for literal IP hosts too; it
  also works as an aiohttp connector's). It checks the DNS answer and hands the client
  exactly the addresses it checked, so the connection goes to a checked address: a second
  DNS answer (DNS rebinding) never gets a say.

Only global unicast passes ``is_public_address``; the tables below name every range that
is refused, so the decision does not depend on which Python patch release the service runs
on (``ipaddress``'s notion of ``is_private``/``is_global`` changed within 3.11 and 3.12).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""A DNS lookup: ``(host, port)`` to the host's addresses as strings."""

MAX_URL_LENGTH = 2048

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Every IPv4 range that is not global unicast (IANA special-purpose registry, RFC 6890).
_V4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "'this network' 0.0.0.0/8"),
    (_V4("10.0.0.0/8"), "private 10.0.0.0/8"),
    (_V4("100.64.0.0/10"), "shared address space (carrier-grade NAT) 100.64.0.0/10"),
    (_V4("127.0.0.0/8"), "loopback 127.0.0.0/8"),
    (_V4("169.254.0.0/16"), "link-local 169.254.0.0/16 (incl. cloud metadata)"),
    (_V4("172.16.0.0/12"), "private 172.16.0.0/12"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments 192.0.0.0/24"),
    (_V4("192.0.2.0/24"), "documentation 192.0.2.0/24"),
    (_V4("192.88.99.0/24"), "6to4 relay anycast 192.88.99.0/24"),
    (_V4("192.168.0.0/16"), "private 192.168.0.0/16"),
    (_V4("198.18.0.0/15"), "benchmarking 198.18.0.0/15"),
    (_V4("198.51.100.0/24"), "documentation 198.51.100.0/24"),
    (_V4("203.0.113.0/24"), "documentation 203.0.113.0/24"),
    (_V4("224.0.0.0/4"), "multicast 224.0.0.0/4"),
    (_V4("255.255.255.255/32"), "broadcast 255.255.255.255"),
    (_V4("240.0.0.0/4"), "reserved 240.0.0.0/4"),
)

# IPv6 ranges that embed an IPv4 address; the destination is judged by that address.
_NAT64 = _V6("64:ff9b::/96")
_SIX_TO_FOUR = _V6("2002::/16")
_GLOBAL_UNICAST = _V6("2000::/3")

_V6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified ::"),
    (_V6("::1/128"), "loopback ::1"),
    # Also the deprecated IPv4-compatible ::a.b.c.d, refused whatever it embeds.
    (_V6("::/8"), "reserved ::/8"),
    (_V6("64:ff9b:1::/48"), "local-use NAT64 64:ff9b:1::/48"),
    (_V6("100::/64"), "discard-only 100::/64"),
    (_V6("2001::/32"), "Teredo 2001::/32"),
    (_V6("2001:db8::/32"), "documentation 2001:db8::/32"),
    (_V6("3fff::/20"), "documentation 3fff::/20"),
    (_V6("fc00::/7"), "unique-local fc00::/7"),
    (_V6("fe80::/10"), "link-local fe80::/10"),
    (_V6("fec0::/10"), "site-local fec0::/10"),
    (_V6("ff00::/8"), "multicast ff00::/8"),
)

# Characters that may spell an IPv4 address in inet_aton's legacy forms (hex, octal,
# fewer than four parts). Checked first because inet_aton ignores trailing junk after
# whitespace ("1.2.3.4 x").
_LEGACY_IPV4 = re.compile(r"[0-9A-Fa-fXx.]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ConnectError(OSError):
    """No connection could be made to any of a webhook host's checked addresses: `error`
    is the last attempt's (None when there was no address to try)."""

    def __init__(self, host: str, port: int, error: OSError | None) -> None:
        why = "no address to connect to"
        if error is not None:
            why = error.strerror or str(error) or type(error).__name__
        super().__init__(f"could not connect to {host}:{port}: {why}")
        self.host = host
        self.port = port
        self.error = error


class BlockedDestination(Exception):
    """A webhook destination that resolves to an address that is not public."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        # The text never names the address: a key holder would read internal DNS answers
        # in the delivery log. `address` and `reason` stay on the object for our own logs.
        super().__init__(
            f"the destination {host!r} is not allowed: it is, or resolves to, an address "
            "that is not public"
        )
        self.host = host
        self.address = address
        self.reason = reason


def _why_not_public(ip: Address) -> str | None:
    """Why ``ip`` is not a public address, or None when it is global unicast."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # drop any %scope: ranges are what matter
        embedded: ipaddress.IPv4Address | None = None
        kind = ""
        if ip.ipv4_mapped is not None:
            embedded, kind = ip.ipv4_mapped, "IPv4-mapped"
        elif ip in _NAT64:
            embedded, kind = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
        elif ip.sixtofour is not None:
            embedded, kind = ip.sixtofour, "6to4"
        if embedded is not None:
            why = _why_not_public(embedded)
            return None if why is None else f"{kind} {embedded}: {why}"
        for net6, why in _V6_REFUSED:
            if ip in net6:
                return why
        if ip not in _GLOBAL_UNICAST:
            return "outside global unicast 2000::/3"
    else:
        for net4, why in _V4_REFUSED:
            if ip in net4:
                return why
    # Belt and braces: whatever this Python's ipaddress also knows to be special.
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "not globally reachable"
    return None


def is_public_address(ip: Address) -> bool:
    """True only for global unicast addresses; IPv4 embedded in IPv6 is judged as IPv4."""
    return _why_not_public(ip) is None


def _literal_address(host: str) -> Address | None:
    """The address a host names literally (no DNS), in any spelling, or None for a name."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        host = host.replace("%25", "%")  # a zone id as it is percent-encoded in a URL
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host)
    if _LEGACY_IPV4.fullmatch(host):
        # 2130706433, 0x7f.0.0.1, 127.1, 017700000001: getaddrinfo reads them all as an
        # IPv4 address, through inet_aton, so read them the same way here.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


async def _system_resolve(host: str, port: int) -> list[str]:
    """The operating system's lookup of ``host``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for _family, _type, _proto, _canonname, sockaddr in infos]


async def resolve_checked(
    host: str,
    port: int,
    *,
    allow_private: bool,
    resolver: Resolve | None = None,
) -> list[str]:
    """Resolve ``host`` and return its addresses, refusing it if ANY is not public.

    A literal IP host (bracketed IPv6, or IPv4 in any form inet_aton accepts) is taken
    as it is, without DNS. ``resolver`` defaults to the operating system's getaddrinfo.
    Raises BlockedDestination (unless ``allow_private``), OSError when the name does not
    resolve, ValueError when the host is empty or the resolver answers a non-address.
    The addresses are returned in canonical form, without duplicates.
    """
    if not host:
        raise ValueError("no host to resolve")
    literal = _literal_address(host)
    if literal is not None:
        addresses: list[Address] = [literal]
    else:
        answer = await (resolver or _system_resolve)(host, port)
        addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in answer))
        if not addresses:
            raise OSError(f"no address found for {host!r}")
    if not allow_private:
        for ip in addresses:
            why = _why_not_public(ip)
            if why is not None:
                raise BlockedDestination(host, str(ip), why)
    return [str(ip) for ip in addresses]


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986 §3.1
_PORT_FIRST = re.compile(r"\d+(?:[/?#]|$)")
_HTTP_WITHOUT_COLON = re.compile(r"(?i)(https?)(//.*)")
_NOT_ABSOLUTE = "the URL must be absolute, like https://example.com/webhooks"
_NO_HOST = "the URL has no host: give one after //, like https://example.com/webhooks"


def _shape_problem(url: str) -> str | None:
    """What is wrong with `url`, if it has one of the shapes a URL parser reads as something
    else than was meant, named as what it lacks (a parser reads ``127.0.0.1:9001/x`` as
    the scheme ``127.0.0.1``, ``localhost:8000`` as the scheme ``localhost``, and
    ``//host/x``, ``host/x`` and ``http:/host/x`` as URLs without a scheme or a host).

    The advice shows the URL's host and port with the scheme it needs, and never the
    rest of it (where a receiver's token often is) nor any ``user:password@``."""
    if not url or (url[0] in "/\\" and not url.startswith("//")):
        return _NOT_ABSOLUTE  # a path alone
    scheme, colon, rest = url.partition(":")
    if without_colon := _HTTP_WITHOUT_COLON.fullmatch(url):  # "http//host/x"
        scheme = without_colon[1].lower()
        return _with_scheme(f"missing ':' after {scheme!r}", without_colon[2], scheme)
    if not colon or not _SCHEME.fullmatch(scheme) or _PORT_FIRST.match(rest):
        # "host/x", "//host/x", "127.0.0.1:9001/x", "localhost:8000", "[::1]:80/x"
        return _with_scheme("missing scheme", url, "http")
    if scheme.lower() in ("http", "https") and not rest.startswith("//"):
        scheme = scheme.lower()  # "https:host/x", "http:/host/x"
        return _with_scheme(f"missing // after '{scheme}:'", rest, scheme)
    return None


def _with_scheme(problem: str, rest: str, scheme: str) -> str:
    """`problem`, and the URL's host and port after `scheme` (and https for http)."""
    text = rest.lstrip("/\\")
    authority = re.split(r"[/?#\\]", text, maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    if not host:
        return _NO_HOST
    tail = "/…" if len(text) > len(authority) else ""
    other = " (or https://)" if scheme == "http" else ""
    return f"{problem}: use {scheme}://{host}{tail}{other}"


def _parse_http_url(url: str) -> tuple[URL, str, int]:
    """``url`` parsed, with its host and port, if it is an absolute http(s) URL with a host.

    Raises ValueError otherwise, saying what the URL lacks (`_shape_problem`).
    """
    problem = _shape_problem(url)
    if problem is not None:
        raise ValueError(problem)
    try:
        parsed = URL(url)
        port = parsed.port  # yarl checks the port's range only when it is read
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"the URL scheme must be http or https, not {parsed.scheme!r}")
    if not parsed.raw_host or port is None:
        raise ValueError(_NO_HOST)
    return parsed, parsed.raw_host, port


def validate_endpoint_url(url: str) -> str:
    """Check a webhook endpoint URL's form and return it unchanged; ValueError if bad.

    It must be an absolute http or https URL with a host, without credentials, at most
    2048 characters, without whitespace or control characters, on a port that can be
    connected to (1 to 65535: port 0 cannot, RFC 6335 §6), without a ``#fragment`` (a
    client never sends it, RFC 9110 §4.2.5: it would only mislead), and not under ``.invalid``
    (RFC 6761 §6.4: such names never resolve). Whether the host resolves to a public
    address is not checked here (that is ``check_url``, at send time).
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ValueError("the URL contains whitespace or control characters")
    parsed, host, port = _parse_http_url(url)
    if "#" in url:  # an unescaped "#" can only start a fragment
        raise ValueError("the URL has a #fragment, which is never sent: leave it out")
    if port == 0:
        raise ValueError("the URL's port 0 cannot be connected to: give a port from 1 to 65535")
    if host.rstrip(".").lower().rsplit(".", 1)[-1] == "invalid":
        raise ValueError("a host under .invalid never resolves (RFC 6761): give a real host")
    authority = re.split(r"[/?#]", url.split("://", 1)[-1], maxsplit=1)[0]
    if "@" in authority or parsed.raw_user is not None or parsed.raw_password is not None:
        raise ValueError("the URL must not carry credentials (user:password@)")
    if _numeric_host(host) and not _canonical_ipv4(host):
        raise ValueError(
            f"the URL host {host!r} is an IPv4 address in a shorthand form (WHATWG URL reads"
            " it as one; the webhook client does not connect to it): write it as four"
            " decimal numbers, like 192.0.2.1"
        )
    if _literal_address(host) is None and not _HOST_NAME.fullmatch(host):
        raise ValueError(f"the URL host {host!r} is not a valid host name")
    return url


# The WHATWG URL Standard's "ends in a number": a host whose last label is decimal digits
# or 0x-hex is an IPv4 address, in any of its shorthand forms (127.1, 2130706433,
# 0x7f.1, 0177.0.0.1). Only the canonical dotted quad means the same to every parser.
_NUMBER_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def _numeric_host(host: str) -> bool:
    """Whether a host (not an IPv6 literal) ends in a number (WHATWG URL, "host parsing")."""
    if ":" in host:
        return False
    labels = host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    return _NUMBER_LABEL.fullmatch(labels[-1]) is not None


def _canonical_ipv4(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


async def check_url(url: str, *, allow_private: bool, resolver: Resolve | None = None) -> None:
    """Refuse ``url`` (BlockedDestination) if its host is, or resolves to, a non-public address.

    The sender calls this before every request: it is the check for literal IP hosts,
    which aiohttp connects to without asking ``PinnedResolver``. ValueError when the URL
    is not an absolute http(s) URL with a host; OSError when the host does not resolve.
    """
    _parsed, host, port = _parse_http_url(url)
    await resolve_checked(host, port, allow_private=allow_private, resolver=resolver)


_IPV4_TEXT = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
_IPV6_TEXT = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def failure_text(exc: BaseException, url: str) -> str:
    """What a failed POST leaves in the delivery log, without the addresses tried.

    Connection errors name the address a host resolved to ("Connect call failed
    ('10.1.2.3', 443)"); that is internal DNS, so any address other than the URL's own
    literal host is replaced by ``<address>``.
    """
    try:
        host = URL(url).raw_host or ""
    except ValueError:
        host = ""
    host = host.strip("[]")
    if isinstance(exc, aiohttp.ClientConnectorError):
        why = exc.os_error.strerror or type(exc.os_error).__name__
        text = f"could not connect to {exc.host}:{exc.port}: {why}"
    elif isinstance(exc, ConnectError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"

    def scrub(match: re.Match[str]) -> str:
        found = match.group(0)
        return found if found == host or not _is_address(found) else "<address>"

    return _IPV6_TEXT.sub(scrub, _IPV4_TEXT.sub(scrub, text))[:500]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def ensure_public(url: str, *, allow_private: bool, timeout_s: float = 3.0) -> None:
    """At creation or change of an endpoint: refuse a URL whose host is, or resolves to,
    an address that is not public (ValueError with a message that names no address).

    A name that does not resolve (yet), or not in time, is accepted: the check before
    every send still holds, with the connection pinned to the address checked.
    """
    if allow_private:
        return
    try:
        await asyncio.wait_for(check_url(url, allow_private=False), timeout_s)
    except BlockedDestination as exc:
        raise ValueError(str(exc)) from None
    except (OSError, TimeoutError):
        return


class PinnedResolver(AbstractResolver):
    """An aiohttp resolver that connects only to the addresses it has checked.

    Give it to the sender's client (``WebhookClient(PinnedResolver(...), ...)``) or to an
    aiohttp connector (``TCPConnector(resolver=PinnedResolver(...))``):
    each lookup goes through ``resolve_checked``, and the client gets exactly those
    addresses, so no later DNS answer can point the connection elsewhere. It raises
    BlockedDestination out of the request when an address is not public.
    """

    def __init__(self, *, allow_private: bool, resolver: Resolve | None = None) -> None:
        self._allow_private = allow_private
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The checked addresses of ``host`` in ``family`` (AF_UNSPEC: any)."""
        addresses = await resolve_checked(
            host, port, allow_private=self._allow_private, resolver=self._resolver
        )
        results: list[ResolveResult] = []
        for address in addresses:
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (socket.AF_UNSPEC, address_family):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=address_family,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise OSError(f"no {socket.AddressFamily(family).name} address for {host!r}")
        return results

    async def close(self) -> None:
        """Nothing to release: lookups hold no resources between calls."""
