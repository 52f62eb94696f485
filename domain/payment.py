"""Payments: the Razorpay orders we create for invoices, the webhook deliveries we receive, and
the Payment aggregate whose state no arrival order or duplicate can change.

- `PaymentOrder`: an order created at Razorpay for an invoice's amount due. Its id is derived
  from Razorpay's order id, so a webhook's `order_id` leads to our invoice without trusting any
  note the payload carries. The recovery job's checks are recorded on it (their schedule).
- `GatewayEvent`: one verified webhook delivery (or what the recovery job found), recorded as it
  came, under an id derived from Razorpay's event id: a repeat collides and records nothing.
  `Processed` says it was applied; it is saved with what applying it changed, in one append.
- `Payment`: one payment (a Razorpay payment, or money recorded by hand). Its state is a join of
  everything observed: once captured it stays captured, an authorization never undoes a capture,
  a failure never undoes either (`payment.failed` is not final), and each refund only moves
  forward (pending -> failed -> processed; processed is final). So the same deliveries in any
  order, any number of times, leave the same state. The rules are in docs/PAYMENTS.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import Conflict, FieldError, ValidationFailed
from domain.gateway_events import EVENT_ID_MAX_CHARS, event_type_of, printable

PaymentStatus = Literal["created", "authorized", "captured", "failed", "refunded",
                        "partially_refunded"]
PAYMENT_STATUSES: tuple[PaymentStatus, ...] = (
    "created", "authorized", "captured", "failed", "refunded", "partially_refunded")
MANUAL_METHODS = ("bank_transfer", "cheque", "upi", "other")
REFERENCE_MAX_CHARS = 40
REVIEW_REASON_MAX_CHARS = 500
RAZORPAY = "razorpay"
MANUAL = "manual"
DETAIL_MAX_CHARS = 2000  # of a delivery's processing detail (an error, kept for people)
# The recovery job's checks of an open order, each counted from the order's creation: soon after
# a checkout would have finished, then hourly, then daily for a week; none after the last.
RECOVERY_SCHEDULE: tuple[timedelta, ...] = (
    timedelta(minutes=5), timedelta(hours=1), *(timedelta(days=n) for n in range(1, 8)))
# A refund's states, in the only order they may move: a failed refund can still be processed
# (Razorpay retries it); a processed one is final.
REFUND_RANK = {"pending": 0, "created": 0, "failed": 1, "processed": 2}

_NAMESPACE = UUID("0f6b8e2a-5d1c-4a7e-9b3f-2c8d4e6a1b07")


def order_ref(razorpay_order_id: str) -> UUID:
    """Our id of the PaymentOrder for a Razorpay order id."""
    return uuid5(_NAMESPACE, f"order/{razorpay_order_id}")


def razorpay_payment_ref(razorpay_payment_id: str) -> UUID:
    """Our id of the Payment for a Razorpay payment id."""
    return uuid5(_NAMESPACE, f"razorpay/{razorpay_payment_id}")


def manual_payment_ref(invoice_id: UUID, reference: str) -> UUID:
    """A manual payment's id: one per (invoice, reference), the reference compared without case
    or spacing, so the same cheque or bank transfer recorded twice (under any method, "UTR 1"
    or "utr  1") is refused instead of counted twice."""
    return uuid5(_NAMESPACE, f"manual/{invoice_id}/{' '.join(reference.split()).casefold()}")


def gateway_event_ref(event_id: str) -> UUID:
    """Our id of a GatewayEvent for Razorpay's X-Razorpay-Event-Id (or a recovery's own id)."""
    return uuid5(_NAMESPACE, f"event/{event_id}")


class PaymentOrder(Aggregate):
    """A Razorpay order for one invoice's amount due (paise)."""

    class Created(Aggregate.Created):
        invoice_id: UUID
        organisation_id: UUID
        razorpay_order_id: str
        amount: int
        currency: str
        receipt: str

    class Checked(Aggregate.Event):
        """The recovery job asked Razorpay for the order's payments and found `found`."""

        found: int

        def apply(self, aggregate: Any) -> None:
            aggregate.checks += 1

    def __init__(self, invoice_id: UUID, organisation_id: UUID, razorpay_order_id: str,
                 amount: int, currency: str, receipt: str) -> None:
        self.invoice_id = invoice_id
        self.organisation_id = organisation_id
        self.razorpay_order_id = razorpay_order_id
        self.amount = amount
        self.currency = currency
        self.receipt = receipt
        self.checks = 0

    @classmethod
    def record(cls, *, invoice_id: UUID, organisation_id: UUID, razorpay_order_id: str,
               amount: int, currency: str, receipt: str, at: datetime) -> PaymentOrder:
        return cls._create(cls.Created, id=order_ref(razorpay_order_id), timestamp=at,
                           invoice_id=invoice_id, organisation_id=organisation_id,
                           razorpay_order_id=razorpay_order_id, amount=amount, currency=currency,
                           receipt=receipt)

    def check_due(self, now: datetime) -> bool:
        """Whether the recovery job's next check of this order is due at `now` (by the order's
        own count of checks in the ledger, never a possibly lagging read model's)."""
        return (self.checks < len(RECOVERY_SCHEDULE)
                and self.created_on + RECOVERY_SCHEDULE[self.checks] <= now)

    def checked(self, found: int, at: datetime) -> None:
        """Record a recovery check that found `found` payments at Razorpay."""
        self.trigger_event(self.Checked, timestamp=at, found=found)


