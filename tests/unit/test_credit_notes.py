"""Credit notes, pure: what a note credits (tax reversed per line in the invoice's split, half-up
to the paisa; never more than invoiced, whatever the number of notes), the CN number series,
racing notes on the memory ledger, and refund shares whose state no order or repeat of
observations can change."""

from __future__ import annotations

import itertools
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.credit_note import (
    FAILED,
    PROCESSED,
    CreditNote,
    CreditNoteSequence,
    RefundShare,
    ShareState,
    compute_credit,
    credit_sequence_id,
    credited_lines,
    credited_taxes,
    format_credit_note_number,
    note_status,
    share_after,
)
from domain.errors import Conflict, ValidationFailed
from domain.invoice import Invoice
from domain.numbering import NUMBER_MAX_CHARS, SEQUENCE_MAX
from domain.services.credit_notes import CreditNotesService
from tests.unit.memory import Clock, MemoryLedger
from tests.unit.test_invoices import AFTER_OCTOBER, draft, org, setup

HYPOTHESIS_EXAMPLES = 60


def finalized(state_code: str = "29", country: str = "IN") -> tuple[Invoice, MemoryLedger, Clock]:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org(state_code, country))
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    return invoice, ledger, clock


def test_numbers_are_their_own_series_within_16_characters() -> None:
    assert format_credit_note_number(2026, 1) == "CN/2627/000001"
    assert len(format_credit_note_number(2099, SEQUENCE_MAX)) <= NUMBER_MAX_CHARS
    assert credit_sequence_id(2026) != credit_sequence_id(2027)
    sequence = CreditNoteSequence.open(2026, AFTER_OCTOBER)
    assert [sequence.issue(uuid4(), AFTER_OCTOBER) for _ in range(2)] == [
        "CN/2627/000001", "CN/2627/000002"]


def test_tax_is_reversed_per_line_half_up_in_the_invoices_split() -> None:
    intra, _, _ = finalized("29")
    credit = compute_credit(intra, lines=[(0, 1005), (1, 1006)], amount=None)
    # 9 % of 1005 = 90.45 -> 90; of 1006 = 90.54 -> 91; each component on its own.
    assert [[(t.name, t.amount) for t in line.taxes] for line in credit.lines] == [
        [("CGST", 90), ("SGST", 90)], [("CGST", 91), ("SGST", 91)]]
    assert [(t.name, t.amount) for t in credit.taxes] == [("CGST", 181), ("SGST", 181)]
    assert (credit.subtotal, credit.total) == (2011, 2011 + 362)
    inter, _, _ = finalized("27")
    credit = compute_credit(inter, lines=[(0, 1005)], amount=None)
    assert [(t.name, t.amount) for t in credit.taxes] == [("IGST", 181)]  # 180.9 -> 181
    export, _, _ = finalized(None, "US")  # type: ignore[arg-type]
    assert compute_credit(export, lines=[(0, 1005)], amount=None).total == 1005


