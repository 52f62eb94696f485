"""Where the platform may send a tenant's webhooks (SSRF guard, docs/WEBHOOKS.md).

A tenant names a URL and the platform calls it: without a guard a tenant could make the platform
call its own network (a database, a cloud metadata service on 169.254.169.254, an admin port on
localhost). So a destination must be http(s), and every address its host resolves to must be a
public one: loopback, private, link-local, multicast, unspecified, reserved and shared
(carrier-grade NAT) addresses are refused, IPv4-mapped and 6to4 IPv6 addresses judged as their
IPv4 address, IPv6 site-local ones refused too. Checked when an endpoint is registered and again
before every send (a name can be pointed elsewhere later). The operator setting
BILLING_WEBHOOKS_ALLOW_PRIVATE lifts the address rule (a private deployment, and the tests'
receivers on 127.0.0.1); the scheme rule stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from domain.errors import FieldError, ValidationFailed

RESOLVE_TIMEOUT_S = 5.0  # a send's name resolution, at most
ALLOW_PRIVATE_SETTING = "BILLING_WEBHOOKS_ALLOW_PRIVATE"
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not the public internet

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def refusal(address: Address) -> str | None:
    """Why the platform must not call `address` (e.g. "loopback"), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one (mapped, or 6to4's 2002::/16) is judged as it.
        carried = address.ipv4_mapped or address.sixtofour
        if carried is not None:
            address = carried
        elif address.is_site_local:  # fec0::/10: deprecated, still routed inside some sites
            return "site-local"
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("private", address.is_private),
              ("shared (carrier-grade NAT)", isinstance(address, ipaddress.IPv4Address)
               and address in _SHARED),
              ("reserved", address.is_reserved))
    return next((name for name, hit in checks if hit), None)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed([FieldError("url", "must be an http or https URL with a host")])
    try:
        port = parts.port
    except ValueError:
        raise ValidationFailed([FieldError("url", "has a port that is not a number")]) from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _judge(host: str, addresses: Iterable[str], allow_private: bool) -> None:
    found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
    if not found:
        raise ValidationFailed([FieldError("url", f"host {host!r} does not resolve to an address")])
    if allow_private:
        return
    for address in found:
        reason = refusal(address)
        if reason:
            raise ValidationFailed([FieldError(
                "url", f"host {host!r} resolves to {address}, a {reason} address: webhooks go "
                       "only to public addresses (the operator setting "
                       f"{ALLOW_PRIVATE_SETTING} allows private ones)")])


class DestinationGuard:
    """Refuses URLs the platform must not call (ValidationFailed on `url`). A call checks
    synchronously (registration, in a worker thread); `check` is the sender's async twin."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def __call__(self, url: str, /) -> None:
        host, port = _host_port(url)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError):
            raise ValidationFailed([FieldError("url", f"host {host!r} does not resolve")]) from None
        _judge(host, (str(info[4][0]) for info in infos), self.allow_private)

    async def check(self, url: str) -> str:
        """The address to connect to (the first the host resolved to, each judged); the sender
        connects to it, so a DNS answer that changes after the check is never used."""
        host, port = _host_port(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, UnicodeError, ValueError, TimeoutError):
            raise ValidationFailed([FieldError("url", f"host {host!r} does not resolve")]) from None
        addresses = [str(info[4][0]) for info in infos]
        _judge(host, addresses, self.allow_private)
        return addresses[0].split("%", 1)[0]