class GatewayEvent(Aggregate):
    """A delivery from the gateway, as received (body bytes exactly as signed)."""

    class Received(Aggregate.Created):
        event_id: str
        event_type: str  # "" when the body named none
        body: bytes
        source: str  # "webhook" | "recovery"

    class Processed(Aggregate.Event):
        """Applied: `outcome` is applied | ignored (unknown type, nothing to do) | unreadable |
        failed (with the error)."""

        outcome: str
        detail: str = ""

        def apply(self, aggregate: Any) -> None:
            aggregate.outcome = self.outcome

    def __init__(self, event_id: str, event_type: str, body: bytes, source: str) -> None:
        self.event_id = event_id
        self.event_type = event_type
        self.body = body
        self.source = source
        self.outcome: str | None = None

    @classmethod
    def receive(cls, *, event_id: str, event_type: str, body: bytes, source: str,
                at: datetime) -> GatewayEvent:
        """Record a delivery as it came; its type is kept only if it looks like Razorpay's."""
        if not event_id or len(event_id) > EVENT_ID_MAX_CHARS or printable(event_id) != event_id:
            raise ValidationFailed([FieldError(
                "X-Razorpay-Event-Id", f"must be 1 to {EVENT_ID_MAX_CHARS} characters")])
        return cls._create(cls.Received, id=gateway_event_ref(event_id), timestamp=at,
                           event_id=event_id, event_type=event_type_of(event_type),
                           body=body, source=source)

    @property
    def processed(self) -> bool:
        return self.outcome is not None

    def processed_as(self, outcome: str, at: datetime, detail: str = "", *,
                     again: bool = False) -> None:
        """Record how the delivery was applied. Once only; `again` re-processes one that
        `failed` (after the fault that failed it was fixed)."""
        if self.processed and not (again and self.outcome == "failed"):
            raise Conflict(f"gateway event {self.event_id} was already processed")
        self.trigger_event(self.Processed, timestamp=at, outcome=outcome,
                           detail=printable(detail, DETAIL_MAX_CHARS))


