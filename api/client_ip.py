"""The client's address: the socket peer, unless that peer is a configured trusted proxy, in
which case the right-most X-Forwarded-For address that is not itself a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from litestar.connection import ASGIConnection

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FORWARDED_MAX_HOPS = 20


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_ip(connection: ASGIConnection[Any, Any, Any, Any], trusted: Sequence[Network]) -> str:
    peer = connection.client.host if connection.client else ""
    if not trusted:
        return peer
    peer_ip = _ip(peer)
    if peer_ip is None or not any(peer_ip in net for net in trusted):
        return peer  # X-Forwarded-For from anyone but a trusted proxy is ignored
    hops = connection.headers.get("x-forwarded-for", "").split(",")[-FORWARDED_MAX_HOPS:]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break
        if not any(ip in net for net in trusted):
            return str(ip)
    return peer


@lru_cache(maxsize=4096)
def _networks(cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs.split(",") if c)


def allowed(ip: str, cidrs: str) -> bool:
    """Whether `ip` is inside the comma-separated CIDR list ("" allows everyone)."""
    if not cidrs:
        return True
    address = _ip(ip)
    return address is not None and any(address in net for net in _networks(cidrs))
