"""Invoice lines a customer understands (issue 21), end to end over HTTP: named meters, a
plan, usage, an invoice run; then the invoice's API shape and its document (HTML and PDF,
with the file name it downloads as). One drafted invoice serves every test of the module."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pypdf import PdfReader

from tests.e2e.conftest import AUTH, Api
from tests.e2e.test_invoicing_http import last_period

pytestmark = pytest.mark.anyio

METERS = (
    {"code": "ln_api", "name": "API calls", "aggregation": "count"},
    {"code": "ln_gb", "name": "Storage (GB)", "aggregation": "sum"},
    {"code": "ln_seats", "name": "Seats", "aggregation": "sum"},
)
PLAN = {
    "code": "lines", "name": "Growth", "base_fee": "0", "minimum": "0", "charges": [
        {"metric": "ln_api", "model": "per_unit", "unit_price": "0.5"},
        {"metric": "ln_gb", "model": "graduated", "tiers": [
            {"up_to": "10", "unit_price": "0", "flat_fee": "5"},
            {"up_to": None, "unit_price": "2.5"}]},
        {"metric": "ln_seats", "model": "volume", "tiers": [
            {"up_to": "10", "unit_price": "100"},
            {"up_to": None, "unit_price": "80", "flat_fee": "20"}]},
    ],
}


async def post(api: Api, path: str, body: dict[str, Any], status: int = 201) -> Any:
    r = await api.http.post(path, headers=AUTH, json=body)
    assert r.status_code == status, r.text
    return r.json()


@pytest.fixture(scope="module")
async def drafted(api: Api) -> dict[str, Any]:
    """One organisation's drafted invoice for last month: 3 API calls, 12.5 GB, 30 seats."""
    for meter in METERS:
        await post(api, "/admin/v1/meters", meter)
    await post(api, "/admin/v1/plans", PLAN)
    org = (await post(api, "/admin/v1/organisations",
                      {"name": "lines", "billing_email": "ap@lines.in", "state_code": "29"}))["id"]
    project = (await post(api, f"/admin/v1/organisations/{org}/projects", {"name": "p"}))["id"]
    key = (await post(api, f"/admin/v1/projects/{project}/api-keys", {"name": "k"}))["key"]
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                           json={"plan_code": "lines",
                                 "starts_at": (datetime.now(UTC) - timedelta(days=70)).isoformat()})
    assert r.status_code == 201, r.text
    period, late = last_period()
    at = late.isoformat()
    events = [{"event_id": f"a{i}", "metric": "ln_api", "timestamp": at} for i in range(3)]
    events += [{"event_id": "g", "metric": "ln_gb", "value": "12.5", "timestamp": at},
               {"event_id": "s", "metric": "ln_seats", "value": "30", "timestamp": at}]
    r = await api.http.post("/api/v1/events", json={"events": events},
                            headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202 and r.json()["accepted"] == 5
    run = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert run["created"] == 1, run
    r = await api.http.get("/admin/v1/invoices", headers=AUTH | {"X-Ledger-Position": "0"},
                           params={"organisation_id": org})
    (invoice,) = r.json()["items"]
    return dict(invoice)


async def test_lines_are_described_by_meter_names_with_codes_beside(drafted: dict[str, Any]) -> None:
    lines = [(x["description"], x["metric"]) for x in drafted["lines"]]
    assert lines == [("API calls", "ln_api"), ("Storage (GB)", "ln_gb"), ("Seats", "ln_seats")]
    # 3 x 0.50 = 1.50; 5 (first tier's flat fee) + 2.5 x 2.50 = 11.25; 30 x 80 + 20 = 2420
    assert [x["amount"] for x in drafted["lines"]] == [150, 1125, 242_000]


async def test_a_tiered_line_shows_what_each_tier_priced(drafted: dict[str, Any]) -> None:
    lines = {x["metric"]: x for x in drafted["lines"]}
    assert lines["ln_api"]["tiers"] == []
    assert lines["ln_gb"]["tiers"] == [
        {"tier": 1, "up_to": "10", "quantity": "10", "unit_price": "0", "flat_fee": "5"},
        {"tier": 2, "up_to": None, "quantity": "2.5", "unit_price": "2.5", "flat_fee": "0"}]
    assert lines["ln_seats"]["tiers"] == [  # volume: every seat at the tier 30 falls in
        {"tier": 2, "up_to": None, "quantity": "30", "unit_price": "80", "flat_fee": "20"}]


async def test_the_invoice_names_its_plan_and_version(drafted: dict[str, Any]) -> None:
    assert (drafted["plan_name"], drafted["plan_code"], drafted["plan_version"]) == (
        "Growth", "lines", 1)


async def test_the_document_downloads_as_a_file_named_by_the_number(
    api: Api, drafted: dict[str, Any]
) -> None:
    path = f"/admin/v1/invoices/{drafted['id']}/document"
    draft_pdf = await api.http.get(path, headers=AUTH, params={"format": "pdf"})
    assert draft_pdf.status_code == 200 and draft_pdf.content.startswith(b"%PDF")
    assert (draft_pdf.headers["content-disposition"]
            == f'attachment; filename="DRAFT-{drafted["id"]}.pdf"')
    r = await api.http.post(f"{path.removesuffix('/document')}/finalize", headers=AUTH)
    assert r.status_code == 200, r.text
    number, position = r.json()["number"], r.headers["X-Ledger-Position"]
    stem = number.replace("/", "-")
    seen = AUTH | {"X-Ledger-Position": position}
    pdf = await api.http.get(path, headers=seen, params={"format": "pdf"})
    assert pdf.headers["content-disposition"] == f'attachment; filename="{stem}.pdf"'
    assert pdf.headers["content-type"] == "application/pdf"
    html = await api.http.get(path, headers=seen)
    assert html.headers["content-disposition"] == f'inline; filename="{stem}.html"'
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    for shown in ("API calls", "Storage (GB)", "Seats", number, "Growth (version 1)",
                  "Tier 1 (up to 10): 0.00 per unit + 5.00 flat fee",
                  "Tier 2 (and above): 80.00 per unit + 20.00 flat fee"):
        assert shown in html.text and shown in text


async def test_readiness_warns_of_a_missing_supplier_gstin_without_failing(api: Api) -> None:
    assert api.rt.settings.supplier_gstin is None  # the test settings leave it unset
    r = await api.http.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [w for w in r.json()["warnings"] if "SUPPLIER_GSTIN" in w]
