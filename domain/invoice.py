"""The Invoice aggregate: one organisation's bill for one period, and its lifecycle.

An invoice is drafted from a priced period (domain.pricing.price) and carries everything it
was computed from: the lines, GST components and totals in paise, the plan version that priced
it, the quantities per meter and the ledger position the usage was read up to. Its identity is
derived from (organisation, period) — `invoice_id` — so drafting the same period twice appends
nothing the second time.

Lifecycle: draft -> finalized -> partially_paid -> paid; draft or finalized -> void (never once
anything was paid). Finalizing assigns the invoice number (domain.numbering) and makes the
invoice immutable: the only facts a finalized invoice still accepts are payment orders,
payments applied to its amount due, credit notes (`Credited`, domain/credit_note.py; an
invoice with a credit note can no longer be voided), and being voided. A voided invoice accepts
nothing. A correction is a void plus a replacement invoice: the replacement is revision 1, 2,
... of the same (organisation, period), with its own derived id. The rules are written down in
docs/INVOICES.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID, uuid5

import msgspec
from eventsourcing.domain import Aggregate

from domain.errors import Conflict, FieldError, ValidationFailed
from domain.period import parse_period
from domain.pricing import LateUsage, Line, Priced
from domain.tax import TaxFacts

InvoiceStatus = Literal["draft", "finalized", "partially_paid", "paid", "void"]
DRAFT: InvoiceStatus = "draft"
FINALIZED: InvoiceStatus = "finalized"
PARTIALLY_PAID: InvoiceStatus = "partially_paid"
PAID: InvoiceStatus = "paid"
VOID: InvoiceStatus = "void"
STATUSES: tuple[InvoiceStatus, ...] = (DRAFT, FINALIZED, PARTIALLY_PAID, PAID, VOID)
PAYABLE: tuple[InvoiceStatus, ...] = (FINALIZED, PARTIALLY_PAID)  # accepts orders and payments

FIRST_REVISION = 0
VOID_REASON_MAX_CHARS = 500
DEFAULT_VOID_REASON = "voided"
_INVOICE_NAMESPACE = UUID("c4e2a7d1-6b3f-4e8a-9d05-7f1b2c8e3a44")


def invoice_id(organisation_id: UUID, period: str, revision: int = FIRST_REVISION) -> UUID:
    """The ledger identity of an organisation's invoice for a period ('YYYY-MM'). Revision 0 is
    uuid5 of (organisation, period); revision n > 0 replaces a voided revision n - 1."""
    key = f"{organisation_id}/{period}"
    return uuid5(_INVOICE_NAMESPACE, key if revision == FIRST_REVISION else f"{key}/{revision}")


# Ledger formats: they evolve by adding fields with defaults (see adapters/codec.py).
class InvoiceLineTier(msgspec.Struct, frozen=True):
    """One tier of a graduated or volume charge's line (domain.pricing.TierPart): its 1-based
    place in the plan's tiers and bound, the units it priced, its unit price and flat fee in
    exact rupees as the plan says them."""

    tier: int
    up_to: Decimal | None
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal


class InvoiceLine(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line: `metric` is None for plan-level lines (base fee, minimum commitment);
    `quantity` is the period quantity (exact decimal); `amount` is whole paise. `tiers`: the
    breakdown of a tiered charge (empty for other lines, and on drafts recorded before it;
    omitted when empty, so such a line is stored exactly as before the field existed)."""

    description: str
    metric: str | None
    quantity: Decimal
    amount: int
    tiers: tuple[InvoiceLineTier, ...] = ()


class InvoiceTax(msgspec.Struct, frozen=True):
    """One GST component: `name` CGST | SGST | IGST, `rate` a fraction (0.09 is 9 %), paise."""

    name: str
    rate: Decimal
    amount: int


class LateUsageBilled(msgspec.Struct, frozen=True):
    """Usage of an earlier, already-finalized period that this invoice bills: the plan version
    that priced that period, the quantities it had billed and the quantities now known."""

    period: str
    plan_code: str
    plan_version: int
    billed: dict[str, Decimal]
    corrected: dict[str, Decimal]


class CreditedLine(msgspec.Struct, frozen=True):
    """Taxable value (paise) a credit note credits on invoice line `index` (-1: the whole invoice)."""

    index: int
    taxable: int


class CreditedTax(msgspec.Struct, frozen=True):
    """Tax (paise) a credit note reverses in component `name` (CGST | SGST | IGST)."""

    name: str
    amount: int


class PaymentShare(msgspec.Struct, frozen=True):
    """Paise of payment `payment_id` that a credit note refunds."""

    payment_id: UUID
    amount: int


