"""The payment routes' refusals that need no database: the webhook is refused before anything
is recorded (no secret configured: 503; a signature that does not match: 400), a malformed
payment id in a path is the API's 422 naming it, and the API's manual methods are the domain's.
And the wiring of payments: one Razorpay gateway per runtime, closed with it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
from pathlib import Path
from typing import get_args

import anyio
from litestar.testing import TestClient

from api.app import create_app
from api.payments import GATEWAY_THREADS, ManualMethod, gateway_limiter
from api.webhooks import event_id_of
from domain.gateway_events import EVENT_ID_MAX_CHARS
from domain.payment import MANUAL_METHODS
from infra.wiring import build_api
from tests.unit.test_wiring import unconnected_runtime

SECRET = "unit-webhook-secret"
BODY = b'{"event": "payment.captured", "payload": {}}'


def _client(tmp_path: Path, *secrets: str) -> TestClient:  # type: ignore[type-arg]
    rt = unconnected_runtime(tmp_path)  # its ledger fails any use: nothing may be recorded
    rt = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, razorpay_webhook_secrets=secrets))
    app, _ = create_app(build_api(rt, admin_token="t").deps)
    return TestClient(app)


def test_without_a_webhook_secret_the_webhook_answers_503(tmp_path: Path) -> None:
    signature = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    with _client(tmp_path) as client:
        r = client.post("/webhooks/razorpay", content=BODY,
                        headers={"X-Razorpay-Signature": signature})
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text
    assert r.json()["detail"].startswith("payments not configured")


def test_a_webhook_whose_signature_does_not_match_is_a_400_before_anything_is_recorded(
        tmp_path: Path) -> None:
    signed = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    with _client(tmp_path, SECRET) as client:
        for body, headers in ((BODY, {}), (BODY, {"X-Razorpay-Signature": "ab" * 32}),
                              (BODY + b" ", {"X-Razorpay-Signature": signed}),
                              # not JSON by its Content-Type: still only the signature decides
                              (b"\xff", {"X-Razorpay-Signature": signed,
                                         "Content-Type": "text/plain"})):
            r = client.post("/webhooks/razorpay", content=body, headers=headers)
            assert r.status_code == 400, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert "X-Razorpay-Signature" in r.json()["detail"]


def test_the_manual_methods_the_api_accepts_are_the_domains() -> None:
    assert get_args(ManualMethod) == MANUAL_METHODS


def test_a_malformed_payment_id_is_a_422_naming_it(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        for method, path, what in (("GET", "/admin/v1/payments/nope", "payment"),
                                   ("POST", "/admin/v1/invoices/nope/payment-orders", "invoice"),
                                   ("POST", "/admin/v1/invoices/nope/payments", "invoice")):
            r = client.request(method, path, json={})
            assert r.status_code == 422, r.text
            assert r.json()["errors"] == [{"field": "id", "message": f"{what} id must be a UUID"}]


def test_a_runtime_builds_one_razorpay_gateway_however_often_payments_are_built(
        tmp_path: Path) -> None:
    rt = unconnected_runtime(tmp_path)
    rt = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, razorpay_key_id="rzp_test_once", razorpay_key_secret="secret-once"))
    first, second = rt.payments(), rt.payments()  # the scheduler builds one every minute
    gateway = rt.gateway()
    assert gateway is not None and first.configured
    assert first._gateway is gateway and second._gateway is gateway
    # A copy with other settings has its own (here: none), and leaves this one open.
    bare = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, razorpay_key_id=None, razorpay_key_secret=None))
    assert bare.gateway() is None and not bare.payments().configured
    bare.close_gateway()
    assert rt.gateway() is gateway
    rt.close_gateway()
    assert rt.gateway_ is None


def test_gateway_calls_get_a_thread_limiter_of_their_own_per_event_loop() -> None:
    async def limiters() -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter, float]:
        default = anyio.to_thread.current_default_thread_limiter()
        first, again = gateway_limiter(), gateway_limiter()
        assert first is again and first is not default
        # Usable in this loop: a thread runs under it.
        assert await anyio.to_thread.run_sync(lambda: 7, limiter=first) == 7
        return first, default, first.total_tokens

    one, default_one, tokens = asyncio.run(limiters())
    two, _, _ = asyncio.run(limiters())
    assert tokens == GATEWAY_THREADS and one is not two and one is not default_one


def test_every_verified_delivery_gets_an_event_id_it_can_be_recorded_under() -> None:
    def digest(source: bytes) -> str:
        return "sha256:" + hashlib.sha256(source).hexdigest()[:40]

    longest = "e" * EVENT_ID_MAX_CHARS
    too_long, unprintable = longest + "e", "evt_\x85nel"  # a C1 control, as latin-1 decodes it
    assert event_id_of(" evt_1 ", BODY) == "evt_1"
    assert event_id_of(longest, BODY) == longest
    assert event_id_of(None, BODY) == event_id_of("  ", BODY) == digest(BODY)
    assert event_id_of(too_long, BODY) == digest(too_long.encode())
    assert event_id_of(unprintable, BODY) == digest(unprintable.encode())
    assert event_id_of(too_long, b"other body") == event_id_of(too_long, BODY)  # a retry collides
