"""Who may read /metrics (issue 20, item 11): with BILLING_METRICS_TOKEN set, only a scraper that
sends it; without one, only clients on this host. It names tenants' blocked organisations and
the service's inner figures, so it is never open to the world by default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from infra.embedded import free_port
from infra.wiring import Runtime
from tests.conftest import http_status, make_settings, running, wait_until
from tests.e2e.conftest import close_and_drop

pytestmark = pytest.mark.anyio
METRICS_TOKEN = "scrape-0123456789abcdef"
FAR_AWAY = "203.0.113.7"  # TEST-NET-3: only ever a header value here, never a destination


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def _serve(tmp: Path, urls: tuple[str, str], **overrides: object) -> AsyncIterator[str]:
    settings = make_settings(tmp, port=free_port(), trusted_proxies=("127.0.0.1/32",), **overrides)
    rt = Runtime.open(settings, *urls)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        async with running(rt, {"api"}):
            await wait_until(lambda: http_status(f"{base}/health/live") == 200, "up")
            yield base
    finally:
        close_and_drop(urls[0], settings.pg_schema, rt)


@pytest.fixture(scope="module")
async def with_token(tmp_path_factory: pytest.TempPathFactory,
                     server_urls: tuple[str, str]) -> AsyncIterator[str]:
    async for base in _serve(tmp_path_factory.mktemp("m1"), server_urls, metrics_token=METRICS_TOKEN):
        yield base


@pytest.fixture(scope="module")
async def without_token(tmp_path_factory: pytest.TempPathFactory,
                        server_urls: tuple[str, str]) -> AsyncIterator[str]:
    async for base in _serve(tmp_path_factory.mktemp("m2"), server_urls):
        yield base


async def test_with_a_token_metrics_answer_only_the_scraper_that_sends_it(with_token: str) -> None:
    async with httpx.AsyncClient(base_url=with_token, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 401
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer not-it"})
        assert wrong.status_code == 401
        assert wrong.headers["content-type"].startswith("application/problem+json")
        ok = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200 and "billing_" in ok.text


async def test_without_a_token_metrics_answer_this_host_only(without_token: str) -> None:
    async with httpx.AsyncClient(base_url=without_token, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 200  # loopback, no proxy in between
        # The same request relayed by a (trusted) proxy for a client elsewhere.
        relayed = await http.get("/metrics", headers={"X-Forwarded-For": FAR_AWAY})
        assert relayed.status_code == 403
        assert "BILLING_METRICS_TOKEN" in relayed.json()["detail"]


