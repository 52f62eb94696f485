"""The pure parts of tenant webhooks: the signature a receiver checks, the retry schedule, the
URL and event rules of an endpoint, which addresses the SSRF guard refuses, and the catalogue's
`invoice.paid` only once nothing is due."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from adapters.destinations import DestinationGuard, refusal
from adapters.tenant_webhooks import (
    RETRY_FIRST_DELAY_S,
    RETRY_MAX_DELAY_S,
    RETRY_WINDOW_S,
    retry_delay_s,
)
from domain.errors import ValidationFailed
from domain.invoice import Invoice
from domain.tenant_webhooks import (
    EVENT_NAMES,
    SIGNATURE_TOLERANCE_S,
    TENANT_EVENTS,
    envelope,
    signature_header,
    verify,
)
from domain.webhook_endpoint import WebhookEndpoint, check_endpoint, check_events, check_url

SECRET = "whsec_test"
BODY = b'{"id":"e1","type":"invoice.paid"}'


def test_a_signature_verifies_within_the_tolerance_and_not_after() -> None:
    header = signature_header(SECRET, 1_000_000, BODY)
    assert header.startswith("t=1000000,v1=")
    assert verify(SECRET, header, BODY, now=1_000_000 + SIGNATURE_TOLERANCE_S)
    assert not verify(SECRET, header, BODY, now=1_000_000 + SIGNATURE_TOLERANCE_S + 1)
    assert not verify("whsec_other", header, BODY, now=1_000_000)
    assert not verify(SECRET, header, BODY + b" ", now=1_000_000)
    assert not verify(SECRET, "v1=abc", BODY, now=1_000_000)
    assert not verify(SECRET, "t=x,v1=abc", BODY, now=1_000_000)


def test_retries_double_from_30_s_to_an_hour_and_stop_after_24_h() -> None:
    delays = [retry_delay_s(n) for n in range(1, 12)]
    assert delays[:8] == [30, 60, 120, 240, 480, 960, 1920, 3600] and set(delays[7:]) == {3600}
    assert RETRY_FIRST_DELAY_S == 30 and RETRY_MAX_DELAY_S == 3600
    elapsed, attempts = 0, 1
    while elapsed + retry_delay_s(attempts) <= RETRY_WINDOW_S:
        elapsed += retry_delay_s(attempts)
        attempts += 1
    assert 25 <= attempts <= 35  # about 24 h of attempts, then dead-lettered


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fd00::1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "shared (carrier-grade NAT)"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_the_guard_refuses_every_non_public_address(address: str, reason: str | None) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


def test_the_guard_refuses_literal_private_hosts_unless_allowed() -> None:
    with pytest.raises(ValidationFailed, match="loopback"):
        DestinationGuard(allow_private=False)("http://127.0.0.1:9/hook")
    with pytest.raises(ValidationFailed, match="link-local"):
        DestinationGuard(allow_private=False)("http://169.254.169.254/")
    DestinationGuard(allow_private=True)("http://127.0.0.1:9/hook")
    with pytest.raises(ValidationFailed, match="http or https"):
        DestinationGuard(allow_private=True)("file:///etc/passwd")


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "example.com/x", "http:///x", "https://u:p@example.com/",
    "http://example.com:0/", "http://example.com:99999/", "http://[::1/", "https://a b.com/",
    "https://example.com/" + "x" * 2048, ""])
def test_an_endpoint_url_must_be_plain_http_or_https(url: str) -> None:
    with pytest.raises(ValidationFailed):
        check_url(url)


def test_a_bad_url_and_bad_events_are_named_together() -> None:
    with pytest.raises(ValidationFailed) as caught:
        check_endpoint("ftp://x", ["nope"])
    assert {e.field for e in caught.value.errors} == {"url", "events"}


def test_events_are_named_from_the_catalogue_once_each() -> None:
    assert check_events(["invoice.paid", "invoice.finalized"]) == ("invoice.finalized",
                                                                   "invoice.paid")
    assert {"credit_note.issued", "refund.processed"} <= set(EVENT_NAMES)
    for bad in ([], ["invoice.eaten"], ["invoice.paid", "invoice.paid"]):
        with pytest.raises(ValidationFailed):
            check_events(bad)


def test_a_secret_is_never_in_the_audit_changes() -> None:
    from domain.audit import Actor, describe

    endpoint = WebhookEndpoint.register(endpoint_id=uuid4(), organisation_id=uuid4(),
                                        url="https://example.com/h", events=["invoice.paid"],
                                        secret=SECRET, at=datetime.now(UTC))
    actor = Actor(uuid4(), "owner", None, "127.0.0.1", "r1")
    entry = describe(actor, [endpoint], uuid4(), datetime.now(UTC))
    assert entry is not None and SECRET not in repr(entry.__dict__)


def test_invoice_paid_only_once_nothing_is_due() -> None:
    paid = TENANT_EVENTS[Invoice.PaymentApplied]
    event = Invoice.PaymentApplied(  # type: ignore[call-arg]  # (eventsourcing's stubs)
        originator_id=uuid4(), originator_version=3, timestamp=datetime.now(UTC),
        payment_id=uuid4(), amount=100)
    assert paid.data(event, {"amount_due": 50}) is None
    data = paid.data(event, {"amount_due": 0, "number": "INV/2627/000001"})
    assert data is not None and data["amount_due"] == 0
    args = (uuid4(), paid.name, str(uuid4()), datetime.now(UTC) - timedelta(days=1), data)
    body = envelope(*args)
    assert body == envelope(*args)  # the same bytes for every endpoint and every attempt
    assert json.loads(body)["type"] == "invoice.paid" and b" " not in body


def test_a_send_goes_to_the_checked_address_under_the_host_name() -> None:
    from adapters.tenant_webhooks import pinned

    assert pinned("https://hooks.example.com:8443/a?x=1", "93.184.216.34") == (
        "https://93.184.216.34:8443/a?x=1", "hooks.example.com:8443", "hooks.example.com")
    assert pinned("http://hooks.example.com/a", "2606:2800::1") == (
        "http://[2606:2800::1]/a", "hooks.example.com", None)


def test_a_claim_lease_outlasts_the_slowest_pass_so_no_delivery_is_sent_twice_at_once() -> None:
    """Two sender workers (SKIP LOCKED, then a lease): a claimed delivery waits its turn behind
    SEND_CONCURRENCY others, each taking up to RESOLVE + SEND seconds; if the lease ran out first,
    the other worker would claim it and both would POST it at the same time."""
    import math

    from adapters import tenant_webhooks as sender
    from adapters.destinations import RESOLVE_TIMEOUT_S

    waves = math.ceil(sender.PASS_MAX_DELIVERIES / sender.SEND_CONCURRENCY)
    assert waves * (RESOLVE_TIMEOUT_S + sender.SEND_TIMEOUT_S) < sender.CLAIM_LEASE_S


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_send_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's timeout is per read: a receiver answering a byte at a time could hold one send for
    ever (and past the claim's lease). A send as a whole is bounded by SEND_TIMEOUT_S."""
    import asyncio
    import time

    from adapters import tenant_webhooks as sender

    monkeypatch.setattr(sender, "SEND_TIMEOUT_S", 0.5)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: " + b"a" * 40 + b"\r\n\r\n"

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for byte in answer:  # each byte well within the per-read timeout
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the sender hung up, or the test is over
        writer.close()

    async def main() -> tuple[sender.Outcome, float]:
        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tx = sender.TenantWebhookSender(None, DestinationGuard(allow_private=True),  # type: ignore[arg-type]
                                        lambda: datetime.now(UTC))
        delivery = sender.Claimed(uuid4(), uuid4(), b"{}", 0, datetime.now(UTC),
                                  f"http://127.0.0.1:{port}/hook", "whsec_x")
        async with server, sender.TenantWebhookSender._client() as client:
            started = time.monotonic()
            outcome = await tx._send(client, delivery)
            return outcome, time.monotonic() - started

    outcome, elapsed = asyncio.run(main())
    assert not outcome.ok and elapsed < 1.5, (outcome, elapsed)


