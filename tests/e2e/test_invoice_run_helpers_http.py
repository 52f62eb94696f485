"""Issue 19 review: a run started over HTTP (202, the run in a thread of the API process) hands
batches to a helper process as the CLI's does, and drafts every invoice once: the helper is
started from that thread, its answers are counted in the run's record, and none is left
running. Small batches, so that a few organisations make several."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta

import httpx
import pytest

import adapters.invoice_run as invoice_run
from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api
from tests.e2e.test_invoicing_http import last_period, post
from tests.integration import orphans
from tests.integration.invoice_run_steps import entries_of

pytestmark = pytest.mark.anyio

ORGS = 8
ORGS_PER_BATCH = 2


async def test_a_run_over_http_drafts_with_a_helper_process_each_invoice_once(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(invoice_run, "ORGS_PER_BATCH", ORGS_PER_BATCH)
    monkeypatch.setattr(invoice_run, "HELPERS_FROM_ORGS", 2 * ORGS_PER_BATCH)
    await post(api, "/admin/v1/meters", {"code": "helped_calls", "name": "Calls",
                                         "aggregation": "count"})
    await post(api, "/admin/v1/plans", {
        "code": "helped", "name": "Helped", "base_fee": "500", "minimum": "0",
        "charges": [{"metric": "helped_calls", "model": "per_unit", "unit_price": "1"}]})
    period, _ = last_period()
    starts = (datetime.now(UTC) - timedelta(days=70)).isoformat()
    for n in range(ORGS):
        org = (await post(api, "/admin/v1/organisations", {
            "name": f"helped {n}", "billing_email": f"ap@h{n}.in", "state_code": "29"}))["id"]
        r = await api.http.put(f"/admin/v1/organisations/{org}/subscription", headers=AUTH,
                               json={"plan_code": "helped", "starts_at": starts})
        assert r.status_code == 201, r.text
    with caplog.at_level(logging.INFO, logger="billing.invoice_run"):
        r = await api.http.post("/admin/v1/invoice-runs",
                                headers=AUTH | {"Prefer": "respond-async"}, json={"period": period})
        assert r.status_code == 202, r.text
        location = f"{api.http.base_url}{r.headers['location']}"

        def done() -> bool:
            return bool(httpx.get(location, headers=AUTH).json()["status"] == "done")

        await wait_until(done, "the run done")
    record = (await api.http.get(r.headers["location"], headers=AUTH)).json()
    assert (record["created"], record["existing"], record["failed"]) == (ORGS, 0, 0)
    assert (record["organisations_done"], record["organisations_total"]) == (ORGS, ORGS)
    helped = [m.getMessage() for m in caplog.records if "helper processes" in m.getMessage()]
    assert helped and not helped[0].split(": ", 1)[1].startswith("0 batches"), helped
    assert entries_of(api.rt, "Invoice.Drafted") == ORGS
    # The run is recorded done after its helpers were stopped: none is left.
    ours = {pid for pid, _ in orphans.descendants(os.getpid())}
    assert not ours & set(orphans.naming("adapters.invoice_run_helpers"))
