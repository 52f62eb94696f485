"""Invoice runs over HTTP (issues 19 and 21): a run answers its id and each organisation it did
not invoice with why; GET /admin/v1/invoice-runs/{id} and the list give the same; a run asked
to answer at once (Prefer: respond-async, as a long run does by itself) is a 202 with a Location
whose progress reaches done."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api
from tests.e2e.test_invoicing_http import last_period, post

pytestmark = pytest.mark.anyio


async def _organisation(api: Api, name: str, starts_at: datetime) -> str:
    org = (await post(api, "/admin/v1/organisations",
                      {"name": name, "billing_email": f"ap@{name}.in", "state_code": "29"}))["id"]
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                           json={"plan_code": "runs", "starts_at": starts_at.isoformat()})
    assert r.status_code == 201, r.text
    return str(org)


async def _get(api: Api, path: str, status: int = 200, **params: Any) -> Any:
    r = await api.http.get(path, headers=AUTH, params=params)
    assert r.status_code == status, r.text
    return r.json()


async def test_a_run_is_recorded_with_each_organisation_it_did_not_invoice_and_why(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH,
                            json={"code": "runs_calls", "name": "Calls", "aggregation": "count"})
    assert r.status_code in (200, 201), r.text
    await post(api, "/admin/v1/plans", {
        "code": "runs", "name": "Runs", "base_fee": "500", "minimum": "0",
        "charges": [{"metric": "runs_calls", "model": "per_unit", "unit_price": "1"}]})
    period, _ = last_period()
    now = datetime.now(UTC)
    billed = await _organisation(api, "billed", now - timedelta(days=70))
    late = await _organisation(api, "late", now - timedelta(hours=1))  # after the period ended

    first = await post(api, "/admin/v1/invoice-runs", {"period": period}, 200)
    assert (first["created"], first["skipped"]) == (1, 1)
    assert [(o["organisation_id"], o["name"], o["outcome"]) for o in first["organisations"]] == [
        (late, "late", "skipped")]
    reason = first["organisations"][0]["reason"]
    assert reason.startswith("no plan covers the period: subscribed from")

    record = await _get(api, f"/admin/v1/invoice-runs/{first['id']}")
    assert record["status"] == "done" and record["period"] == period
    assert (record["organisations_done"], record["organisations_total"]) == (2, 2)
    assert (record["created"], record["existing"], record["skipped"]) == (1, 0, 1)
    assert record["organisations"] == first["organisations"]
    assert record["started_by"] != "scheduler" and record["finished_at"] is not None

    # Asked to answer at once: 202, the run's id and where to follow it.
    r = await api.http.post("/admin/v1/invoice-runs", headers=AUTH | {"Prefer": "respond-async"},
                            json={"period": period})
    assert r.status_code == 202, r.text
    second = r.json()
    assert r.headers["location"] == f"/admin/v1/invoice-runs/{second['id']}"
    assert second["status"] in ("running", "done")

    def second_done() -> bool:
        got = httpx.get(f"{api.http.base_url}{r.headers['location']}", headers=AUTH)
        return bool(got.json()["status"] == "done")

    await wait_until(second_done, "the second run done")
    again = await _get(api, r.headers["location"])
    assert (again["created"], again["existing"], again["skipped"]) == (0, 1, 1)
    assert [o["organisation_id"] for o in again["organisations"]] == [late]

    listed = await _get(api, "/admin/v1/invoice-runs", period=period)
    assert [run["id"] for run in listed["items"]] == [second["id"], first["id"]]
    page = await _get(api, "/admin/v1/invoice-runs", limit="1")
    assert [run["id"] for run in page["items"]] == [second["id"]] and page["next_cursor"]
    rest = await _get(api, "/admin/v1/invoice-runs", limit="1", cursor=page["next_cursor"])
    assert [run["id"] for run in rest["items"]] == [first["id"]]
    assert billed not in {o["organisation_id"] for o in again["organisations"]}

    await _get(api, "/admin/v1/invoice-runs/00000000-0000-0000-0000-000000000000", 404)
    await _get(api, "/admin/v1/invoice-runs", 422, limit="0")
    await _get(api, "/admin/v1/invoice-runs", 422, start="2026-01")
    await _get(api, "/admin/v1/invoice-runs", 422, period="2026-13")
