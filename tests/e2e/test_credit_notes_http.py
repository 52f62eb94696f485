"""Credit notes over HTTP against the in-process service and the fake Razorpay
(infra/fake_razorpay.py): a paid invoice credited in part with `settlement: refund` (one refund
whose answer was lost, settled by its webhooks arriving duplicated and reordered; one answered
at once), the invoice's, payment's and organisation's figures by hand, the PDF and the email,
crediting more than was invoiced (422, nothing changes), gapless numbers under 8 concurrent
issuers, reduce_due and out_of_band, bad input and another organisation's notes."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pypdf
import pytest

from adapters.payment_manager import NAME as MANAGER
from infra.embedded import free_port
from infra.fake_razorpay import FakeRazorpay
from infra.wiring import Runtime, admin_token, build_api
from tests.conftest import http_status, make_settings, running, tracked, wait_until
from tests.e2e.conftest import AUTH, Api, close_and_drop
from tests.e2e.test_invoicing_http import last_period
from tests.e2e.test_tenant_webhooks_http import Receivers, readme_verify

pytestmark = pytest.mark.anyio

KEY_ID, KEY_SECRET = "rzp_test_credit", "key-secret-credit-notes"
WEBHOOK_SECRET = "whsec-credit-0123"
GATEWAY_TIMEOUT_S = 1.0
FAULT_DELAY_S = 1.5  # a "timeout_after_create" answers after the service gave up
WEBHOOK = "/webhooks/razorpay"
TENANTS = ("refund", "race", "unpaid", "oob", "other", "retry", "declined", "hooked")
BASE_FEE_PAISE = 50_000  # ₹500 base fee; intra-state: CGST 9 % + SGST 9 %
TOTAL_PAISE = 59_000
ISSUERS = 8


@dataclasses.dataclass
class Credit:
    api: Api
    fake: FakeRazorpay
    invoices: dict[str, dict[str, Any]]

    def head(self) -> int:
        return self.api.rt.ledger.head()

    async def quiet_head(self) -> int:
        return int(await wait_until(
            lambda: (head := self.head()) <= tracked(self.api.rt, MANAGER) and head,
            "the payments manager caught up"))


async def _ok(r: httpx.Response, status: int = 201) -> Any:
    assert r.status_code == status, r.text
    return r.json()


async def _setup(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    await _ok(await http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "cn_api", "name": "API", "aggregation": "count"}))
    await _ok(await http.post("/admin/v1/plans", headers=AUTH, json={
        "code": "cn_plan", "name": "Credit", "base_fee": "500", "minimum": "0",
        "charges": [{"metric": "cn_api", "model": "per_unit", "unit_price": "0.01"}]}))
    orgs = {}
    for name in TENANTS:
        org = (await _ok(await http.post("/admin/v1/organisations", headers=AUTH, json={
            "name": name, "billing_email": f"ap@{name}.in", "state_code": "29",
            "gstin": "29ABCDE1234F1Z5"})))["id"]
        await _ok(await http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH, json={
            "plan_code": "cn_plan",
            "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()}))
        orgs[org] = name
    run = await _ok(await http.post("/admin/v1/invoice-runs", headers=AUTH,
                                    json={"period": last_period()[0]}), 200)
    assert run["created"] == len(TENANTS), run
    drafts = (await _ok(await http.get("/admin/v1/invoices", headers=AUTH), 200))["items"]
    return {orgs[d["organisation_id"]]: await _ok(await http.post(
        f"/admin/v1/invoices/{d['id']}/finalize", headers=AUTH), 200) for d in drafts}


@pytest.fixture(scope="module")
async def credit(tmp_path_factory: pytest.TempPathFactory,
                 server_urls: tuple[str, str]) -> AsyncIterator[Credit]:
    # Deliveries by hand: each test decides the order and the repeats.
    with FakeRazorpay(key_id=KEY_ID, key_secret=KEY_SECRET, auto_deliver=False) as fake:
        port = free_port()
        settings = make_settings(
            Path(tmp_path_factory.mktemp("credit")), port=port, razorpay_key_id=KEY_ID,
            razorpay_key_secret=KEY_SECRET, razorpay_base_url=fake.url,
            razorpay_webhook_secrets=(WEBHOOK_SECRET,), razorpay_timeout_s=GATEWAY_TIMEOUT_S,
            webhooks_allow_private=True)  # the tenant's receiver is on loopback
        fake.set_webhook(f"http://127.0.0.1:{port}{WEBHOOK}", WEBHOOK_SECRET)
        rt = Runtime.open(settings, *server_urls)
        role = build_api(rt, admin_token=admin_token(settings))
        base = f"http://127.0.0.1:{port}"
        try:
            async with running(rt, {"api", "relay", "project"}, api=role), \
                    httpx.AsyncClient(base_url=base, timeout=10) as http:
                await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "up")
                yield Credit(Api(http, rt, role), fake, await _setup(http))
        finally:
            rt.close_gateway()
            close_and_drop(server_urls[0], settings.pg_schema, rt)


async def _pay_by_razorpay(c: Credit, invoice: dict[str, Any]) -> dict[str, Any]:
    order = await _ok(await c.api.http.post(f"/admin/v1/invoices/{invoice['id']}/payment-orders",
                                            headers=AUTH))
    paid = await asyncio.to_thread(c.fake.pay, order["razorpay_order_id"], deliver=True)
    assert all(d["status"] == 200 for d in paid["deliveries"]), paid
    await wait_until(lambda: _get_sync(c, f"/admin/v1/invoices/{invoice['id']}")["status"] == "paid",
                     "the invoice paid")
    payment: dict[str, Any] = paid["payment"]
    return payment


def _get_sync(c: Credit, path: str, **params: Any) -> Any:
    r = httpx.get(str(c.api.http.base_url) + path, headers=AUTH, params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


async def _get(c: Credit, path: str, **params: Any) -> Any:
    return await _ok(await c.api.http.get(path, headers=AUTH, params=params), 200)


def _refund_events(c: Credit, refund_id: str) -> list[str]:
    """The fake's refund.created and refund.processed events of one refund, in that order."""
    found = [e for e in c.fake.events() if e["type"].startswith("refund.")
             and f'"id":"{refund_id}"' in e["body"]]
    return [e["id"] for e in sorted(found, key=lambda e: e["type"] != "refund.created")]


