"""The scheduler's jobs, run as the scheduler runs them: they must finish and say what they did."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from domain.period import due_periods
from infra.scheduler import CATCH_UP_PERIODS, invoice_job
from infra.wiring import Runtime

pytestmark = pytest.mark.anyio


async def test_the_invoice_job_runs_every_catch_up_period_and_logs_its_counts(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="billing.scheduler")
    await invoice_job(runtime)
    runs = [r for r in caplog.records if r.getMessage() == "invoice run"]
    expected = due_periods(datetime.now(UTC), timedelta(hours=runtime.settings.grace_hours),
                           CATCH_UP_PERIODS)
    assert [r.invoice_run["period"] for r in runs] == expected  # type: ignore[attr-defined]
    for record in runs:
        counts = record.invoice_run  # type: ignore[attr-defined]
        assert counts["created"] == counts["existing"] == counts["failed"] == 0
        assert counts["blocked"] == []
