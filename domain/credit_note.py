"""GST credit notes: the CreditNote aggregate, its own gapless number series, and the pure
arithmetic of what a note credits.

A finalized invoice is never edited; money is given back with a credit note (section 34, CGST
Act). A note credits an amount per invoice line (taxable value, paise) or a whole-invoice amount
(the note's total, tax included), and reverses the tax in the invoice's own split (CGST+SGST or
IGST), each component rounded half-up to the paisa per line (domain.tax's rule). What was
credited is recorded on the Invoice too (`Invoice.Credited`), saved with the note in one
atomic append: two notes racing for the same invoice collide on its version, and the loser
decides again from the fresh invoice, so together they never credit more than was invoiced.

Numbers: `CN/{FY}/{seq:06d}` (at most 16 characters), a series of its own per financial year
(IST), issued by `CreditNoteSequence` exactly as domain.numbering's InvoiceSequence issues
invoice numbers: the sequence is saved with the note, so a number is never skipped or issued
twice.

Settlement: `reduce_due` (the invoice's amount due goes down), `refund` (Razorpay refunds
against the invoice's captured payments, tracked here per payment: requested, pending,
processed — final — or failed, and retried), or `out_of_band` (money returned outside
Razorpay, with a reference). The rules are written down in docs/CREDIT_NOTES.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import Conflict, FieldError, ValidationFailed
from domain.invoice import (
    FINALIZED,
    PAID,
    PARTIALLY_PAID,
    CreditedLine,
    CreditedTax,
    Invoice,
    InvoiceTax,
)
from domain.money import MONEY_EXACT, round_half_up
from domain.numbering import (
    FY_TIMEZONE,
    NUMBER_MAX_CHARS,
    SEQUENCE_MAX,
    financial_year,
    format_number,
    fy_label,
    sequence_id,
)

Reason = Literal["duplicate_charge", "service_deficiency", "order_change", "other"]
REASONS: tuple[str, ...] = ("duplicate_charge", "service_deficiency", "order_change", "other")
Settlement = Literal["refund", "out_of_band", "reduce_due"]
REFUND: Settlement = "refund"
OUT_OF_BAND: Settlement = "out_of_band"
REDUCE_DUE: Settlement = "reduce_due"
SETTLEMENTS: tuple[str, ...] = (REFUND, OUT_OF_BAND, REDUCE_DUE)
CreditNoteStatus = Literal["issued", "refund_pending", "refunded", "refund_failed"]
ISSUED: CreditNoteStatus = "issued"
REFUND_PENDING: CreditNoteStatus = "refund_pending"
REFUNDED: CreditNoteStatus = "refunded"
REFUND_FAILED: CreditNoteStatus = "refund_failed"
CREDIT_NOTE_STATUSES: tuple[str, ...] = (ISSUED, REFUND_PENDING, REFUNDED, REFUND_FAILED)
CREDITABLE = (FINALIZED, PARTIALLY_PAID, PAID)

CREDIT_NOTE_PREFIX = "CN"
WHOLE_INVOICE = -1  # the line index of a whole-invoice amount
REFERENCE_MAX_CHARS = 40  # an out_of_band reference (a bank transfer's UTR, a cheque number)
ERROR_MAX_CHARS = 500  # of a failed refund request's reason, as kept
LINES_MAX = 1000  # lines in one request (an invoice has far fewer)
# Section 34 CGST Act: a credit note for a supply in financial year FY is issued no later than
# 30 November after the end of FY (FY 2026-27 ends 31 March 2027: 30 November 2027, IST).
SECTION_34_MONTH = 11
SECTION_34_DAY = 30
TOTAL_SEARCH_PAISE = 3  # around total / (1 + rate) when a tax-inclusive total is asked for
# Refund states as Razorpay names them, in the only order they may move (processed is final).
REFUND_RANK = {"pending": 0, "created": 0, "failed": 1, "processed": 2}
PROCESSED = "processed"
FAILED = "failed"
PENDING = "pending"
NOTE_CREDIT_NOTE = "credit_note_id"  # the refund's notes at Razorpay: how a webhook finds us
NOTE_SHARE = "share"
NOTE_ATTEMPT = "attempt"
_KEY_NAMESPACE = UUID("9a4c2e6f-1b3d-4f5a-8c7e-0d2b4f6a8c91")

assert len(f"{CREDIT_NOTE_PREFIX}/0000/{SEQUENCE_MAX}") <= NUMBER_MAX_CHARS


def format_credit_note_number(start_year: int, sequence: int) -> str:
    """`CN/{FY}/{seq:06d}`, e.g. CN/2627/000001: the invoices' format, the notes' prefix."""
    return format_number(start_year, sequence, prefix=CREDIT_NOTE_PREFIX)


def credit_sequence_id(start_year: int) -> UUID:
    """One series per financial year, derived from the year (never the invoices' series)."""
    return sequence_id(start_year, prefix=CREDIT_NOTE_PREFIX)


class CreditNoteSequence(Aggregate):
    """The credit note numbers issued in one financial year; `last` is 0 before the first."""

    class Opened(Aggregate.Created):
        financial_year: int

    class NumberIssued(Aggregate.Event):
        """`number` (the `sequence`-th of the year) now belongs to `credit_note_id`."""

        number: str
        sequence: int
        credit_note_id: UUID

        def apply(self, aggregate: Any) -> None:
            aggregate.last = self.sequence

    def __init__(self, financial_year: int) -> None:
        self.financial_year = financial_year
        self.last = 0

    @classmethod
    def open(cls, start_year: int, at: datetime) -> CreditNoteSequence:
        return cls._create(cls.Opened, id=credit_sequence_id(start_year), timestamp=at,
                           financial_year=start_year)

    def issue(self, credit_note_id: UUID, at: datetime) -> str:
        """Decide: the year's next number goes to `credit_note_id`; returns it."""
        following = self.last + 1
        if following > SEQUENCE_MAX:
            raise Conflict(f"credit note numbers of financial year {fy_label(self.financial_year)}"
                           f" are exhausted ({SEQUENCE_MAX} issued)")
        number = format_credit_note_number(self.financial_year, following)
        self.trigger_event(self.NumberIssued, timestamp=at, number=number, sequence=following,
                           credit_note_id=credit_note_id)
        return number


# ---- section 34 ------------------------------------------------------------------------------

def section_34_deadline(invoice_date: datetime) -> date:
    """The last day (IST) a credit note may be issued for an invoice dated `invoice_date`."""
    return date(financial_year(invoice_date) + 1, SECTION_34_MONTH, SECTION_34_DAY)


def check_section_34(invoice_date: datetime, now: datetime) -> None:
    """ValidationFailed when `now` (its IST date) is after the invoice's section 34 deadline."""
    deadline = section_34_deadline(invoice_date)
    today = now.astimezone(ZoneInfo(FY_TIMEZONE)).date()
    if today > deadline:
        raise ValidationFailed([FieldError(
            "invoice", f"a credit note for an invoice of financial year "
                       f"{fy_label(financial_year(invoice_date))} can be issued until "
                       f"{deadline.isoformat()} (section 34 CGST Act); it is {today.isoformat()}")])


# ---- what a note credits ---------------------------------------------------------------------

class CreditNoteLine(msgspec.Struct, frozen=True):
    """One credited line: invoice line `index` (-1: a whole-invoice amount), its description,
    the taxable value and the tax reversed on it (paise, per component)."""

    index: int
    description: str
    taxable: int
    taxes: tuple[InvoiceTax, ...]


class RefundShare(msgspec.Struct, frozen=True):
    """Paise refunded through one captured Razorpay payment of the invoice."""

    payment_id: UUID
    razorpay_payment_id: str
    amount: int


@dataclass(frozen=True)
class Credit:
    """What a note credits, computed from the invoice: lines, tax per component, totals."""

    lines: tuple[CreditNoteLine, ...]
    subtotal: int
    taxes: tuple[InvoiceTax, ...]
    total: int


@dataclass(frozen=True)
class Refundable:
    """A captured Razorpay payment of the invoice and what of it can still be refunded."""

    payment_id: UUID
    razorpay_payment_id: str
    available: int


def _line_taxes(invoice: Invoice, taxable: int) -> tuple[InvoiceTax, ...]:
    return tuple(InvoiceTax(t.name, t.rate, round_half_up(MONEY_EXACT.multiply(Decimal(taxable),
                                                                               t.rate)))
                 for t in invoice.taxes)


def _taxable_for_total(invoice: Invoice, total: int) -> int | None:
    """The taxable value whose tax-inclusive total is exactly `total`, if there is one."""
    rate = sum((t.rate for t in invoice.taxes), Decimal(0))
    guess = int(Decimal(total) / (1 + rate))
    for taxable in range(max(guess - TOTAL_SEARCH_PAISE, 1), guess + TOTAL_SEARCH_PAISE + 1):
        if taxable + sum(t.amount for t in _line_taxes(invoice, taxable)) == total:
            return taxable
    return None


def compute_credit(invoice: Invoice, *, lines: Sequence[tuple[int, int]] | None,
                   amount: int | None) -> Credit:
    """The credit `lines` ((invoice line index, taxable paise), ...) or a whole-invoice `amount`
    (paise, tax included) would be, checked against what the invoice still has to credit.
    ValidationFailed (nothing changes) for anything else."""
    if (lines is None) == (amount is None):
        raise ValidationFailed([FieldError("lines", "give either lines or amount (not both)")])
    problems: list[FieldError] = []
    already_taxable = sum(invoice.credited_lines.values())
    credited: list[CreditNoteLine] = []
    if lines is not None:
        if not lines or len(lines) > LINES_MAX:
            raise ValidationFailed([FieldError("lines", f"1 to {LINES_MAX} lines")])
        seen: set[int] = set()
        for n, (index, taxable) in enumerate(lines):
            if not 0 <= index < len(invoice.lines):
                problems.append(FieldError("line", f"the invoice has lines 0 to "
                                           f"{len(invoice.lines) - 1}", n))
                continue
            if index in seen:
                problems.append(FieldError("line", f"line {index} is named twice", n))
                continue
            seen.add(index)
            left = invoice.lines[index].amount - invoice.credited_lines.get(index, 0)
            if taxable <= 0:
                problems.append(FieldError("amount", "must be a positive whole number of paise", n))
            elif taxable > left:
                problems.append(FieldError("amount", f"line {index} has {left} paise left to "
                                           f"credit, not {taxable}", n))
            else:
                credited.append(CreditNoteLine(index, invoice.lines[index].description, taxable,
                                               _line_taxes(invoice, taxable)))
    else:
        assert amount is not None
        if amount > 0 and amount == invoice.total - invoice.credited:
            # Exactly what is left: all the taxable value left, and (below) all the tax left,
            # whatever earlier notes' rounding made of it.
            taxable_whole: int | None = invoice.subtotal - already_taxable
        else:
            taxable_whole = _taxable_for_total(invoice, amount) if amount > 0 else None
        if amount <= 0:
            problems.append(FieldError("amount", "must be a positive whole number of paise"))
        elif taxable_whole is None:
            problems.append(FieldError("amount", f"no taxable value gives exactly {amount} paise "
                                       "with the invoice's tax rounded to the paisa; ask for a "
                                       "paisa more or less"))
        else:
            credited.append(CreditNoteLine(WHOLE_INVOICE, f"Credit against invoice "
                                           f"{invoice.number}", taxable_whole,
                                           _line_taxes(invoice, taxable_whole)))
    if problems:
        raise ValidationFailed(problems)
    subtotal = sum(line.taxable for line in credited)
    if already_taxable + subtotal > invoice.subtotal:
        raise ValidationFailed([FieldError(
            "amount", f"the invoice's taxable value is {invoice.subtotal} paise and "
                      f"{already_taxable} were credited already; {subtotal} more is too much")])
    # Never reverse more tax than was charged: each component at most what is left of it, and a
    # note that credits the last of the taxable value reverses exactly what is left.
    exhausts = already_taxable + subtotal == invoice.subtotal
    adjusted = list(credited)
    taxes = []
    for i, tax in enumerate(invoice.taxes):
        left = tax.amount - invoice.credited_taxes.get(tax.name, 0)
        summed = sum(line.taxes[i].amount for line in credited)
        final = left if exhausts else min(summed, left)
        # The difference (usually a paisa or two of rounding) goes on the line with the most of
        # this component; a cut larger than that line's tax (little tax left) goes on to the
        # next, so no line's tax goes below 0.
        diff = final - summed
        for j in sorted(range(len(adjusted)), key=lambda k: -adjusted[k].taxes[i].amount):
            if diff == 0:
                break
            line = adjusted[j]
            have = line.taxes[i].amount
            change = diff if diff > 0 else max(diff, -have)
            fixed = list(line.taxes)
            fixed[i] = InvoiceTax(tax.name, tax.rate, have + change)
            adjusted[j] = CreditNoteLine(line.index, line.description, line.taxable, tuple(fixed))
            diff -= change
        taxes.append(InvoiceTax(tax.name, tax.rate, final))
    total = subtotal + sum(t.amount for t in taxes)
    if amount is not None and total != amount:
        # The tax left to reverse is less than this taxable value's: no note of exactly `amount`.
        raise ValidationFailed([FieldError(
            "amount", f"a note of {amount} paise would reverse more tax than is left; "
                      f"{invoice.total - invoice.credited} paise are left to credit")])
    left_total = invoice.total - invoice.credited
    if total > left_total:
        raise ValidationFailed([FieldError(
            "amount", f"the invoice's total is {invoice.total} paise and {invoice.credited} were "
                      f"credited already; a note of {total} more is too much")])
    return Credit(tuple(adjusted), subtotal, tuple(taxes), total)


def settle(invoice: Invoice, total: int, settlement: str, reference: str | None,
           refundable: Sequence[Refundable]) -> tuple[int, int, tuple[RefundShare, ...]]:
    """How a note of `total` paise is settled: (paise off the amount due, paise returned,
    refund shares per payment). ValidationFailed when the settlement cannot take it."""
    if settlement == REDUCE_DUE:
        if invoice.status not in (FINALIZED, PARTIALLY_PAID) or total > invoice.amount_due:
            raise ValidationFailed([FieldError(
                "settlement", f"reduce_due takes at most the amount due ({invoice.amount_due} "
                              f"paise, invoice {invoice.status}); refund the rest or settle it "
                              "out of band")])
        return total, 0, ()
    can_return = invoice.paid - invoice.returned
    if total > can_return:
        raise ValidationFailed([FieldError(
            "settlement", f"{settlement} returns money paid: {can_return} paise of what was paid "
                          f"can still be returned, not {total}")])
    if settlement == OUT_OF_BAND:
        if not reference or not reference.strip() or len(reference.strip()) > REFERENCE_MAX_CHARS:
            raise ValidationFailed([FieldError(
                "reference", f"out_of_band needs a reference of 1 to {REFERENCE_MAX_CHARS} "
                             "characters (where the money went)")])
        return 0, total, ()
    if settlement != REFUND:
        raise ValidationFailed([FieldError("settlement", f"must be one of {list(SETTLEMENTS)}")])
    shares: list[RefundShare] = []
    left = total
    for payment in refundable:
        take = min(left, payment.available)
        if take > 0:
            shares.append(RefundShare(payment.payment_id, payment.razorpay_payment_id, take))
            left -= take
    if left > 0:
        available = sum(p.available for p in refundable)
        raise ValidationFailed([FieldError(
            "settlement", f"refund goes back through captured Razorpay payments: {available} paise"
                          f" of them can be refunded, not {total} (settle money received by hand "
                          "out_of_band)")])
    return 0, total, tuple(shares)


def refund_key(credit_note_id: UUID, share: int, attempt: int) -> str:
    """X-Refund-Idempotency of a share's refund attempt: derived from the note, so a retry of the
    same attempt can never refund twice (a new attempt only after Razorpay said it failed)."""
    return uuid5(_KEY_NAMESPACE, f"{credit_note_id}/{share}/{attempt}").hex  # 32 alphanumerics


# ---- the aggregate --------------------------------------------------------------------------

@dataclass(frozen=True)
class ShareState:
    """Where a share's refund is: `current` the refund of the latest attempt (None: not yet
    known), `refunds` every refund seen with its status, `error` the last failed request."""

    attempt: int = 0
    current: str | None = None
    refunds: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> str:
        """processed | failed | pending | "" (nothing requested yet)."""
        if PROCESSED in self.refunds.values():
            return PROCESSED
        if self.current is not None:
            return self.refunds.get(self.current, PENDING) if self.error is None else FAILED
        return FAILED if self.error is not None else ""


def share_after(state: ShareState, event: Any) -> ShareState:
    """A share's state after one of CreditNote's refund events: the one transition, used by the
    aggregate and by the read model (projections/credit_notes.py)."""
    refunds = dict(state.refunds)
    if isinstance(event, CreditNote.RefundRequested):
        refunds.setdefault(event.refund_id, PENDING)  # its status moves by observe_refund
        return ShareState(event.attempt, event.refund_id, refunds, None)
    if isinstance(event, CreditNote.RefundRequestFailed):
        return ShareState(event.attempt, state.current, refunds, event.reason)
    status = PROCESSED if isinstance(event, CreditNote.RefundProcessed) else event.status
    refunds[event.refund_id] = status
    current, error = state.current, state.error
    if event.attempt == state.attempt and current in (None, event.refund_id):
        current, error = event.refund_id, None
    return ShareState(state.attempt, current, refunds, error)


def note_status(settlement: str, shares: Sequence[ShareState]) -> CreditNoteStatus:
    """issued (settled without a refund), refunded (every share processed), refund_failed (a
    share failed), else refund_pending."""
    if settlement != REFUND:
        return ISSUED
    statuses = [s.status for s in shares]
    if all(s == PROCESSED for s in statuses):
        return REFUNDED
    if FAILED in statuses:
        return REFUND_FAILED
    return REFUND_PENDING


class CreditNote(Aggregate):
    """A GST credit note against one invoice, and how its money goes back."""

    class Issued(Aggregate.Created):
        """Issued with its number: everything the document shows. Amounts are paise."""

        invoice_id: UUID
        organisation_id: UUID
        number: str
        invoice_number: str
        invoice_date: datetime
        reason: str
        settlement: str
        reference: str | None
        currency: str
        lines: tuple[CreditNoteLine, ...]
        subtotal: int
        taxes: tuple[InvoiceTax, ...]
        total: int
        country: str
        customer_state_code: str | None
        customer_gstin: str | None
        supplier_state_code: str
        refunds: tuple[RefundShare, ...] = ()

    class RefundRequested(Aggregate.Event):
        """Razorpay took share `share`'s refund (attempt `attempt`) as `refund_id`."""

        share: int
        attempt: int
        refund_id: str
        status: str

        def apply(self, aggregate: Any) -> None:
            aggregate._advance(self)

    class RefundRequestFailed(Aggregate.Event):
        """Asking Razorpay for share `share`'s refund failed (no refund was made, or none is
        known): visible on the note until a retry."""

        share: int
        attempt: int
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate._advance(self)

    class RefundObserved(Aggregate.Event):
        """A refund webhook moved share `share`'s refund `refund_id` to `status` (pending or
        failed); `processed` is RefundProcessed."""

        share: int
        attempt: int
        refund_id: str
        amount: int
        status: str

        def apply(self, aggregate: Any) -> None:
            aggregate._advance(self)

    class RefundProcessed(Aggregate.Event):
        """Razorpay processed share `share`'s refund `refund_id` of `amount` paise: final, the
        money is back with the customer."""

        share: int
        attempt: int
        refund_id: str
        amount: int
        invoice_id: UUID  # whose refunded amount grows (the invoices read model)
        organisation_id: UUID  # whose tenant webhook `refund.processed` this is
        razorpay_payment_id: str  # the payment refunded

        def apply(self, aggregate: Any) -> None:
            aggregate._advance(self)

    def __init__(self, invoice_id: UUID, organisation_id: UUID, number: str, invoice_number: str,
                 invoice_date: datetime, reason: str, settlement: str, reference: str | None,
                 currency: str, lines: tuple[CreditNoteLine, ...], subtotal: int,
                 taxes: tuple[InvoiceTax, ...], total: int, country: str,
                 customer_state_code: str | None, customer_gstin: str | None,
                 supplier_state_code: str, refunds: tuple[RefundShare, ...] = ()) -> None:
        self.invoice_id = invoice_id
        self.organisation_id = organisation_id
        self.number = number
        self.invoice_number = invoice_number
        self.invoice_date = invoice_date
        self.reason = reason
        self.settlement = settlement
        self.reference = reference
        self.currency = currency
        self.lines = tuple(lines)
        self.subtotal = subtotal
        self.taxes = tuple(taxes)
        self.total = total
        self.country = country
        self.customer_state_code = customer_state_code
        self.customer_gstin = customer_gstin
        self.supplier_state_code = supplier_state_code
        self.refunds = tuple(refunds)
        self.shares: tuple[ShareState, ...] = tuple(ShareState() for _ in refunds)

    def _advance(self, event: Any) -> None:
        share = event.share
        self.shares = (*self.shares[:share], share_after(self.shares[share], event),
                       *self.shares[share + 1:])

    @classmethod
    def issue(cls, *, credit_note_id: UUID, invoice: Invoice, number: str, reason: str,
              settlement: str, reference: str | None, credit: Credit,
              refunds: tuple[RefundShare, ...], at: datetime) -> CreditNote:
        """Decide: the note, numbered (the caller checked the credit and its settlement)."""
        assert invoice.number is not None and invoice.finalized_at is not None
        return cls._create(
            cls.Issued, id=credit_note_id, timestamp=at, invoice_id=invoice.id,
            organisation_id=invoice.organisation_id, number=number,
            invoice_number=invoice.number, invoice_date=invoice.finalized_at, reason=reason,
            settlement=settlement,
            reference=reference.strip() if settlement == OUT_OF_BAND and reference else None,
            currency=invoice.currency, lines=credit.lines, subtotal=credit.subtotal,
            taxes=credit.taxes, total=credit.total, country=invoice.country,
            customer_state_code=invoice.state_code, customer_gstin=invoice.gstin or None,
            supplier_state_code=invoice.supplier_state_code, refunds=refunds)

    # ---- refunds ---------------------------------------------------------------------------

    @property
    def status(self) -> CreditNoteStatus:
        return note_status(self.settlement, self.shares)

    @property
    def refunded(self) -> int:
        """Paise refunded for good (processed shares)."""
        return sum(share.amount for share, state in zip(self.refunds, self.shares, strict=True)
                   if state.status == PROCESSED)

    def to_request(self, *, retry: bool) -> list[tuple[int, int]]:
        """(share, attempt) to ask Razorpay for: shares never requested (the same attempt: a
        request that may have reached Razorpay is repeated with its key, never doubled); with
        `retry` also failed ones: a failed request again under its key, a refund Razorpay said
        failed under the next attempt's key."""
        wanted = []
        for i, state in enumerate(self.shares):
            status = state.status
            if status == "" or (retry and status == FAILED and state.error is not None
                                and state.current is None):
                wanted.append((i, state.attempt))
            elif retry and status == FAILED:
                # A request that failed (state.error) may have reached Razorpay: its key again.
                known_failed = (state.error is None and state.current is not None
                                and state.refunds.get(state.current) == FAILED)
                wanted.append((i, state.attempt + 1 if known_failed else state.attempt))
        return wanted

    def refund_requested(self, share: int, attempt: int, refund_id: str, status: str,
                         at: datetime) -> None:
        state = self.shares[share]
        if state.current == refund_id and state.attempt == attempt and state.error is None:
            return
        self.trigger_event(self.RefundRequested, timestamp=at, share=share, attempt=attempt,
                           refund_id=refund_id, status=status)
        if status in (PROCESSED, FAILED):
            self.observe_refund(share=share, attempt=attempt, refund_id=refund_id,
                                amount=self.refunds[share].amount, status=status, at=at)

    def refund_request_failed(self, share: int, attempt: int, reason: str, at: datetime) -> None:
        self.trigger_event(self.RefundRequestFailed, timestamp=at, share=share, attempt=attempt,
                           reason=reason[:ERROR_MAX_CHARS])

    def share_of(self, razorpay_payment_id: str, share: int | None) -> int | None:
        """The share a refund of `razorpay_payment_id` belongs to (its notes may say which)."""
        if share is not None and 0 <= share < len(self.refunds) \
                and self.refunds[share].razorpay_payment_id == razorpay_payment_id:
            return share
        for i, planned in enumerate(self.refunds):
            if planned.razorpay_payment_id == razorpay_payment_id:
                return i
        return None

    def observe_refund(self, *, share: int, attempt: int, refund_id: str, amount: int,
                       status: str, at: datetime) -> None:
        """Join a refund's snapshot (a webhook's or an answer's): forward only, processed final."""
        rank = REFUND_RANK.get(status)
        if rank is None or not 0 <= share < len(self.shares):
            return
        known = self.shares[share].refunds.get(refund_id)
        if known is not None and REFUND_RANK.get(known, 0) >= rank:
            return  # nothing new: a repeat, or older than what is known
        if status == PROCESSED:
            self.trigger_event(self.RefundProcessed, timestamp=at, share=share, attempt=attempt,
                               refund_id=refund_id, amount=amount, invoice_id=self.invoice_id,
                               organisation_id=self.organisation_id,
                               razorpay_payment_id=self.refunds[share].razorpay_payment_id)
        else:
            self.trigger_event(self.RefundObserved, timestamp=at, share=share, attempt=attempt,
                               refund_id=refund_id, amount=amount, status=status)


def credited_lines(credit: Credit) -> tuple[CreditedLine, ...]:
    return tuple(CreditedLine(line.index, line.taxable) for line in credit.lines)


def credited_taxes(credit: Credit) -> tuple[CreditedTax, ...]:
    return tuple(CreditedTax(t.name, t.amount) for t in credit.taxes)


# ---- email ------------------------------------------------------------------------------------

_MAIL_NAMESPACE = UUID("5d8e2f4a-7b1c-4e3d-9a6f-2c4e8b0d1f63")


def credit_note_mail_id(credit_note_id: UUID) -> UUID:
    """One record per note: its email is sent once (as domain/mail_record.py's InvoiceMail)."""
    return uuid5(_MAIL_NAMESPACE, str(credit_note_id))


class CreditNoteMail(Aggregate):
    """The record that a credit note's email was accepted by the mail server."""

    class Sent(Aggregate.Created):
        credit_note_id: UUID
        message_id: str
        to: str
        attempts: int

    def __init__(self, credit_note_id: UUID, message_id: str, to: str, attempts: int) -> None:
        self.credit_note_id = credit_note_id
        self.message_id = message_id

    @classmethod
    def record(cls, credit_note_id: UUID, message_id: str, to: str, attempts: int,
               at: datetime) -> CreditNoteMail:
        return cls._create(cls.Sent, id=credit_note_mail_id(credit_note_id), timestamp=at,
                           credit_note_id=credit_note_id, message_id=message_id, to=to,
                           attempts=attempts)