def test_a_whole_amount_is_the_total_tax_included_or_refused_when_unreachable() -> None:
    invoice, _, _ = finalized("29")
    credit = compute_credit(invoice, lines=None, amount=11_800)
    assert (credit.subtotal, [t.amount for t in credit.taxes], credit.total) == (
        10_000, [900, 900], 11_800)
    reachable = {t + 2 * int((t * 9 + 50) // 100) for t in range(1, 2000)}
    unreachable = next(n for n in range(1, 2000) if n not in reachable)
    with pytest.raises(ValidationFailed, match="a paisa more or less"):
        compute_credit(invoice, lines=None, amount=unreachable)
    for bad in ({"lines": None, "amount": None}, {"lines": [(0, 1)], "amount": 118},
                {"lines": [(99, 1)], "amount": None}, {"lines": [(0, 0)], "amount": None},
                {"lines": [(0, 1), (0, 1)], "amount": None}, {"lines": None, "amount": -1}):
        with pytest.raises(ValidationFailed):
            compute_credit(invoice, **bad)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None)
@given(st.lists(st.integers(1, 99), min_size=1, max_size=6), st.sampled_from(["29", "27"]))
def test_notes_in_any_parts_never_exceed_the_invoice_and_a_full_credit_reverses_its_tax(
        parts: list[int], state: str) -> None:
    invoice, ledger, _ = finalized(state)
    svc = CreditNotesService(ledger, Clock(AFTER_OCTOBER), uuid4, None)
    for pct in parts:  # each a share of what each line has left
        lines = [(i, max(1, (line.amount - invoice.credited_lines.get(i, 0)) * pct // 100))
                 for i, line in enumerate(invoice.lines)
                 if line.amount - invoice.credited_lines.get(i, 0) > 0]
        if lines:
            svc.issue(invoice.id, reason="other", settlement="reduce_due", lines=lines, actor=None)
        invoice = ledger.get(invoice.id, Invoice)
    rest = [(i, line.amount - invoice.credited_lines.get(i, 0))
            for i, line in enumerate(invoice.lines) if line.amount - invoice.credited_lines.get(i, 0)]
    if rest:
        svc.issue(invoice.id, reason="other", settlement="reduce_due", lines=rest, actor=None)
    invoice = ledger.get(invoice.id, Invoice)
    assert invoice.credited == invoice.total and invoice.amount_due == 0
    assert invoice.credited_taxes == {t.name: t.amount for t in invoice.taxes}
    with pytest.raises(ValidationFailed):
        svc.issue(invoice.id, reason="other", settlement="reduce_due", lines=[(0, 1)], actor=None)


def test_a_note_that_lost_the_race_decides_again_and_is_refused_if_nothing_is_left() -> None:
    invoice, ledger, clock = finalized("29")
    svc = CreditNotesService(ledger, clock, uuid4, None)
    # Just before the first note's save, another note credits everything: the first collides on
    # the invoice's version, decides again from the fresh invoice, and finds nothing left.
    ledger.before_save = lambda: svc.issue(invoice.id, reason="other", settlement="reduce_due",
                                           amount=invoice.total, actor=None)
    with pytest.raises(ValidationFailed, match="too much"):
        svc.issue(invoice.id, reason="other", settlement="reduce_due", amount=118, actor=None)
    now = ledger.get(invoice.id, Invoice)
    assert (now.credited, len(now.credit_notes)) == (invoice.total, 1)
    assert ledger.get(credit_sequence_id(2026), CreditNoteSequence).last == 1


def test_only_finalized_partly_paid_or_paid_invoices_are_credited() -> None:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org())
    svc = CreditNotesService(ledger, clock, uuid4, None)
    with pytest.raises(Conflict, match="draft"):
        svc.issue(written.aggregate.id, reason="other", settlement="reduce_due", amount=118,
                  actor=None)
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    svc.issue(invoice.id, reason="other", settlement="reduce_due", amount=118, actor=None)
    with pytest.raises(Conflict, match="credit notes were issued"):
        invoicing.void(invoice.id, actor=None)


# ---- refund shares ----------------------------------------------------------------------------

def _note() -> CreditNote:
    invoice, _, _ = finalized("29")
    credit = compute_credit(invoice, lines=None, amount=11_800)
    return CreditNote.issue(credit_note_id=uuid4(), invoice=invoice, number="CN/2627/000001",
                            reason="other", settlement="refund", reference=None, credit=credit,
                            refunds=(RefundShare(uuid4(), "pay_1", 11_800),), at=AFTER_OCTOBER)


OBSERVATIONS = [("rfnd_1", "pending"), ("rfnd_1", "processed"), ("rfnd_1", "pending"),
                ("rfnd_1", "failed"), ("rfnd_1", "processed")]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(OBSERVATIONS))))[::7])
def test_a_refunds_outcome_does_not_depend_on_the_order_or_repeats_of_its_webhooks(
        order: tuple[int, ...]) -> None:
    note = _note()
    for i in order:
        refund_id, status = OBSERVATIONS[i]
        note.observe_refund(share=0, attempt=0, refund_id=refund_id, amount=11_800, status=status,
                            at=AFTER_OCTOBER)
    assert (note.status, note.refunded) == ("refunded", 11_800)
    processed = [e for e in note.collect_events() if isinstance(e, CreditNote.RefundProcessed)]
    assert len(processed) == 1  # processed is recorded once: the tenants' refund.processed


def test_failed_shares_are_retried_under_the_same_key_or_the_next_attempts() -> None:
    note = _note()
    assert note.to_request(retry=False) == [(0, 0)]  # never asked yet
    note.refund_request_failed(0, 0, "GatewayUnavailable: no answer", AFTER_OCTOBER)
    assert note.status == "refund_failed"
    assert (note.to_request(retry=False), note.to_request(retry=True)) == ([], [(0, 0)])
    note.refund_requested(0, 0, "rfnd_1", "pending", AFTER_OCTOBER)
    assert (note.status, note.to_request(retry=True)) == ("refund_pending", [])
    note.observe_refund(share=0, attempt=0, refund_id="rfnd_1", amount=11_800, status=FAILED,
                        at=AFTER_OCTOBER)
    assert (note.status, note.to_request(retry=True)) == ("refund_failed", [(0, 1)])
    note.refund_requested(0, 1, "rfnd_2", PROCESSED, AFTER_OCTOBER)
    assert (note.status, note.refunded) == ("refunded", 11_800)
    # The read model folds the same events with the same function.
    state = ShareState()
    for event in note.collect_events()[1:]:
        state = share_after(state, event)
    assert state == note.shares[0] and note_status("refund", [state]) == "refunded"


