"""Where webhooks may go: the URL rules and the address policy (SSRF protection).

A webhook URL is chosen by the client, and the service POSTs to it from inside its own network,
so every address a delivery connects to must be a public one. The rules:

* URL: ``http`` or ``https``, a host, no ``user:password@``; any port.
* Address: only a *globally reachable* unicast address. IPv4: the IANA special-purpose ranges are
  refused (loopback, RFC 1918, CGNAT 100.64/10 where cloud metadata lives, link-local 169.254/16,
  192.0.0/24, documentation and benchmarking ranges, 6to4 relay anycast, multicast, 240/4, the
  broadcast address). IPv6: only global unicast 2000::/3 minus its special blocks (2001::/23 with
  Teredo, documentation 2001:db8::/32 and 3fff::/20); so ::1, ::, fc00::/7, fe80::/10, fec0::/10,
  multicast and everything unallocated are refused. :attr:`ipaddress.IPv4Address.is_global` must
  agree too, but the tables decide on their own, so the answer does not depend on the Python
  version (``is_global`` gained ranges in 3.12/3.13).
* IPv6 addresses that carry an IPv4 address are judged by the IPv4 address they lead to:
  IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d`` (RFC 6052, also the local-use
  ``64:ff9b:1::/48``, as DNS64 networks answer for IPv4-only hosts) and 6to4 ``2002:AABB:CCDD::``
  (a relay forwards it to AA.BB.CC.DD). So ``2002:7f00:1::`` (127.0.0.1) is refused and
  ``2002:808:808::`` (8.8.8.8) is allowed: it reaches nothing 8.8.8.8 itself would not.
  Teredo (2001::/32) and the deprecated IPv4-compatible ``::a.b.c.d`` are always refused: no
  server lives behind them, and an IPv4-compatible address is not routed to its IPv4 address.

``MEGASR_WEBHOOK_ALLOW_PRIVATE`` turns the address policy off (for tests and private deployments);
the URL rules always hold. The check runs at submit (a fast, friendly 422) and again on every
delivery attempt, against the addresses the delivery then connects to (DNS pinning), so a name
that later resolves somewhere else (DNS rebinding) is caught.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""``resolve(host, port) -> addresses`` (strings); :func:`resolve_host`, or a test's stand-in."""

PUBLIC_ONLY = "webhook_url must point to a public address"
SCHEMES = {"http": 80, "https": 443}

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# IANA IPv4 Special-Purpose Address Registry entries that are not globally reachable, and more.
REFUSED_V4: tuple[ipaddress.IPv4Network, ...] = (
    _V4("0.0.0.0/8"),  # "this network", 0.0.0.0 included
    _V4("10.0.0.0/8"),
    _V4("172.16.0.0/12"),
    _V4("192.168.0.0/16"),  # RFC 1918
    _V4("100.64.0.0/10"),  # shared address space (CGNAT): Alibaba's metadata is 100.100.100.200
    _V4("127.0.0.0/8"),  # loopback
    _V4("169.254.0.0/16"),  # link-local: 169.254.169.254 is the cloud metadata service
    _V4("192.0.0.0/24"),  # IETF protocol assignments (DS-Lite, NAT64 discovery, ...)
    _V4("192.0.2.0/24"),
    _V4("198.51.100.0/24"),
    _V4("203.0.113.0/24"),  # documentation
    _V4("192.88.99.0/24"),  # 6to4 relay anycast (deprecated, RFC 7526)
    _V4("198.18.0.0/15"),  # benchmarking
    _V4("224.0.0.0/4"),  # multicast
    _V4("240.0.0.0/4"),  # reserved, 255.255.255.255 included
)
GLOBAL_UNICAST_V6 = _V6("2000::/3")
REFUSED_V6: tuple[ipaddress.IPv6Network, ...] = (
    _V6("2001::/23"),  # IETF protocol assignments, Teredo 2001::/32 among them
    _V6("2001:db8::/32"),
    _V6("3fff::/20"),  # documentation
)
IPV4_MAPPED = _V6("::ffff:0:0/96")
IPV4_COMPATIBLE = _V6("::/96")
NAT64_WELL_KNOWN = _V6("64:ff9b::/96")
NAT64_LOCAL = _V6("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (mapped, NAT64, 6to4), or ``None``."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(ip.packed[12:])
    if ip in NAT64_LOCAL:  # RFC 6052 /48 layout: bits 48-63, the "u" octet (bits 64-71), bits 72-87
        return ipaddress.IPv4Address(ip.packed[6:8] + ip.packed[9:11])
    return ip.sixtofour


def address_allowed(ip: IPAddress) -> bool:
    """Whether a webhook may connect to ``ip``: a globally reachable unicast address (see module doc)."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # without a zone (fe80::1%eth0)
        inner = embedded_ipv4(ip)
        if inner is not None:
            return address_allowed(inner)
        if ip in IPV4_COMPATIBLE or ip.teredo is not None:
            return False
        if ip not in GLOBAL_UNICAST_V6 or any(ip in net for net in REFUSED_V6):
            return False
    elif any(ip in net for net in REFUSED_V4):
        return False
    return ip.is_global and not ip.is_multicast


def parse_address(text: str) -> IPAddress:
    """An address as ``getaddrinfo`` writes it (an IPv6 zone ``%eth0`` is dropped)."""
    return ipaddress.ip_address(text.split("%", 1)[0])


@dataclass(frozen=True)
class WebhookTarget:
    """The parts of a webhook URL that a delivery connects with."""

    scheme: str
    host: str  # a name or an address, without brackets
    port: int
    authority: str  # the Host header: the URL's host[:port] as written


def parse_webhook_url(url: str) -> WebhookTarget:
    """Check the URL rules (http/https, a host, no userinfo); raises ``ValueError`` with the reason."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"webhook_url is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("webhook_url must use http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("webhook_url must not contain credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("webhook_url must name a host")
    return WebhookTarget(scheme, parts.hostname, port or SCHEMES[scheme], parts.netloc)


def resolve_host(host: str, port: int) -> list[str]:
    """Every TCP address of ``host`` (in the resolver's order, without repeats)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(target: WebhookTarget, allow_private: bool, resolve: Resolver = resolve_host) -> list[str]:
    """Resolve the target now and return the addresses to connect to; every one must pass the
    policy (one refused address refuses the URL: an attacker's name may answer with both)."""
    try:
        found = [parse_address(text) for text in resolve(target.host, target.port)]
    except (OSError, UnicodeError, ValueError):
        found = []
    if not found:
        raise ValueError(f"webhook_url host {target.host!r} does not resolve")
    if not allow_private and not all(address_allowed(ip) for ip in found):
        raise ValueError(PUBLIC_ONLY)
    return [str(ip) for ip in found]


def check_webhook_url(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> None:
    """At submit: the URL rules, and (unless ``allow_private``) the policy for every address the host
    resolves to now. Raises ``ValueError``; deliveries check again (:func:`checked_addresses`)."""
    target = parse_webhook_url(url)
    if not allow_private:
        checked_addresses(target, allow_private, resolve)
