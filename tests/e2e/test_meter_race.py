"""A meter's aggregation is frozen by usage that is committed but not yet in the usage read
model: the change waits for the read model, answers 503 while it cannot catch up, and 409 once
it has."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from infra.embedded import free_port
from infra.wiring import Runtime
from tests.conftest import http_status, make_settings, running, wait_until
from tests.e2e.conftest import AUTH, close_and_drop

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Split:
    """The API in one runtime; relay and projectors in another, started and stopped at will."""

    http: httpx.AsyncClient
    api: Runtime
    worker: Runtime


@pytest.fixture
async def split(tmp_path: Path, server_urls: tuple[str, str]) -> AsyncIterator[Split]:
    settings = make_settings(tmp_path, port=free_port())
    api, worker = Runtime.open(settings, *server_urls), Runtime.open(settings, *server_urls)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        async with running(api, {"api"}), httpx.AsyncClient(base_url=base, timeout=10) as http:
            await wait_until(lambda: http_status(f"{base}/health/live") == 200, "up")
            yield Split(http, api, worker)
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, api, worker)


async def test_usage_not_yet_projected_still_freezes_the_meter(split: Split) -> None:
    http = split.http
    meter = {"code": "calls", "name": "Calls", "aggregation": "count"}
    async with running(split.worker, {"relay", "project"}):
        for m in (meter, meter | {"code": "warm"}):
            assert (await http.post("/admin/v1/meters", headers=AUTH, json=m)).status_code == 201
        org = (await http.post("/admin/v1/organisations", headers=AUTH,
                               json={"name": "o", "billing_email": "a@b.in"})).json()["id"]
        project = (await http.post(f"/admin/v1/organisations/{org}/projects", headers=AUTH,
                                   json={"name": "web"})).json()["id"]
        key = (await http.post(f"/admin/v1/projects/{project}/api-keys", headers=AUTH,
                               json={"name": "k"})).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        first = await http.post("/api/v1/events", headers=auth,
                                json={"event_id": "warm", "metric": "warm"})
        assert first.status_code == 202, first.text  # the key is known to the API (another meter)
    # The worker is stopped: this usage is committed and stays out of the read model.
    r = await http.post("/api/v1/events", headers=auth, json={"event_id": "e1", "metric": "calls"})
    assert r.status_code == 202, r.text
    # The API waits (api.deps.READ_WAIT_S) for the usage read model, then asks for a retry.
    waiting = await http.post("/admin/v1/meters", headers=AUTH, json=meter | {"aggregation": "sum"})
    assert waiting.status_code == 503, waiting.text
    assert waiting.headers["retry-after"]
    head = split.api.ledger.head()
    async with running(split.worker, {"relay", "project"}):
        refused = await http.post("/admin/v1/meters", headers=AUTH, json=meter | {"aggregation": "sum"})
        assert refused.status_code == 409, refused.text
        listed = (await http.get("/admin/v1/meters", headers=AUTH)).json()["items"]
        assert [m["aggregation"] for m in listed if m["code"] == "calls"] == ["count"]
    assert split.api.ledger.head() == head
