"""What an organisation-scoped caller sees in its audit trail (issue 20, item 11): its own
actors in full, and the platform's operators only as "platform" (no ids, no addresses)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio


async def test_an_org_scoped_caller_sees_operators_as_platform_and_its_own_actors_in_full(
    api: Api,
) -> None:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "audited", "billing_email": "a@b.in"})).json()["id"]
    r = await api.http.post("/admin/v1/tokens", headers=AUTH,
                            json={"role": "org_admin", "organisation_id": org})
    assert r.status_code == 201, r.text
    own_id, own = r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"}
    assert (await api.http.patch(f"/admin/v1/organisations/{org}", headers=AUTH,
                                 json={"billing_email": "ops@b.in"})).status_code == 200
    assert (await api.http.patch(f"/admin/v1/organisations/{org}", headers=own,
                                 json={"name": "audited too"})).status_code == 200

    def by_role(items: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
        return [e for e in items if e["role"] == role]

    seen = (await api.http.get("/admin/v1/audit-events", headers=own)).json()["items"]
    operators = by_role(seen, "platform")
    assert operators, seen
    assert all(e["actor_id"] is None and e["source_ip"] == "" for e in operators)
    mine = by_role(seen, "org_admin")
    assert [e["actor_id"] for e in mine] == [own_id]
    assert mine[0]["source_ip"] == "127.0.0.1"
    # The platform's own view names everybody.
    full = (await api.http.get("/admin/v1/audit-events", headers=AUTH,
                               params={"organisation_id": org})).json()["items"]
    assert not by_role(full, "platform")
    assert all(e["actor_id"] and e["source_ip"] for e in full)