async def test_a_paid_invoice_is_credited_in_part_and_refunded_through_razorpay(
        credit: Credit) -> None:
    c, invoice = credit, credit.invoices["refund"]
    assert invoice["total"] == TOTAL_PAISE and invoice["lines"][0]["amount"] == BASE_FEE_PAISE
    payment = await _pay_by_razorpay(c, invoice)
    path = f"/admin/v1/invoices/{invoice['id']}/credit-notes"

    # 1. ₹100 of the base fee, refunded; Razorpay makes the refund but its answer is lost.
    c.fake.add_fault("timeout_after_create", method="POST", path="/v1/payments",
                     delay_s=FAULT_DELAY_S)
    first = await _ok(await c.api.http.post(path, headers=AUTH, json={
        "reason": "service_deficiency", "settlement": "refund",
        "lines": [{"line": 0, "amount": 10_000}]}))
    assert first["number"].startswith("CN/") and len(first["number"]) <= 16
    assert (first["invoice_number"], first["status"]) == (invoice["number"], "refund_failed")
    assert [(t["name"], t["amount"]) for t in first["taxes"]] == [("CGST", 900), ("SGST", 900)]
    assert (first["subtotal"], first["total"], first["refunded"]) == (10_000, 11_800, 0)
    (share,) = first["refunds"]
    assert share["error"] and share["razorpay_payment_id"] == payment["id"]
    (made,) = c.fake.refunds()  # Razorpay did refund; we did not hear
    assert made["amount"] == 11_800 and made["notes"]["credit_note_id"] == first["id"]

    # Its webhooks arrive reordered and twice each: the note follows them.
    created, processed = _refund_events(c, made["id"])
    deliveries = await asyncio.to_thread(c.fake.deliver, [processed, created, processed, created])
    assert [d["status"] for d in deliveries] == [200] * 4
    await wait_until(lambda: _get_sync(c, f"/admin/v1/credit-notes/{first['id']}")["status"]
                     == "refunded", "the first note refunded by its webhooks")
    note = await _get(c, f"/admin/v1/credit-notes/{first['id']}")
    assert (note["refunded"], note["refunds"][0]["razorpay_refund_id"], note["refunds"][0]["error"]
            ) == (11_800, made["id"], None)
    # Nothing failed any more: a retry is refused and refunds nothing.
    retry = await c.api.http.post(f"/admin/v1/credit-notes/{first['id']}/retry-refund",
                                  headers=AUTH)
    assert retry.status_code == 409, retry.text
    assert len(c.fake.refunds()) == 1

    # 2. A whole-invoice amount (₹59, tax included), answered at once.
    second = await _ok(await c.api.http.post(path, headers=AUTH, json={
        "reason": "duplicate_charge", "settlement": "refund", "amount": 5_900}))
    assert (second["subtotal"], second["total"], second["status"]) == (5_000, 5_900, "refunded")
    assert [t["amount"] for t in second["taxes"]] == [450, 450]
    assert int(second["number"][-6:]) == int(first["number"][-6:]) + 1  # the next number
    refund_two = c.fake.refunds()[1]
    events = _refund_events(c, refund_two["id"])
    await asyncio.to_thread(c.fake.deliver, [*reversed(events), *events])
    await c.quiet_head()

    # By hand: credited 11,800 + 5,900 = 17,700, all of it refunded; nothing due.
    now = await _get(c, f"/admin/v1/invoices/{invoice['id']}")
    assert (now["status"], now["amount_due"], now["paid"], now["credited"], now["refunded"]) == (
        "paid", 0, TOTAL_PAISE, 17_700, 17_700)
    (paid,) = (await _get(c, "/admin/v1/payments", invoice_id=invoice["id"]))["items"]
    assert (paid["status"], paid["refunded"]) == ("partially_refunded", 17_700)
    balance = await _get(c, f"/admin/v1/organisations/{invoice['organisation_id']}/balance")
    assert {k: balance[k] for k in ("outstanding", "invoiced", "paid", "credited", "refunded",
                                    "balance")} == {
        "outstanding": 0, "invoiced": TOTAL_PAISE, "paid": TOTAL_PAISE, "credited": 17_700,
        "refunded": 17_700, "balance": 0}
    listed = (await _get(c, "/admin/v1/credit-notes", invoice_id=invoice["id"]))["items"]
    assert [x["id"] for x in listed] == [first["id"], second["id"]]

    # 3. More than is left to credit: 422, and nothing changes (at Razorpay neither).
    head = await c.quiet_head()
    for body in ({"reason": "other", "settlement": "refund", "amount": TOTAL_PAISE - 17_700 + 118},
                 {"reason": "other", "settlement": "refund",
                  "lines": [{"line": 0, "amount": BASE_FEE_PAISE - 15_000 + 1}]}):
        r = await c.api.http.post(path, headers=AUTH, json=body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    assert c.head() == head and len(c.fake.refunds()) == 2

    # 4. The document: the note's number, the original invoice's, the tax reversed.
    pdf = await c.api.http.get(f"/admin/v1/credit-notes/{first['id']}/document",
                               params={"format": "pdf"}, headers=AUTH)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf.content)).pages)
    for expected in (first["number"], invoice["number"], "CGST", "SGST", "9.00", "118.00",
                     "29ABCDE1234F1Z5", "998315"):
        assert expected in text, (expected, text)
    html = await c.api.http.get(f"/admin/v1/credit-notes/{first['id']}/document", headers=AUTH)
    assert html.status_code == 200 and first["number"] in html.text

    # 5. Each note emailed once, however often the job runs.
    notifier = c.api.rt.credit_note_notifier()
    await asyncio.to_thread(notifier.send_due)
    await asyncio.to_thread(notifier.send_due)
    outbox = c.api.rt.settings.data_dir / "outbox"
    mails = [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
             for f in sorted(outbox.glob("*.eml"))]
    subjects = sorted(str(m["Subject"]) for m in mails if str(m["Subject"]).startswith("Credit note"))
    assert subjects == sorted(f"Credit note {n['number']} against invoice {invoice['number']}"
                              for n in (first, second))


