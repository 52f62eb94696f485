"""Issue 19 review: numbering reads the next page of drafts while it numbers the current one
(PeriodNumbering.finalize_period). A draft of the page read ahead that is voided before its page is
numbered is not numbered: the page's append loses the race on that invoice's version and
finalize_batch decides again from a fresh read. The others are numbered, once each, gaplessly."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import pytest

import adapters.period_numbering as period_numbering
from domain.invoice import FINALIZED, VOID, Invoice, invoice_id
from domain.numbering import format_number
from domain.period import period_of, shift_period
from infra.wiring import Runtime
from tests.integration.invoice_run_steps import subscribed

ORGS = 6
BATCH_INVOICES = 3  # two pages: the second is read while the first is numbered


def test_a_draft_voided_after_numbering_read_it_ahead_is_left_void_and_the_rest_gapless(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    monkeypatch.setattr(period_numbering, "FINALIZE_BATCH_INVOICES", BATCH_INVOICES)
    period = shift_period(period_of(datetime.now(UTC), "Asia/Kolkata"), -2)
    ids = subscribed(rt, period, ORGS, "ahead")
    assert rt.invoice_run().run(period, actor=None).created == ORGS
    numbering = rt.period_numbering()
    read_page = numbering._finalize_page
    voided: list[UUID] = []

    def read_then_void(period: str, after: UUID | None
                       ) -> tuple[list[UUID], dict[UUID, Invoice]]:
        page, newest = read_page(period, after)
        if after is not None and newest and not voided:  # the page read ahead
            ident = next(iter(newest))
            rt.invoice_run().void(ident, "voided while numbering read it ahead", actor=None)
            voided.append(ident)
        return page, newest

    monkeypatch.setattr(numbering, "_finalize_page", read_then_void)
    assert numbering.finalize_period(period, actor=None) == ORGS - 1
    assert voided
    invoices = rt.ledger.get_many([invoice_id(o, period) for o in ids], Invoice)
    assert invoices[voided[0]].status == VOID and invoices[voided[0]].number is None
    numbered = [i for i in invoices.values() if i.status == FINALIZED]
    assert len(numbered) == ORGS - 1
    fy = int(f"20{(numbered[0].number or '').split('/')[1][:2]}")
    assert sorted(i.number or "" for i in numbered) == [
        format_number(fy, n) for n in range(1, ORGS)]
