"""An organisation's `allowed_ips` binds its own organisation-scoped admin tokens too (issue 20,
item 10: from a blocked address an org_admin still read (200) and created keys (201))."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio
ELSEWHERE = "192.0.2.0/24"  # TEST-NET-1: never the test client's address (127.0.0.1)


async def test_an_org_admin_outside_its_organisations_allow_list_is_refused(api: Api) -> None:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "fenced", "billing_email": "a@b.in"})).json()["id"]
    project = (await api.http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                   json={"name": "p"})).json()["id"]
    r = await api.http.post("/admin/v1/tokens", headers=AUTH,
                            json={"role": "org_admin", "organisation_id": org})
    own = {"Authorization": f"Bearer {r.json()['token']}"}
    assert (await api.http.get(f"/admin/v1/organisations/{org}", headers=own)).status_code == 200
    r = await api.http.patch(f"/admin/v1/organisations/{org}", headers=AUTH,
                             json={"allowed_ips": [ELSEWHERE]})
    assert r.status_code == 200, r.text

    url = str(api.http.base_url.join(f"/admin/v1/organisations/{org}"))
    # Each API process's token cache follows the organisations model twice a second.
    await wait_until(lambda: httpx.get(url, headers=own, timeout=5).status_code == 403,
                     "the org_admin refused", 5.0)
    keys_before = len((await api.http.get(f"/admin/v1/projects/{project}/api-keys",
                                          headers=AUTH)).json()["items"])
    r = await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=own, json={"name": "k"})
    assert r.status_code == 403, r.text
    assert "allow" in r.json()["detail"]
    after = (await api.http.get(f"/admin/v1/projects/{project}/api-keys", headers=AUTH)).json()
    assert len(after["items"]) == keys_before  # nothing created
    # The platform's operators are not bound by a tenant's allow-list.
    assert (await api.http.get(f"/admin/v1/organisations/{org}", headers=AUTH)).status_code == 200
