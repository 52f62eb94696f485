"""Plans and subscriptions over real HTTP: versions, exact decimal prices, bad input."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio


async def _meter(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH,
                            json={"code": "req", "name": "Requests", "aggregation": "count"})
    assert r.status_code in (200, 201)


async def test_publishing_twice_makes_versions_and_prices_stay_exact(api: Api) -> None:
    await _meter(api)
    plan = {"code": "growth", "name": "Growth", "base_fee": "999.00", "minimum": "0",
            "charges": [{"metric": "req", "model": "graduated", "tiers": [
                {"up_to": "1000", "unit_price": "0"},
                {"up_to": None, "unit_price": "0.0035", "flat_fee": "10"}]}]}
    first = await api.http.post("/admin/v1/plans", headers=AUTH, json=plan)
    assert first.status_code == 201, first.text
    second = await api.http.post("/admin/v1/plans", headers=AUTH, json=plan | {"base_fee": "1099"})
    assert second.status_code == 201
    got = (await api.http.get("/admin/v1/plans/growth", headers=AUTH)).json()
    assert got["version"] == 2 and len(got["versions"]) == 2
    assert "0.0035" in str(got)

    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "sub", "billing_email": "a@b.in"})).json()["id"]
    r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                           json={"plan_code": "growth"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("body", [
    {"code": "bad", "name": "B", "base_fee": "-1", "minimum": "0", "charges": []},
    {"code": "bad", "name": "B", "base_fee": "abc", "minimum": "0", "charges": []},
    {"code": "bad", "name": "B", "charges": [{"metric": "unknown-meter", "model": "per_unit",
                                              "unit_price": "1"}]},
    {"code": "bad", "name": "B", "charges": [{"metric": "req", "model": "graduated", "tiers": [
        {"up_to": "10", "unit_price": "1"}, {"up_to": "5", "unit_price": "1"}]}]},
    {"code": "bad", "name": "B", "surprise": 1},
])
async def test_bad_plans_are_refused_and_record_nothing(api: Api, body: dict[str, object]) -> None:
    await _meter(api)
    head = api.rt.ledger.head()
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"]
    assert api.rt.ledger.head() == head


async def test_subscribing_to_unknowns_is_404(api: Api) -> None:
    r = await api.http.put(f"/admin/v1/organisations/{uuid.uuid4()}/subscription", headers=AUTH,
                           json={"plan_code": "growth"})
    assert r.status_code == 404
    assert (await api.http.get("/admin/v1/plans/nope", headers=AUTH)).status_code == 404


async def test_quantities_typed_as_json_integers_are_accepted_and_answered_as_decimal_strings(
    api: Api,
) -> None:
    await _meter(api)
    plan = {"code": "typed", "name": "Typed", "base_fee": 500, "charges": [
        {"metric": "req", "model": "graduated", "tiers": [
            {"up_to": 100, "unit_price": "0"}, {"up_to": None, "unit_price": "0.0035"}]}]}
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json=plan)
    assert r.status_code == 201, r.text
    assert r.json()["base_fee"] == "500"
    assert [t["up_to"] for t in r.json()["charges"][0]["tiers"]] == ["100", None]
    package = {"code": "packed", "name": "Packed", "charges": [
        {"metric": "req", "model": "package", "package_size": 1000, "package_price": "9.99"}]}
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json=package)
    assert r.status_code == 201, r.text
    assert r.json()["charges"][0]["package_size"] == "1000"


async def test_a_price_sent_as_a_json_fraction_is_refused_naming_it_and_records_nothing(api: Api) -> None:
    await _meter(api)
    head = api.rt.ledger.head()
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json={
        "code": "floaty", "name": "F", "charges": [
            {"metric": "req", "model": "per_unit", "unit_price": 0.5}]})
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["charges[0].unit_price"]
    assert api.rt.ledger.head() == head


async def test_an_oversized_base_fee_is_refused_and_no_plan_is_published(api: Api) -> None:
    """Issue 20, item 7: this base fee was accepted, and the invoice run then failed with a 500
    for every organisation after the one subscribed to it."""
    await _meter(api)
    huge = {"code": "huge", "name": "Huge", "base_fee": "9" * 40, "minimum": "0", "charges": []}
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json=huge)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["base_fee"]
    assert (await api.http.get("/admin/v1/plans/huge", headers=AUTH)).status_code == 404
