"""POST /admin/v1/reconciliations (auditor, owner) answers the report as JSON and records it;
GET lists and reads the recorded ones; a failed one shows in /metrics; other roles get 403 and
bad input a 422 that records nothing."""

from __future__ import annotations

from typing import Any

import pytest

from projections.reconciliations import last_failed
from tests.conftest import wait_until
from tests.e2e.conftest import AUTH, Api

pytestmark = pytest.mark.anyio


async def _token(api: Api, role: str) -> dict[str, str]:
    r = await api.http.post("/admin/v1/tokens", headers=AUTH, json={"role": role})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def _metric(api: Api, name: str) -> float | None:
    text = (await api.http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_an_auditor_reconciles_reads_the_report_and_a_failure_shows_in_metrics(
        api: Api) -> None:
    auditor, support = await _token(api, "auditor"), await _token(api, "support")
    r = await api.http.post("/admin/v1/organisations", headers=AUTH,
                            json={"name": "reconciled", "billing_email": "a@b.in"})
    assert r.status_code == 201, r.text
    org = r.json()["id"]

    assert (await api.http.post("/admin/v1/reconciliations", headers=support)).status_code == 403
    bad = await api.http.post("/admin/v1/reconciliations", headers=auditor,
                              json={"period": "2026-13"})
    assert bad.status_code == 422, bad.text

    r = await api.http.post("/admin/v1/reconciliations", headers=auditor, json={})
    assert r.status_code == 201, r.text
    report: dict[str, Any] = r.json()
    assert report["ok"] is True, report
    assert [c["name"] for c in report["checks"]][:4] == [
        "read_models", "invoices", "payments", "numbering"]
    assert report["ledger_position"] > 0

    listed = (await api.http.get("/admin/v1/reconciliations", headers=auditor)).json()["items"]
    assert report["id"] in [item["id"] for item in listed]
    one = (await api.http.get(f"/admin/v1/reconciliations/{report['id']}", headers=auditor)).json()
    assert one["ok"] is True and one["report"]["ledger_position"] == report["ledger_position"]
    assert len(one["report_sha256"]) == 64
    assert await _metric(api, "billing_reconciliation_failed") == 0

    unknown = await api.http.post("/admin/v1/reconciliations", headers=auditor,
                                  json={"organisation_id": "00000000-0000-4000-8000-000000000001"})
    assert unknown.status_code == 404, unknown.text  # no organisation: refused, not "ok"

    with api.rt.pool.connection() as conn:  # a row edited by hand
        conn.execute("UPDATE organisations SET name = 'edited' WHERE id = %s", (org,))
    r = await api.http.post("/admin/v1/reconciliations", headers=AUTH,
                            json={"organisation_id": org})
    assert r.status_code == 201, r.text
    failed = r.json()
    assert failed["ok"] is False and failed["difference_count"] == 1, failed
    (difference,) = failed["checks"][0]["differences"]
    assert difference["subject"] == "organisations" and difference["positions"]

    def recorded_as_failed() -> bool:
        with api.rt.pool.connection() as conn:
            return last_failed(conn)

    await wait_until(recorded_as_failed, "the failed reconciliation projected")
    assert await _metric(api, "billing_reconciliation_failed") == 1
