"""Issue 21's reads over real HTTP: the plans list, one meter, an organisation's projects, and
the invoices list's number filter, order and organisation names. One service for the module."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
IST = ZoneInfo("Asia/Kolkata")  # invoice periods are months in India's time


async def _ok(api: Api, path: str, **params: str) -> dict[str, object]:
    r = await api.http.get(path, headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


async def _unprocessable_field(api: Api, path: str, **params: str) -> str:
    r = await api.http.get(path, headers=AUTH, params=params)
    assert r.status_code == 422, r.text
    return str(r.json())


async def test_plans_list_pages_by_code_with_each_plans_latest_version(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH,
                            json={"code": "rd_req", "name": "Requests", "aggregation": "count"})
    assert r.status_code in (200, 201), r.text
    for code, fee in (("rd_a", "1"), ("rd_b", "2"), ("rd_b", "3")):
        r = await api.http.post("/admin/v1/plans", headers=AUTH, json={
            "code": code, "name": code.upper(), "base_fee": fee})
        assert r.status_code == 201, r.text
    first = await _ok(api, "/admin/v1/plans", limit="1")
    assert [(p["code"], p["version"]) for p in first["items"]] == [("rd_a", 1)]  # type: ignore[attr-defined]
    cursor = first["next_cursor"]
    assert isinstance(cursor, str)
    rest = await _ok(api, "/admin/v1/plans", limit="1", cursor=cursor)
    assert rest["items"] == [{"code": "rd_b", "version": 2, "name": "RD_B", "currency": "INR",
                              "published_at": rest["items"][0]["published_at"]}]  # type: ignore[index]
    assert rest["next_cursor"] is None
    assert "limit" in await _unprocessable_field(api, "/admin/v1/plans", limit="0")
    assert "cursor" in await _unprocessable_field(api, "/admin/v1/plans", cursor="!!")


async def test_one_meter_is_read_by_code_and_an_unknown_code_is_a_404_problem(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "rd_gb", "name": "Gigabytes", "aggregation": "sum", "group_by": ["region"]})
    assert r.status_code in (200, 201), r.text
    got = await _ok(api, "/admin/v1/meters/rd_gb")
    assert got == {"code": "rd_gb", "name": "Gigabytes", "aggregation": "sum", "field": None,
                   "group_by": ["region"], "allow_negative": False}
    missing = await api.http.get("/admin/v1/meters/rd_nope", headers=AUTH)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def _org(api: Api, name: str) -> str:
    r = await api.http.post("/admin/v1/organisations", headers=AUTH,
                            json={"name": name, "billing_email": "a@b.in"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_an_organisations_projects_are_listed_oldest_first_and_only_its_own(api: Api) -> None:
    org, other = await _org(api, "rd_projects"), await _org(api, "rd_other")
    made = []
    for name in ("p1", "p2"):
        r = await api.http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                json={"name": name})
        assert r.status_code == 201, r.text
        made.append(r.json())
    r = await api.http.post(f"/admin/v1/organisations/{other}/projects", headers=AUTH,
                            json={"name": "theirs"})
    assert r.status_code == 201, r.text
    first = await _ok(api, f"/admin/v1/organisations/{org}/projects", limit="1")
    assert first["items"] == [made[0]]
    rest = await _ok(api, f"/admin/v1/organisations/{org}/projects", limit="1",
                     cursor=str(first["next_cursor"]))
    assert rest == {"items": [made[1]], "next_cursor": None}
    unknown = await api.http.get(f"/admin/v1/organisations/{uuid.uuid4()}/projects", headers=AUTH)
    assert unknown.status_code == 404
    assert "cursor" in await _unprocessable_field(
        api, f"/admin/v1/organisations/{org}/projects", cursor="x")


async def test_invoices_list_filters_by_number_orders_both_ways_and_names_the_organisation(
    api: Api,
) -> None:
    await api.http.post("/admin/v1/meters", headers=AUTH,
                        json={"code": "rd_req", "name": "Requests", "aggregation": "count"})
    r = await api.http.post("/admin/v1/plans", headers=AUTH,
                            json={"code": "rd_std", "name": "Std", "base_fee": "100"})
    assert r.status_code == 201, r.text
    starts_at = (datetime.now(UTC) - timedelta(days=70)).isoformat()
    for name in ("rd_inv_1", "rd_inv_2"):
        org = await _org(api, name)
        r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                               json={"plan_code": "rd_std", "starts_at": starts_at})
        assert r.status_code == 201, r.text
    period = (datetime.now(IST).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    r = await api.http.post("/admin/v1/invoice-runs", headers=AUTH, json={"period": period})
    assert r.status_code == 200 and r.json()["created"] == 2, r.text

    oldest = (await _ok(api, "/admin/v1/invoices"))["items"]
    assert isinstance(oldest, list) and len(oldest) == 2
    assert sorted(i["organisation_name"] for i in oldest) == ["rd_inv_1", "rd_inv_2"]
    newest = await _ok(api, "/admin/v1/invoices", order="newest", limit="1")
    assert newest["items"] == [oldest[1]]
    after = await _ok(api, "/admin/v1/invoices", order="newest", limit="1",
                      cursor=str(newest["next_cursor"]))
    assert after == {"items": [oldest[0]], "next_cursor": None}

    r = await api.http.post(f"/admin/v1/invoices/{oldest[1]['id']}/finalize", headers=AUTH)
    assert r.status_code == 200, r.text
    number = r.json()["number"]
    found = await _ok(api, "/admin/v1/invoices", number=number)
    assert [(i["id"], i["number"]) for i in found["items"]] == [(oldest[1]["id"], number)]  # type: ignore[attr-defined]
    # The number as the PDF's file name spells it (INV-2627-000001.pdf): an admin holding the
    # file finds its invoice, rather than an empty list (review of issue 21).
    by_file_name = await _ok(api, "/admin/v1/invoices", number=number.replace("/", "-"))
    assert by_file_name == found
    assert "order" in await _unprocessable_field(api, "/admin/v1/invoices", order="latest")
    assert "number" in await _unprocessable_field(api, "/admin/v1/invoices", number="N" * 17)
