"""The Razorpay adapter (the real SDK) against the fake Razorpay (infra/fake_razorpay.py) on
127.0.0.1: orders and payments read back, every fault mapped to exactly GatewayUnavailable or
GatewayFailed, limits checked before any HTTP call, and webhook deliveries signed so that
domain.gateway_events accepts them with the right secret only.

No Postgres: every server here is started by a fixture on a free loopback port and stopped
when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import razorpay

from adapters.razorpay_gateway import RazorpayGateway
from domain.errors import GatewayFailed, GatewayUnavailable
from domain.gateway_events import (
    NOTE_MAX_CHARS,
    NOTES_MAX_PAIRS,
    ORDER_PAID,
    PAYMENT_AUTHORIZED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    RECEIPT_MAX_CHARS,
    REFUND_CREATED,
    REFUND_PROCESSED,
    parse_webhook,
    signature_matches,
)
from infra.fake_razorpay import FakeRazorpay
from tests.conftest import wait_sync

LOOPBACK = "127.0.0.1"
KEY_ID = "rzp_test_gwtest000001"
KEY_SECRET = "gw-test-key-secret-0123456789"  # long enough to be scrubbed from messages
WEBHOOK_SECRET = "whsec-gateway-test"
CLIENT_TIMEOUT_S = 0.3  # the gateway's timeout in fault tests
FAULT_DELAY_S = 2.0  # the fake's late answer: well past CLIENT_TIMEOUT_S
CONTROL_TIMEOUT_S = 5.0
STOP_MAX_S = 1.0  # stop() must not wait for a delayed answer
WAIT_DEADLINE_S = 5.0
AMOUNT_PAISE = 118_000


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeRazorpay]:
    with FakeRazorpay(key_id=KEY_ID, key_secret=KEY_SECRET) as server:
        yield server


def gateway(fake: FakeRazorpay, *, timeout_s: float = CLIENT_TIMEOUT_S,
            key_secret: str = KEY_SECRET) -> RazorpayGateway:
    return RazorpayGateway(key_id=KEY_ID, key_secret=key_secret, base_url=fake.url,
                           timeout_s=timeout_s)


def control(fake: FakeRazorpay, method: str, path: str, body: Any = None) -> Any:
    """One call to the fake's /_fake API; its JSON answer (raises on 4xx/5xx)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(fake.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=CONTROL_TIMEOUT_S) as answer:
        return json.loads(answer.read())


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """What a webhook endpoint received, in arrival order."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with receiver.lock:
                receiver.deliveries.append(Delivery(dict(self.headers.items()), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    receiver.url = f"http://{LOOPBACK}:{server.server_address[1]}/webhooks/razorpay"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --- orders and payments ---------------------------------------------------------------------


def test_an_order_is_created_and_found_again_by_its_receipt(fake: FakeRazorpay) -> None:
    gw = gateway(fake)
    order = gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-2026-0001",
                            notes={"invoice_id": "a1b2", "organisation": "acme"})
    gw.create_order(amount=500, currency="INR", receipt="INV-2026-0002", notes={})

    assert order.id.startswith("order_")
    assert (order.amount, order.currency, order.status, order.receipt, order.amount_paid) == (
        AMOUNT_PAISE, "INR", "created", "INV-2026-0001", 0)
    assert order.notes == {"invoice_id": "a1b2", "organisation": "acme"}
    assert gw.orders_with_receipt("INV-2026-0001") == [order]
    assert gw.orders_with_receipt("INV-unknown") == []
    # What reached Razorpay: one payment settles the order, never a part of it.
    sent = next(o for o in control(fake, "GET", "/_fake/orders")["items"] if o["id"] == order.id)
    assert sent["partial_payment"] is False
    assert gw.key_id == KEY_ID


def test_an_orders_payments_are_read_after_the_customer_pays(fake: FakeRazorpay) -> None:
    gw = gateway(fake)
    order = gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-7", notes={})
    assert gw.order_payments(order.id) == []

    failed = control(fake, "POST", f"/_fake/orders/{order.id}/payments",
                     {"outcome": "failed", "deliver": False})
    paid = control(fake, "POST", f"/_fake/orders/{order.id}/payments",
                   {"outcome": "captured", "deliver": False})

    payments = {p.id: p for p in gw.order_payments(order.id)}
    assert set(payments) == {failed["payment"]["id"], paid["payment"]["id"]}
    captured = payments[paid["payment"]["id"]]
    assert (captured.status, captured.captured, captured.amount, captured.order_id) == (
        "captured", True, AMOUNT_PAISE, order.id)
    assert payments[failed["payment"]["id"]].status == "failed"
    [now] = gw.orders_with_receipt("INV-7")
    assert (now.status, now.amount_paid) == ("paid", AMOUNT_PAISE)
    types = {e["id"]: e["type"] for e in control(fake, "GET", "/_fake/events")["items"]}
    assert [types[i] for i in failed["events"]] == [PAYMENT_FAILED]
    assert [types[i] for i in paid["events"]] == [PAYMENT_AUTHORIZED, PAYMENT_CAPTURED, ORDER_PAID]


def test_an_authorized_payment_is_captured_later(fake: FakeRazorpay) -> None:
    gw = gateway(fake)
    order = gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-8", notes={})
    authorized = control(fake, "POST", f"/_fake/orders/{order.id}/payments",
                         {"outcome": "authorized", "deliver": False})["payment"]
    assert [p.status for p in gw.order_payments(order.id)] == ["authorized"]

    captured = control(fake, "POST", f"/_fake/payments/{authorized['id']}/capture", {"deliver": False})

    assert [fake.events()[-2]["type"], fake.events()[-1]["type"]] == [PAYMENT_CAPTURED, ORDER_PAID]
    assert captured["payment"]["status"] == "captured"
    assert [p.status for p in gw.order_payments(order.id)] == ["captured"]


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "error"), [
    ("500", GatewayFailed),
    ("non_json", GatewayFailed),
    ("wrong_shape", GatewayFailed),
    ("refuse", GatewayUnavailable),
    ("timeout", GatewayUnavailable),
])
@pytest.mark.parametrize("operation", ["create_order", "orders_with_receipt", "order_payments"])
def test_each_fault_is_one_of_the_two_gateway_errors(fake: FakeRazorpay, fault: str,
                                                     error: type[Exception], operation: str) -> None:
    gw = gateway(fake)
    order = gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-F", notes={})
    control(fake, "POST", "/_fake/faults", {"next": fault, "count": 1, "delay_s": FAULT_DELAY_S})
    calls: dict[str, Callable[[], object]] = {
        "create_order": lambda: gw.create_order(amount=AMOUNT_PAISE, currency="INR",
                                                receipt="INV-F", notes={}),
        "orders_with_receipt": lambda: gw.orders_with_receipt("INV-F"),
        "order_payments": lambda: gw.order_payments(order.id),
    }

    with pytest.raises(error) as raised:
        calls[operation]()

    assert type(raised.value) is error
    assert KEY_SECRET not in str(raised.value)
    assert control(fake, "GET", "/_fake/faults")["pending"] == []
    assert gw.orders_with_receipt("INV-F") == [order]  # the next call is answered again
    started = time.monotonic()
    fake.stop()  # also while a "timeout" answer is still being held back
    assert time.monotonic() - started < STOP_MAX_S


def test_a_closed_port_is_unavailable() -> None:
    gw = RazorpayGateway(key_id=KEY_ID, key_secret=KEY_SECRET,
                         base_url=f"http://{LOOPBACK}:{closed_port()}", timeout_s=CLIENT_TIMEOUT_S)
    with pytest.raises(GatewayUnavailable):
        gw.orders_with_receipt("INV-1")
    with pytest.raises(GatewayUnavailable):
        gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-1", notes={})


def test_an_order_whose_answer_timed_out_is_found_by_its_receipt(fake: FakeRazorpay) -> None:
    gw = gateway(fake)
    control(fake, "POST", "/_fake/faults",
            {"next": "timeout_after_create", "delay_s": FAULT_DELAY_S, "path": "/v1/orders",
             "method": "POST"})

    with pytest.raises(GatewayUnavailable):
        gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-T", notes={"k": "v"})

    [order] = gw.orders_with_receipt("INV-T")
    assert (order.amount, order.notes) == (AMOUNT_PAISE, {"k": "v"})
    assert [o["id"] for o in control(fake, "GET", "/_fake/orders")["items"]] == [order.id]


def test_a_wrong_key_secret_is_a_failed_gateway(fake: FakeRazorpay) -> None:
    wrong = "not-the-key-secret-at-all"
    gw = gateway(fake, key_secret=wrong)
    with pytest.raises(GatewayFailed) as raised:
        gw.create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-A", notes={})
    assert "Authentication failed" in str(raised.value)
    assert wrong not in str(raised.value) and wrong not in repr(gw)
    assert fake.orders() == []
    assert [r["status"] for r in control(fake, "GET", "/_fake/requests")["items"]] == [401]


@pytest.mark.parametrize(("amount", "receipt", "notes"), [
    (0, "INV-1", {}),
    (-100, "INV-1", {}),
    (True, "INV-1", {}),
    (100.0, "INV-1", {}),
    (AMOUNT_PAISE, "", {}),
    (AMOUNT_PAISE, "R" * (RECEIPT_MAX_CHARS + 1), {}),
    (AMOUNT_PAISE, "INV-1", {f"k{i}": "v" for i in range(NOTES_MAX_PAIRS + 1)}),
    (AMOUNT_PAISE, "INV-1", {"k": "v" * (NOTE_MAX_CHARS + 1)}),
    (AMOUNT_PAISE, "INV-1", {"k" * (NOTE_MAX_CHARS + 1): "v"}),
])
def test_limits_are_checked_before_any_http_call(fake: FakeRazorpay, amount: Any, receipt: str,
                                                 notes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        gateway(fake).create_order(amount=amount, currency="INR", receipt=receipt, notes=notes)
    assert control(fake, "GET", "/_fake/requests")["items"] == []


def test_the_limits_themselves_are_allowed(fake: FakeRazorpay) -> None:
    notes = {f"{i:0{NOTE_MAX_CHARS}d}": "v" * NOTE_MAX_CHARS for i in range(NOTES_MAX_PAIRS)}
    order = gateway(fake).create_order(amount=AMOUNT_PAISE, currency="INR",
                                       receipt="R" * RECEIPT_MAX_CHARS, notes=notes)
    assert order.notes == notes


# --- webhooks --------------------------------------------------------------------------------


def test_deliveries_are_signed_with_the_webhook_secret(fake: FakeRazorpay) -> None:
    with webhook_receiver() as receiver:
        control(fake, "POST", "/_fake/webhook", {"url": receiver.url, "secret": WEBHOOK_SECRET})
        order = gateway(fake).create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-W",
                                           notes={})

        paid = control(fake, "POST", f"/_fake/orders/{order.id}/payments", {"outcome": "captured"})

        assert [d["status"] for d in paid["deliveries"]] == [200, 200, 200]
        got = receiver.received()
        assert [d.headers["X-Razorpay-Event-Id"] for d in got] == paid["events"]
        for delivery in got:
            signature = delivery.headers["X-Razorpay-Signature"]
            assert delivery.headers["Content-Type"] == "application/json"
            assert signature_matches(delivery.body, signature, [WEBHOOK_SECRET])
            assert not signature_matches(delivery.body, signature, ["another-secret"])
            assert not signature_matches(delivery.body + b" ", signature, [WEBHOOK_SECRET])
        hooks = [parse_webhook(d.body) for d in got]
        assert [h.event for h in hooks] == [PAYMENT_AUTHORIZED, PAYMENT_CAPTURED, ORDER_PAID]
        # Each payload is a snapshot of its moment: authorized first, then captured.
        assert [p.status for h in hooks if (p := h.payment()) is not None] == [
            "authorized", "captured", "captured"]
        paid_order = hooks[2].order()
        assert paid_order is not None and (paid_order.status, paid_order.amount_paid) == (
            "paid", AMOUNT_PAISE)


def test_stored_events_are_redelivered_in_any_order_and_with_any_signature(
        fake: FakeRazorpay) -> None:
    with webhook_receiver() as receiver:
        fake.set_webhook(receiver.url, WEBHOOK_SECRET)
        order = gateway(fake).create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-R",
                                           notes={})
        held = control(fake, "POST", f"/_fake/orders/{order.id}/payments", {"deliver": False})
        authorized, captured, order_paid = held["events"]
        assert receiver.received() == []  # a suppressed webhook

        answer = control(fake, "POST", "/_fake/deliveries",
                         {"event_ids": [order_paid, authorized, order_paid]})
        assert [d["status"] for d in answer["deliveries"]] == [200, 200, 200]
        assert [d.headers["X-Razorpay-Event-Id"] for d in receiver.received()] == [
            order_paid, authorized, order_paid]
        first, _, again = receiver.received()
        assert first.body == again.body  # a duplicate is the same bytes

        control(fake, "POST", "/_fake/deliveries",
                {"event_ids": [captured], "secret": "an-old-secret"})
        control(fake, "POST", "/_fake/deliveries", {"event_ids": [captured], "signature": "00ff"})
        control(fake, "POST", "/_fake/deliveries", {"event_ids": [captured], "signature": None})
        control(fake, "POST", "/_fake/deliveries",
                {"event_ids": [captured], "body_override": '{"event": "payment.captured"}'})
        old, forged, unsigned, replaced = receiver.received()[3:]
        assert signature_matches(old.body, old.headers["X-Razorpay-Signature"], ["an-old-secret"])
        assert not signature_matches(old.body, old.headers["X-Razorpay-Signature"], [WEBHOOK_SECRET])
        assert forged.headers["X-Razorpay-Signature"] == "00ff"
        assert "X-Razorpay-Signature" not in unsigned.headers
        assert replaced.body == b'{"event": "payment.captured"}'
        assert signature_matches(replaced.body, replaced.headers["X-Razorpay-Signature"],
                                 [WEBHOOK_SECRET])


def test_a_refund_through_the_sdk_is_idempotent_and_sends_its_webhooks(fake: FakeRazorpay) -> None:
    with webhook_receiver() as receiver:
        fake.set_webhook(receiver.url, WEBHOOK_SECRET)
        order = gateway(fake).create_order(amount=AMOUNT_PAISE, currency="INR", receipt="INV-X",
                                           notes={})
        payment = fake.pay(order.id, deliver=False)["payment"]
        client = razorpay.Client(auth=(KEY_ID, KEY_SECRET), base_url=fake.url)
        headers = {"X-Refund-Idempotency": "refund-INV-X-1"}

        first = client.payment.refund(payment["id"], {"amount": 1000}, headers=headers,
                                      timeout=CONTROL_TIMEOUT_S)
        again = client.payment.refund(payment["id"], {"amount": 1000}, headers=headers,
                                      timeout=CONTROL_TIMEOUT_S)

        assert first == again and first["status"] == "processed"
        assert client.refund.fetch(first["id"], timeout=CONTROL_TIMEOUT_S) == first
        assert len(fake.refunds()) == 1
        assert client.payment.fetch(payment["id"], timeout=CONTROL_TIMEOUT_S)[
            "amount_refunded"] == 1000
        wait_sync(lambda: len(receiver.received()) == 2, "the refund's two webhooks", WAIT_DEADLINE_S)
        hooks = [parse_webhook(d.body) for d in receiver.received()]
        assert [h.event for h in hooks] == [REFUND_CREATED, REFUND_PROCESSED]
        assert [r.status for h in hooks if (r := h.refund()) is not None] == ["pending", "processed"]