@pytest.mark.parametrize("state", ["27", "29"])
def test_exactly_what_is_left_can_be_credited_as_a_whole_amount_after_rounded_notes(
        state: str) -> None:
    """An earlier note's tax rounded up (IGST 18 % of 25 paise = 4.5 -> 5): what is left of the
    invoice is then no taxable value's freshly rounded total, and yet it must be creditable."""
    invoice, ledger, _ = finalized(state)
    svc = CreditNotesService(ledger, Clock(AFTER_OCTOBER), uuid4, None)
    for taxable in (25, 75, 1005):
        svc.issue(invoice.id, reason="other", settlement="reduce_due", lines=[(0, taxable)],
                  actor=None)
    invoice = ledger.get(invoice.id, Invoice)
    left = invoice.total - invoice.credited
    for asked in (left - 1, left - 2):  # a whole amount is the note's total, or refused
        try:
            note = svc.issue(invoice.id, reason="other", settlement="reduce_due", amount=asked,
                             actor=None).aggregate
        except ValidationFailed:
            continue
        assert note.total == asked
        break
    invoice = ledger.get(invoice.id, Invoice)
    left = invoice.total - invoice.credited
    note = svc.issue(invoice.id, reason="other", settlement="reduce_due", amount=left,
                     actor=None).aggregate
    assert note.total == left
    invoice = ledger.get(invoice.id, Invoice)
    assert invoice.credited == invoice.total and invoice.amount_due == 0
    assert invoice.credited_taxes == {t.name: t.amount for t in invoice.taxes}


def test_a_payment_after_a_note_reduced_the_due_to_nothing_applies_nothing() -> None:
    """A credit note racing a payment: the checkout was open when a reduce_due note took the
    whole amount due; the payment captured then has nothing to pay (it is flagged for review)
    and must not turn the invoice `paid` with a payment of 0 paise."""
    invoice, ledger, clock = finalized("27")
    svc = CreditNotesService(ledger, clock, uuid4, None)
    svc.issue(invoice.id, reason="other", settlement="reduce_due",
              amount=invoice.total, actor=None)
    invoice = ledger.get(invoice.id, Invoice)
    assert invoice.amount_due == 0
    assert invoice.apply_payment(uuid4(), 1_000, clock()) == 0
    assert invoice.status == "finalized" and not invoice.payments
    assert not invoice.pending_events


def test_a_retry_after_a_failed_retry_repeats_its_key_and_never_refunds_twice() -> None:
    """Razorpay said refund 1 failed; the retry's request (attempt 1) timed out, yet Razorpay may
    have made refund 2 under that key (its webhook says pending). The next retry must repeat
    attempt 1's key (Razorpay answers refund 2 again), not make a third refund under a new key."""
    note = _note()
    note.refund_requested(0, 0, "rfnd_1", "pending", AFTER_OCTOBER)
    note.observe_refund(share=0, attempt=0, refund_id="rfnd_1", amount=11_800, status=FAILED,
                        at=AFTER_OCTOBER)
    assert note.to_request(retry=True) == [(0, 1)]
    note.refund_request_failed(0, 1, "GatewayUnavailable: read timed out", AFTER_OCTOBER)
    assert note.to_request(retry=True) == [(0, 1)]
    note.observe_refund(share=0, attempt=1, refund_id="rfnd_2", amount=11_800, status="pending",
                        at=AFTER_OCTOBER)
    assert note.to_request(retry=True) in ([], [(0, 1)])


def test_no_line_of_a_note_reverses_negative_tax_when_little_tax_is_left() -> None:
    """Notes of 6 paise each reverse 1 paisa of CGST and of SGST (0.54 rounded up): the tax runs
    out long before the taxable value. A note of two lines then reverses only the paisa or two
    left, and no line may show a negative tax (the cut is spread over the lines)."""
    invoice, _, clock = finalized("29")
    at, line = clock(), 0
    while min(t.amount - invoice.credited_taxes.get(t.name, 0) for t in invoice.taxes) > 2:
        credit = compute_credit(invoice, lines=[(line, 6)], amount=None)
        invoice.credit(credit_note_id=uuid4(), total=credit.total, lines=credited_lines(credit),
                       taxes=credited_taxes(credit), reduce_due=credit.total, returned=0,
                       refunds=(), settlement="reduce_due", at=at)
        line = (line + 1) % len(invoice.lines)
    credit = compute_credit(invoice, lines=[(0, 1_000), (1, 1_000)], amount=None)
    assert all(t.amount >= 0 for note_line in credit.lines for t in note_line.taxes), credit.lines
    assert [sum(note_line.taxes[i].amount for note_line in credit.lines)
            for i in range(len(credit.taxes))] == [t.amount for t in credit.taxes]
