"""Issue 19: numbering in batches (PeriodNumbering.finalize_period -> finalize_batch) racing single
finalizations of the same drafts in other Postgres sessions (POST .../finalize, the scheduler's
auto-finalize) on the real ledger: every draft is numbered exactly once and the year's numbers
stay gapless. A batch that loses the race on an invoice's or the sequence's version decides
again from a fresh read (or, contended past its attempts, stops with Unavailable and is run
again): it never numbers an invoice a single finalization numbered."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime
from uuid import UUID

import pytest

import adapters.period_numbering as period_numbering
from domain.errors import Conflict, Unavailable
from domain.invoice import FINALIZED, Invoice, invoice_id
from domain.numbering import InvoiceSequence, format_number, sequence_id
from domain.period import period_of, shift_period
from infra.wiring import Runtime
from tests.integration.invoice_run_steps import entries_of, subscribed

ORGS = 200
BATCH_INVOICES = 20
SINGLE_FINALIZERS = 2
JOIN_TIMEOUT_S = 120.0


def _drafts(rt: Runtime, period: str) -> list[UUID]:
    """ORGS organisations with a draft each for `period` (an invoice run, no helpers)."""
    ids = subscribed(rt, period, ORGS, "race")
    assert rt.invoice_run().run(period, actor=None).created == ORGS
    return [invoice_id(o, period) for o in ids]


def test_batched_numbering_racing_single_finalizations_numbers_each_draft_once_gaplessly(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime
    monkeypatch.setattr(period_numbering, "FINALIZE_BATCH_INVOICES", BATCH_INVOICES)
    period = shift_period(period_of(datetime.now(UTC), "Asia/Kolkata"), -2)
    ids = _drafts(rt, period)
    seed = random.randrange(2**32)
    start = threading.Barrier(1 + SINGLE_FINALIZERS)
    errors: list[BaseException] = []
    batch_stopped: list[Unavailable] = []
    singles = [0] * SINGLE_FINALIZERS

    def batches() -> None:
        try:
            start.wait()
            rt.period_numbering().finalize_period(period, actor=None)
        except Unavailable as e:  # contended past its attempts: run again below
            batch_stopped.append(e)
        except BaseException as e:
            errors.append(e)

    def single(n: int) -> None:
        order = list(ids)
        random.Random(seed + n).shuffle(order)
        service = rt.invoicing()
        try:
            start.wait()
            for ident in order:
                try:
                    service.finalize(ident, actor=None)
                    singles[n] += 1
                except (Conflict, Unavailable):  # numbered already, or the numbering is busy
                    pass
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=batches)] + [
        threading.Thread(target=single, args=(n,)) for n in range(SINGLE_FINALIZERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"seed {seed}"
    assert not errors, f"seed {seed}: {errors!r}"
    rt.period_numbering().finalize_period(period, actor=None)  # the rest, if the race left any
    assert sum(singles) > 0, f"seed {seed}: the single finalizations never won a race"
    invoices = rt.ledger.get_many(ids, Invoice)
    assert {i.status for i in invoices.values()} == {FINALIZED}, f"seed {seed}"
    # Numbered once each (one Finalized event per invoice), gapless 1..ORGS.
    assert entries_of(rt, "Invoice.Finalized") == ORGS, f"seed {seed}"
    assert entries_of(rt, "InvoiceSequence.NumberIssued") == ORGS, f"seed {seed}"
    years = {(i.number or "").split("/")[1] for i in invoices.values()}
    assert len(years) == 1, f"seed {seed}"
    now = datetime.now(UTC)
    sequence = next(iter(rt.ledger.get_many(
        [sequence_id(y) for y in range(now.year - 1, now.year + 1)], InvoiceSequence).values()))
    assert sequence.last == ORGS, f"seed {seed}"
    assert sorted(i.number or "" for i in invoices.values()) == [
        format_number(sequence.financial_year, n) for n in range(1, ORGS + 1)], f"seed {seed}"