async def test_a_refund_razorpay_refused_is_visible_and_retried_without_refunding_twice(
        credit: Credit) -> None:
    c, invoice = credit, credit.invoices["retry"]
    payment = await _pay_by_razorpay(c, invoice)
    before = len(c.fake.refunds())
    c.fake.add_fault("500", method="POST", path=f"/v1/payments/{payment['id']}/refund")
    failed = await _ok(await c.api.http.post(f"/admin/v1/invoices/{invoice['id']}/credit-notes",
                                             headers=AUTH, json={
        "reason": "duplicate_charge", "settlement": "refund", "lines": [{"line": 0, "amount": 1_000}]}))
    assert failed["status"] == "refund_failed" and "GatewayFailed" in failed["refunds"][0]["error"]
    assert len(c.fake.refunds()) == before
    shown = await _get(c, f"/admin/v1/credit-notes/{failed['id']}")
    assert shown["status"] == "refund_failed" and shown["refunds"][0]["error"]
    retried = await _ok(await c.api.http.post(
        f"/admin/v1/credit-notes/{failed['id']}/retry-refund", headers=AUTH), 200)
    assert (retried["status"], retried["refunded"], retried["refunds"][0]["error"]) == (
        "refunded", 1_180, None)
    again = await c.api.http.post(f"/admin/v1/credit-notes/{failed['id']}/retry-refund",
                                  headers=AUTH)
    assert again.status_code == 409
    assert [r["amount"] for r in c.fake.refunds()[before:]] == [1_180]  # one refund, once


