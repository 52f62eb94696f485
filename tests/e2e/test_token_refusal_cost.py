"""A refused admin token costs the same whether its prefix exists or not (issue 20, item 11:
an unknown prefix took about twice as long, one Postgres lookup more, so timing told an
attacker which prefixes exist). Counted in lookups, not measured in time."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio


async def _lookups(cache: Any, request: Callable[[], Awaitable[httpx.Response]]) -> int:
    """The cache's lookups one refused request cost."""
    before = cache.lookups
    got = await request()
    assert got.status_code == 401
    return int(cache.lookups - before)


async def test_a_wrong_secret_for_a_known_prefix_costs_what_an_unknown_prefix_costs(api: Api) -> None:
    r = await api.http.post("/admin/v1/tokens", headers=AUTH, json={"role": "support"})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert (await api.http.get("/admin/v1/meters", headers={"Authorization": f"Bearer {token}"})
            ).status_code == 200  # known, and in this process's cache
    cache = api.role.token_cache
    assert cache is not None
    prefix = token.split("_")[1]

    async def lookups_for(presented: str) -> int:
        return await _lookups(cache, lambda: api.http.get(
            "/admin/v1/meters", headers={"Authorization": f"Bearer {presented}"}))

    unknown = f"bt_{secrets.token_hex(len(prefix) // 2)}_{secrets.token_urlsafe(32)}"
    wrong_secret = f"bt_{prefix}_{secrets.token_urlsafe(32)}"
    assert await lookups_for(unknown) == await lookups_for(wrong_secret) == 1
    # Repeated, each is remembered alike: no lookup for either.
    assert await lookups_for(unknown) == await lookups_for(wrong_secret) == 0


async def test_a_wrong_secret_for_a_known_key_prefix_costs_what_an_unknown_prefix_costs(
    api: Api,
) -> None:
    org = (await api.http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "keys", "billing_email": "a@b.in"})).json()["id"]
    project = (await api.http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                   json={"name": "p"})).json()["id"]
    key = (await api.http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                               json={"name": "k"})).json()["key"]
    body = {"event_id": "e", "metric": "no_such_meter"}
    assert (await api.http.post("/api/v1/events", json=body,
                                headers={"Authorization": f"Bearer {key}"})).status_code == 422
    cache = api.role.key_cache
    assert cache is not None
    prefix = key.split("_")[1]

    async def lookups_for(presented: str) -> int:
        return await _lookups(cache, lambda: api.http.post(
            "/api/v1/events", json=body, headers={"Authorization": f"Bearer {presented}"}))

    unknown = f"bk_{secrets.token_hex(len(prefix) // 2)}_{secrets.token_urlsafe(32)}"
    wrong_secret = f"bk_{prefix}_{secrets.token_urlsafe(32)}"
    assert await lookups_for(unknown) == await lookups_for(wrong_secret) == 1
    assert await lookups_for(unknown) == await lookups_for(wrong_secret) == 0