@pytest.mark.parametrize(("address", "reason"), [
    ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
    ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 around the metadata service
    ("2002:a00:1::1", "private"),  # 6to4 around 10.0.0.1
    ("fec0::1", "site-local"),  # deprecated, still routed inside some sites
    ("2002:808:808::1", None),  # 6to4 around a public address
])
def test_the_guard_judges_ipv6_addresses_that_carry_an_ipv4_address_by_it(
        address: str, reason: str | None) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


def test_an_endpoint_on_an_internationalised_host_name_is_sent_to_not_stuck() -> None:
    """A host name with non-ASCII letters (accepted at registration) goes in the Host header in
    its ASCII (IDNA) form; no outcome of a send may escape unrecorded (the delivery would be
    claimed again and again, never retried by the rules nor dead-lettered)."""
    import asyncio

    from adapters import tenant_webhooks as sender

    class Resolved(DestinationGuard):  # as if the name resolved to the test's receiver
        async def check(self, url: str) -> str:
            return "127.0.0.1"

    hosts: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hosts.extend(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                     if line.lower().startswith(b"host:"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> sender.Outcome:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tx = sender.TenantWebhookSender(None, Resolved(allow_private=True),  # type: ignore[arg-type]
                                        lambda: datetime.now(UTC))
        delivery = sender.Claimed(uuid4(), uuid4(), b"{}", 0, datetime.now(UTC),
                                  f"http://bücher.example:{port}/hook", "whsec_x")
        async with server, sender.TenantWebhookSender._client() as client:
            return await tx._send(client, delivery)

    outcome = asyncio.run(main())
    assert outcome.ok, outcome
    assert hosts == [b"xn--bcher-kva.example:" + hosts[0].rsplit(b":", 1)[1]]
