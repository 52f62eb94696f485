"""A fake Razorpay for tests and local demos: the slice of Razorpay's REST API this platform
calls (orders, payments, refunds), webhook deliveries signed like Razorpay's, and a control
API under /_fake that plays the customer (pays, fails, authorises) and the network (faults,
duplicated and reordered deliveries). Standard library only; binds 127.0.0.1 only.

By hand:  python -m infra.fake_razorpay --port 9999 --key-id rzp_test_fake --key-secret s3cret \
              --webhook-url http://127.0.0.1:8000/webhooks/razorpay --webhook-secret whsec
In tests: with FakeRazorpay(key_id=..., key_secret=...) as fake: ... fake.url, fake.port

What it owns:
- Razorpay's answers as the real SDK parses them (the shapes and error JSON of api.razorpay.com
  under /v1, HTTP basic auth with the key id and secret, Razorpay's order limits).
- The events Razorpay would send, as snapshots taken when they happened, kept so that a test
  can deliver them again, in any order, with a wrong signature or another body.
- Faults on the next API calls: an error answer, an HTML answer, a late answer (before or
  after acting), a connection closed without an answer.

Every /_fake endpoint is described in `CONTROL_API` below (also printed by --help); Python
callers can use the same operations as methods (`pay`, `capture`, `deliver`, `add_fault`,
`orders`, `events`...), which raise ControlError where the endpoint answers an error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import hashlib
import hmac
import http.client
import json
import queue
import re
import secrets
import signal
import socketserver
import string
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TypeGuard
from urllib.parse import parse_qs, urlsplit

from domain.gateway_events import (
    NOTE_MAX_CHARS,
    NOTES_MAX_PAIRS,
    ORDER_PAID,
    PAYMENT_AUTHORIZED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    RECEIPT_MAX_CHARS,
    REFUND_CREATED,
    REFUND_FAILED,
    REFUND_PROCESSED,
)

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # where webhooks may go
DEFAULT_KEY_ID = "rzp_test_fake"
DEFAULT_KEY_SECRET = "fake_key_secret"
DEFAULT_CLI_PORT = 9999
ACCOUNT_ID = "acc_fake"
ORDER_MIN_AMOUNT_PAISE = 100  # Razorpay refuses orders under ₹1
CURRENCY_CODE_CHARS = 3
ID_RANDOM_CHARS = 14  # order_/pay_/rfnd_/evt_ + 14 alphanumerics, like Razorpay's ids
LIST_DEFAULT_COUNT = 10  # Razorpay's default page size
LIST_MAX_COUNT = 100  # Razorpay's largest page size
REQUEST_MAX_BYTES = 1_000_000
REQUEST_LOG_MAX_ENTRIES = 10_000  # a demo left running does not grow without bound
HANDLER_SOCKET_TIMEOUT_S = 5.0  # a client that connects and sends nothing is dropped
WEBHOOK_TIMEOUT_S = 5.0  # per delivery: connecting and waiting for the receiver's answer
FAULT_DEFAULT_DELAY_S = 2.0  # "timeout" faults: longer than a test's short client timeout
FAULT_MAX_DELAY_S = 60.0
FAULT_MAX_COUNT = 1000
SERVE_POLL_S = 0.05  # how often serve_forever looks for stop(): bounds stop()'s wait
STOP_JOIN_TIMEOUT_S = 10.0

FAULT_KINDS = frozenset({"500", "timeout", "non_json", "timeout_after_create", "refuse", "wrong_shape"})
OUTCOMES = frozenset({"captured", "authorized", "failed"})
_ALNUM = string.ascii_letters + string.digits
_HTML_ERROR_PAGE = (b"<html><head><title>502 Bad Gateway</title></head>"
                    b"<body><h1>502 Bad Gateway</h1></body></html>")

CONTROL_API = """
Control API (no auth, JSON in and out; errors are {"error": "..."} with 400/404/409):
  POST   /_fake/orders/{order_id}/payments  {"outcome": "captured"|"authorized"|"failed" (default
         captured), "amount": paise (default: the order's amount due), "deliver": true,
         "method": "upi", "error_description": optional}
         -> 201 {"payment": {...}, "events": [event ids], "deliveries": [...]}
  POST   /_fake/payments/{payment_id}/capture  {"deliver": true}
         -> 200 {"payment": {...}, "events": [...], "deliveries": [...]}
  POST   /_fake/deliveries  {"event_ids": [...], "secret": optional, "signature": optional
         (null: no signature header), "body_override": optional string}
         -> 200 {"deliveries": [{"event_id", "status": int|null, "error": str|null}, ...]}
  GET    /_fake/events[?type=payment.captured]
         -> {"items": [{"id", "type", "body": exact JSON text, "created_at", "deliveries"}]}
  GET    /_fake/orders | /_fake/payments | /_fake/refunds  -> {"items": [...]} (oldest first)
  POST   /_fake/faults  {"next": "500"|"timeout"|"non_json"|"timeout_after_create"|"refuse"|
         "wrong_shape", "count": 1, "delay_s": 2.0, "method": optional, "path": optional prefix}
         -> {"pending": [...]};  GET /_fake/faults -> {"pending": [...]};  DELETE clears
  POST   /_fake/webhook  {"url": str|null, "secret": str|null, "auto_deliver": optional bool}
         -> {"url": ..., "auto_deliver": ...};  GET /_fake/webhook -> the same
  GET    /_fake/requests  -> {"items": [{"method", "path", "query", "status", "fault"}]}
  POST   /_fake/reset  -> {} (forgets orders, payments, refunds, events, faults, requests)
"""


class _ApiError(Exception):
    """An answer in Razorpay's error format."""

    def __init__(self, status: int, description: str, *, code: str = "BAD_REQUEST_ERROR",
                 field_name: str | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description
        self.field_name = field_name


class ControlError(Exception):
    """A control operation the fake cannot do (bad input: 400, unknown id: 404, wrong state:
    409); the control API answers it as {"error": message} with that status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class _Fault:
    kind: str
    delay_s: float
    method: str | None
    path: str | None

    def matches(self, request: _Request) -> bool:
        return ((self.method is None or self.method == request.method)
                and (self.path is None or request.path.startswith(self.path)))

    def view(self) -> dict[str, Any]:
        return {"next": self.kind, "delay_s": self.delay_s, "method": self.method, "path": self.path}


@dataclass
class _Event:
    id: str
    type: str
    body: bytes  # exactly what is delivered and signed: a snapshot of when it happened
    created_at: int
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "body": self.body.decode(),
                "created_at": self.created_at, "deliveries": list(self.deliveries)}


Route = tuple[str, re.Pattern[str], Callable[[_Request, dict[str, str]], tuple[int, Any]]]


class FakeRazorpay:
    """The fake server. `start()` (or `with`) serves on 127.0.0.1:`port` (0: a free port) in a
    background thread; `stop()` ends it, also while answers are being delayed. Webhooks go to
    `webhook_url` signed with `webhook_secret` (both can be set later: `set_webhook`). Events
    caused by API calls (a capture or refund through /v1) are delivered in the background, in
    order, when `auto_deliver`; events the control API makes are delivered when it is told to."""

    def __init__(self, *, key_id: str = DEFAULT_KEY_ID, key_secret: str = DEFAULT_KEY_SECRET,
                 webhook_url: str | None = None, webhook_secret: str | None = None,
                 port: int = 0, auto_deliver: bool = True) -> None:
        self.key_id = key_id
        self._key_secret = key_secret
        self._requested_port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._outbox: queue.Queue[str | None] = queue.Queue()
        self._webhook_url: str | None = None
        self._webhook_secret: str | None = None
        self._auto_deliver = auto_deliver
        self.set_webhook(webhook_url, webhook_secret)
        self._orders: dict[str, dict[str, Any]] = {}
        self._payments: dict[str, dict[str, Any]] = {}
        self._refunds: dict[str, dict[str, Any]] = {}
        self._refund_keys: dict[str, str] = {}  # X-Refund-Idempotency -> refund id
        self._refunds_to_fail = 0  # the next refunds made end failed (fail_refunds)
        self._events: dict[str, _Event] = {}
        self._faults: list[_Fault] = []
        self._requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_MAX_ENTRIES)
        self._api_routes: list[Route] = [
            ("POST", re.compile(r"/v1/orders"), self._api_create_order),
            ("GET", re.compile(r"/v1/orders"), self._api_list_orders),
            ("GET", re.compile(r"/v1/orders/([^/]+)"), self._api_order),
            ("GET", re.compile(r"/v1/orders/([^/]+)/payments"), self._api_order_payments),
            ("GET", re.compile(r"/v1/payments/([^/]+)"), self._api_payment),
            ("POST", re.compile(r"/v1/payments/([^/]+)/capture"), self._api_capture),
            ("POST", re.compile(r"/v1/payments/([^/]+)/refund"), self._api_refund),
            ("GET", re.compile(r"/v1/payments/([^/]+)/refunds"), self._api_payment_refunds),
            ("GET", re.compile(r"/v1/refunds/([^/]+)"), self._api_get_refund),
        ]
        self._control_routes: list[Route] = [
            ("POST", re.compile(r"/_fake/orders/([^/]+)/payments"), self._control_pay),
            ("POST", re.compile(r"/_fake/payments/([^/]+)/capture"), self._control_capture),
            ("POST", re.compile(r"/_fake/deliveries"), self._control_deliver),
            ("GET", re.compile(r"/_fake/events"), self._control_events),
            ("GET", re.compile(r"/_fake/orders"), lambda r, p: (200, {"items": self.orders()})),
            ("GET", re.compile(r"/_fake/payments"), lambda r, p: (200, {"items": self.payments()})),
            ("GET", re.compile(r"/_fake/refunds"), lambda r, p: (200, {"items": self.refunds()})),
            ("POST", re.compile(r"/_fake/faults"), self._control_add_fault),
            ("GET", re.compile(r"/_fake/faults"), lambda r, p: (200, {"pending": self.faults()})),
            ("DELETE", re.compile(r"/_fake/faults"), self._control_clear_faults),
            ("POST", re.compile(r"/_fake/webhook"), self._control_set_webhook),
            ("GET", re.compile(r"/_fake/webhook"), lambda r, p: (200, self._webhook_view())),
            ("GET", re.compile(r"/_fake/requests"),
             lambda r, p: (200, {"items": self.requests_seen()})),
            ("POST", re.compile(r"/_fake/reset"), self._control_reset),
        ]

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeRazorpay:
        if self._server is not None:
            raise RuntimeError("the fake Razorpay is already started")
        self._server = _Server(self, self._requested_port)
        serving = threading.Thread(target=self._server.serve_forever,
                                   kwargs={"poll_interval": SERVE_POLL_S},
                                   name="fake-razorpay", daemon=True)
        delivering = threading.Thread(target=self._deliver_outbox, name="fake-razorpay-webhooks",
                                      daemon=True)
        self._threads = [serving, delivering]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and waits for the threads; answers being delayed by a fault are cut
        short (their clients have given up by then). Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()  # joins the request threads: none waits longer than a delivery
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(STOP_JOIN_TIMEOUT_S)
        self._threads = []

    def __enter__(self) -> FakeRazorpay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake Razorpay is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL for razorpay.Client(base_url=...): no /v1."""
        return f"http://{LOOPBACK}:{self.port}"

    def set_webhook(self, url: str | None, secret: str | None, *,
                    auto_deliver: bool | None = None) -> None:
        """Where webhooks go and the secret they are signed with (None: nowhere)."""
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK_HOSTS:
                raise ValueError(f"the webhook URL must be http(s) on a loopback host, got {url!r}")
            if not secret:
                raise ValueError("a webhook URL needs a webhook secret to sign with")
        with self._lock:
            self._webhook_url = url
            self._webhook_secret = secret
            if auto_deliver is not None:
                self._auto_deliver = auto_deliver

    # --- what tests use directly (the control API calls the same) ----------------------------

    def pay(self, order_id: str, *, outcome: str = "captured", amount: int | None = None,
            deliver: bool = True, method: str = "upi",
            error_description: str | None = None) -> dict[str, Any]:
        """A customer's payment of the order, and the webhooks Razorpay would send for it:
        authorized -> payment.authorized; captured -> payment.authorized, payment.captured
        (and order.paid when the order becomes paid); failed -> payment.failed."""
        if outcome not in OUTCOMES:
            raise ControlError(400, f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        if amount is not None and not _is_positive_int(amount):
            raise ControlError(400, f"amount must be a positive integer of paise, got {amount!r}")
        with self._lock:
            order = self._orders.get(order_id)
            if order is None:
                raise ControlError(404, f"no order {order_id}")
            payment, events = self._new_payment(order, outcome=outcome, amount=amount,
                                                method=method, error_description=error_description)
            answer: dict[str, Any] = {"payment": copy.deepcopy(payment), "events": events}
        answer["deliveries"] = self.deliver(events) if deliver else []
        return answer

    def capture(self, payment_id: str, *, deliver: bool = True) -> dict[str, Any]:
        """Captures an authorized payment (payment.captured, maybe order.paid)."""
        with self._lock:
            payment = self._payments.get(payment_id)
            if payment is None:
                raise ControlError(404, f"no payment {payment_id}")
            if payment["status"] != "authorized":
                raise ControlError(409, f"payment {payment_id} is {payment['status']}, not authorized")
            events = self._capture(payment)
            answer: dict[str, Any] = {"payment": copy.deepcopy(payment), "events": events}
        answer["deliveries"] = self.deliver(events) if deliver else []
        return answer

    def deliver(self, event_ids: Sequence[str], *, secret: str | None = None,
                signature: str | None = None, omit_signature: bool = False,
                body_override: str | bytes | None = None) -> list[dict[str, Any]]:
        """Delivers the stored events to the webhook URL now, one after another in exactly this
        order (repeat an id for a duplicate). `secret` signs instead of the webhook secret;
        `signature` is sent instead of the computed one; `omit_signature` sends none;
        `body_override` is sent instead of each event's body (and signed, unless `signature`).
        Returns each delivery's {"event_id", "status" (None: no answer), "error"}."""
        with self._lock:
            unknown = [ident for ident in event_ids if ident not in self._events]
            if unknown:
                raise ControlError(404, f"unknown events {unknown}")
            events = [self._events[ident] for ident in event_ids]
            url, default_secret = self._webhook_url, self._webhook_secret
        results = []
        for event in events:
            if url is None or default_secret is None:
                result: dict[str, Any] = {"event_id": event.id, "status": None,
                                          "error": "no webhook URL is set"}
            else:
                body = event.body if body_override is None else (
                    body_override.encode() if isinstance(body_override, str) else body_override)
                if omit_signature:
                    sent_signature = None
                elif signature is not None:
                    sent_signature = signature
                else:
                    sent_signature = _sign(body, secret if secret is not None else default_secret)
                result = _post_webhook(url, body, event_id=event.id, signature=sent_signature)
            with self._lock:
                event.deliveries.append({"status": result["status"], "error": result["error"]})
            results.append(result)
        return results

    def fail_refunds(self, count: int = 1) -> None:
        """The next `count` refunds made end `failed` (refund.created, then refund.failed; the
        payment's amount_refunded is given back), as a bank that refuses the credit would."""
        if not _is_positive_int(count) or count > FAULT_MAX_COUNT:
            raise ControlError(400, f"count must be 1..{FAULT_MAX_COUNT}, got {count!r}")
        with self._lock:
            self._refunds_to_fail += count

    def add_fault(self, kind: str, *, count: int = 1, delay_s: float = FAULT_DEFAULT_DELAY_S,
                  method: str | None = None, path: str | None = None) -> None:
        """The next `count` API calls (matching `method` and the `path` prefix, when given)
        fail as `kind` says: "500", "non_json" (502 with HTML), "wrong_shape" (200 with JSON
        that is no entity), "timeout" (answers after `delay_s`, having done nothing),
        "timeout_after_create" (acts, then answers after `delay_s`), "refuse" (closes the
        connection without an answer)."""
        if kind not in FAULT_KINDS:
            raise ControlError(400, f"next must be one of {sorted(FAULT_KINDS)}, got {kind!r}")
        if not _is_positive_int(count) or count > FAULT_MAX_COUNT:
            raise ControlError(400, f"count must be 1..{FAULT_MAX_COUNT}, got {count!r}")
        if (isinstance(delay_s, bool) or not isinstance(delay_s, int | float)
                or not 0 <= delay_s <= FAULT_MAX_DELAY_S):
            raise ControlError(400, f"delay_s must be 0..{FAULT_MAX_DELAY_S}, got {delay_s!r}")
        fault = _Fault(kind, float(delay_s), method.upper() if method else None, path)
        with self._lock:
            self._faults.extend([fault] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [fault.view() for fault in self._faults]

    def orders(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._orders.values()))

    def payments(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._payments.values()))

    def refunds(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._refunds.values()))

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e.view() for e in self._events.values()
                    if event_type is None or e.type == event_type]

    def requests_seen(self) -> list[dict[str, Any]]:
        """The API calls (/v1) received, oldest first: method, path, query, status (None when
        the connection was closed unanswered) and the fault applied."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            for store in (self._orders, self._payments, self._refunds, self._refund_keys,
                          self._events):
                store.clear()
            self._faults.clear()
            self._requests.clear()
            self._refunds_to_fail = 0

    # --- state changes (callers hold the lock) -------------------------------------------

    def _new_payment(self, order: dict[str, Any], *, outcome: str, amount: int | None,
                     method: str, error_description: str | None) -> tuple[dict[str, Any], list[str]]:
        payment: dict[str, Any] = {
            "id": _new_id("pay", self._payments),
            "entity": "payment",
            "amount": amount if amount is not None else (order["amount_due"] or order["amount"]),
            "currency": order["currency"],
            "status": "created",
            "order_id": order["id"],
            "invoice_id": None,
            "international": False,
            "method": method,
            "amount_refunded": 0,
            "refund_status": None,
            "captured": False,
            "description": None,
            "vpa": "success@razorpay" if method == "upi" else None,
            "email": "customer@example.com",
            "contact": "+919000090000",
            "notes": [],
            "fee": None,
            "tax": None,
            "error_code": None,
            "error_description": None,
            "error_source": None,
            "error_step": None,
            "error_reason": None,
            "created_at": int(time.time()),
        }
        self._payments[payment["id"]] = payment
        order["attempts"] += 1
        if order["status"] == "created":
            order["status"] = "attempted"
        if outcome == "failed":
            payment.update(status="failed", error_code="BAD_REQUEST_ERROR",
                           error_description=error_description or "Payment failed",
                           error_source="customer", error_step="payment_authorization",
                           error_reason="payment_failed")
            return payment, [self._event(PAYMENT_FAILED, payment=payment)]
        payment["status"] = "authorized"
        events = [self._event(PAYMENT_AUTHORIZED, payment=payment)]
        if outcome == "captured":
            events += self._capture(payment)
        return payment, events

    def _capture(self, payment: dict[str, Any]) -> list[str]:
        payment.update(status="captured", captured=True)
        events = [self._event(PAYMENT_CAPTURED, payment=payment)]
        order = self._orders.get(payment["order_id"] or "")
        if order is not None:
            order["amount_paid"] += payment["amount"]
            order["amount_due"] = max(0, order["amount"] - order["amount_paid"])
            if order["status"] != "paid" and order["amount_paid"] >= order["amount"]:
                order["status"] = "paid"
                events.append(self._event(ORDER_PAID, payment=payment, order=order))
        return events

    def _event(self, event_type: str, **entities: dict[str, Any]) -> str:
        """Stores an event whose body is the entities as they are now."""
        created_at = int(time.time())
        body = json.dumps({
            "entity": "event",
            "account_id": ACCOUNT_ID,
            "event": event_type,
            "contains": list(entities),
            "payload": {name: {"entity": entity} for name, entity in entities.items()},
            "created_at": created_at,
        }, separators=(",", ":")).encode()
        ident = _new_id("evt", self._events)
        self._events[ident] = _Event(ident, event_type, body, created_at)
        return ident

    def _queue_deliveries(self, event_ids: list[str]) -> None:
        """Events caused by an API call go out after the answer, as Razorpay's do: delivering
        inside the call could wait on a receiver that is itself waiting for this answer."""
        if self._auto_deliver and self._webhook_url is not None:
            for ident in event_ids:
                self._outbox.put(ident)

    def _deliver_outbox(self) -> None:
        while (ident := self._outbox.get()) is not None:
            if not self._stopping.is_set():
                self.deliver([ident])

    # --- HTTP ----------------------------------------------------------------------------

    def _serve(self, method: str, target: str, headers: Message, body: bytes) -> _Reply | None:
        """The answer to one request; None closes the connection without one."""
        parts = urlsplit(target)
        request = _Request(method, parts.path.rstrip("/") or "/", parse_qs(parts.query), headers, body)
        if request.path.startswith("/_fake/"):
            return self._serve_control(request)
        with self._lock:
            fault = next((f for f in self._faults if f.matches(request)), None)
            if fault is not None:
                self._faults.remove(fault)
        reply = self._serve_api(request, fault)
        with self._lock:
            self._requests.append({"method": method, "path": request.path, "query": parts.query,
                                   "status": None if reply is None else reply.status,
                                   "fault": None if fault is None else fault.kind})
        return reply

    def _serve_api(self, request: _Request, fault: _Fault | None) -> _Reply | None:
        kind = None if fault is None else fault.kind
        if kind == "refuse":
            return None
        if kind == "500":
            return _api_error_reply(_ApiError(500, "The server encountered an error. The incident "
                                              "has been reported to admins.", code="SERVER_ERROR"))
        if kind == "non_json":
            return _Reply(502, _HTML_ERROR_PAGE, "text/html")
        if kind == "wrong_shape":
            return _json_reply(200, {"entity": "unexpected", "detail": "not what was asked for"})
        if kind == "timeout" and fault is not None:
            self._stopping.wait(fault.delay_s)
            return _api_error_reply(_ApiError(504, "The fake answered after its delay",
                                              code="SERVER_ERROR"))
        try:
            self._authenticate(request)
            reply = _json_reply(*self._route(self._api_routes, request))
        except _ApiError as e:
            reply = _api_error_reply(e)
        if kind == "timeout_after_create" and fault is not None:
            self._stopping.wait(fault.delay_s)
        return reply

    def _serve_control(self, request: _Request) -> _Reply:
        try:
            return _json_reply(*self._route(self._control_routes, request))
        except ControlError as e:
            return _json_reply(e.status, {"error": e.message})
        except _ApiError as e:  # no such route
            return _json_reply(e.status, {"error": e.description})

    @staticmethod
    def _route(routes: list[Route], request: _Request) -> tuple[int, Any]:
        for method, pattern, handler in routes:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                return handler(request, {"id": match.group(1)} if match.groups() else {})
        raise _ApiError(404, "The requested URL was not found on the server.")

    def _authenticate(self, request: _Request) -> None:
        scheme, _, encoded = (request.headers.get("Authorization") or "").partition(" ")
        try:
            key_id, _, key_secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            key_id = key_secret = ""
        if not (scheme.lower() == "basic"
                and hmac.compare_digest(key_id.encode(), self.key_id.encode())
                and hmac.compare_digest(key_secret.encode(), self._key_secret.encode())):
            raise _ApiError(401, "Authentication failed")

    # --- Razorpay's API --------------------------------------------------------------------

    def _api_create_order(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _api_json(request)
        amount = data.get("amount")
        if not _is_positive_int(amount) or amount < ORDER_MIN_AMOUNT_PAISE:
            raise _ApiError(400, "The amount must be atleast INR 1.00", field_name="amount")
        currency = data.get("currency")
        if not (isinstance(currency, str) and len(currency) == CURRENCY_CODE_CHARS
                and currency.isalpha() and currency.isupper()):
            raise _ApiError(400, "The currency field is required and must be a currency code.",
                            field_name="currency")
        receipt = data.get("receipt")
        if receipt is not None and (not isinstance(receipt, str) or len(receipt) > RECEIPT_MAX_CHARS):
            raise _ApiError(400, f"The receipt may not be greater than {RECEIPT_MAX_CHARS} characters.",
                            field_name="receipt")
        notes = _api_notes(data.get("notes"))
        partial = data.get("partial_payment", False)
        if not isinstance(partial, bool):
            raise _ApiError(400, "The partial payment field must be true or false.",
                            field_name="partial_payment")
        with self._lock:
            order: dict[str, Any] = {
                "id": _new_id("order", self._orders),
                "entity": "order",
                "amount": amount,
                "amount_paid": 0,
                "amount_due": amount,
                "currency": currency,
                "receipt": receipt,
                "offer_id": None,
                "partial_payment": partial,
                "status": "created",
                "attempts": 0,
                # Razorpay's API answers empty notes as [] (a PHP empty array), not {}.
                "notes": notes or [],
                "created_at": int(time.time()),
            }
            self._orders[order["id"]] = order
            return 200, copy.deepcopy(order)

    def _api_list_orders(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        count = _query_int(request, "count", LIST_DEFAULT_COUNT, 1, LIST_MAX_COUNT)
        skip = _query_int(request, "skip", 0, 0, None)
        receipt = request.query.get("receipt", [None])[0]
        with self._lock:
            newest_first = [o for o in reversed(self._orders.values())
                            if receipt is None or o["receipt"] == receipt]
            return 200, _collection(newest_first[skip:skip + count])

    def _api_order(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            return 200, copy.deepcopy(self._existing(self._orders, params["id"]))

    def _api_order_payments(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            order = self._existing(self._orders, params["id"])
            return 200, _collection([p for p in reversed(self._payments.values())
                                     if p["order_id"] == order["id"]])

    def _api_payment(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            return 200, copy.deepcopy(self._existing(self._payments, params["id"]))

    def _api_capture(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _api_json(request)
        with self._lock:
            payment = self._existing(self._payments, params["id"])
            if payment["status"] != "authorized":
                raise _ApiError(400, "Only payments which have been authorized and not yet "
                                     "captured can be captured")
            if data.get("amount") != payment["amount"]:
                raise _ApiError(400, "Capture amount must be equal to the amount authorized",
                                field_name="amount")
            events = self._capture(payment)
            self._queue_deliveries(events)
            return 200, copy.deepcopy(payment)

    def _api_refund(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        """Refunds are processed at once: refund.created (pending) then refund.processed (or,
        after fail_refunds, refund.failed)."""
        data = _api_json(request)
        key = request.headers.get("X-Refund-Idempotency")
        with self._lock:
            payment = self._existing(self._payments, params["id"])
            if key and key in self._refund_keys:
                earlier = self._refunds[self._refund_keys[key]]
                if earlier["payment_id"] != payment["id"]:
                    raise _ApiError(400, "The idempotency key was used for another payment")
                return 200, copy.deepcopy(earlier)
            if not payment["captured"]:
                raise _ApiError(400, "The payment has not been captured")
            left = payment["amount"] - payment["amount_refunded"]
            amount = data.get("amount", left)
            if not _is_positive_int(amount) or amount > left:
                raise _ApiError(400, "The refund amount provided is greater than amount captured",
                                field_name="amount")
            refund: dict[str, Any] = {
                "id": _new_id("rfnd", self._refunds),
                "entity": "refund",
                "amount": amount,
                "currency": payment["currency"],
                "payment_id": payment["id"],
                "notes": _api_notes(data.get("notes")) or [],
                "receipt": data.get("receipt"),
                "acquirer_data": {"arn": None},
                "created_at": int(time.time()),
                "batch_id": None,
                "status": "pending",
                "speed_processed": "normal",
                "speed_requested": data.get("speed", "normal"),
            }
            self._refunds[refund["id"]] = refund
            if key:
                self._refund_keys[key] = refund["id"]
            payment["amount_refunded"] += amount
            full = payment["amount_refunded"] == payment["amount"]
            payment["refund_status"] = "full" if full else "partial"
            if full:
                payment["status"] = "refunded"
            events = [self._event(REFUND_CREATED, refund=refund, payment=payment)]
            if self._refunds_to_fail > 0:  # fail_refunds: the refund is given back
                self._refunds_to_fail -= 1
                payment["amount_refunded"] -= amount
                payment["refund_status"] = "partial" if payment["amount_refunded"] else None
                if payment["status"] == "refunded":
                    payment["status"] = "captured"
                refund["status"] = "failed"
                events.append(self._event(REFUND_FAILED, refund=refund, payment=payment))
                self._queue_deliveries(events)
                return 200, copy.deepcopy(refund)
            refund["status"] = "processed"
            events.append(self._event(REFUND_PROCESSED, refund=refund, payment=payment))
            self._queue_deliveries(events)
            return 200, copy.deepcopy(refund)

    def _api_payment_refunds(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            payment = self._existing(self._payments, params["id"])
            return 200, _collection([r for r in reversed(self._refunds.values())
                                     if r["payment_id"] == payment["id"]])

    def _api_get_refund(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            return 200, copy.deepcopy(self._existing(self._refunds, params["id"]))

    @staticmethod
    def _existing(store: dict[str, dict[str, Any]], ident: str) -> dict[str, Any]:
        if ident not in store:  # Razorpay answers an unknown id with 400, not 404
            raise _ApiError(400, "The id provided does not exist", field_name="id")
        return store[ident]

    # --- the control API -------------------------------------------------------------------

    def _control_pay(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _control_json(request)
        return 201, self.pay(params["id"], outcome=data.get("outcome", "captured"),
                             amount=data.get("amount"), deliver=_flag(data, "deliver", True),
                             method=str(data.get("method", "upi")),
                             error_description=data.get("error_description"))

    def _control_capture(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _control_json(request)
        return 200, self.capture(params["id"], deliver=_flag(data, "deliver", True))

    def _control_deliver(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _control_json(request)
        event_ids = data.get("event_ids")
        if (not isinstance(event_ids, list) or not event_ids
                or not all(isinstance(i, str) for i in event_ids)):
            raise ControlError(400, "event_ids must be a non-empty list of event ids")
        for name in ("secret", "signature", "body_override"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ControlError(400, f"{name} must be a string")
        with self._lock:
            if self._webhook_url is None:
                raise ControlError(409, "no webhook URL is set (POST /_fake/webhook)")
        return 200, {"deliveries": self.deliver(
            event_ids, secret=data.get("secret"), signature=data.get("signature"),
            omit_signature="signature" in data and data["signature"] is None,
            body_override=data.get("body_override"))}

    def _control_events(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        return 200, {"items": self.events(request.query.get("type", [None])[0])}

    def _control_add_fault(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _control_json(request)
        for name in ("method", "path"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ControlError(400, f"{name} must be a string")
        self.add_fault(str(data.get("next")), count=data.get("count", 1),
                       delay_s=data.get("delay_s", FAULT_DEFAULT_DELAY_S),
                       method=data.get("method"), path=data.get("path"))
        return 200, {"pending": self.faults()}

    def _control_clear_faults(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        self.clear_faults()
        return 200, {"pending": []}

    def _control_set_webhook(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        data = _control_json(request)
        url, secret, auto = data.get("url"), data.get("secret"), data.get("auto_deliver")
        if not all(v is None or isinstance(v, str) for v in (url, secret)):
            raise ControlError(400, "url and secret must be strings or null")
        if auto is not None and not isinstance(auto, bool):
            raise ControlError(400, "auto_deliver must be true or false")
        try:
            self.set_webhook(url, secret, auto_deliver=auto)
        except ValueError as e:
            raise ControlError(400, str(e)) from e
        return 200, self._webhook_view()

    def _control_reset(self, request: _Request, params: dict[str, str]) -> tuple[int, Any]:
        self.reset()
        return 200, {}

    def _webhook_view(self) -> dict[str, Any]:
        with self._lock:  # the secret is not echoed: the caller set it
            return {"url": self._webhook_url, "auto_deliver": self._auto_deliver}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeRazorpay, port: int) -> None:
        self.fake = fake
        super().__init__((LOOPBACK, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks up the host's FQDN (a reverse DNS query): not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = LOOPBACK, int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = HANDLER_SOCKET_TIMEOUT_S
    server_version = "FakeRazorpay/1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PATCH(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read /_fake/requests instead."""

    def _answer(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= REQUEST_MAX_BYTES:
            self._send(_json_reply(413, {"error": f"a body of 0..{REQUEST_MAX_BYTES} bytes"}))
            return
        body = self.rfile.read(length) if length else b""
        reply = self.server.fake._serve(self.command, self.path, self.headers, body)
        if reply is None:  # the "refuse" fault: the client sees the connection closed
            self.close_connection = True
            return
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:  # the client gave up (a delayed answer): nobody to tell
            self.close_connection = True


def _post_webhook(url: str, body: bytes, *, event_id: str, signature: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "X-Razorpay-Event-Id": event_id,
               "User-Agent": "Razorpay-Webhook/v1"}
    if signature is not None:
        headers["X-Razorpay-Signature"] = signature
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    # No proxies: webhooks go to loopback, never through whatever HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=WEBHOOK_TIMEOUT_S) as answer:
            answer.read()
            return {"event_id": event_id, "status": int(answer.status), "error": None}
    except urllib.error.HTTPError as e:  # a 4xx/5xx is an answer, not a failure to deliver
        with e:
            e.read()
        return {"event_id": event_id, "status": int(e.code), "error": None}
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, garbled
        return {"event_id": event_id, "status": None, "error": repr(e)}


def _sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _new_id(prefix: str, taken: Mapping[str, object]) -> str:
    while True:
        ident = f"{prefix}_{''.join(secrets.choice(_ALNUM) for _ in range(ID_RANDOM_CHARS))}"
        if ident not in taken:
            return ident


def _is_positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _collection(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"entity": "collection", "count": len(items), "items": copy.deepcopy(items)}


def _api_json(request: _Request) -> dict[str, Any]:
    return _json_object(request.body, lambda m: _ApiError(400, m))


def _control_json(request: _Request) -> dict[str, Any]:
    return _json_object(request.body, lambda m: ControlError(400, m))


def _json_object(body: bytes, error: Callable[[str], Exception]) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as e:
        raise error(f"The request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error("The request body must be a JSON object")
    return data


def _api_notes(notes: object) -> dict[str, str]:
    """Notes as Razorpay takes them: an object (or an empty array) of at most 15 pairs, each
    value at most 256 characters; numbers are kept as text so that every note reads back as
    a string."""
    if notes is None or notes == []:
        return {}
    if not isinstance(notes, dict):
        raise _ApiError(400, "The notes field must be an object.", field_name="notes")
    if len(notes) > NOTES_MAX_PAIRS:
        raise _ApiError(400, f"Number of notes must not be more than {NOTES_MAX_PAIRS}.",
                        field_name="notes")
    kept = {}
    for key, value in notes.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _ApiError(400, "The notes values must be strings or numbers.", field_name="notes")
        text = value if isinstance(value, str) else json.dumps(value)
        if len(key) > NOTE_MAX_CHARS or len(text) > NOTE_MAX_CHARS:
            raise _ApiError(400, f"Notes may not be greater than {NOTE_MAX_CHARS} characters.",
                            field_name="notes")
        kept[key] = text
    return kept


def _query_int(request: _Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name, [None])[0]
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        raise _ApiError(400, f"The {name} must be between {low} and {high}.", field_name=name)
    return value


def _flag(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ControlError(400, f"{name} must be true or false")
    return value


def _json_reply(status: int, body: Any) -> _Reply:
    return _Reply(status, json.dumps(body).encode())


def _api_error_reply(error: _ApiError) -> _Reply:
    return _json_reply(error.status, {"error": {
        "code": error.code, "description": error.description, "source": "NA", "step": "NA",
        "reason": "NA", "metadata": {}, "field": error.field_name}})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.fake_razorpay",
        description="A fake Razorpay API on 127.0.0.1 for local demos and tests.",
        epilog=CONTROL_API, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help="0: any free port")
    parser.add_argument("--key-id", default=DEFAULT_KEY_ID)
    parser.add_argument("--key-secret", default=DEFAULT_KEY_SECRET)
    parser.add_argument("--webhook-url", help="where webhooks go (a loopback URL)")
    parser.add_argument("--webhook-secret", help="the secret webhooks are signed with")
    parser.add_argument("--no-auto-deliver", action="store_true",
                        help="keep the webhooks of API calls (captures, refunds) undelivered")
    args = parser.parse_args(argv)
    try:
        fake = FakeRazorpay(key_id=args.key_id, key_secret=args.key_secret,
                            webhook_url=args.webhook_url, webhook_secret=args.webhook_secret,
                            port=args.port, auto_deliver=not args.no_auto_deliver)
    except ValueError as e:
        parser.error(str(e))
    done = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    fake.start()
    print(f"fake Razorpay at {fake.url} (key id {fake.key_id}); control API at {fake.url}/_fake;"
          f" webhooks to {args.webhook_url or 'nowhere yet'}. Ctrl-C stops.", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
