"""Issue 21's small inconsistencies, over real HTTP on one shared service: a key's allow-list
is a list wherever a key is shown, as an organisation's is; /metrics names one charset; a
credential of the wrong kind is refused saying which kind the route needs; a plan's type errors
and broken rules come in one 422."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from api.credentials import WRONG_KIND_FOR_ADMIN, WRONG_KIND_FOR_INGEST
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
FENCE = ["10.0.0.0/8", "fd00::/8"]


async def _project(api: Api) -> str:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "consistency", "billing_email": "a@b.in"})).json()
    r = await api.http.post(f"/admin/v1/organisations/{org['id']}/projects", headers=AUTH,
                            json={"name": "p"})
    assert r.status_code == 201, r.text
    project: str = r.json()["id"]
    return project


async def test_a_keys_allowed_ips_is_a_list_when_created_listed_and_rotated(api: Api) -> None:
    project = await _project(api)
    keys = f"/admin/v1/projects/{project}/api-keys"
    fenced = await api.http.post(keys, headers=AUTH, json={"name": "fenced", "allowed_ips": FENCE})
    open_ = await api.http.post(keys, headers=AUTH, json={"name": "open"})
    assert (fenced.status_code, open_.status_code) == (201, 201), (fenced.text, open_.text)
    assert (fenced.json()["allowed_ips"], open_.json()["allowed_ips"]) == (FENCE, [])
    rotated = await api.http.post(f"/admin/v1/api-keys/{fenced.json()['id']}/rotate", headers=AUTH,
                                  json={})
    assert rotated.status_code == 201 and rotated.json()["allowed_ips"] == FENCE
    listed: list[dict[str, Any]] = (await api.http.get(keys, headers=AUTH)).json()["items"]
    by_id = {k["id"]: k["allowed_ips"] for k in listed}
    assert by_id == {fenced.json()["id"]: FENCE, open_.json()["id"]: [],
                     rotated.json()["id"]: FENCE}


async def test_metrics_send_exactly_one_content_type_with_one_charset(api: Api) -> None:
    r = await api.http.get("/metrics")  # the test client is on this host: no token needed
    assert r.status_code == 200
    assert r.headers.get_list("content-type") == [CONTENT_TYPE_PLAIN_0_0_4]
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "billing_http_requests_total" in r.text


async def test_a_credential_of_the_wrong_kind_is_refused_naming_the_kind_needed(api: Api) -> None:
    project = await _project(api)
    key = (await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                               json={"name": "ingest"})).json()["key"]
    token = (await api.http.post("/admin/v1/tokens", headers=AUTH,
                                 json={"name": "ops", "role": "support"})).json()["token"]
    as_admin = await api.http.get("/admin/v1/organisations", headers={"Authorization": f"Bearer {key}"})
    as_ingest = await api.http.post("/api/v1/events", headers={"Authorization": f"Bearer {token}"},
                                    json={"events": []})
    for r, said in ((as_admin, WRONG_KIND_FOR_ADMIN), (as_ingest, WRONG_KIND_FOR_INGEST)):
        assert r.status_code == 401, r.text
        assert r.json()["detail"] == said
    assert "bk_" in WRONG_KIND_FOR_ADMIN and "bt_" in WRONG_KIND_FOR_INGEST
    # Unknown credentials of the route's own kind keep their plain refusal.
    forged = {"Authorization": f"Bearer {key[:-4]}zzzz"}
    assert (await api.http.post("/api/v1/events", headers=forged, json={"events": []})).json()[
        "detail"] == "unknown API key"
    assert (await api.http.get("/admin/v1/organisations", headers={
        "Authorization": f"Bearer {token[:-4]}zzzz"})).json()["detail"] == "unknown admin token"


async def test_a_plan_with_wrong_types_and_broken_rules_gets_every_error_in_one_answer(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH,
                            json={"code": "calls", "name": "Calls", "aggregation": "count"})
    assert r.status_code in (200, 201), r.text
    head = api.rt.ledger.head()
    r = await api.http.post("/admin/v1/plans", headers=AUTH, json={
        "code": "mixed", "name": 5, "base_fee": "-1", "minimum": 0.5, "surprise": True,
        "charges": [{"metric": "calls", "model": "per_unit", "unit_price": 0.5},
                    {"metric": "nope", "model": "per_unit", "unit_price": "1"},
                    "not a charge",
                    {"metric": "calls", "model": "graduated", "tiers": [{"up_to": []}]}]})
    assert r.status_code == 422, r.text
    errors = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert errors == {
        "name": "Expected `str`, got `int`",                        # types ...
        "minimum": "Expected `int | str`, got `float`",            # a JSON fraction, still refused
        "surprise": "Object contains unknown field `surprise`",
        "charges[0].unit_price": "Expected `int | str | null`, got `float`",
        "charges[2]": "Expected `object`, got `str`",
        "charges[3].tiers[0].up_to": "Expected `int | str | null`, got `array`",
        "charges[3].tiers[0].unit_price": "Object missing required field `unit_price`",
        "base_fee": errors["base_fee"],                            # ... and rules, together
        "charges[1].metric": errors["charges[1].metric"],
        "charges[3].metric": errors["charges[3].metric"],
    }
    assert "negative" in errors["base_fee"] and "not a defined meter" in errors["charges[1].metric"]
    assert "already has a charge" in errors["charges[3].metric"]
    assert api.rt.ledger.head() == head


async def test_plan_bodies_of_any_shape_are_422s_naming_a_field(api: Api) -> None:
    odd: list[Any] = [None, [], "x", 1, {}, {"charges": [None, []]}, {"charges": {"a": 1}},
                      {"code": {"x": 1}, "name": ["n"]}, {"charges": [{"tiers": "t"}]},
                      {"charges": [{"tiers": [None, {"up_to": True}]}]}]
    for body in odd:
        r = await api.http.post("/admin/v1/plans", headers=AUTH, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["errors"] and all(e["field"] for e in r.json()["errors"]), (body, r.text)
    r = await api.http.post("/admin/v1/plans", headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    schema = (await api.http.get("/schema/openapi.json")).json()
    assert "/admin/v1/plans" in schema["paths"]
