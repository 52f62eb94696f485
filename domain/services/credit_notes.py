"""Credit notes: issue one against an invoice, and settle it (refunds through Razorpay).

get -> decide -> save over the Ledger and PaymentGateway ports, the clock and ids passed in.
- Issue: read the invoice (and its payments, for a refund), decide the credit
  (domain.credit_note.compute_credit), its settlement and its number, then save the note, the
  invoice's `Credited` and the financial year's CreditNoteSequence in one atomic append. Losing
  a race (another note of the same invoice or year, a payment of the invoice) is a Conflict on a
  version: decide again from the fresh state, a bounded number of times. So two notes racing
  never credit more than was invoiced together, and numbers stay gapless.
- Refund: for each share of a `refund` note not yet requested (or, on a retry, failed), ask
  Razorpay with X-Refund-Idempotency derived from (note, share, attempt); record the refund it
  made, or why the request failed (visible on the note; `retry_refunds` asks again).
  Webhooks then move each refund on (PaymentsService._observe calls `observe_refund`).
The rules are written down in docs/CREDIT_NOTES.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from uuid import UUID

from domain.audit import Actor
from domain.credit_note import (
    CREDITABLE,
    NOTE_ATTEMPT,
    NOTE_CREDIT_NOTE,
    NOTE_SHARE,
    REASONS,
    REFUND,
    SETTLEMENTS,
    CreditNote,
    CreditNoteSequence,
    Refundable,
    check_section_34,
    compute_credit,
    credit_sequence_id,
    credited_lines,
    credited_taxes,
    refund_key,
    settle,
)
from domain.errors import (
    Conflict,
    DomainError,
    FieldError,
    NotFound,
    PaymentsNotConfigured,
    Unavailable,
    ValidationFailed,
)
from domain.invoice import Invoice, PaymentShare
from domain.numbering import financial_year
from domain.payment import RAZORPAY, Payment
from domain.ports import Clock, Ledger, NewId, Pause, RefundGateway
from domain.services.base import Written, with_retries

# Concurrent issuers of one financial year all want the sequence's next version (as invoice
# finalization does): each round one of them wins, so this bounds the unluckiest's wait.
ISSUE_ATTEMPTS = 64
NOT_CONFIGURED_RETRY_AFTER_S = 3600


def _no_pause(attempt: int) -> None:
    """Retry at once: the ledger serialises appends."""


class CreditNotesService:
    """Issues credit notes and settles their refunds. `gateway` None: refunds answer 503."""

    def __init__(self, ledger: Ledger, clock: Clock, new_id: NewId,
                 gateway: RefundGateway | None, pause: Pause = _no_pause) -> None:
        self._ledger = ledger
        self._clock = clock
        self._new_id = new_id
        self._gateway = gateway
        self._pause = pause

    def note(self, ident: UUID) -> CreditNote:
        try:
            return self._ledger.get(ident, CreditNote)
        except NotFound:
            raise NotFound("credit note", ident) from None

    def _invoice(self, ident: UUID) -> Invoice:
        try:
            return self._ledger.get(ident, Invoice)
        except NotFound:
            raise NotFound("invoice", ident) from None

    def _refundable(self, invoice: Invoice) -> list[Refundable]:
        """The invoice's captured Razorpay payments, oldest first, and what of each is not yet
        taken by refunds of earlier notes."""
        out = []
        for payment_id, applied in invoice.payments.items():
            payment = self._ledger.get(payment_id, Payment)
            if payment.source != RAZORPAY or payment.razorpay_payment_id is None:
                continue
            available = applied - invoice.refund_shares.get(payment_id, 0)
            if available > 0:
                out.append(Refundable(payment_id, payment.razorpay_payment_id, available))
        return out

    # ---- issue -------------------------------------------------------------------------------

    def issue(self, invoice_id: UUID, *, reason: str, settlement: str,
              lines: Sequence[tuple[int, int]] | None = None, amount: int | None = None,
              reference: str | None = None, actor: Actor | None) -> Written[CreditNote]:
        """Issue a note against a finalized (or partly or wholly paid) invoice. ValidationFailed
        (422) for a bad request, more than is left to credit or a settlement that cannot take
        it, or a date past the section 34 deadline; Conflict (409) for an invoice in another
        state; NotFound for an unknown invoice. Nothing changes on any of them."""
        problems = []
        if reason not in REASONS:
            problems.append(FieldError("reason", f"must be one of {list(REASONS)}"))
        if settlement not in SETTLEMENTS:
            problems.append(FieldError("settlement", f"must be one of {list(SETTLEMENTS)}"))
        if problems:
            raise ValidationFailed(problems)
        if settlement == REFUND and self._gateway is None:
            raise PaymentsNotConfigured("refunds need Razorpay: set RAZORPAY_KEY_ID and "
                                        "RAZORPAY_KEY_SECRET",
                                        retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
        note_id = self._new_id()
        for attempt in range(ISSUE_ATTEMPTS):
            invoice = self._invoice(invoice_id)
            if invoice.status not in CREDITABLE:
                what = f"invoice {invoice.number or invoice.id}"
                raise Conflict(f"{what} is {invoice.status}; only finalized, partially paid or "
                               "paid invoices can be credited")
            assert invoice.finalized_at is not None
            now = self._clock()
            check_section_34(invoice.finalized_at, now)
            credit = compute_credit(invoice, lines=lines, amount=amount)
            refundable = self._refundable(invoice) if settlement == REFUND else []
            reduce_due, returned, shares = settle(invoice, credit.total, settlement, reference,
                                                  refundable)
            year = financial_year(now)
            try:
                sequence = self._ledger.get(credit_sequence_id(year), CreditNoteSequence)
            except NotFound:
                sequence = CreditNoteSequence.open(year, now)
            number = sequence.issue(note_id, now)
            note = CreditNote.issue(credit_note_id=note_id, invoice=invoice, number=number,
                                    reason=reason, settlement=settlement, reference=reference,
                                    credit=credit, refunds=shares, at=now)
            invoice.credit(credit_note_id=note_id, total=credit.total,
                           lines=credited_lines(credit), taxes=credited_taxes(credit),
                           reduce_due=reduce_due, returned=returned,
                           refunds=tuple(PaymentShare(s.payment_id, s.amount) for s in shares),
                           settlement=settlement, at=now)
            try:
                return Written(note, self._ledger.save(note, invoice, sequence, actor=actor))
            except Conflict:  # another note (or payment) got there first: decide again
                self._pause(attempt)
        raise Unavailable("credit note numbering is busy; retry", retry_after_s=1)

    # ---- refunds -----------------------------------------------------------------------------

    def request_refunds(self, ident: UUID, *, retry: bool = False,
                        actor: Actor | None = None) -> Written[CreditNote]:
        """Ask Razorpay for the note's refunds not yet requested (`retry`: and the failed
        ones). Each share's call is recorded: the refund made, or the error (never raised: the
        note shows it). Conflict when `retry` finds nothing to retry."""
        note = self.note(ident)
        if note.settlement != REFUND:
            raise Conflict(f"credit note {note.number} is settled {note.settlement}; it has no "
                           "refund to retry")
        wanted = note.to_request(retry=retry)
        if retry and not wanted:
            raise Conflict(f"credit note {note.number} is {note.status}; there is no failed "
                           "refund to retry")
        if wanted and self._gateway is None:
            raise PaymentsNotConfigured("refunds need Razorpay: set RAZORPAY_KEY_ID and "
                                        "RAZORPAY_KEY_SECRET",
                                        retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
        position = 0
        for share, attempt in wanted:
            # `actor` (a person's retry) is audited on the first save only: under an
            # Idempotency-Key a request has one audit entry.
            saved = self._request_one(note.id, share, attempt, actor if not position else None)
            position = max(position, saved)
        return Written(self.note(ident), position)

    def _request_one(self, ident: UUID, share: int, attempt: int, actor: Actor | None) -> int:
        gateway = self._gateway
        assert gateway is not None
        note = self.note(ident)
        planned = note.refunds[share]
        state = note.shares[share]
        if attempt > state.attempt and state.current is not None:
            # Razorpay said the refund failed; it may have moved on since (failed is not final):
            # look before refunding again.
            try:
                seen = gateway.fetch_refund(state.current)
            except DomainError:
                seen = None
            if seen is not None and seen.status != "failed":
                return self._save(ident, lambda n: n.observe_refund(
                    share=share, attempt=state.attempt, refund_id=seen.id, amount=seen.amount,
                    status=seen.status, at=self._clock()), actor)
        notes = {NOTE_CREDIT_NOTE: str(note.id), NOTE_SHARE: str(share),
                 NOTE_ATTEMPT: str(attempt), "credit_note": note.number}
        try:
            refund = gateway.refund(razorpay_payment_id=planned.razorpay_payment_id,
                                    amount=planned.amount,
                                    idempotency_key=refund_key(note.id, share, attempt),
                                    notes=notes)
        except DomainError as e:
            reason = f"{type(e).__name__}: {e}"
            return self._save(ident, lambda n: n.refund_request_failed(
                share, attempt, reason, self._clock()), actor)
        return self._save(ident, lambda n: n.refund_requested(
            share, attempt, refund.id, refund.status, self._clock()), actor)

    def _save(self, ident: UUID, decide: Callable[[CreditNote], None], actor: Actor | None) -> int:
        """Record what a gateway call answered on the note (get -> decide -> save, again after
        losing a race with a webhook), audited as `actor`'s when given (a person's retry; the
        refunds asked right after issuing are the service's bookkeeping: the issue was audited,
        and under an Idempotency-Key a request has one audit entry)."""
        def attempt() -> int:
            note = self.note(ident)
            decide(note)
            if not note.pending_events:
                return 0
            return self._ledger.save(note, actor=actor)

        return with_retries(attempt)
