"""Payments over HTTP against the in-process service and the fake Razorpay (infra/fake_razorpay.py):
orders (once per amount due, whatever the gateway does), signed webhooks applied until the invoice
is paid (repeats, bad signatures and tampered bodies changing nothing), manual payments, what an
organisation-scoped token sees, and a service without Razorpay keys."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import anyio.to_thread
import httpx
import pytest

from adapters.payment_manager import NAME as MANAGER
from api.app import create_app
from domain.errors import NotFound
from domain.payment import GatewayEvent, gateway_event_ref
from infra.embedded import free_port
from infra.fake_razorpay import FakeRazorpay
from infra.scheduler import recover_payments
from infra.wiring import Runtime, admin_token, build_api
from projections.payments import orders_to_check
from tests.conftest import (
    TEST_ADMIN_TOKEN,
    http_status,
    make_settings,
    running,
    tracked,
    wait_until,
)
from tests.e2e.conftest import AUTH, Api, close_and_drop
from tests.e2e.test_invoicing_http import last_period

pytestmark = pytest.mark.anyio

KEY_ID, KEY_SECRET = "rzp_test_payments", "key-secret-payments"
WEBHOOK_SECRET, OLD_WEBHOOK_SECRET = "whsec-new-0123", "whsec-old-4567"  # a rotation under way
GATEWAY_TIMEOUT_S = 1.0  # the service's wait on the fake: short, so the timeout faults are quick
FAULT_DELAY_S = 2.0  # a "timeout" fault answers this late: after the service gave up
WEBHOOK = "/webhooks/razorpay"
TENANTS = ("checkout", "faults", "manual", "scoped", "other", "bare", "suppressed",
           "starved")  # an invoice per test
# Orders stuck on a slow Razorpay, against a webhook's answer: the fake holds each order request
# this long, under a gateway timeout long enough to wait it out; the webhook must answer sooner.
SLOW_GATEWAY_DELAY_S = 2.0
SLOW_GATEWAY_TIMEOUT_S = 10.0
WEBHOOK_PROMPT_S = 1.0
STUCK_ORDERS = 2  # and anyio's default threads cut to as many, as if all 40 were taken by orders


@dataclasses.dataclass
class Payments:
    api: Api
    fake: httpx.AsyncClient  # the fake's control API
    invoices: dict[str, dict[str, Any]]  # tenant name -> its finalized invoice

    def head(self) -> int:
        return self.api.rt.ledger.head()

    async def quiet_head(self) -> int:
        """The ledger head once the payments manager has applied every recorded delivery (it
        writes in the background): what a request that records nothing must leave unchanged."""
        return int(await wait_until(
            lambda: (head := self.head()) <= tracked(self.api.rt, MANAGER) and head,
            "the payments manager caught up"))

    def recorded(self, event_id: str) -> GatewayEvent | None:
        try:
            return self.api.rt.ledger.get(gateway_event_ref(event_id), GatewayEvent)
        except NotFound:
            return None


async def _ok(r: httpx.Response, status: int = 201) -> Any:
    assert r.status_code == status, r.text
    return r.json()


async def _finalized_invoices(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """One finalized invoice (a ₹500 base fee, + GST) per tenant, for last month."""
    await _ok(await http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "pay_api", "name": "API", "aggregation": "count"}))
    await _ok(await http.post("/admin/v1/plans", headers=AUTH, json={
        "code": "payg", "name": "Pay", "base_fee": "500", "minimum": "0",
        "charges": [{"metric": "pay_api", "model": "per_unit", "unit_price": "0.01"}]}))
    orgs = {}
    for name in TENANTS:
        org = (await _ok(await http.post("/admin/v1/organisations", headers=AUTH, json={
            "name": name, "billing_email": f"ap@{name}.in", "state_code": "29"})))["id"]
        await _ok(await http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH, json={
            "plan_code": "payg", "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()}))
        orgs[org] = name
    period, _ = last_period()
    run = await _ok(await http.post("/admin/v1/invoice-runs", headers=AUTH,
                                    json={"period": period}), 200)
    assert run["created"] == len(TENANTS), run
    drafts = (await _ok(await http.get("/admin/v1/invoices", headers=AUTH), 200))["items"]
    invoices = {}
    for draft in drafts:
        invoices[orgs[draft["organisation_id"]]] = await _ok(await http.post(
            f"/admin/v1/invoices/{draft['id']}/finalize", headers=AUTH), 200)
    return invoices


@pytest.fixture(scope="module")
async def payments(tmp_path_factory: pytest.TempPathFactory,
                   server_urls: tuple[str, str]) -> AsyncIterator[Payments]:
    with FakeRazorpay(key_id=KEY_ID, key_secret=KEY_SECRET) as fake:
        port = free_port()
        settings = make_settings(
            Path(tmp_path_factory.mktemp("payments")), port=port, razorpay_key_id=KEY_ID,
            razorpay_key_secret=KEY_SECRET, razorpay_base_url=fake.url,
            razorpay_webhook_secrets=(WEBHOOK_SECRET, OLD_WEBHOOK_SECRET),
            razorpay_timeout_s=GATEWAY_TIMEOUT_S)
        fake.set_webhook(f"http://127.0.0.1:{port}{WEBHOOK}", WEBHOOK_SECRET)
        rt = Runtime.open(settings, *server_urls)
        role = build_api(rt, admin_token=admin_token(settings))
        base = f"http://127.0.0.1:{port}"
        try:
            async with running(rt, {"api", "relay", "project"}, api=role), \
                    httpx.AsyncClient(base_url=base, timeout=10) as http, \
                    httpx.AsyncClient(base_url=fake.url, timeout=10) as control:
                await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "up")
                yield Payments(Api(http, rt, role), control, await _finalized_invoices(http))
        finally:
            rt.close_gateway()
            close_and_drop(server_urls[0], settings.pg_schema, rt)


def _sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _deliver(p: Payments, body: bytes, *, signature: str | None, event_id: str | None,
                   ) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Razorpay-Signature"] = signature
    if event_id is not None:
        headers["X-Razorpay-Event-Id"] = event_id
    return await p.api.http.post(WEBHOOK, content=body, headers=headers)


async def _invoice(p: Payments, ident: str) -> dict[str, Any]:
    invoice: dict[str, Any] = await _ok(await p.api.http.get(f"/admin/v1/invoices/{ident}",
                                                             headers=AUTH), 200)
    return invoice


async def _order(p: Payments, invoice_id: str, status: int = 201) -> Any:
    return await _ok(await p.api.http.post(f"/admin/v1/invoices/{invoice_id}/payment-orders",
                                           headers=AUTH), status)


async def _fake_orders(p: Payments, receipt: str) -> list[dict[str, Any]]:
    items = (await _ok(await p.fake.get("/_fake/orders"), 200))["items"]
    return [o for o in items if o["receipt"] == receipt]


async def test_a_checkout_paid_by_signed_webhooks_pays_the_invoice_once(payments: Payments) -> None:
    p, invoice = payments, payments.invoices["checkout"]
    first = await p.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH)
    assert first.status_code == 201, first.text
    order = first.json()
    assert order == {"invoice_id": invoice["id"], "razorpay_order_id": order["razorpay_order_id"],
                     "amount": invoice["amount_due"], "currency": "INR", "key_id": KEY_ID}
    assert int(first.headers["X-Ledger-Position"]) > 0
    again = await p.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH)
    assert (again.status_code, again.json()) == (200, order)  # a retry answers the open order
    assert again.headers["X-Ledger-Position"] == "0"
    assert [o["id"] for o in await _fake_orders(p, invoice["number"])] == [order["razorpay_order_id"]]

    # The customer pays; Razorpay's webhooks arrive, the first signed with the old secret (a
    # delivery retried from before the rotation).
    paid = await _ok(await p.fake.post(f"/_fake/orders/{order['razorpay_order_id']}/payments",
                                       json={"outcome": "captured", "deliver": False}))
    events = paid["events"]
    assert len(events) >= 2  # payment.authorized, payment.captured (and order.paid)
    old = await _ok(await p.fake.post("/_fake/deliveries", json={
        "event_ids": events[:1], "secret": OLD_WEBHOOK_SECRET}), 200)
    rest = await _ok(await p.fake.post("/_fake/deliveries", json={"event_ids": events[1:]}), 200)
    assert [d["status"] for d in old["deliveries"] + rest["deliveries"]] == [200] * len(events)

    async def settled() -> dict[str, Any]:
        return await _invoice(p, invoice["id"])

    await wait_until(lambda: all((e := p.recorded(i)) is not None and e.processed for i in events),
                     "every delivery applied")
    now = await settled()
    assert (now["status"], now["amount_due"], now["paid"]) == ("paid", 0, invoice["total"])
    listed = (await _ok(await p.api.http.get("/admin/v1/payments", headers=AUTH,
                                             params={"invoice_id": invoice["id"]}), 200))["items"]
    assert [(x["status"], x["amount"], x["applied"], x["review"]) for x in listed] == [
        ("captured", invoice["amount_due"], invoice["amount_due"], [])]
    assert listed[0]["razorpay_payment_id"] == paid["payment"]["id"]
    assert listed[0]["razorpay_order_id"] == order["razorpay_order_id"]
    one = await _ok(await p.api.http.get(f"/admin/v1/payments/{listed[0]['id']}", headers=AUTH), 200)
    assert one == listed[0]

    # The same delivery again (Razorpay retries): recognised, nothing written.
    event = next(e for e in (await _ok(await p.fake.get("/_fake/events"), 200))["items"]
                 if e["id"] == events[-1])
    body = event["body"].encode()
    head = await p.quiet_head()
    repeat = await _deliver(p, body, signature=_sign(body), event_id=event["id"])
    assert (repeat.status_code, repeat.json()) == (200, {"status": "duplicate"})
    redelivered = await _ok(await p.fake.post("/_fake/deliveries", json={"event_ids": events}), 200)
    assert [d["status"] for d in redelivered["deliveries"]] == [200] * len(events)
    assert p.head() == head
    assert (await settled())["amount_due"] == 0

    # Unsigned, wrongly signed, signed with a secret not configured, or a body changed after
    # signing: 400, and nothing recorded.
    tampered = body.replace(str(invoice["amount_due"]).encode(), b"1", 1)
    assert tampered != body
    for sent, signature in ((body, None), (body, "0" * 64), (body, _sign(body, "not-ours")),
                            (tampered, _sign(body))):
        fresh = f"evt_bad_{uuid.uuid4().hex[:10]}"
        r = await _deliver(p, sent, signature=signature, event_id=fresh)
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", r.text
        assert p.recorded(fresh) is None
    assert p.head() == head

    # One payment confirmation email, however often the mail job runs.
    notifier = p.api.rt.notifier()
    await asyncio.to_thread(notifier.send_due)
    await asyncio.to_thread(notifier.send_due)
    outbox = p.api.rt.settings.data_dir / "outbox"
    mails = [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
             for f in sorted(outbox.glob("*.eml"))]
    confirmations = [m for m in mails if str(m["Subject"]).startswith("Payment received")]
    assert [(str(m["To"]), invoice["number"] in str(m["Subject"])) for m in confirmations] == [
        ("ap@checkout.in", True)]


async def test_a_verified_delivery_is_recorded_whatever_it_holds(payments: Payments) -> None:
    p = payments
    for body in (b"not json at all", b'{"event": "payment.dispute.created", "payload": {}}',
                 b"\xff\x00\xfe", b'{"event": "x\\u0000y", "payload": {"payment": 1}}',
                 b'{"event": "\\ud800"}'):
        event_id = f"evt_odd_{uuid.uuid4().hex[:10]}"
        r = await _deliver(p, body, signature=_sign(body, OLD_WEBHOOK_SECRET), event_id=event_id)
        assert (r.status_code, r.json()) == (200, {"status": "recorded"}), r.text
        recorded = p.recorded(event_id)
        assert recorded is not None and recorded.body == body
    # Without an event id, the body's digest stands for one: its repeat is still a repeat.
    body = b'{"event": "payment.dispute.closed", "payload": {}}'
    answers = [(await _deliver(p, body, signature=_sign(body), event_id=None)).json()
               for _ in range(2)]
    assert answers == [{"status": "recorded"}, {"status": "duplicate"}]
    assert p.recorded("sha256:" + hashlib.sha256(body).hexdigest()[:40]) is not None
    # An event id longer than we store (100 characters) is stood for by its digest: still 200,
    # and its repeat is still a repeat. One of exactly 100 is kept as given.
    body = b'{"event": "payment.dispute.won", "payload": {}}'
    long_id, longest_kept = "evt_" + "L" * 97, "evt_" + "K" * 96
    answers = [(await _deliver(p, body, signature=_sign(body), event_id=event_id)).json()
               for event_id in (long_id, long_id, longest_kept)]
    assert answers == [{"status": "recorded"}, {"status": "duplicate"}, {"status": "recorded"}]
    derived = p.recorded("sha256:" + hashlib.sha256(long_id.encode()).hexdigest()[:40])
    assert derived is not None and derived.body == body
    assert p.recorded(longest_kept) is not None
    # Applied (as unreadable or ignored) and read-modelled like any other: nothing is stuck.
    await p.quiet_head()
    assert (await p.api.http.get("/admin/v1/payments", headers=AUTH)).status_code == 200


@pytest.mark.parametrize(("fault", "status"), [("500", 502), ("timeout", 503), ("refuse", 503),
                                               ("non_json", 502)])
async def test_a_gateway_fault_on_order_creation_records_nothing(
        payments: Payments, fault: str, status: int) -> None:
    p, invoice = payments, payments.invoices["faults"]
    head = await p.quiet_head()
    await _ok(await p.fake.post("/_fake/faults", json={
        "next": fault, "method": "POST", "path": "/v1/orders", "delay_s": FAULT_DELAY_S}), 200)
    r = await p.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH)
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
    if status == 503:
        assert "Retry-After" in r.headers
    assert p.head() == head
    assert (await _invoice(p, invoice["id"]))["amount_due"] == invoice["amount_due"]
    await p.fake.delete("/_fake/faults")


async def test_an_order_whose_answer_was_lost_is_adopted_by_the_retry(payments: Payments) -> None:
    p, invoice = payments, payments.invoices["faults"]
    head = await p.quiet_head()
    await _ok(await p.fake.post("/_fake/faults", json={
        "next": "timeout_after_create", "method": "POST", "path": "/v1/orders",
        "delay_s": FAULT_DELAY_S}), 200)
    lost = await p.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH)
    assert lost.status_code == 503, lost.text
    assert p.head() == head
    (made,) = await _fake_orders(p, invoice["number"])  # Razorpay made it; we did not hear
    retry = await _order(p, invoice["id"])
    assert (retry["razorpay_order_id"], retry["amount"]) == (made["id"], invoice["amount_due"])
    assert (await _order(p, invoice["id"], 200)) == retry
    assert len(await _fake_orders(p, invoice["number"])) == 1


async def test_manual_payments_pay_an_invoice_in_parts_and_never_twice(payments: Payments) -> None:
    p, invoice = payments, payments.invoices["manual"]
    path = f"/admin/v1/invoices/{invoice['id']}/payments"
    due = invoice["amount_due"]
    part = await p.api.http.post(path, headers=AUTH, json={
        "amount": 20000, "method": "bank_transfer", "reference": "UTR0001"})
    assert part.status_code == 201, part.text
    body = part.json()
    assert {k: body[k] for k in ("invoice_id", "organisation_id", "status", "amount", "applied",
                                 "refunded", "method", "reference", "review")} == {
        "invoice_id": invoice["id"], "organisation_id": invoice["organisation_id"],
        "status": "captured", "amount": 20000, "applied": 20000, "refunded": 0,
        "method": "bank_transfer", "reference": "UTR0001", "review": []}
    assert int(part.headers["X-Ledger-Position"]) > 0
    now = await _invoice(p, invoice["id"])
    assert (now["status"], now["amount_due"], now["paid"]) == ("partially_paid", due - 20000, 20000)
    partly = (await _ok(await p.api.http.get("/admin/v1/invoices", headers=AUTH,
                                             params={"status": "partially_paid",
                                                     "organisation_id": invoice["organisation_id"]}),
                    200))["items"]
    assert [i["id"] for i in partly] == [invoice["id"]]
    balance = await _ok(await p.api.http.get(
        f"/admin/v1/organisations/{invoice['organisation_id']}/balance", headers=AUTH), 200)
    assert {k: balance[k] for k in ("outstanding", "invoiced", "paid")} == {
        "outstanding": due - 20000, "invoiced": invoice["total"], "paid": 20000}

    head = await p.quiet_head()
    same = await p.api.http.post(path, headers=AUTH, json={
        "amount": 20000, "method": "bank_transfer", "reference": "UTR0001"})
    too_much = await p.api.http.post(path, headers=AUTH, json={
        "amount": due - 20000 + 1, "method": "cheque", "reference": "CHQ1"})
    assert (same.status_code, too_much.status_code) == (409, 409), (same.text, too_much.text)
    for bad in ({"amount": 0, "method": "upi", "reference": "r"},
                {"amount": 100, "method": "cash", "reference": "r"},
                {"amount": 100, "method": "upi", "reference": "r" * 41},
                {"amount": 100, "method": "upi", "reference": "r", "note": "unknown field"},
                {"amount": "100", "method": "upi", "reference": "r"},  # money is a JSON integer
                {"amount": 100.0, "method": "upi", "reference": "r"}):
        r = await p.api.http.post(path, headers=AUTH, json=bad)
        assert r.status_code == 422, (bad, r.text)
    unknown = await p.api.http.post(f"/admin/v1/invoices/{uuid.uuid4()}/payments", headers=AUTH,
                                    json={"amount": 100, "method": "upi", "reference": "r"})
    assert unknown.status_code == 404, unknown.text
    assert p.head() == head

    await _ok(await p.api.http.post(path, headers=AUTH, json={
        "amount": due - 20000, "method": "cheque", "reference": "CHQ1"}))
    now = await _invoice(p, invoice["id"])
    assert (now["status"], now["amount_due"]) == ("paid", 0)
    listed = (await _ok(await p.api.http.get("/admin/v1/payments", headers=AUTH, params={
        "invoice_id": invoice["id"], "status": "captured"}), 200))["items"]
    assert sorted(x["applied"] for x in listed) == sorted([20000, due - 20000])
    bad_filter = await p.api.http.get("/admin/v1/payments", headers=AUTH,
                                      params={"status": "paid", "review": "maybe"})
    assert bad_filter.status_code == 422
    assert {e["field"] for e in bad_filter.json()["errors"]} == {"status", "review"}


async def test_an_organisation_token_sees_only_its_organisations_payments(payments: Payments) -> None:
    p = payments
    mine, theirs = p.invoices["scoped"], p.invoices["other"]
    for invoice, reference in ((mine, "UPI-1"), (theirs, "UPI-X")):
        await _ok(await p.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payments",
                                        headers=AUTH, json={"amount": 100, "method": "upi",
                                                            "reference": reference}))
    token = (await _ok(await p.api.http.post("/admin/v1/tokens", headers=AUTH, json={
        "role": "org_viewer", "name": "viewer", "organisation_id": mine["organisation_id"]})))["token"]
    scoped = {"Authorization": f"Bearer {token}"}
    everything = (await _ok(await p.api.http.get("/admin/v1/payments", headers=AUTH), 200))["items"]
    assert {x["organisation_id"] for x in everything} > {mine["organisation_id"]}
    own = (await _ok(await p.api.http.get("/admin/v1/payments", headers=scoped), 200))["items"]
    assert [x["reference"] for x in own] == ["UPI-1"]
    assert (await _ok(await p.api.http.get(f"/admin/v1/payments/{own[0]['id']}", headers=scoped),
                      200))["id"] == own[0]["id"]
    (foreign,) = [x for x in everything if x["reference"] == "UPI-X"]
    assert (await p.api.http.get(f"/admin/v1/payments/{foreign['id']}", headers=scoped)).status_code == 404
    assert (await _ok(await p.api.http.get("/admin/v1/payments", headers=scoped, params={
        "organisation_id": foreign["organisation_id"]}), 200))["items"] == []
    order = await p.api.http.post(f"/admin/v1/invoices/{mine['id']}/payment-orders", headers=scoped)
    assert order.status_code == 403, order.text


async def test_without_razorpay_keys_orders_and_webhooks_answer_503_and_manual_payments_work(
        payments: Payments) -> None:
    p, invoice = payments, payments.invoices["bare"]
    bare = dataclasses.replace(p.api.rt.settings, razorpay_key_id=None, razorpay_key_secret=None,
                               razorpay_webhook_secrets=())
    rt = dataclasses.replace(p.api.rt, settings=bare)  # the same ledger and pools
    _, asgi = create_app(build_api(rt, admin_token=TEST_ADMIN_TOKEN).deps)
    # In process, not served: Litestar's ASGI types are narrower than httpx's, hence the cast.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, asgi)),
                                 base_url="http://unconfigured") as http:
        head = await p.quiet_head()
        order = await http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH)
        body = b'{"event": "payment.captured"}'
        webhook = await http.post(WEBHOOK, content=body, headers={
            "X-Razorpay-Signature": _sign(body), "X-Razorpay-Event-Id": "evt_unconfigured"})
        for r in (order, webhook):
            assert r.status_code == 503 and "Retry-After" in r.headers, r.text
            assert "payments not configured" in r.json()["detail"]
        assert p.head() == head and p.recorded("evt_unconfigured") is None
        manual = await http.post(f"/admin/v1/invoices/{invoice['id']}/payments", headers=AUTH,
                                 json={"amount": 100, "method": "cheque", "reference": "CHQ-BARE"})
        assert manual.status_code == 201, manual.text
        assert p.head() > head


async def test_a_payment_whose_webhooks_never_came_is_found_by_the_recovery_job(
        payments: Payments) -> None:
    p, invoice = payments, payments.invoices["suppressed"]
    order = await _order(p, invoice["id"])
    await _ok(await p.fake.post(f"/_fake/orders/{order['razorpay_order_id']}/payments",
                                json={"outcome": "captured", "deliver": False}))  # webhooks lost
    rt = p.api.rt
    later = datetime.now(UTC) + timedelta(minutes=6)
    await wait_until(lambda: order["razorpay_order_id"] in _due_orders(rt, later),
                     "the order in the payments read model")
    # Not yet due: an order is first checked 5 minutes after it was made.
    assert order["razorpay_order_id"] not in _due_orders(rt, datetime.now(UTC))
    assert await asyncio.to_thread(recover_payments, rt, datetime.now(UTC)) == 0
    assert await asyncio.to_thread(recover_payments, rt, later) >= 1
    await wait_until(lambda: _paid_in_read_model(p, invoice["id"]), "paid through recovery")
    now = await _invoice(p, invoice["id"])
    assert (now["status"], now["amount_due"]) == ("paid", 0)
    listed = (await _ok(await p.api.http.get("/admin/v1/payments", headers=AUTH,
                                             params={"invoice_id": invoice["id"]}), 200))["items"]
    assert [(x["status"], x["applied"]) for x in listed] == [("captured", invoice["amount_due"])]
    # Checked once at 5 min; the next check is not due before an hour: nothing asked again.
    assert await asyncio.to_thread(recover_payments, rt, later) == 0


def _due_orders(rt: Runtime, now: datetime) -> list[str]:
    with rt.pool.connection() as conn:
        return [o.razorpay_order_id for o in orders_to_check(conn, now, 10)]


def _paid_in_read_model(p: Payments, invoice_id: str) -> bool:
    with p.api.rt.pool.connection() as conn:
        row = conn.execute("SELECT status FROM invoices WHERE id = %s", (invoice_id,)).fetchone()
    return row is not None and row[0] == "paid"


async def test_a_payment_of_no_order_of_ours_is_flagged_and_counted_in_metrics(
        payments: Payments) -> None:
    p = payments
    body = (b'{"event":"payment.captured","payload":{"payment":{"entity":{"id":"pay_stray01",'
            b'"amount":12345,"currency":"INR","status":"captured","order_id":"order_stray01",'
            b'"captured":true}}}}')
    r = await _deliver(p, body, signature=_sign(body), event_id="evt_stray01")
    assert r.status_code == 200, r.text

    async def flagged() -> list[dict[str, Any]]:
        return list((await _ok(await p.api.http.get("/admin/v1/payments", headers=AUTH, params={
            "review": "true"}), 200))["items"])

    await wait_until(lambda: p.recorded("evt_stray01") is not None
                     and p.recorded("evt_stray01").processed, "the stray payment applied")  # type: ignore[union-attr]
    stray = [x for x in await flagged() if x["razorpay_payment_id"] == "pay_stray01"]
    assert [(x["status"], x["invoice_id"], x["applied"]) for x in stray] == [("captured", None, 0)]
    assert "no order of ours" in stray[0]["review"][0]
    metrics = (await p.api.http.get("/metrics")).text
    (line,) = [x for x in metrics.splitlines() if x.startswith("billing_payments_for_review ")]
    assert float(line.split()[1]) >= 1


async def test_orders_waiting_on_a_slow_gateway_never_hold_up_a_webhook(payments: Payments) -> None:
    p, invoice = payments, payments.invoices["starved"]
    # The service in process, with a gateway timeout that waits the slow answers out.
    slow = dataclasses.replace(p.api.rt.settings, razorpay_timeout_s=SLOW_GATEWAY_TIMEOUT_S)
    rt = dataclasses.replace(p.api.rt, settings=slow)  # the same ledger and pools
    _, asgi = create_app(build_api(rt, admin_token=TEST_ADMIN_TOKEN).deps)
    default = anyio.to_thread.current_default_thread_limiter()
    default_tokens = default.total_tokens
    fake_faults = f"{p.fake.base_url}/_fake/faults"
    try:
        default.total_tokens = STUCK_ORDERS
        await _ok(await p.fake.post("/_fake/faults", json={
            "next": "timeout", "count": STUCK_ORDERS, "delay_s": SLOW_GATEWAY_DELAY_S,
            "method": "GET", "path": "/v1/orders"}), 200)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, asgi)),
                                     base_url="http://in-process", timeout=30) as http:
            orders = [asyncio.create_task(http.post(
                f"/admin/v1/invoices/{invoice['id']}/payment-orders", headers=AUTH))
                for _ in range(STUCK_ORDERS)]
            await wait_until(lambda: httpx.get(fake_faults).json()["pending"] == [],
                             "every order request held by the slow gateway")
            body = b'{"event": "payment.dispute.lost", "payload": {}}'
            started = time.monotonic()
            r = await http.post(WEBHOOK, content=body, headers={
                "X-Razorpay-Signature": _sign(body), "X-Razorpay-Event-Id": "evt_not_starved"})
            took = time.monotonic() - started
            assert took < WEBHOOK_PROMPT_S, f"the webhook waited {took:.2f} s for a thread"
            assert (r.status_code, r.json()) == (200, {"status": "recorded"}), r.text
            assert not any(o.done() for o in orders)  # still waiting on the gateway
            # The gateway's answer (an error, late) comes; nothing was recorded for the orders.
            assert [o.status_code for o in await asyncio.gather(*orders)] == [502] * STUCK_ORDERS
        assert await _fake_orders(p, invoice["number"]) == []
    finally:
        default.total_tokens = default_tokens
        rt.close_gateway()
        await p.fake.delete("/_fake/faults")