async def test_a_refund_razorpay_declined_is_asked_for_again_under_a_new_key(
        credit: Credit) -> None:
    c, invoice = credit, credit.invoices["declined"]
    payment = await _pay_by_razorpay(c, invoice)
    before = len(c.fake.refunds())
    c.fake.fail_refunds(1)
    note = await _ok(await c.api.http.post(f"/admin/v1/invoices/{invoice['id']}/credit-notes",
                                           headers=AUTH, json={
        "reason": "service_deficiency", "settlement": "refund", "amount": 2_360}))
    assert note["status"] == "refund_failed", note
    declined = c.fake.refunds()[before]
    assert (declined["status"], note["refunds"][0]["razorpay_refund_id"]) == ("failed", declined["id"])
    # Its webhooks (created, failed) arrive twice and reordered: still failed, nothing refunded.
    events = _refund_events(c, declined["id"])
    await asyncio.to_thread(c.fake.deliver, [*reversed(events), *events])
    await c.quiet_head()
    shown = await _get(c, f"/admin/v1/credit-notes/{note['id']}")
    assert (shown["status"], shown["refunded"]) == ("refund_failed", 0)
    failing = (await _get(c, "/admin/v1/credit-notes", status="refund_failed"))["items"]
    assert note["id"] in [x["id"] for x in failing]
    assert c.api.rt.ops_snapshot().refunds_failed >= 1  # /metrics: billing_credit_note_refunds_failed
    retried = await _ok(await c.api.http.post(
        f"/admin/v1/credit-notes/{note['id']}/retry-refund", headers=AUTH), 200)
    assert (retried["status"], retried["refunded"]) == ("refunded", 2_360)
    made = c.fake.refunds()[before:]
    assert [(r["status"], r["amount"], r["payment_id"]) for r in made] == [
        ("failed", 2_360, payment["id"]), ("processed", 2_360, payment["id"])]
    await asyncio.to_thread(c.fake.deliver, _refund_events(c, made[1]["id"]))
    await c.quiet_head()
    (paid,) = (await _get(c, "/admin/v1/payments", invoice_id=invoice["id"]))["items"]
    assert paid["refunded"] == 2_360
    now = await _get(c, f"/admin/v1/invoices/{invoice['id']}")
    assert (now["credited"], now["refunded"], now["amount_due"]) == (2_360, 2_360, 0)


