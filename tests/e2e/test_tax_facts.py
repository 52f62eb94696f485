"""Tax facts over HTTP (issue 14, defect 5): a change of an organisation's country applies from
its next invoice; a period already drafted keeps the taxes and the facts it was drafted with.

Who may change the facts at all (owner and billing_admin only) is proved in test_access.py,
beside the other role checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from domain.invoice import Invoice, invoice_id
from domain.period import shift_period
from tests.e2e.conftest import AUTH, Api
from tests.e2e.test_invoicing_http import last_period, post

pytestmark = pytest.mark.anyio

# Periods two and three months back have ended, grace included, whatever today's date; a
# subscription started this many days ago covers both of them.
SUBSCRIBED_DAYS_AGO = 130
BASE_FEE_PAISE = 50000
CGST_SGST_PAISE = 4500  # 9 % of 50000, each


async def _invoice_of(api: Api, org: str, period: str, barrier: str) -> dict[str, Any]:
    r = await api.http.get("/admin/v1/invoices", headers=AUTH | {"X-Ledger-Position": barrier},
                           params={"organisation_id": org, "period": period})
    assert r.status_code == 200, r.text
    (invoice,) = r.json()["items"]
    assert isinstance(invoice, dict)
    return invoice


async def test_a_country_change_applies_from_the_next_invoice_never_to_a_drafted_one(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH,
                            json={"code": "tax_api", "name": "API", "aggregation": "count"})
    assert r.status_code in (200, 201), r.text
    await post(api, "/admin/v1/plans", {"code": "taxed", "name": "Taxed", "base_fee": "500",
                                        "charges": [{"metric": "tax_api", "model": "per_unit",
                                                     "unit_price": "1"}]})
    org = (await post(api, "/admin/v1/organisations",
                      {"name": "moving", "billing_email": "ap@moving.in", "state_code": "29"}))["id"]
    starts = (datetime.now(UTC) - timedelta(days=SUBSCRIBED_DAYS_AGO)).isoformat()
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                           json={"plan_code": "taxed", "starts_at": starts})
    assert r.status_code == 201, r.text
    drafted_period = shift_period(last_period()[0], -2)
    next_period = shift_period(drafted_period, 1)

    assert (await post(api, "/admin/v1/invoice-runs", {"period": drafted_period}, 200))["created"] == 1
    moved = await api.http.patch(f"/admin/v1/organisations/{org}", headers=AUTH, json={"country": "US"})
    assert moved.status_code == 200 and moved.json()["country"] == "US", moved.text
    barrier = moved.headers["x-ledger-position"]

    # The drafted period is not re-priced: a re-run finds it, and it keeps its GST.
    again = await post(api, "/admin/v1/invoice-runs", {"period": drafted_period}, 200)
    assert (again["created"], again["existing"]) == (0, 1)
    kept = await _invoice_of(api, org, drafted_period, barrier)
    assert [(t["name"], t["amount"]) for t in kept["taxes"]] == [
        ("CGST", CGST_SGST_PAISE), ("SGST", CGST_SGST_PAISE)]
    assert kept["total"] == BASE_FEE_PAISE + 2 * CGST_SGST_PAISE

    # The next period's draft uses the new facts: an export, zero-rated.
    assert (await post(api, "/admin/v1/invoice-runs", {"period": next_period}, 200))["created"] == 1
    after = await _invoice_of(api, org, next_period, barrier)
    assert after["taxes"] == [] and after["total"] == BASE_FEE_PAISE

    # Each invoice records the facts it was drafted with.
    recorded = [api.rt.ledger.get(invoice_id(UUID(org), period), Invoice)
                for period in (drafted_period, next_period)]
    assert [(i.country, i.state_code) for i in recorded] == [("IN", "29"), ("US", "29")]

    # And its tax document shows them: the drafted period stays an intra-state supply in
    # Karnataka with CGST + SGST, never "Outside India" beside Indian taxes.
    doc = await api.http.get(f"/admin/v1/invoices/{kept['id']}/document", headers=AUTH,
                             params={"format": "html"})
    assert doc.status_code == 200, doc.text
    assert "Outside India" not in doc.text and "Karnataka" in doc.text
    export = await api.http.get(f"/admin/v1/invoices/{after['id']}/document", headers=AUTH,
                                params={"format": "html"})
    assert "Outside India (US)" in export.text
