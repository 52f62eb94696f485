"""Issue 21's small inconsistencies, over real HTTP on one shared service: a key's allow-list
is a list wherever a key is shown, as an organisation's is; /metrics names one charset."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

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
