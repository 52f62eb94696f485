"""Payments: Razorpay orders for invoices, webhook deliveries recorded and applied, manual
payments, and the recovery of payments whose webhooks were missed.

get -> decide -> save over the Ledger and PaymentGateway ports. The rules (docs/PAYMENTS.md):
- An order is for the whole amount due. While an order for that amount is open, asking again
  answers it. Before creating one, the gateway is asked for orders already made with the
  invoice's receipt: a create that timed out on our side but happened at Razorpay is adopted,
  not repeated. A gateway error records nothing.
- A delivery is recorded as it came (GatewayEvent) and applied later by the process manager;
  applying saves the payment, the invoice and the delivery's `Processed` in one append, so a
  delivery is applied exactly once even with two managers racing.
- Applying joins the delivery's snapshot into the Payment (domain/payment.py): the outcome does
  not depend on arrival order or repeats. A captured payment reduces its invoice's amount due
  once; what the invoice was not owed, or a payment of no order of ours, is flagged for review.
  A refund of a credit note (its notes name the note) moves the note's refund on too, in the
  same append (domain/credit_note.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import msgspec

from domain.audit import Actor
from domain.credit_note import NOTE_ATTEMPT, NOTE_CREDIT_NOTE, NOTE_SHARE, CreditNote
from domain.errors import Conflict, NotFound, PaymentsNotConfigured
from domain.gateway_events import (
    HANDLED_EVENTS,
    ORDER_MIN_AMOUNT_PAISE,
    ORDER_PAID,
    PAYMENT_AUTHORIZED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    OrderEntity,
    PaymentEntity,
    RefundEntity,
    Webhook,
    checkout_signature_matches,
    parse_webhook,
    printable,
    webhook_body,
)
from domain.invoice import Invoice
from domain.payment import GatewayEvent, Payment, PaymentOrder, order_ref, razorpay_payment_ref
from domain.ports import Clock, Ledger, PaymentGateway
from domain.services.base import Written, with_retries

log = logging.getLogger("billing.payments")

WEBHOOK = "webhook"
RECOVERY = "recovery"
APPLIED = "applied"
IGNORED = "ignored"
UNREADABLE = "unreadable"
FAILED = "failed"
NOT_CONFIGURED_RETRY_AFTER_S = 3600  # configuration does not fix itself within seconds
NOTE_INVOICE = "invoice_id"
NOTE_ORGANISATION = "organisation_id"


@dataclass(frozen=True)
class OrderOut:
    """What a checkout needs: the order, its amount (paise) and currency, the public key id."""

    invoice_id: UUID
    razorpay_order_id: str
    amount: int
    currency: str
    key_id: str
    created: bool  # False: an open order already existed (or was adopted from the gateway)
    position: int


@dataclass(frozen=True)
class Recorded:
    """A delivery recorded (`new`) or recognised as a repeat; `position` to wait for."""

    new: bool
    position: int


class PaymentsService:
    """Orders, deliveries, manual payments and recovery. `gateway` None: not configured."""

    def __init__(self, ledger: Ledger, clock: Clock, gateway: PaymentGateway | None,
                 key_secret: str | None = None) -> None:
        self._ledger = ledger
        self._clock = clock
        self._gateway = gateway
        self._key_secret = key_secret

    @property
    def configured(self) -> bool:
        return self._gateway is not None

    def _need_gateway(self) -> PaymentGateway:
        if self._gateway is None:
            raise PaymentsNotConfigured("payments not configured: set RAZORPAY_KEY_ID and "
                                        "RAZORPAY_KEY_SECRET",
                                        retry_after_s=NOT_CONFIGURED_RETRY_AFTER_S)
        return self._gateway

    def _invoice(self, ident: UUID) -> Invoice:
        try:
            return self._ledger.get(ident, Invoice)
        except NotFound:
            raise NotFound("invoice", ident) from None

    # ---- orders ---------------------------------------------------------------------------

    def create_order(self, invoice_id: UUID, *, actor: Actor | None) -> OrderOut:
        """A Razorpay order for the invoice's amount due, or the open one for that amount."""
        gateway = self._need_gateway()
        invoice = self._invoice(invoice_id)
        invoice.check_payable()
        existing = invoice.open_order()
        if existing is not None:
            return self._out(invoice, existing, created=False, position=0)
        if invoice.amount_due < ORDER_MIN_AMOUNT_PAISE:
            raise Conflict(f"{invoice.amount_due} paise is due: Razorpay takes no order under "
                           f"{ORDER_MIN_AMOUNT_PAISE} paise; record it as a manual payment")
        assert invoice.number is not None  # payable means finalized, and finalized is numbered
        notes = {NOTE_INVOICE: str(invoice.id), NOTE_ORGANISATION: str(invoice.organisation_id)}
        order = self._adoptable(gateway.orders_with_receipt(invoice.number), invoice)
        adopted = order is not None
        if order is None:
            order = gateway.create_order(amount=invoice.amount_due, currency=invoice.currency,
                                         receipt=invoice.number, notes=notes)
        if order.amount != invoice.amount_due or order.currency != invoice.currency:
            raise Conflict(f"the gateway made order {order.id} for {order.amount} {order.currency};"
                           f" {invoice.amount_due} {invoice.currency} is due")
        return self._record_order(invoice_id, order, created=not adopted, actor=actor)

    def _adoptable(self, orders: Sequence[OrderEntity], invoice: Invoice) -> OrderEntity | None:
        """An order Razorpay holds for this invoice and amount that we never recorded: made by
        a create whose answer we did not get. Orders we recorded are not adopted again."""
        for order in orders:
            notes = order.notes if isinstance(order.notes, dict) else {}
            if (notes.get(NOTE_INVOICE) == str(invoice.id) and order.amount == invoice.amount_due
                    and order.currency == invoice.currency and order.status != "paid"
                    and order.id not in invoice.orders):
                return order
        return None

    def _record_order(self, invoice_id: UUID, order: OrderEntity, *, created: bool,
                      actor: Actor | None) -> OrderOut:
        def attempt() -> OrderOut:
            invoice = self._invoice(invoice_id)
            existing = invoice.open_order()
            if existing is not None:  # a concurrent request recorded one first: answer it
                return self._out(invoice, existing, created=False, position=0)
            now = self._clock()
            invoice.record_order(order.id, order.amount, now)
            record = PaymentOrder.record(
                invoice_id=invoice.id, organisation_id=invoice.organisation_id,
                razorpay_order_id=order.id, amount=order.amount, currency=order.currency,
                receipt=order.receipt or (invoice.number or ""), at=now)
            position = self._ledger.save(invoice, record, actor=actor)
            return self._out(invoice, order.id, created=created, position=position)

        return with_retries(attempt)

    def _out(self, invoice: Invoice, order_id: str, *, created: bool, position: int) -> OrderOut:
        gateway = self._need_gateway()
        return OrderOut(invoice.id, order_id, invoice.orders[order_id], invoice.currency,
                        gateway.key_id, created, position)

    def confirm_checkout(self, invoice_id: UUID, *, payment_id: str, signature: str) -> bool:
        """Whether a checkout's answer (razorpay_payment_id, razorpay_signature) was signed for
        an order we recorded for this invoice. The browser's order id is not used: only ours."""
        if self._key_secret is None:
            raise PaymentsNotConfigured("payments not configured")
        invoice = self._invoice(invoice_id)
        return any(checkout_signature_matches(stored_order_id=order_id, payment_id=payment_id,
                                              signature=signature, key_secret=self._key_secret)
                   for order_id in invoice.orders)

    # ---- deliveries -------------------------------------------------------------------------

    def record_delivery(self, *, event_id: str, body: bytes, source: str = WEBHOOK) -> Recorded:
        """Record a verified delivery as it came; a repeated event id records nothing."""
        try:
            event_type = parse_webhook(body).event
        except ValueError:
            event_type = ""  # recorded all the same; the process manager marks it unreadable
        delivery = GatewayEvent.receive(event_id=event_id, event_type=event_type, body=body,
                                        source=source, at=self._clock())
        try:
            return Recorded(True, self._ledger.save(delivery, actor=None))
        except Conflict:
            return Recorded(False, 0)

    def apply_delivery(self, ref: UUID, *, again: bool = False) -> str:
        """Apply a recorded delivery once (the process manager calls this); its outcome.
        `again`: apply one that `failed` afresh (`billing payments reapply`, after a fix)."""
        return with_retries(lambda: self._apply_once(ref, again=again))

    def give_up(self, ref: UUID, error: str) -> None:
        """Record that a delivery could not be applied (a bug, not the gateway's fault): it stays
        visible as `failed` with the error, instead of stopping every delivery after it."""
        def attempt() -> None:
            delivery = self._ledger.get(ref, GatewayEvent)
            if delivery.outcome is None:
                delivery.processed_as(FAILED, self._clock(), error)
                self._ledger.save(delivery, actor=None)

        with_retries(attempt)

    def _apply_once(self, ref: UUID, *, again: bool) -> str:
        delivery = self._ledger.get(ref, GatewayEvent)
        if delivery.outcome is not None and not (again and delivery.outcome == FAILED):
            return delivery.outcome
        now = self._clock()
        try:
            webhook = parse_webhook(delivery.body)
            payment_entity, refund = _entities(webhook)
        except ValueError as e:
            delivery.processed_as(UNREADABLE, now, f"{type(e).__name__}: {e}", again=again)
            self._ledger.save(delivery, actor=None)
            return UNREADABLE
        if webhook.event not in HANDLED_EVENTS or (payment_entity is None and refund is None):
            delivery.processed_as(IGNORED, now, f"event {printable(webhook.event)!r}: nothing to "
                                  "apply", again=again)
            self._ledger.save(delivery, actor=None)
            return IGNORED
        changed = self._observe(webhook.event, payment_entity, refund, now)
        delivery.processed_as(APPLIED, now, again=again)
        self._ledger.save(*changed, delivery, actor=None)
        return APPLIED

    def _observe(self, event: str, entity: PaymentEntity | None, refund: RefundEntity | None,
                 now: datetime) -> list[Payment | Invoice | CreditNote]:
        """What one delivery changes: its payment (made on first sight) and maybe its invoice."""
        payment_id = entity.id if entity is not None else refund.payment_id  # type: ignore[union-attr]
        try:
            payment = self._ledger.get(razorpay_payment_ref(payment_id), Payment)
        except NotFound:
            # First seen through a refund: its own amount and method come with its entity.
            payment = Payment.from_gateway(
                razorpay_payment_id=payment_id,
                currency=entity.currency if entity else refund.currency,  # type: ignore[union-attr]
                amount=entity.amount if entity else 0, method=entity.method if entity else None,
                at=now, described=entity is not None)
        if entity is not None:
            payment.describe(amount=entity.amount, currency=entity.currency, method=entity.method,
                             at=now)
            self._link(payment, entity, now)
            payment.observe(authorized=entity.status == "authorized" or event == PAYMENT_AUTHORIZED,
                            captured_amount=_captured(event, entity),
                            failure=_failure(event, entity), at=now)
        changed: list[Payment | Invoice | CreditNote] = [payment]
        if refund is not None:
            payment.observe_refund(refund_id=refund.id, amount=refund.amount, status=refund.status,
                                   at=now)
            changed += self._credit_note_refund(refund, now)
        if payment.captured and not payment.settled:
            changed += self._settle(payment, now)
        return changed

    def _credit_note_refund(self, refund: RefundEntity, now: datetime) -> list[CreditNote]:
        """A refund of a credit note (its notes name it): the note follows it too, in the same
        append (domain/credit_note.py). A refund made any other way changes only its payment."""
        raw_id, raw_share, raw_attempt = (refund.note(NOTE_CREDIT_NOTE), refund.note(NOTE_SHARE),
                                          refund.note(NOTE_ATTEMPT))
        try:
            note_id = UUID(raw_id or "")
            share_hint = int(raw_share) if raw_share is not None else None
            attempt = int(raw_attempt or 0)
        except ValueError:
            return []
        try:
            note = self._ledger.get(note_id, CreditNote)
        except NotFound:
            return []
        share = note.share_of(refund.payment_id, share_hint)
        if share is None:
            return []
        note.observe_refund(share=share, attempt=attempt, refund_id=refund.id,
                            amount=refund.amount, status=refund.status, at=now)
        return [note]

    def _link(self, payment: Payment, entity: PaymentEntity, now: datetime) -> None:
        if payment.invoice_id is not None or entity.order_id is None:
            return
        try:
            order = self._ledger.get(order_ref(entity.order_id), PaymentOrder)
        except NotFound:
            return  # not an order of ours: flagged once captured
        payment.link(invoice_id=order.invoice_id, organisation_id=order.organisation_id,
                     razorpay_order_id=order.razorpay_order_id, at=now)

    def _settle(self, payment: Payment, now: datetime) -> list[Invoice]:
        """Apply a captured payment to its invoice, once; flag what cannot be applied."""
        captured = payment.captured_amount or 0
        if payment.invoice_id is None:
            payment.flag("captured, but it matches no order of ours: find the customer and apply "
                         "or refund it by hand", now)
            return []
        invoice = self._invoice(payment.invoice_id)
        if payment.currency != invoice.currency:
            payment.flag(f"captured in {payment.currency}; the invoice is in {invoice.currency}", now)
            payment.settle(invoice_id=invoice.id, applied=0, at=now)
            return []
        applied = invoice.apply_payment(payment.id, captured, now)
        if applied < captured:
            payment.flag(f"{captured - applied} paise captured beyond what invoice "
                         f"{invoice.number or invoice.id} was owed ({invoice.status})", now)
        payment.settle(invoice_id=invoice.id, applied=applied, at=now)
        return [invoice]

    # ---- manual payments ----------------------------------------------------------------

    def record_manual(self, invoice_id: UUID, *, amount: int, method: str, reference: str,
                      actor: Actor | None) -> Written[Payment]:
        """Money received outside Razorpay. At most the amount due; the same reference twice for
        one invoice (whatever the method, case or spacing) is refused (Conflict), never counted
        twice."""
        def attempt() -> Written[Payment]:
            invoice = self._invoice(invoice_id)
            invoice.check_payable()
            if isinstance(amount, int) and amount > invoice.amount_due:
                raise Conflict(f"{amount} paise is more than the {invoice.amount_due} paise due")
            now = self._clock()
            payment = Payment.manual(invoice_id=invoice.id, organisation_id=invoice.organisation_id,
                                     currency=invoice.currency, amount=amount, method=method,
                                     reference=reference, at=now)
            try:
                self._ledger.get(payment.id, Payment)
                raise Conflict(f"a payment with reference {reference.strip()!r} is already "
                               "recorded for this invoice")
            except NotFound:
                pass
            applied = invoice.apply_payment(payment.id, amount, now)
            payment.settle(invoice_id=invoice.id, applied=applied, at=now)
            return Written(payment, self._ledger.save(payment, invoice, actor=actor))

        return with_retries(attempt)

    # ---- missed-webhook recovery ------------------------------------------------------------

    def recover(self, order_id: UUID, now: datetime | None = None) -> int:
        """If the order's next check is due (by its checks in the ledger: a lagging read model or
        a second scheduler asks nothing twice), ask the gateway for its payments and record each
        as the delivery a webhook would have been (applied by the process manager like any
        other); note the check on the order. Returns how many deliveries were new. `now`: the
        moment the caller's pass is for (default: the clock's now)."""
        gateway = self._need_gateway()
        order = self._ledger.get(order_id, PaymentOrder)
        if not order.check_due(now or self._clock()):
            return 0
        found = gateway.order_payments(order.razorpay_order_id)
        new = 0
        for entity in found:
            event = {"captured": PAYMENT_CAPTURED, "refunded": PAYMENT_CAPTURED,
                     "authorized": PAYMENT_AUTHORIZED, "failed": PAYMENT_FAILED}.get(entity.status)
            if event is None:
                continue  # created: nothing happened yet
            event_id = f"{RECOVERY}:{entity.id}:{entity.status}"
            new += self.record_delivery(event_id=event_id, body=webhook_body(event, payment=entity),
                                        source=RECOVERY).new
        order.checked(len(found), self._clock())
        with contextlib.suppress(Conflict):  # another scheduler recorded this check first
            self._ledger.save(order, actor=None)
        return new


def _entities(webhook: Webhook) -> tuple[PaymentEntity | None, RefundEntity | None]:
    try:
        return webhook.payment(), webhook.refund()
    except msgspec.ValidationError as e:
        raise ValueError(f"payload does not match {webhook.event}: {e}") from e


def _captured(event: str, entity: PaymentEntity) -> int | None:
    """The captured amount if this snapshot shows a capture (order.paid carries the payment that
    paid the order; a refunded payment was captured first)."""
    if event in (PAYMENT_CAPTURED, ORDER_PAID) or entity.captured or entity.status in (
            "captured", "refunded"):
        return entity.amount
    return None


def _failure(event: str, entity: PaymentEntity) -> str | None:
    if event == PAYMENT_FAILED or entity.status == "failed":
        return printable(entity.error_description or "") or "the payment failed"
    return None
