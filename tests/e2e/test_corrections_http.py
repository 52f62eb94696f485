"""Issue 21's corrections over real HTTP, their refusals above all: the redraft of a voided
invoice (unknown, not void, already replaced, another tenant's caller, a run in progress), the
back-dated start of a subscription (never silently ignored), and the usage summary across
meters (group_by needs a metric; another tenant's organisation is a 404)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
IST = ZoneInfo("Asia/Kolkata")


def _last_period() -> tuple[str, datetime]:
    first = datetime.now(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    late = first - timedelta(hours=6)
    return late.strftime("%Y-%m"), late


def _problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    for word in words:
        assert word in r.text, r.text
    return body


async def _post(api: Api, path: str, body: dict[str, Any] | None = None, status: int = 201,
                headers: dict[str, str] | None = None) -> Any:
    r = await api.http.post(path, headers=headers or AUTH, json=body)
    assert r.status_code == status, r.text
    return r.json()


async def _customer(api: Api, name: str, starts_at: datetime | None) -> tuple[str, str]:
    await _post(api, "/admin/v1/meters", {"code": "fix_calls", "name": "Fix calls",
                                          "aggregation": "count"}, status=201 if name == "a" else 200)
    if name == "a":
        await _post(api, "/admin/v1/plans", {"code": "fix", "name": "Fix", "base_fee": 100,
                                             "charges": [{"metric": "fix_calls", "model": "per_unit",
                                                          "unit_price": 1}]})
    org = (await _post(api, "/admin/v1/organisations", {
        "name": f"fix-{name}", "billing_email": f"ap@{name}.in", "state_code": "29"}))["id"]
    project = (await _post(api, f"/admin/v1/organisations/{org}/projects", {"name": "p"}))["id"]
    key = (await _post(api, f"/admin/v1/projects/{project}/api-keys", {"name": "k"}))["key"]
    body: dict[str, Any] = {"plan_code": "fix"}
    if starts_at is not None:
        body["starts_at"] = starts_at.isoformat()
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    return org, key


async def test_a_voided_invoice_is_redrafted_once_and_every_wrong_redraft_is_a_clear_4xx(api: Api) -> None:
    # The month before last: past the test service's grace period (24 h) on any day, and billed
    # for the plan's base fee without usage (last month's would not be due on the 1st).
    _, late = _last_period()
    before_last = late.replace(day=1) - timedelta(hours=6)
    period = before_last.strftime("%Y-%m")
    org, _ = await _customer(api, "a", before_last - timedelta(days=40))
    run = await _post(api, "/admin/v1/invoice-runs", {"period": period}, status=200)
    assert run["created"] >= 1, run
    items = (await api.http.get("/admin/v1/invoices", headers=AUTH,
                                params={"organisation_id": org})).json()["items"]
    (first,) = items
    base = f"/admin/v1/invoices/{first['id']}"

    _problem(await api.http.post(f"{base}/redraft", headers=AUTH), 409, "not void", "draft")
    _problem(await api.http.post(f"/admin/v1/invoices/{uuid.uuid4()}/redraft", headers=AUTH), 404)
    assert (await api.http.post("/admin/v1/invoices/not-a-uuid/redraft", headers=AUTH)).status_code in (
        400, 404, 422)
    # An organisation's own admin may not redraft, not even its own invoice (invoices:write).
    token = (await _post(api, "/admin/v1/tokens", {"name": "own", "role": "org_admin",
                                                   "organisation_id": org}))["token"]
    _problem(await api.http.post(f"{base}/redraft", headers={"Authorization": f"Bearer {token}"}), 403)

    finalized = await _post(api, f"{base}/finalize", status=200)
    await _post(api, f"{base}/void", {"reason": "wrong"}, status=200)
    # A run in progress holds the lock a redraft takes: 409, and nothing drafted.
    with api.rt.invoice_run()._exclusive("held by the test"):
        # The lock's holder may as well be a void or the first of two redraft clicks: the 409
        # names each, never only "an invoice run" (review of issue 21).
        _problem(await api.http.post(f"{base}/redraft", headers=AUTH), 409, "an invoice run",
                 "a void or redraft", "is in progress")
    replacement = await _post(api, f"{base}/redraft")
    assert (replacement["status"], replacement["period"], replacement["number"]) == ("draft", period, None)
    assert replacement["id"] != first["id"]
    _problem(await api.http.post(f"{base}/redraft", headers=AUTH), 409, "already replaced",
             replacement["id"])
    # The run finds the replacement, and drafts nothing more.
    again = await _post(api, "/admin/v1/invoice-runs", {"period": period}, status=200)
    assert again["created"] == 0
    numbered = await _post(api, f"/admin/v1/invoices/{replacement['id']}/finalize", status=200)
    voided = (await api.http.get(base, headers=AUTH)).json()
    assert voided["status"] == "void" and voided["number"] == finalized["number"]
    assert numbered["number"] not in (None, finalized["number"])


async def test_an_earlier_start_moves_the_subscription_back_or_says_why_not(api: Api) -> None:
    org, _ = await _customer(api, "b", None)  # starts now
    path = f"/admin/v1/organisations/{org}/subscription"
    earlier = (datetime.now(IST).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
               - timedelta(days=40)).replace(day=1)
    await _post(api, "/admin/v1/plans", {"code": "fix_other", "name": "Other", "base_fee": 1})
    r = await api.http.put(path, headers=AUTH, json={"plan_code": "fix_other",
                                                     "starts_at": earlier.isoformat()})
    _problem(r, 422, "plan_code", "'fix'")
    # Never while a run drafts: a run that read the schedule before the move could draft a
    # period the move re-prices, after the move found no invoice there (review of issue 21).
    with api.rt.invoice_run()._exclusive("held by the test"):
        r = await api.http.put(path, headers=AUTH, json={"plan_code": "fix",
                                                         "starts_at": earlier.isoformat()})
        _problem(r, 409, "is in progress", "start")
    assert len((await api.http.get(path, headers=AUTH)).json()["history"]) == 1
    r = await api.http.put(path, headers=AUTH, json={"plan_code": "fix", "starts_at": earlier.isoformat()})
    assert r.status_code == 200, r.text
    history = r.json()["history"]
    assert datetime.fromisoformat(r.json()["effective_from"]) == earlier
    assert [(e["plan_code"], datetime.fromisoformat(e["effective_from"])) for e in history] == [
        ("fix", earlier)]
    read = (await api.http.get(path, headers=AUTH)).json()
    assert read["history"] == history and read["plan_code"] == "fix"


async def test_usage_without_a_metric_sums_every_meter_and_group_by_needs_one(api: Api) -> None:
    await _post(api, "/admin/v1/meters", {"code": "fix_gb", "name": "GB", "aggregation": "sum"})
    org, key = await _customer(api, "c", None)
    r = await api.http.post("/api/v1/events", headers={"Authorization": f"Bearer {key}"}, json={
        "events": [{"event_id": "c-1", "metric": "fix_calls"}, {"event_id": "c-2", "metric": "fix_calls"},
                   {"event_id": "c-3", "metric": "fix_gb", "value": "2.5"}]})
    assert r.status_code == 202, r.text
    position = r.headers["x-ledger-position"]
    path = f"/admin/v1/organisations/{org}/usage"
    headers = AUTH | {"X-Ledger-Position": position}
    r = await api.http.get(path, headers=headers)
    assert r.status_code == 200, r.text
    both = [("fix_calls", "2"), ("fix_gb", "2.5")]
    assert [(i["metric"], i["quantity"]) for i in r.json()["items"]] == both
    own = await api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}",
                                                       "X-Ledger-Position": position})
    assert [(i["metric"], i["quantity"]) for i in own.json()["items"]] == both
    _problem(await api.http.get(path, headers=AUTH, params={"group_by": "region"}), 422,
             "group_by", "needs a metric")
    other, _ = await _customer(api, "d", None)
    token = (await _post(api, "/admin/v1/tokens", {"name": "d", "role": "org_viewer",
                                                   "organisation_id": other}))["token"]
    _problem(await api.http.get(path, headers={"Authorization": f"Bearer {token}"}), 404)
    _problem(await api.http.get(f"/admin/v1/organisations/{uuid.uuid4()}/usage", headers=AUTH), 404)
