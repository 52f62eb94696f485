"""A void never lands while an invoice run is deciding what earlier invoices billed (found in
review of issue 14): the run reads which invoice carries a period's late usage, then drafts; a
void in between left that usage on a void invoice and on no other, never to be billed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

import adapters.invoice_run as invoice_run
from domain.errors import Conflict
from domain.late_usage import late_usage
from domain.services.invoicing import InvoicingService
from tests.integration.invoice_run_steps import GRACE, SUPPLIER_STATE_CODE, now
from tests.integration.test_late_usage import NOVEMBER, OCTOBER, calls_tenant, live  # noqa: F401

SEPTEMBER = datetime(2026, 9, 20, 12, tzinfo=UTC)


def _runner(tenant: Any) -> invoice_run.InvoiceRun:
    return invoice_run.InvoiceRun(tenant.rt.pool, tenant.rt.ledger,
                                  InvoicingService(tenant.rt.ledger, now), SUPPLIER_STATE_CODE,
                                  now, GRACE, tenant.rt.settings.pg_schema)


def test_a_void_while_a_run_drafts_is_refused_and_the_late_usage_stays_billed(
    live: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    tenant = calls_tenant(live)
    tenant.usage(SEPTEMBER)
    tenant.drafted("2026-09")
    tenant.usage(SEPTEMBER, OCTOBER)  # one late September call
    october = tenant.drafted("2026-10")  # carries "late usage for 2026-09"
    assert tenant.late_amounts(october, "2026-09")
    refused: list[Exception] = []
    original = late_usage

    def operator_voids_meanwhile(*args: Any, **kw: Any) -> Any:
        late = original(*args, **kw)
        try:  # the operator's void arrives between the run's reading and its drafting
            _runner(tenant).void(october.id, "wrong address", actor=None)
        except Conflict as e:
            refused.append(e)
        return late

    monkeypatch.setattr(invoice_run, "late_usage", operator_voids_meanwhile)
    tenant.usage(NOVEMBER)
    tenant.drafted("2026-11")
    monkeypatch.setattr(invoice_run, "late_usage", original)
    assert len(refused) == 1 and "in progress" in str(refused[0])
    assert tenant.billed()[("2026-09", "calls")] == tenant.sent[("2026-09", "calls")] == Decimal(2)
    # After the run, the void goes through.
    assert _runner(tenant).void(october.id, "wrong address", actor=None).aggregate.status == "void"
