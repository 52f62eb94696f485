"""NATS goes away: writes still commit to the ledger; when it returns, the relay catches up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from infra.embedded import EmbeddedNats, free_port
from infra.settings import Settings
from infra.wiring import Runtime
from tests.conftest import TEST_ADMIN_TOKEN, http_status, running, tracked, wait_until
from tests.integration.helpers import org_rows, rebuilt_rows

pytestmark = pytest.mark.anyio


async def test_writes_survive_a_nats_outage_and_the_read_model_gets_every_one(
    tmp_path: Path, settings: Settings, server_urls: tuple[str, str]
) -> None:
    nats_server = EmbeddedNats(tmp_path / "own-nats")
    nats_server.start()
    port = free_port()
    cfg = dataclasses.replace(settings, port=port)
    rt = Runtime.open(cfg, server_urls[0], nats_server.url)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    try:
        async with running(rt, {"api", "relay", "project"}), httpx.AsyncClient(
            base_url=base, headers=headers, timeout=10
        ) as http:
            await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "ready")
            first = await http.post("/admin/v1/organisations",
                                    json={"name": "before", "billing_email": "a@b.in"})
            assert first.status_code == 201

            nats_server.stop()
            await wait_until(lambda: http_status(f"{base}/health/ready") == 503, "not ready")
            during = []
            for i in range(3):
                r = await http.post("/admin/v1/organisations",
                                    json={"name": f"during-{i}", "billing_email": "a@b.in"})
                assert r.status_code == 201, r.text  # committed to the ledger regardless
                during.append(r.json()["id"])
            head = rt.ledger.head()
            assert tracked(rt, "organisations") < head

            nats_server.start(port=int(nats_server.url.rsplit(":", 1)[1]))
            await wait_until(lambda: tracked(rt, "organisations") >= head, "catch-up", 30)
            await wait_until(lambda: http_status(f"{base}/health/ready") == 200, "ready again")
            listed = (await http.get("/admin/v1/organisations")).json()["items"]
            assert {o["id"] for o in listed} >= set(during)
            assert len(listed) == 4
        assert org_rows(rt) == rebuilt_rows(rt)
    finally:
        rt.pool.close()
        rt.ledger.close()
        nats_server.stop()