class Payment(Aggregate):
    """One payment against an invoice (or, flagged for review, against none of ours)."""

    class Opened(Aggregate.Created):
        source: str  # razorpay | manual
        currency: str
        amount: int  # as first seen (paise)
        method: str | None
        razorpay_payment_id: str | None
        reference: str | None  # a manual payment's bank or cheque reference
        # False: first seen through a refund, whose entity does not say the payment's own
        # amount and method; they come with the payment's entity (Described).
        described: bool = True

    class Described(Aggregate.Event):
        """The payment's own amount, currency and method, from its entity (after a refund had
        made it known first)."""

        amount: int
        currency: str
        method: str | None

        def apply(self, aggregate: Any) -> None:
            aggregate.amount = self.amount
            aggregate.currency = self.currency
            aggregate.method = self.method
            aggregate.described = True

    class Linked(Aggregate.Event):
        """The payment belongs to our order for `invoice_id` (known from its order id)."""

        invoice_id: UUID
        organisation_id: UUID
        razorpay_order_id: str | None

        def apply(self, aggregate: Any) -> None:
            aggregate.invoice_id = self.invoice_id
            aggregate.organisation_id = self.organisation_id
            aggregate.razorpay_order_id = self.razorpay_order_id

    class Authorized(Aggregate.Event):
        amount: int

        def apply(self, aggregate: Any) -> None:
            aggregate.authorized = True

    class Captured(Aggregate.Event):
        amount: int

        def apply(self, aggregate: Any) -> None:
            aggregate.captured_amount = self.amount

    class Failed(Aggregate.Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.failure = self.reason

    class Settled(Aggregate.Event):
        """The captured amount was applied to its invoice: `applied` paise of it (less than
        captured when the invoice was owed less; the rest is flagged for review)."""

        invoice_id: UUID
        applied: int

        def apply(self, aggregate: Any) -> None:
            aggregate.applied = self.applied
            aggregate.settled = True

    class RefundObserved(Aggregate.Event):
        refund_id: str
        amount: int
        status: str

        def apply(self, aggregate: Any) -> None:
            aggregate.refunds = {**aggregate.refunds, self.refund_id: (self.amount, self.status)}

    class FlaggedForReview(Aggregate.Event):
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.review = (*aggregate.review, self.reason)

    def __init__(self, source: str, currency: str, amount: int, method: str | None,
                 razorpay_payment_id: str | None, reference: str | None,
                 described: bool = True) -> None:
        self.source = source
        self.currency = currency
        self.amount = amount
        self.method = method
        self.razorpay_payment_id = razorpay_payment_id
        self.reference = reference
        self.invoice_id: UUID | None = None
        self.organisation_id: UUID | None = None
        self.razorpay_order_id: str | None = None
        self.authorized = False
        self.captured_amount: int | None = None
        self.failure: str | None = None
        self.settled = False
        self.applied = 0
        self.refunds: dict[str, tuple[int, str]] = {}
        self.review: tuple[str, ...] = ()
        self.described = described

    # ---- creation ------------------------------------------------------------------------

    @classmethod
    def from_gateway(cls, *, razorpay_payment_id: str, currency: str, amount: int,
                     method: str | None, at: datetime, described: bool = True) -> Payment:
        """A Razorpay payment on first sight; `described` False when only a refund of it was
        seen (amount 0 and no method until its own entity comes)."""
        return cls._create(cls.Opened, id=razorpay_payment_ref(razorpay_payment_id), timestamp=at,
                           source=RAZORPAY, currency=currency, amount=amount, method=method,
                           razorpay_payment_id=razorpay_payment_id, reference=None,
                           described=described)

    @classmethod
    def manual(cls, *, invoice_id: UUID, organisation_id: UUID, currency: str, amount: int,
               method: str, reference: str, at: datetime) -> Payment:
        """Money that arrived outside Razorpay: captured as it is recorded."""
        problems = []
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            problems.append(FieldError("amount", "must be a positive whole number of paise"))
        if method not in MANUAL_METHODS:
            problems.append(FieldError("method", f"must be one of {list(MANUAL_METHODS)}"))
        text = reference.strip()
        if not text or len(text) > REFERENCE_MAX_CHARS:
            problems.append(FieldError("reference", f"must be 1 to {REFERENCE_MAX_CHARS} characters"))
        if problems:
            raise ValidationFailed(problems)
        payment = cls._create(cls.Opened, id=manual_payment_ref(invoice_id, text),
                              timestamp=at, source=MANUAL, currency=currency, amount=amount,
                              method=method, razorpay_payment_id=None, reference=text)
        payment.link(invoice_id=invoice_id, organisation_id=organisation_id, razorpay_order_id=None,
                     at=at)
        payment.observe(authorized=False, captured_amount=amount, failure=None, at=at)
        return payment

    # ---- decisions (each records only what changes the state) ------------------------------

    def describe(self, *, amount: int, currency: str, method: str | None, at: datetime) -> None:
        """Take the payment's own amount, currency and method from its entity, once."""
        if not self.described:
            self.trigger_event(self.Described, timestamp=at, amount=amount, currency=currency,
                               method=method)

    def link(self, *, invoice_id: UUID, organisation_id: UUID, razorpay_order_id: str | None,
             at: datetime) -> None:
        """Tie the payment to our order's invoice, once (the order id is Razorpay's)."""
        if self.invoice_id is None:
            self.trigger_event(self.Linked, timestamp=at, invoice_id=invoice_id,
                               organisation_id=organisation_id, razorpay_order_id=razorpay_order_id)

    def observe(self, *, authorized: bool, captured_amount: int | None, failure: str | None,
                at: datetime) -> None:
        """Join one snapshot into the state: nothing observed can undo a later stage."""
        if captured_amount is not None and self.captured_amount is None:
            self.trigger_event(self.Captured, timestamp=at, amount=captured_amount)
        if authorized and not self.authorized:
            self.trigger_event(self.Authorized, timestamp=at, amount=self.amount)
        if failure is not None and self.failure is None:
            self.trigger_event(self.Failed, timestamp=at, reason=failure[:REVIEW_REASON_MAX_CHARS])

    def observe_refund(self, *, refund_id: str, amount: int, status: str, at: datetime) -> None:
        """Join a refund's snapshot: each refund only moves forward (processed is final)."""
        rank = REFUND_RANK.get(status)
        if rank is None:
            return  # a state Razorpay may add later: the next known one will move it
        known = self.refunds.get(refund_id)
        if known is None or REFUND_RANK.get(known[1], 0) < rank:
            self.trigger_event(self.RefundObserved, timestamp=at, refund_id=refund_id,
                               amount=amount, status=status)

    def settle(self, *, invoice_id: UUID, applied: int, at: datetime) -> None:
        """Record what of the captured amount its invoice took, once."""
        if not self.settled:
            self.trigger_event(self.Settled, timestamp=at, invoice_id=invoice_id, applied=applied)

    def flag(self, reason: str, at: datetime) -> None:
        """Ask a person to look at this payment (each reason once)."""
        if reason not in self.review:
            self.trigger_event(self.FlaggedForReview, timestamp=at,
                               reason=reason[:REVIEW_REASON_MAX_CHARS])

    # ---- what the state says -----------------------------------------------------------

    @property
    def captured(self) -> bool:
        return self.captured_amount is not None

    @property
    def refunded(self) -> int:
        """Paise refunded for good (processed refunds)."""
        return sum(amount for amount, status in self.refunds.values() if status == "processed")

    @property
    def status(self) -> PaymentStatus:
        """Derived from what was observed, never stored: see the module's docstring."""
        if self.captured_amount is not None:
            refunded = self.refunded
            if refunded >= self.captured_amount > 0:
                return "refunded"
            return "partially_refunded" if refunded > 0 else "captured"
        if self.authorized:
            return "authorized"
        return "failed" if self.failure is not None else "created"