async def test_numbers_stay_gapless_and_credit_never_exceeds_under_concurrent_issuers(
        credit: Credit) -> None:
    c, invoice = credit, credit.invoices["race"]
    path = f"/admin/v1/invoices/{invoice['id']}/credit-notes"
    # 8 notes of ₹100 + tax each race for an invoice with ₹590 due: 5 fit, 3 are refused.
    answers = await asyncio.gather(*(c.api.http.post(path, headers=AUTH, json={
        "reason": "order_change", "settlement": "reduce_due", "amount": 11_800})
        for _ in range(ISSUERS)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 5 + [422] * 3, [a.text for a in answers]
    numbers = sorted(a.json()["number"] for a in answers if a.status_code == 201)
    everything = (await _get(c, "/admin/v1/credit-notes", limit="1000"))["items"]
    sequence = sorted(int(x["number"][-6:]) for x in everything)
    assert sequence == list(range(sequence[0], sequence[0] + len(sequence)))  # no gap, no repeat
    assert len(set(numbers)) == 5
    now = await _get(c, f"/admin/v1/invoices/{invoice['id']}")
    assert (now["credited"], now["amount_due"], now["status"]) == (TOTAL_PAISE, 0, "finalized")


async def test_reduce_due_and_out_of_band_settle_without_razorpay(credit: Credit) -> None:
    c = credit
    unpaid, oob = c.invoices["unpaid"], c.invoices["oob"]
    body = {"reason": "order_change", "settlement": "reduce_due",
            "lines": [{"line": 0, "amount": 20_000}]}
    key = {"Idempotency-Key": f"cn-{uuid.uuid4()}"}
    note = await _ok(await c.api.http.post(f"/admin/v1/invoices/{unpaid['id']}/credit-notes",
                                           headers=AUTH | key, json=body))
    assert (note["status"], note["total"]) == ("issued", 23_600)
    # The same request again under its Idempotency-Key: the first answer, no second note.
    again = await _ok(await c.api.http.post(f"/admin/v1/invoices/{unpaid['id']}/credit-notes",
                                            headers=AUTH | key, json=body))
    assert again == note
    assert len((await _get(c, "/admin/v1/credit-notes", invoice_id=unpaid["id"]))["items"]) == 1
    # Out of band needs money paid first; with it, a reference.
    path = f"/admin/v1/invoices/{oob['id']}/credit-notes"
    early = await c.api.http.post(path, headers=AUTH, json={
        "reason": "other", "settlement": "out_of_band", "amount": 1_180, "reference": "UTR9"})
    assert early.status_code == 422, early.text
    await _ok(await c.api.http.post(f"/admin/v1/invoices/{oob['id']}/payments", headers=AUTH,
                                    json={"amount": TOTAL_PAISE, "method": "bank_transfer",
                                          "reference": "UTR1"}))
    missing = await c.api.http.post(path, headers=AUTH, json={
        "reason": "other", "settlement": "out_of_band", "amount": 1_180})
    assert missing.status_code == 422 and "reference" in missing.text
    by_hand = await c.api.http.post(path, headers=AUTH, json={
        "reason": "other", "settlement": "refund", "amount": 1_180})
    assert by_hand.status_code == 422, by_hand.text  # no Razorpay payment to refund through
    back = await _ok(await c.api.http.post(path, headers=AUTH, json={
        "reason": "other", "settlement": "out_of_band", "amount": 1_180, "reference": "UTR9"}))
    assert (back["status"], back["reference"]) == ("issued", "UTR9")
    await c.quiet_head()
    for inv, due, credited, refunded in ((unpaid, TOTAL_PAISE - 23_600, 23_600, 0),
                                         (oob, 0, 1_180, 1_180)):
        now = await _get(c, f"/admin/v1/invoices/{inv['id']}")
        assert (now["amount_due"], now["credited"], now["refunded"]) == (due, credited, refunded)
        balance = await _get(c, f"/admin/v1/organisations/{inv['organisation_id']}/balance")
        assert balance["balance"] == balance["outstanding"] == due


async def test_bad_input_unknown_ids_and_other_organisations_get_clear_4xx(credit: Credit) -> None:
    c, mine, theirs = credit, credit.invoices["other"], credit.invoices["unpaid"]
    path = f"/admin/v1/invoices/{mine['id']}/credit-notes"
    head = await c.quiet_head()
    for body, field in (({"reason": "because", "settlement": "reduce_due", "amount": 100}, "reason"),
                        ({"reason": "other", "settlement": "cash", "amount": 100}, "settlement"),
                        ({"reason": "other", "settlement": "reduce_due"}, "lines"),
                        ({"reason": "other", "settlement": "reduce_due", "amount": 118,
                          "lines": [{"line": 0, "amount": 100}]}, "lines"),
                        ({"reason": "other", "settlement": "reduce_due", "amount": "118"}, "amount"),
                        ({"reason": "other", "settlement": "reduce_due", "amount": 1.5}, "amount"),
                        ({"reason": "other", "settlement": "reduce_due",
                          "lines": [{"line": 9, "amount": 100}]}, "line"),
                        ({"reason": "other", "settlement": "reduce_due", "amount": 118,
                          "extra": 1}, "extra")):
        r = await c.api.http.post(path, headers=AUTH, json=body)
        assert r.status_code == 422, (body, r.text)
        assert any(field in e["field"] for e in r.json()["errors"]), (body, r.text)
    unknown = await c.api.http.post(f"/admin/v1/invoices/{uuid.uuid4()}/credit-notes", headers=AUTH,
                                    json={"reason": "other", "settlement": "reduce_due", "amount": 118})
    assert unknown.status_code == 404, unknown.text
    assert (await c.api.http.get(f"/admin/v1/credit-notes/{uuid.uuid4()}", headers=AUTH)
            ).status_code == 404
    assert (await c.api.http.get("/admin/v1/credit-notes/nope", headers=AUTH)).status_code == 422
    assert (await c.api.http.get("/admin/v1/credit-notes", headers=AUTH,
                                 params={"invoice_id": "nope"})).status_code == 422
    assert c.head() == head

    own = await _ok(await c.api.http.post(path, headers=AUTH, json={
        "reason": "other", "settlement": "reduce_due", "amount": 118}))
    token = (await _ok(await c.api.http.post("/admin/v1/tokens", headers=AUTH, json={
        "role": "org_viewer", "name": "viewer", "organisation_id": mine["organisation_id"]})))["token"]
    scoped = {"Authorization": f"Bearer {token}"}
    listed = (await _ok(await c.api.http.get("/admin/v1/credit-notes", headers=scoped), 200))["items"]
    assert [x["id"] for x in listed] == [own["id"]]
    foreign = (await _get(c, "/admin/v1/credit-notes", invoice_id=theirs["id"]))["items"][0]
    for target in (foreign["id"], f"{foreign['id']}/document"):
        r = await c.api.http.get(f"/admin/v1/credit-notes/{target}", headers=scoped)
        assert r.status_code == 404, r.text
    r = await c.api.http.post(path, headers=scoped, json={
        "reason": "other", "settlement": "reduce_due", "amount": 118})
    assert r.status_code == 403, r.text


async def test_the_tenant_hears_of_its_credit_note_and_of_its_refund_processed_as_signed(
        credit: Credit) -> None:
    """Issue 17's tenant events of this part: `credit_note.issued` and `refund.processed` reach
    the organisation's endpoint from the ledger, signed as the README shows how to verify."""
    c, invoice = credit, credit.invoices["hooked"]
    receivers = Receivers()
    receivers.thread.start()
    try:
        endpoint = await _ok(await c.api.http.post(
            f"/admin/v1/organisations/{invoice['organisation_id']}/webhook-endpoints", headers=AUTH,
            json={"url": f"{receivers.url}/hooked", "events": ["credit_note.issued",
                                                               "refund.processed"]}))
        await _pay_by_razorpay(c, invoice)
        note = await _ok(await c.api.http.post(
            f"/admin/v1/invoices/{invoice['id']}/credit-notes", headers=AUTH,
            json={"reason": "order_change", "settlement": "refund", "amount": 5_900}))
        (made,) = [r for r in c.fake.refunds() if r["notes"].get("credit_note_id") == note["id"]]
        await asyncio.to_thread(c.fake.deliver, _refund_events(c, made["id"]))
        got = await wait_until(lambda: len(r := receivers.received("hooked")) >= 2 and r,
                               "both tenant events at the receiver")
    finally:
        receivers.server.shutdown()
        receivers.server.server_close()
    verify = readme_verify()
    bodies = {}
    for r in got:
        assert verify(endpoint["secret"], r.headers["Webhook-Signature"], r.body), r.headers
        body = json.loads(r.body)
        bodies[body["type"]] = body
    assert sorted(bodies) == ["credit_note.issued", "refund.processed"]
    issued, processed = bodies["credit_note.issued"], bodies["refund.processed"]
    assert issued["organisation_id"] == invoice["organisation_id"]
    assert (issued["data"]["credit_note_id"], issued["data"]["number"], issued["data"]["total"],
            issued["data"]["invoice_number"]) == (note["id"], note["number"], 5_900, invoice["number"])
    assert (processed["data"]["credit_note_id"], processed["data"]["refund_id"],
            processed["data"]["amount"]) == (note["id"], made["id"], 5_900)


async def test_every_issued_credit_note_pdf_is_archived_once(credit: Credit, tmp_path: Path) -> None:
    """Issue 18's archive: each credit note's PDF goes to the object store under its SHA-256,
    once, like the invoices' (the scheduler's archive job)."""
    from adapters.archive import DirectoryStore
    from adapters.invoice_archive import archive_credit_notes

    rt = credit.api.rt
    notes = (await _get(credit, "/admin/v1/credit-notes", limit=1000))["items"]
    assert notes, "the module's earlier tests issued notes"
    store = DirectoryStore(tmp_path / "archive")
    assert await asyncio.to_thread(archive_credit_notes, rt.pool, rt.supplier(), store) == len(notes)
    assert await asyncio.to_thread(archive_credit_notes, rt.pool, rt.supplier(), store) == 0
    with rt.pool.connection() as conn:
        recorded: dict[str, str] = dict(conn.execute(
            "SELECT number, sha256 FROM archived_credit_notes").fetchall())
    assert sorted(recorded) == sorted(n["number"] for n in notes)
    for number, key in recorded.items():
        pdf = store.get(key)
        text = "\n".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(pdf)).pages)
        assert pdf.startswith(b"%PDF") and number in text