class Invoice(Aggregate):
    """An organisation's invoice for one billing period."""

    class Drafted(Aggregate.Created):
        """A draft invoice, with everything it was computed from. Amounts are paise."""

        organisation_id: UUID
        period: str
        revision: int
        currency: str
        lines: tuple[InvoiceLine, ...]
        subtotal: int
        taxes: tuple[InvoiceTax, ...]
        total: int
        amount_due: int
        plan_code: str
        plan_version: int
        usage_position: int  # usage was read from a view that included the ledger up to here
        quantities: dict[str, Decimal]  # period quantity per charged meter, as priced
        country: str  # the organisation's tax facts when drafted (place of supply)
        state_code: str | None
        supplier_state_code: str
        late_usage: tuple[LateUsageBilled, ...] = ()
        # The customer's GSTIN when drafted: "" = it had none; None = not recorded (drafted
        # before this field existed: the document then shows the organisation's current one).
        gstin: str | None = None
        # The plan version's name when drafted ("Growth"); None: drafted before it was recorded
        # (the invoice then shows the plan code).
        plan_name: str | None = None

        def mutate(self, aggregate: Any) -> Any:
            """The invoice this event creates, as the library's generic mutate builds it (a
            shell, its id, version and timestamps, then __init__ with the event's fields),
            with __init__'s parameters named once (_DRAFTED_INIT) rather than matched against
            the event's fields on every call: billing day creates, and numbering reads, one
            per organisation."""
            assert aggregate is None
            invoice = Invoice.__new__(Invoice)
            invoice.__base_init__(self.originator_id, self.originator_version, self.timestamp)
            fields = self.__dict__
            invoice.__init__(**{name: fields[name] for name in _DRAFTED_INIT})  # type: ignore[misc]
            self.apply(invoice)
            return invoice

    class Finalized(Aggregate.Event):
        """The invoice got its number and can no longer change (only be paid or voided)."""

        number: str
        finalized_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = FINALIZED
            aggregate.number = self.number
            aggregate.finalized_at = self.finalized_at

    class Voided(Aggregate.Event):
        """The invoice is cancelled; a finalized one keeps its number (the series stays gapless)."""

        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.status = VOID
            aggregate.void_reason = self.reason
            aggregate.voided_at = self.timestamp

    class PaymentOrderCreated(Aggregate.Event):
        """A Razorpay order was created for `amount` paise of the amount due."""

        razorpay_order_id: str
        amount: int

        def apply(self, aggregate: Any) -> None:
            aggregate.orders = {**aggregate.orders, self.razorpay_order_id: self.amount}

    class PaymentApplied(Aggregate.Event):
        """`amount` paise of payment `payment_id` reduce the amount due."""

        payment_id: UUID
        amount: int

        def apply(self, aggregate: Any) -> None:
            aggregate.payments = {**aggregate.payments, self.payment_id: self.amount}
            aggregate.amount_due -= self.amount
            aggregate.status = PAID if aggregate.amount_due <= 0 else PARTIALLY_PAID

    class Credited(Aggregate.Event):
        """Credit note `credit_note_id` credits `total` paise (tax included) of this invoice:
        `lines` the taxable value per invoice line index credited (-1: a whole-invoice amount),
        `taxes` the tax reversed per component; `reduce_due` paise come off the amount due
        (settlement reduce_due); `returned` paise of what was paid go back to the customer
        (refund or out_of_band), `refunds` of them through which payments (refund)."""

        credit_note_id: UUID
        total: int
        lines: tuple[CreditedLine, ...]
        taxes: tuple[CreditedTax, ...]
        reduce_due: int = 0
        returned: int = 0
        refunds: tuple[PaymentShare, ...] = ()
        settlement: str = ""  # refund | out_of_band | reduce_due

        def apply(self, aggregate: Any) -> None:
            credited = dict(aggregate.credited_lines)
            for line in self.lines:
                credited[line.index] = credited.get(line.index, 0) + line.taxable
            aggregate.credited_lines = credited
            taxes = dict(aggregate.credited_taxes)
            for tax in self.taxes:
                taxes[tax.name] = taxes.get(tax.name, 0) + tax.amount
            aggregate.credited_taxes = taxes
            aggregate.credited = aggregate.credited + self.total
            aggregate.returned = aggregate.returned + self.returned
            shares = dict(aggregate.refund_shares)
            for share in self.refunds:
                shares[share.payment_id] = shares.get(share.payment_id, 0) + share.amount
            aggregate.refund_shares = shares
            if self.reduce_due:
                aggregate.amount_due -= self.reduce_due
                if aggregate.amount_due <= 0 and aggregate.status == PARTIALLY_PAID:
                    aggregate.status = PAID
            aggregate.credit_notes = (*aggregate.credit_notes, self.credit_note_id)

    def __init__(
        self, organisation_id: UUID, period: str, revision: int, currency: str,
        lines: tuple[InvoiceLine, ...], subtotal: int, taxes: tuple[InvoiceTax, ...], total: int,
        amount_due: int, plan_code: str, plan_version: int, usage_position: int,
        quantities: dict[str, Decimal], country: str, state_code: str | None,
        supplier_state_code: str, late_usage: tuple[LateUsageBilled, ...] = (),
        gstin: str | None = None, plan_name: str | None = None,
    ) -> None:
        self.organisation_id = organisation_id
        self.period = period
        self.revision = revision
        self.currency = currency
        self.lines = tuple(lines)
        self.subtotal = subtotal
        self.taxes = tuple(taxes)
        self.total = total
        self.amount_due = amount_due
        self.plan_code = plan_code
        self.plan_version = plan_version
        self.usage_position = usage_position
        self.quantities = dict(quantities)
        self.country = country
        self.state_code = state_code
        self.supplier_state_code = supplier_state_code
        self.late_usage = tuple(late_usage)
        self.gstin = gstin
        self.plan_name = plan_name
        self.status: InvoiceStatus = DRAFT
        self.number: str | None = None
        self.finalized_at: datetime | None = None
        self.voided_at: datetime | None = None
        self.void_reason: str | None = None
        self.orders: dict[str, int] = {}  # Razorpay order id -> paise, in creation order
        self.payments: dict[UUID, int] = {}  # payment id -> paise applied
        # Credit notes (domain/credit_note.py): taxable value credited per line index (-1: whole
        # amounts), tax reversed per component, paise credited (tax included), paise of what was
        # paid that go back, and of those, per payment, what refunds take.
        self.credited_lines: dict[int, int] = {}
        self.credited_taxes: dict[str, int] = {}
        self.credited = 0
        self.returned = 0
        self.refund_shares: dict[UUID, int] = {}
        self.credit_notes: tuple[UUID, ...] = ()

    @property
    def paid(self) -> int:
        """Paise applied from payments so far."""
        return sum(self.payments.values())

    @classmethod
    def draft(
        cls, *, organisation_id: UUID, period: str, revision: int, priced: Priced, plan_code: str,
        plan_version: int, quantities: Mapping[str, Decimal], usage_position: int, tax: TaxFacts,
        late: Sequence[LateUsage], at: datetime, gstin: str | None = None,
        plan_name: str | None = None,
    ) -> Invoice:
        """Decide: record a draft of `priced` (the output of domain.pricing.price).
        `quantities` are the period quantities of the plan's charged meters, as priced."""
        parse_period(period)  # ValidationFailed for anything but YYYY-MM
        if usage_position < 0 or revision < FIRST_REVISION:
            raise ValueError("usage_position and revision are >= 0")
        # What the library's _create does for this one event class (the event with the
        # aggregate's topic and first version, then the aggregate from it, with the event
        # pending), without its per-call matching of argument names: a run drafts one per
        # organisation.
        drafted = cls.Drafted(  # type: ignore[call-arg]  # its fields come from the dataclass
            originator_topic=_INVOICE_TOPIC, originator_version=cls.INITIAL_VERSION,
            originator_id=invoice_id(organisation_id, period, revision), timestamp=at,
            organisation_id=organisation_id, period=period, revision=revision,
            currency=priced.currency,
            lines=tuple(_line(x) for x in priced.lines),
            subtotal=priced.subtotal,
            taxes=tuple(InvoiceTax(t.name, t.rate, t.amount) for t in priced.taxes),
            total=priced.total, amount_due=priced.total, plan_code=plan_code,
            plan_version=plan_version, usage_position=usage_position,
            quantities=dict(quantities),
            country=tax.country, state_code=tax.state_code,
            supplier_state_code=tax.supplier_state_code,
            late_usage=tuple(
                LateUsageBilled(item.period, item.plan.code, item.plan.version, dict(item.billed),
                                dict(item.corrected))
                for item in late
            ),
            gstin=gstin, plan_name=plan_name,
        )
        invoice: Invoice = drafted.mutate(None)
        invoice.pending_events.append(drafted)
        return invoice

    @property
    def created_at(self) -> datetime:
        return self.created_on

    @property
    def is_immutable(self) -> bool:
        """A finalized (or paid, or void) invoice never changes its lines or amounts."""
        return self.status != DRAFT

    def _refuse(self, action: str) -> Conflict:
        what = f"invoice {self.number}" if self.number else f"invoice {self.id}"
        if self.status == VOID:
            return Conflict(f"{what} is void; a void invoice cannot be {action}")
        return Conflict(f"{what} is {self.status} and immutable; it cannot be {action} "
                        "(correct it with a void and a new invoice, or a credit note)")

    def check_mutable(self, action: str) -> None:
        """Raise Conflict (naming `action`) unless this is still a draft. Every command that
        would change a finalized, paid or void invoice goes through here."""
        if self.status != DRAFT:
            raise self._refuse(action)

    def check_can_finalize(self) -> None:
        """Raise Conflict unless this is a draft."""
        self.check_mutable("finalized again" if self.status in (FINALIZED, PAID) else "finalized")

    def finalize(self, number: str, at: datetime) -> None:
        """Decide: assign `number` (from the financial year's InvoiceSequence) and freeze."""
        self.check_can_finalize()
        if not number:
            raise ValueError("a finalized invoice has a number")
        self.trigger_event(self.Finalized, timestamp=at, number=number, finalized_at=at)

    def void(self, reason: str, at: datetime) -> None:
        """Decide: cancel a draft or finalized invoice. A paid invoice needs a refund or a
        credit note instead; a void one is already cancelled."""
        text = reason.strip() or DEFAULT_VOID_REASON
        if len(text) > VOID_REASON_MAX_CHARS:
            raise ValidationFailed([FieldError("reason", f"at most {VOID_REASON_MAX_CHARS} characters")])
        if self.status == VOID:
            raise self._refuse("voided again")
        if self.payments:
            raise self._refuse("voided: payments were applied to it (refund them or issue a "
                               "credit note)")
        if self.credit_notes:
            raise self._refuse("voided: credit notes were issued against it")
        self.trigger_event(self.Voided, timestamp=at, reason=text)

    # ---- credit notes ------------------------------------------------------------------

    def credit(self, *, credit_note_id: UUID, total: int, lines: tuple[CreditedLine, ...],
               taxes: tuple[CreditedTax, ...], reduce_due: int, returned: int,
               refunds: tuple[PaymentShare, ...], settlement: str, at: datetime) -> None:
        """Decide: record a credit note against this invoice (domain/credit_note.py checks the
        amounts first; this records them, so two notes racing collide on the invoice)."""
        self.trigger_event(self.Credited, timestamp=at, credit_note_id=credit_note_id,
                           total=total, lines=lines, taxes=taxes, reduce_due=reduce_due,
                           returned=returned, refunds=refunds, settlement=settlement)

    # ---- payments ------------------------------------------------------------------------

    def check_payable(self) -> None:
        """Raise Conflict unless the invoice is finalized (or partly paid) with something due."""
        if self.status not in PAYABLE or self.amount_due <= 0:
            what = f"invoice {self.number}" if self.number else f"invoice {self.id}"
            if self.status == DRAFT:
                raise Conflict(f"{what} is a draft; finalize it before taking payment")
            raise Conflict(f"{what} is {self.status}; nothing is due on it")

    def open_order(self) -> str | None:
        """The newest Razorpay order for exactly the amount due now, if any: a second request
        for an order gets that one instead of a new order."""
        if self.status not in PAYABLE:
            return None
        for order_id, amount in reversed(self.orders.items()):
            if amount == self.amount_due:
                return order_id
        return None

    def record_order(self, razorpay_order_id: str, amount: int, at: datetime) -> None:
        """Decide: an order was created at Razorpay for the whole amount due."""
        self.check_payable()
        if amount != self.amount_due:
            raise Conflict(f"an order must be for the amount due ({self.amount_due} paise), "
                           f"not {amount}")
        if razorpay_order_id not in self.orders:
            self.trigger_event(self.PaymentOrderCreated, timestamp=at,
                               razorpay_order_id=razorpay_order_id, amount=amount)

    def apply_payment(self, payment_id: UUID, amount: int, at: datetime) -> int:
        """Decide: reduce the amount due by up to `amount` paise of a captured payment, once per
        payment. Returns the paise applied: 0 when nothing is due (a draft, a void or paid
        invoice) — the caller flags the rest of the payment for review."""
        if payment_id in self.payments:
            return self.payments[payment_id]
        if self.status not in PAYABLE or amount <= 0 or self.amount_due <= 0:
            return 0  # nothing due: a reduce_due credit note may have taken all of it
        applied = min(amount, self.amount_due)
        self.trigger_event(self.PaymentApplied, timestamp=at, payment_id=payment_id, amount=applied)
        return applied


# The aggregate's topic as the library names it (eventsourcing.utils.get_topic: the class's
# module and qualified name; Invoice sets no TOPIC of its own).
_INVOICE_TOPIC = f"{Invoice.__module__}:{Invoice.__qualname__}"
# Invoice.__init__'s parameters, every one a field of Invoice.Drafted (checked here, once).
_DRAFTED_INIT = tuple(inspect.signature(Invoice.__init__).parameters)[1:]
assert set(_DRAFTED_INIT) <= {f.name for f in dataclasses.fields(Invoice.Drafted)}


def _line(line: Line) -> InvoiceLine:
    return InvoiceLine(line.description, line.metric, line.quantity, line.amount, tuple(
        InvoiceLineTier(t.tier, t.up_to, t.quantity, t.unit_price, t.flat_fee) for t in line.tiers))
