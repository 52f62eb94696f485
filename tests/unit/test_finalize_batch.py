"""Finalize and number in batches (issue 19): a batch is numbered whole in one append with its
year's sequence; batches that race, or use a sequence kept from an earlier batch that another
finalization has since moved on, still leave the numbers gapless and unique."""

from __future__ import annotations

from typing import Any

from domain.invoice import Invoice
from domain.numbering import InvoiceSequence, format_number, sequence_id
from domain.services.invoicing import InvoicingService
from tests.unit.memory import MemoryLedger
from tests.unit.test_invoices import AFTER_OCTOBER, draft, org, setup


def _drafts(svc: InvoicingService, count: int) -> list[Any]:
    return [draft(svc, org())[0].aggregate.id for _ in range(count)]


def _numbers(ledger: MemoryLedger, ids: list[Any]) -> list[str]:
    return sorted(ledger.get(i, Invoice).number or "" for i in ids)


def test_a_batch_is_numbered_in_order_and_only_its_drafts() -> None:
    svc, _, _ = setup()
    ids = _drafts(svc, 5)
    svc.finalize(ids[0], actor=None)  # already finalized: left as it is
    done = svc.finalize_batch(ids, actor=None)
    assert [i.id for i in done] == ids[1:]
    assert [i.number for i in done] == [format_number(2026, n) for n in range(2, 6)]
    assert svc.finalize_batch(ids, actor=None) == []  # nothing left to number


def test_batches_with_a_stale_sequence_still_number_without_gaps() -> None:
    svc, ledger, _ = setup()
    ids = _drafts(svc, 9)
    kept: dict[int, InvoiceSequence] = {}
    svc.finalize_batch(ids[:3], actor=None, sequences=kept)
    # Another finalizer moves the sequence on while `kept` still holds the old one.
    other = InvoicingService(ledger, lambda: AFTER_OCTOBER)
    other.finalize(ids[3], actor=None)
    svc.finalize_batch(ids[4:7], actor=None, sequences=kept)  # loses once, reads afresh
    svc.finalize_batch(ids[7:], actor=None, sequences=kept)  # the kept one is current again
    assert _numbers(ledger, ids) == [format_number(2026, n) for n in range(1, 10)]
    assert ledger.get(sequence_id(2026), InvoiceSequence).last == 9
