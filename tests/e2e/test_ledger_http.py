"""GET /admin/v1/ledger (issue 18): the ledger as NDJSON in position order, for auditors and
owners only; bad `after` and `limit` are a 4xx."""

from __future__ import annotations

import base64
import json

import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio


async def token(api: Api, role: str, organisation: str | None = None) -> dict[str, str]:
    body = {"role": role} | ({"organisation_id": organisation} if organisation else {})
    r = await api.http.post("/admin/v1/tokens", headers=AUTH, json=body)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def test_auditors_and_owners_read_the_ledger_in_order_and_page_through_it(api: Api) -> None:
    for i in range(3):
        r = await api.http.post("/admin/v1/organisations", headers=AUTH,
                                json={"name": f"ledgered {i}", "billing_email": "a@b.in"})
        assert r.status_code == 201, r.text
    auditor = await token(api, "auditor")
    head = api.rt.ledger.head()
    r = await api.http.get("/admin/v1/ledger", headers=auditor, params={"limit": "10000"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    entries = [json.loads(line) for line in r.text.splitlines()]
    positions = [e["position"] for e in entries]
    assert positions == sorted(positions) and positions[-1] >= head
    assert {"originator_id", "originator_version", "topic", "state"} <= set(entries[0])
    base64.b64decode(entries[0]["state"], validate=True)
    # Paging: `after` the last position seen, `limit` entries at most.
    page = await api.http.get("/admin/v1/ledger", headers=AUTH,
                              params={"after": str(positions[1]), "limit": "2"})
    assert page.status_code == 200
    assert [json.loads(x)["position"] for x in page.text.splitlines()] == positions[2:4]
    end = await api.http.get("/admin/v1/ledger", headers=auditor, params={"after": "999999999"})
    assert end.status_code == 200 and end.text == ""


async def test_other_roles_and_bad_parameters_are_refused(api: Api) -> None:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "refused", "billing_email": "a@b.in"})).json()["id"]
    for role, scoped in (("billing_admin", None), ("support", None), ("org_admin", org),
                         ("org_viewer", org)):
        r = await api.http.get("/admin/v1/ledger", headers=await token(api, role, scoped))
        assert r.status_code == 403, (role, r.text)
    assert (await api.http.get("/admin/v1/ledger")).status_code == 401
    for params in ({"limit": "0"}, {"limit": "10001"}, {"limit": "ten"}, {"limit": "-1"},
                   {"after": "x"}, {"after": "-1"}, {"after": "1.5"}, {"after": "9" * 20},
                   {"after": "١٢"}):
        r = await api.http.get("/admin/v1/ledger", headers=AUTH, params=params)
        assert 400 <= r.status_code < 500, (params, r.status_code, r.text)
