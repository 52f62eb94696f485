"""End to end over HTTP: meters + plan + subscriptions + usage across two periods -> invoice
run -> drafts with hand-computed totals -> finalize -> gapless numbers; re-runs change nothing."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pypdf import PdfReader

from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
IST = ZoneInfo("Asia/Kolkata")


def last_period() -> tuple[str, datetime]:
    """The month before this one (IST) and a moment late in it (within the 35-day window)."""
    first_of_month = datetime.now(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    late_in_last = first_of_month - timedelta(hours=6)
    return late_in_last.strftime("%Y-%m"), late_in_last


async def post(api: Api, path: str, body: dict[str, Any], status: int = 201, **kw: Any) -> Any:
    r = await api.http.post(path, headers=AUTH | kw.pop("headers", {}), json=body)
    assert r.status_code == status, r.text
    return r.json()


async def tenant(api: Api, name: str, state: str) -> tuple[str, str]:
    org = (await post(api, "/admin/v1/organisations",
                      {"name": name, "billing_email": f"ap@{name}.in", "state_code": state}))["id"]
    project = (await post(api, f"/admin/v1/organisations/{org}/projects", {"name": "p"}))["id"]
    key = (await post(api, f"/admin/v1/projects/{project}/api-keys", {"name": "k"}))["key"]
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                           json={"plan_code": "standard",
                                 "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()})
    assert r.status_code == 201, r.text
    return org, key


async def test_invoice_run_drafts_exact_gst_invoices_and_numbers_them_without_gaps(api: Api) -> None:
    for meter in ({"code": "inv_api", "name": "API", "aggregation": "count"},
                  {"code": "inv_gb", "name": "GB", "aggregation": "sum"}):
        r = await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)
        assert r.status_code in (200, 201)
    await post(api, "/admin/v1/plans", {
        "code": "standard", "name": "Standard", "base_fee": "500", "minimum": "0", "charges": [
            {"metric": "inv_api", "model": "per_unit", "unit_price": "0.0035"},
            {"metric": "inv_gb", "model": "graduated", "tiers": [
                {"up_to": "10", "unit_price": "0"}, {"up_to": None, "unit_price": "2.5"}]}]})
    period, late = last_period()
    karnataka, key_a = await tenant(api, "karnataka", "29")  # same state as the supplier
    maharashtra, key_b = await tenant(api, "maharashtra", "27")
    for key in (key_a, key_b):
        events = [{"event_id": f"a{i}", "metric": "inv_api", "timestamp": late.isoformat()} for i in range(3)]
        events += [{"event_id": "g1", "metric": "inv_gb", "value": "12.5", "timestamp": late.isoformat()},
                   # this period's usage belongs to the next invoice, not this one
                   {"event_id": "now", "metric": "inv_gb", "value": "99"}]
        r = await api.http.post("/api/v1/events", json={"events": events},
                                headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202 and r.json()["accepted"] == 5

    # Run at once: the run waits for the usage projection, so the totals are complete.
    first = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert (first["created"], first["blocked"], first["failed"]) == (2, [], 0)
    again = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert (again["created"], again["existing"]) == (0, 2)

    listed = (await api.http.get("/admin/v1/invoices", headers=AUTH | {"X-Ledger-Position": "0"},
                                 params={"period": period})).json()["items"]
    by_org = {i["organisation_id"]: i for i in listed}
    a, b = by_org[karnataka], by_org[maharashtra]
    # base 500.00 + 3 x 0.0035 = 0.0105 -> 0.01 + (12.5 - 10) x 2.5 = 6.25  => 50626 paise
    assert [line["amount"] for line in a["lines"]] == [50000, 1, 625]
    assert a["subtotal"] == b["subtotal"] == 50626
    # 9 % of 50626 = 4556.34 -> 4556 each; 18 % = 9112.68 -> 9113
    assert [(t["name"], t["amount"]) for t in a["taxes"]] == [("CGST", 4556), ("SGST", 4556)]
    assert [(t["name"], t["amount"]) for t in b["taxes"]] == [("IGST", 9113)]
    assert (a["total"], b["total"]) == (59738, 59739)
    assert a["status"] == "draft" and a["number"] is None

    numbers = []
    for invoice in (a, b):
        r = await api.http.post(f"/admin/v1/invoices/{invoice['id']}/finalize", headers=AUTH)
        assert r.status_code == 200, r.text
        numbers.append(r.json()["number"])
    fy = datetime.now(IST).year if datetime.now(IST).month >= 4 else datetime.now(IST).year - 1
    prefix = f"INV/{fy % 100:02d}{(fy + 1) % 100:02d}/"
    assert sorted(numbers) == [f"{prefix}000001", f"{prefix}000002"]

    # The invoice emails: sent once each, HTML + PDF, to the outbox folder (no SMTP_URL).
    notifier = api.rt.notifier()
    head = api.rt.ledger.head()
    await wait_until(lambda: api.count_where("invoices", "status = 'finalized'") == 2, "finalized")
    assert await asyncio.to_thread(notifier.send_due) == (2, 0)
    assert await asyncio.to_thread(notifier.send_due) == (0, 0)  # once
    assert api.rt.ledger.head() > head  # the sending is recorded in the ledger
    outbox = api.rt.settings.data_dir / "outbox"
    mails = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
             for p in sorted(outbox.glob("*.eml"))]
    by_to = {m["To"]: m for m in mails}
    mail = by_to["ap@karnataka.in"]
    assert numbers[0] in mail["Subject"] or numbers[1] in mail["Subject"]
    (pdf,) = [part for part in mail.iter_attachments() if part.get_content_type() == "application/pdf"]
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.get_content())).pages)
    number = next(n for n in numbers if n in mail["Subject"])
    assert number in text and "597.38" in text  # the total, 59738 paise

    html = await api.http.get(f"/admin/v1/invoices/{a['id']}/document", headers=AUTH)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert number in html.text and "998315" in html.text  # the number and the SAC code
    pdf_doc = await api.http.get(f"/admin/v1/invoices/{a['id']}/document", headers=AUTH,
                                 params={"format": "pdf"})
    assert pdf_doc.content.startswith(b"%PDF")

    balance = (await api.http.get(f"/admin/v1/organisations/{karnataka}/balance", headers=AUTH)).json()
    assert (balance["currency"], balance["outstanding"]) == ("INR", 59738)

    r = await api.http.post(f"/admin/v1/invoices/{a['id']}/void", headers=AUTH, json={"reason": "x"})
    assert r.status_code == 200 and r.json()["number"] == numbers[0]  # a void keeps its number
    assert (await post(api, "/admin/v1/invoice-runs", {"period": "2026-13"}, 422))["errors"]


async def test_runs_refuse_bad_periods_and_unknown_invoices_are_404(api: Api) -> None:
    for bad in ("2026-1", "26-10", "2026-00", ""):
        await post(api, "/admin/v1/invoice-runs", {"period": bad}, 422)
    r = await api.http.post(f"/admin/v1/invoices/{uuid.uuid4()}/finalize", headers=AUTH)
    assert r.status_code == 404


async def test_dead_lettered_usage_blocks_an_organisation_until_it_is_redriven(api: Api) -> None:
    period, late = last_period()
    for meter in ({"code": "inv_api", "name": "API", "aggregation": "count"},):
        await api.http.post("/admin/v1/meters", headers=AUTH, json=meter)
    plan = {"code": "standard", "name": "Standard", "base_fee": "500", "minimum": "0",
            "charges": [{"metric": "inv_api", "model": "per_unit", "unit_price": "1"}]}
    await api.http.post("/admin/v1/plans", headers=AUTH, json=plan)
    org, key = await tenant(api, "blocked", "29")
    r = await api.http.post("/api/v1/events", headers={"Authorization": f"Bearer {key}"},
                            json={"event_id": "d1", "metric": "inv_api", "timestamp": late.isoformat()})
    position = int(r.headers["x-ledger-position"])
    # As if the usage projector had dead-lettered that event (the DLQ path has its own tests).
    with api.rt.pool.connection() as conn:
        conn.execute("INSERT INTO projection_dead_letters (name, position, topic, error, attempts)"
                     " VALUES ('usage_totals', %s, 'usage', 'test', 6)", (position,))
    # Subscribed from a later period only: skipped, and the answer says why.
    later = (await post(api, "/admin/v1/organisations", {
        "name": "later", "billing_email": "ap@later.in", "state_code": "29"}))["id"]
    r = await api.http.put(f"/admin/v1/organisations/{later}/subscription", headers=AUTH, json={
        "plan_code": "standard", "starts_at": (datetime.now(UTC) + timedelta(days=40)).isoformat()})
    assert r.status_code == 201, r.text
    run = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert [(b["organisation_id"], b["name"], b["missing_positions"]) for b in run["blocked"]] == [
        (org, "blocked", [position])]
    why = {o["organisation_id"]: o for o in run["organisations"]}
    assert (why[org]["outcome"], why[org]["reason"]) == (
        "blocked", f"blocked by dead-lettered ledger entries: usage_totals at {position}; "
                   "run `billing dlq redrive`")
    assert (why[later]["name"], why[later]["outcome"]) == ("later", "skipped")
    assert why[later]["reason"].startswith("no plan covers the period: subscribed from ")
    assert run["more"] == 0
    with api.rt.pool.connection() as conn:  # re-driven
        conn.execute("DELETE FROM projection_dead_letters WHERE position = %s", (position,))
    run = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert run["blocked"] == [] and run["created"] == 1
