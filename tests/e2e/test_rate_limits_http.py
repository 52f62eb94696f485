"""Rate limits as a tenant meets them over HTTP: one bucket per organisation, whatever the
number of keys, and a bound on keys per project (issue 20, item 6)."""

from __future__ import annotations

import math
import time

import pytest

from api.keys import KEYS_PER_PROJECT_MAX
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
PER_SECOND, BURST = 1, 5
KEYS = 10
REQUESTS = 50


async def _org_project(api: Api, name: str) -> tuple[str, str]:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": name, "billing_email": "a@b.in"})).json()["id"]
    project = (await api.http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                   json={"name": "p"})).json()["id"]
    return str(org), str(project)


async def test_many_keys_of_one_organisation_share_its_one_bucket(api: Api) -> None:
    r = await api.http.post("/admin/v1/meters", headers=AUTH, json={
        "code": "rl_calls", "name": "calls", "aggregation": "count"})
    assert r.status_code in (200, 201), r.text
    org, project = await _org_project(api, "limited")
    r = await api.http.patch(f"/admin/v1/organisations/{org}", headers=AUTH,
                             json={"rate_limit": {"per_second": PER_SECOND, "burst": BURST}})
    assert r.status_code == 200, r.text
    keys = []
    for i in range(KEYS):
        r = await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                                json={"name": f"k{i}"})
        assert r.status_code == 201, r.text
        keys.append(r.json()["key"])
    started = time.monotonic()
    accepted = 0
    for n in range(REQUESTS):
        r = await api.http.post("/api/v1/events", headers={"Authorization": f"Bearer {keys[n % KEYS]}"},
                                json={"event_id": f"e{n}", "metric": "rl_calls"})
        assert r.status_code in (202, 429), r.text
        accepted += r.status_code == 202
    elapsed = time.monotonic() - started
    # The burst, what the rate refilled meanwhile, and one for rounding: not a burst per key.
    assert accepted <= BURST + math.ceil(elapsed * PER_SECOND) + 1, (accepted, elapsed)


async def test_a_project_has_at_most_its_limit_of_live_keys(api: Api) -> None:
    _, project = await _org_project(api, "many keys")
    for i in range(KEYS_PER_PROJECT_MAX):
        r = await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                                json={"name": f"k{i}"})
        assert r.status_code == 201, r.text
    r = await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                            json={"name": "one too many"})
    assert r.status_code == 422, r.text
    assert "revoke" in r.json()["errors"][0]["message"]
    listed = (await api.http.get(f"/admin/v1/projects/{project}/api-keys", headers=AUTH)).json()
    assert len(listed["items"]) == KEYS_PER_PROJECT_MAX  # nothing stored
    r = await api.http.delete(f"/admin/v1/api-keys/{listed['items'][0]['id']}", headers=AUTH)
    assert r.status_code == 204
    r = await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                            json={"name": "after a revocation"})
    assert r.status_code == 201, r.text
