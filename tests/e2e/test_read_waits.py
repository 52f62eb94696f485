"""Read-your-writes waits (issue 20, item 4): X-Ledger-Position beyond the ledger head answers at
once, and readers waiting for a reachable position hold no thread each (45 such waits used to
take the API's worker threads and slow every other tenant's reads)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from infra.embedded import free_port
from infra.wiring import ApiRole, Runtime, admin_token, build_api
from tests.conftest import TEST_ADMIN_TOKEN, http_status, make_settings, running, wait_until
from tests.e2e.conftest import close_and_drop

pytestmark = pytest.mark.anyio
AUTH = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
WAITERS = 45
THREADS_SPARE = 8  # a few pool and to_thread workers may start; never one per waiter


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api_without_projectors(
    tmp_path: Path, server_urls: tuple[str, str]
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime, ApiRole]]:
    """The API and relay in this process; the projectors only when the test starts them."""
    settings = make_settings(tmp_path, port=free_port())
    rt = Runtime.open(settings, *server_urls)
    role = build_api(rt, admin_token=admin_token(settings))
    base = f"http://127.0.0.1:{settings.port}"
    try:
        async with running(rt, {"api", "relay"}, api=role), httpx.AsyncClient(
            base_url=base, timeout=30
        ) as http:
            await wait_until(lambda: http_status(f"{base}/health/live") == 200, "up")
            yield http, rt, role
    finally:
        close_and_drop(server_urls[0], settings.pg_schema, rt)


async def test_a_position_beyond_the_ledger_head_is_refused_at_once(
    api_without_projectors: tuple[httpx.AsyncClient, Runtime, ApiRole],
) -> None:
    http, rt, _ = api_without_projectors
    r = await http.get("/admin/v1/organisations", headers=AUTH | {"X-Ledger-Position": "9999999999999999999"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "X-Ledger-Position"
    assert str(rt.ledger.head()) in r.json()["errors"][0]["message"]


async def test_many_readers_waiting_for_a_lagging_model_hold_no_thread_each(
    api_without_projectors: tuple[httpx.AsyncClient, Runtime, ApiRole],
) -> None:
    http, rt, role = api_without_projectors
    r = await http.post("/admin/v1/organisations", headers=AUTH,
                        json={"name": "waited for", "billing_email": "a@b.in"})
    assert r.status_code == 201, r.text
    position = r.headers["x-ledger-position"]
    threads_before = threading.active_count()
    readers = [asyncio.create_task(http.get(f"/admin/v1/organisations/{r.json()['id']}",
                                            headers=AUTH | {"X-Ledger-Position": position}))
               for _ in range(WAITERS)]
    watch = role.tracking_watch
    assert watch is not None
    # Nothing projects yet: every reader reaches the server and waits there.
    await wait_until(lambda: watch.waiting == WAITERS, "every reader waiting")
    peak = threading.active_count()
    assert peak - threads_before <= THREADS_SPARE, (threads_before, peak)
    assert (await http.get("/health/live")).status_code == 200  # others are served meanwhile
    projectors = Runtime.open(rt.settings, rt.database_url, rt.nats_url)
    try:
        async with running(projectors, {"project"}):
            answers = await asyncio.gather(*readers)
    finally:
        projectors.pool.close()
        projectors.ledger.close()
    assert [a.status_code for a in answers] == [200] * WAITERS
    assert {a.json()["name"] for a in answers} == {"waited for"}
