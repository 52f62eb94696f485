"""Payments decide alone (memory ledger, an in-memory gateway behind the port): orders for the
amount due, deliveries applied once whatever their order, manual payments, invoice states."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import Conflict, GatewayUnavailable, PaymentsNotConfigured, ValidationFailed
from domain.gateway_events import (
    OrderEntity,
    PaymentEntity,
    RefundEntity,
    checkout_signature_matches,
    signature_matches,
    webhook_body,
)
from domain.invoice import Invoice
from domain.payment import (
    RECOVERY_SCHEDULE,
    GatewayEvent,
    Payment,
    PaymentOrder,
    gateway_event_ref,
    order_ref,
    razorpay_payment_ref,
)
from domain.services.invoicing import InvoicingService
from domain.services.payments import APPLIED, FAILED, IGNORED, UNREADABLE, PaymentsService
from tests.unit.memory import Clock, MemoryLedger
from tests.unit.test_invoices import draft, org, setup

KEY_SECRET = "key-secret"


class MemoryGateway:
    """domain.ports.PaymentGateway in memory, for deciding alone. The real SDK against a real
    HTTP server is tested in tests/integration/test_razorpay_gateway.py."""

    key_id = "rzp_test_memory"

    def __init__(self) -> None:
        self.orders: list[OrderEntity] = []
        self.payments: dict[str, list[PaymentEntity]] = {}
        self.fail_next: Exception | None = None
        self.create_then_fail = False

    def create_order(self, *, amount: int, currency: str, receipt: str,
                     notes: Mapping[str, str]) -> OrderEntity:
        if self.fail_next is not None and not self.create_then_fail:
            error, self.fail_next = self.fail_next, None
            raise error
        order = OrderEntity(f"order_{len(self.orders) + 1:014d}", amount, currency, "created",
                            receipt, 0, dict(notes))
        self.orders.append(order)
        if self.fail_next is not None:  # created, but the answer was lost
            error, self.fail_next = self.fail_next, None
            raise error
        return order

    def orders_with_receipt(self, receipt: str) -> list[OrderEntity]:
        return [o for o in self.orders if o.receipt == receipt]

    def order_payments(self, order_id: str) -> list[PaymentEntity]:
        return list(self.payments.get(order_id, []))


def finalized() -> tuple[PaymentsService, MemoryLedger, MemoryGateway, Invoice, Clock]:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org())
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    gateway = MemoryGateway()
    return PaymentsService(ledger, clock, gateway, KEY_SECRET), ledger, gateway, invoice, clock


def deliver(svc: PaymentsService, event_id: str, body: bytes) -> str:
    svc.record_delivery(event_id=event_id, body=body)
    return svc.apply_delivery(gateway_event_ref(event_id))


def payment_entity(pid: str, order_id: str | None, amount: int, status: str,
                   **kw: Any) -> PaymentEntity:
    return PaymentEntity(pid, amount, "INR", status, order_id, "upi",
                         captured=status in ("captured", "refunded"), **kw)


# ---- orders ---------------------------------------------------------------------------------

def test_an_order_is_for_the_amount_due_and_asking_again_answers_the_open_one() -> None:
    svc, ledger, gateway, invoice, _ = finalized()
    first = svc.create_order(invoice.id, actor=None)
    again = svc.create_order(invoice.id, actor=None)
    assert (first.amount, first.currency, first.key_id) == (invoice.amount_due, "INR", gateway.key_id)
    assert first.created and not again.created
    assert again.razorpay_order_id == first.razorpay_order_id
    assert len(gateway.orders) == 1
    assert gateway.orders[0].receipt == invoice.number
    assert gateway.orders[0].notes == {"invoice_id": str(invoice.id),
                                       "organisation_id": str(invoice.organisation_id)}
    assert ledger.get(invoice.id, Invoice).orders == {first.razorpay_order_id: invoice.amount_due}


def test_a_create_that_timed_out_but_happened_is_adopted_by_the_retry_not_repeated() -> None:
    svc, ledger, gateway, invoice, _ = finalized()
    gateway.fail_next, gateway.create_then_fail = GatewayUnavailable("timed out"), True
    head = ledger.position
    with pytest.raises(GatewayUnavailable):
        svc.create_order(invoice.id, actor=None)
    assert ledger.position == head  # nothing half-done in the ledger
    retry = svc.create_order(invoice.id, actor=None)
    assert len(gateway.orders) == 1
    assert retry.razorpay_order_id == gateway.orders[0].id and not retry.created


def test_a_gateway_error_records_nothing() -> None:
    svc, ledger, gateway, invoice, _ = finalized()
    gateway.fail_next = GatewayUnavailable("refused")
    head = ledger.position
    with pytest.raises(GatewayUnavailable):
        svc.create_order(invoice.id, actor=None)
    assert ledger.position == head and gateway.orders == []


def test_drafts_void_and_paid_invoices_take_no_order_and_unconfigured_payments_say_so() -> None:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org())
    svc = PaymentsService(ledger, clock, MemoryGateway())
    with pytest.raises(Conflict, match="draft"):
        svc.create_order(written.aggregate.id, actor=None)
    invoicing.void(written.aggregate.id, actor=None)
    with pytest.raises(Conflict, match="void"):
        svc.create_order(written.aggregate.id, actor=None)
    with pytest.raises(PaymentsNotConfigured):
        PaymentsService(ledger, clock, None).create_order(written.aggregate.id, actor=None)


# ---- deliveries -------------------------------------------------------------------------------

def test_a_captured_payment_pays_the_invoice_once_whatever_repeats() -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    body = webhook_body("payment.captured", payment=payment_entity(
        "pay_1", order.razorpay_order_id, invoice.amount_due, "captured"))
    assert deliver(svc, "evt_1", body) == APPLIED
    assert deliver(svc, "evt_1", body) == APPLIED  # the repeat: recorded once, applied once
    head = ledger.position
    assert not svc.record_delivery(event_id="evt_1", body=body).new
    assert ledger.position == head
    paid = ledger.get(invoice.id, Invoice)
    assert (paid.status, paid.amount_due, paid.paid) == ("paid", 0, invoice.amount_due)
    payment = ledger.get(razorpay_payment_ref("pay_1"), Payment)
    assert (payment.status, payment.invoice_id, payment.applied, payment.review) == (
        "captured", invoice.id, invoice.amount_due, ())


def test_unknown_types_and_unreadable_bodies_are_recorded_and_ignored() -> None:
    svc, ledger, _, _, _ = finalized()
    assert deliver(svc, "evt_x", b'{"event": "subscription.charged", "payload": {}}') == IGNORED
    assert deliver(svc, "evt_y", b"not json at all") == UNREADABLE
    assert deliver(svc, "evt_z", b'{"event": "payment.captured", "payload": {"payment": '
                                 b'{"entity": {"id": 5}}}}') == UNREADABLE
    assert ledger.get(gateway_event_ref("evt_y"), GatewayEvent).body == b"not json at all"


def test_a_capture_of_no_order_of_ours_is_recorded_and_flagged_never_dropped() -> None:
    svc, ledger, _, _, _ = finalized()
    deliver(svc, "evt_1", webhook_body("payment.captured", payment=payment_entity(
        "pay_x", "order_not_ours", 5000, "captured")))
    payment = ledger.get(razorpay_payment_ref("pay_x"), Payment)
    assert payment.status == "captured" and payment.invoice_id is None
    assert payment.review and "no order of ours" in payment.review[0]


def test_a_payment_beyond_the_amount_due_applies_what_was_due_and_flags_the_rest() -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    svc.record_manual(invoice.id, amount=100, method="cheque", reference="CHQ 1", actor=None)
    deliver(svc, "evt_1", webhook_body("payment.captured", payment=payment_entity(
        "pay_1", order.razorpay_order_id, invoice.amount_due, "captured")))
    payment = ledger.get(razorpay_payment_ref("pay_1"), Payment)
    assert payment.applied == invoice.amount_due - 100
    assert "100 paise captured beyond" in payment.review[0]
    assert ledger.get(invoice.id, Invoice).status == "paid"


def test_a_checkout_answer_is_checked_against_the_order_we_stored() -> None:
    svc, _, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    good = hmac.new(KEY_SECRET.encode(), f"{order.razorpay_order_id}|pay_9".encode(),
                    hashlib.sha256).hexdigest()
    forged = hmac.new(KEY_SECRET.encode(), b"order_cheaper|pay_9", hashlib.sha256).hexdigest()
    assert svc.confirm_checkout(invoice.id, payment_id="pay_9", signature=good)
    assert not svc.confirm_checkout(invoice.id, payment_id="pay_9", signature=forged)
    assert not checkout_signature_matches(stored_order_id="order_cheaper", payment_id="pay_9",
                                          signature=good, key_secret=KEY_SECRET)


def test_a_webhook_signature_is_the_hmac_of_the_raw_body_under_any_listed_secret() -> None:
    body = b'{"event":"payment.captured"}'
    old = hmac.new(b"old", body, hashlib.sha256).hexdigest()
    assert signature_matches(body, old, ["new", "old"])
    assert not signature_matches(body, old, ["new"])
    assert not signature_matches(body + b" ", old, ["new", "old"])  # tampered body
    assert not signature_matches(body, None, ["old"]) and not signature_matches(body, old, [])


# ---- manual payments ---------------------------------------------------------------------------

def test_manual_payments_move_the_invoice_to_partly_paid_then_paid_and_refuse_repeats() -> None:
    svc, ledger, _, invoice, _ = finalized()
    first = svc.record_manual(invoice.id, amount=1000, method="bank_transfer", reference="UTR 1",
                              actor=None)
    assert ledger.get(invoice.id, Invoice).status == "partially_paid"
    with pytest.raises(Conflict, match="already recorded"):
        svc.record_manual(invoice.id, amount=1000, method="bank_transfer", reference="UTR 1",
                          actor=None)
    with pytest.raises(Conflict, match="more than"):
        svc.record_manual(invoice.id, amount=invoice.amount_due, method="upi", reference="U2",
                          actor=None)
    svc.record_manual(invoice.id, amount=invoice.amount_due - 1000, method="upi", reference="U2",
                      actor=None)
    paid = ledger.get(invoice.id, Invoice)
    assert (paid.status, paid.amount_due, first.aggregate.status) == ("paid", 0, "captured")
    with pytest.raises(Conflict, match="nothing is due"):
        svc.record_manual(invoice.id, amount=1, method="other", reference="x", actor=None)


@pytest.mark.parametrize(("body", "field"), [
    ({"amount": 0, "method": "upi", "reference": "r"}, "amount"),
    ({"amount": 10, "method": "barter", "reference": "r"}, "method"),
    ({"amount": 10, "method": "upi", "reference": "x" * 41}, "reference"),
    ({"amount": 10, "method": "upi", "reference": "  "}, "reference"),
])
def test_a_bad_manual_payment_names_its_field_and_changes_nothing(body: dict[str, Any],
                                                                   field: str) -> None:
    svc, ledger, _, invoice, _ = finalized()
    head = ledger.position
    with pytest.raises(ValidationFailed) as e:
        svc.record_manual(invoice.id, actor=None, **body)
    assert [x.field for x in e.value.errors] == [field] and ledger.position == head


def test_a_paid_or_partly_paid_invoice_cannot_be_voided() -> None:
    svc, ledger, _, invoice, clock = finalized()
    svc.record_manual(invoice.id, amount=1, method="upi", reference="r", actor=None)
    partly = ledger.get(invoice.id, Invoice)
    with pytest.raises(Conflict, match="payments were applied"):
        partly.void("wrong customer", clock())


# ---- recovery ------------------------------------------------------------------------------------

class CountingGateway(MemoryGateway):
    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def order_payments(self, order_id: str) -> list[PaymentEntity]:
        self.asked += 1
        return super().order_payments(order_id)


def test_recovery_records_what_the_gateway_holds_as_the_webhook_would_have() -> None:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org())
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    gateway = CountingGateway()
    svc = PaymentsService(ledger, clock, gateway)
    order = svc.create_order(invoice.id, actor=None)
    ref = order_ref(order.razorpay_order_id)
    gateway.payments[order.razorpay_order_id] = [
        payment_entity("pay_r", order.razorpay_order_id, invoice.amount_due, "captured")]
    assert svc.recover(ref) == 0 and gateway.asked == 0  # not due before 5 minutes
    clock.now += RECOVERY_SCHEDULE[0]
    assert svc.recover(ref) == 1
    # Due again only an hour after creation, whatever asks (a lagging read model, a second
    # scheduler): the order's own count of checks in the ledger decides.
    assert svc.recover(ref) == 0 and svc.recover(ref) == 0 and gateway.asked == 1
    clock.now += RECOVERY_SCHEDULE[1]
    assert svc.recover(ref) == 0 and gateway.asked == 2  # found again: nothing new recorded
    assert ledger.get(ref, PaymentOrder).checks == 2
    assert svc.apply_delivery(gateway_event_ref("recovery:pay_r:captured")) == APPLIED
    assert ledger.get(invoice.id, Invoice).status == "paid"


def test_a_delivery_that_failed_is_applied_afresh_when_asked_again() -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    body = webhook_body("payment.captured", payment=payment_entity(
        "pay_f", order.razorpay_order_id, invoice.amount_due, "captured"))
    svc.record_delivery(event_id="evt_f", body=body)
    svc.give_up(gateway_event_ref("evt_f"), "RuntimeError: a bug, since fixed")
    assert svc.apply_delivery(gateway_event_ref("evt_f")) == FAILED  # not by itself
    assert ledger.get(invoice.id, Invoice).status == "finalized"
    assert svc.apply_delivery(gateway_event_ref("evt_f"), again=True) == APPLIED
    assert ledger.get(invoice.id, Invoice).status == "paid"
    assert svc.apply_delivery(gateway_event_ref("evt_f"), again=True) == APPLIED  # once only


def test_signed_bodies_put_only_storable_text_into_the_ledgers_fields() -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    assert deliver(svc, "evt_nul", b'{"event": "x\\u0000y", "payload": {}}') == IGNORED
    assert ledger.get(gateway_event_ref("evt_nul"), GatewayEvent).event_type == ""
    bad_id = (b'{"event": "payment.failed", "payload": {"payment": {"entity": {"id": "p\\u0000",'
              b' "amount": 1, "currency": "INR", "status": "failed"}}}}')
    assert deliver(svc, "evt_badid", bad_id) == UNREADABLE
    huge = (b'{"event": "payment.captured", "payload": {"payment": {"entity": {"id": "pay_h",'
            b' "amount": 99999999999999999999, "currency": "INR", "status": "captured"}}}}')
    assert deliver(svc, "evt_huge", huge) == UNREADABLE
    deliver(svc, "evt_desc", webhook_body("payment.failed", payment=payment_entity(
        "pay_d", order.razorpay_order_id, 100, "failed", error_description="bank\x00 said\x1b no")))
    assert ledger.get(razorpay_payment_ref("pay_d"), Payment).failure == "bank  said  no"


def test_less_than_a_rupee_due_takes_no_order_but_a_manual_payment() -> None:
    svc, _, gateway, invoice, _ = finalized()
    svc.record_manual(invoice.id, amount=invoice.amount_due - 99, method="upi", reference="u1",
                      actor=None)
    with pytest.raises(Conflict, match="manual payment"):
        svc.create_order(invoice.id, actor=None)
    assert gateway.orders == []


def test_the_same_reference_in_another_method_case_or_spacing_is_the_same_payment() -> None:
    svc, _, _, invoice, _ = finalized()
    svc.record_manual(invoice.id, amount=100, method="bank_transfer", reference="UTR 1",
                      actor=None)
    with pytest.raises(Conflict, match="already recorded"):
        svc.record_manual(invoice.id, amount=100, method="upi", reference="  utr   1 ", actor=None)


def test_a_payment_first_seen_through_its_refund_takes_its_own_amount_and_method_later() -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    due = invoice.amount_due
    snapshot = payment_entity("pay_rf", order.razorpay_order_id, due, "refunded", amount_refunded=100)
    deliver(svc, "r", webhook_body("refund.processed", refund=RefundEntity(
        "rfnd_1", "pay_rf", 100, "INR", "processed")))  # no payment entity in it
    early = ledger.get(razorpay_payment_ref("pay_rf"), Payment)
    assert (early.amount, early.method, early.described) == (0, None, False)
    deliver(svc, "c", webhook_body("payment.captured", payment=payment_entity(
        "pay_rf", order.razorpay_order_id, due, "captured")))
    deliver(svc, "r2", webhook_body("refund.processed", refund=RefundEntity(
        "rfnd_1", "pay_rf", 100, "INR", "processed"), payment=snapshot))
    late = ledger.get(razorpay_payment_ref("pay_rf"), Payment)
    assert (late.amount, late.method, late.status, late.refunded) == (due, "upi",
                                                                       "partially_refunded", 100)


# ---- any arrival order ----------------------------------------------------------------------------

Scenario = tuple[list[tuple[str, bytes]], list[str]]


@st.composite
def scenarios(draw: st.DrawFn, order_id: str, due: int) -> Scenario:
    """The deliveries of up to three payments on one order (partial payments summing to at most
    the amount due), each authorized, captured, failed then captured, or failed only, some of the
    captured ones refunded; and an arrival order with repeats."""
    count = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(1, due), min_size=count - 1, max_size=count - 1)))
    amounts = [b - a for a, b in itertools.pairwise([0, *cuts, due]) if b > a]
    deliveries: list[tuple[str, bytes]] = []
    for n, amount in enumerate(amounts):
        pid = f"pay_{n}"
        fate = draw(st.sampled_from(["captured", "authorized", "failed", "failed_then_captured"]))
        shots = [("payment.authorized", payment_entity(pid, order_id, amount, "authorized"))]
        if fate == "failed" or fate == "failed_then_captured":
            shots.append(("payment.failed", payment_entity(
                pid, order_id, amount, "failed", error_description="bank declined")))
        if fate in ("captured", "failed_then_captured"):
            captured = payment_entity(pid, order_id, amount, "captured")
            shots += [("payment.captured", captured), ("order.paid", captured)]
            refund = draw(st.sampled_from([None, "processed", "failed", "created"]))
            if refund is not None:
                part = draw(st.integers(1, amount))
                done = refund == "processed"
                snapshot = payment_entity(pid, order_id, amount, "refunded" if done else "captured",
                                          amount_refunded=part if done else 0)
                for status in ["created"] if refund == "created" else ["created", refund]:
                    entity = RefundEntity(f"rfnd_{n}", pid, part, "INR",
                                          "pending" if status == "created" else status)
                    deliveries.append((f"evt_{pid}_refund_{status}", webhook_body(
                        f"refund.{status}", refund=entity, payment=snapshot)))
        deliveries += [(f"evt_{pid}_{event}", webhook_body(event, payment=entity))
                       for event, entity in shots]
    arrival = draw(st.permutations([event_id for event_id, _ in deliveries]))
    repeats = draw(st.lists(st.sampled_from([event_id for event_id, _ in deliveries]), max_size=4))
    return deliveries, [*arrival, *repeats]


def outcome(ledger: MemoryLedger, invoice_id: UUID, payment_ids: list[str]) -> tuple[Any, ...]:
    invoice = ledger.get(invoice_id, Invoice)
    payments = []
    for pid in payment_ids:
        p = ledger.get(razorpay_payment_ref(pid), Payment)
        payments.append((p.status, p.captured_amount, p.refunded, p.invoice_id == invoice_id, p.review,
                         p.amount, p.method, p.currency, p.applied))
    return invoice.status, invoice.amount_due, invoice.paid, tuple(payments)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_outcome_is_the_same_for_every_arrival_order_and_any_repeats(data: st.DataObject) -> None:
    svc, ledger, _, invoice, _ = finalized()
    order = svc.create_order(invoice.id, actor=None)
    deliveries, arrival = data.draw(scenarios(order.razorpay_order_id, invoice.amount_due))
    bodies = dict(deliveries)
    payment_ids = sorted({msgspec.json.decode(b)["payload"]["payment"]["entity"]["id"]
                          for b in bodies.values()})
    for event_id in arrival:
        deliver(svc, event_id, bodies[event_id])
    # The same deliveries in the order they were made, once each, on a fresh copy.
    fresh, fresh_ledger, _, fresh_invoice, _ = finalized()
    fresh_order = fresh.create_order(fresh_invoice.id, actor=None)
    assert fresh_order.razorpay_order_id == order.razorpay_order_id
    for event_id, body in deliveries:
        deliver(fresh, event_id, body)
    got = outcome(ledger, invoice.id, payment_ids)
    assert got[:3] == outcome(fresh_ledger, fresh_invoice.id, payment_ids)[:3]
    assert got[3] == outcome(fresh_ledger, fresh_invoice.id, payment_ids)[3]
    captured = sum(p[1] or 0 for p in got[3])
    assert got[1] == invoice.amount_due - captured  # amount_due follows the captured payments
    assert got[0] == ("paid" if captured == invoice.amount_due
                      else "partially_paid" if captured else "finalized")
    assert all(p[4] == () for p in got[3])  # within the amount due: nothing to review


def test_a_late_authorization_or_failure_never_undoes_a_capture() -> None:
    svc, ledger, _, invoice, clock = finalized()
    order = svc.create_order(invoice.id, actor=None)
    due = invoice.amount_due
    deliver(svc, "c", webhook_body("payment.captured", payment=payment_entity(
        "p", order.razorpay_order_id, due, "captured")))
    clock.now += timedelta(minutes=1)
    deliver(svc, "a", webhook_body("payment.authorized", payment=payment_entity(
        "p", order.razorpay_order_id, due, "authorized")))
    deliver(svc, "f", webhook_body("payment.failed", payment=payment_entity(
        "p", order.razorpay_order_id, due, "failed")))
    assert ledger.get(razorpay_payment_ref("p"), Payment).status == "captured"
    assert ledger.get(invoice.id, Invoice).status == "paid"


def test_two_requests_racing_for_an_order_answer_the_one_recorded() -> None:
    """The second request starts after the first made its order at Razorpay but before it
    recorded it: it finds that order by receipt and records it; the first loses the race on the
    invoice's version and answers the recorded order. One order, one answer."""
    svc, ledger, gateway, invoice, _ = finalized()
    racing: list[Any] = []
    ledger.before_save = lambda: racing.append(svc.create_order(invoice.id, actor=None))
    loser = svc.create_order(invoice.id, actor=None)
    (winner,) = racing
    assert loser.razorpay_order_id == winner.razorpay_order_id and not loser.created
    assert len(gateway.orders) == 1
    assert list(ledger.get(invoice.id, Invoice).orders) == [winner.razorpay_order_id]


def test_a_manual_payment_racing_a_void_leaves_either_a_void_unpaid_or_a_paid_unvoided_invoice() -> None:
    svc, ledger, _, invoice, clock = finalized()
    invoicing = InvoicingService(ledger, clock)
    ledger.before_save = lambda: invoicing.void(invoice.id, "cancelled", actor=None)
    with pytest.raises(Conflict, match="void"):
        svc.record_manual(invoice.id, amount=100, method="upi", reference="r", actor=None)
    voided = ledger.get(invoice.id, Invoice)
    assert (voided.status, voided.paid) == ("void", 0)


def test_a_lost_capture_on_the_order_of_an_invoice_paid_otherwise_is_recovered_and_flagged() -> None:
    invoicing, ledger, clock = setup()
    written, _ = draft(invoicing, org())
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    gateway = MemoryGateway()
    svc = PaymentsService(ledger, clock, gateway)
    order = svc.create_order(invoice.id, actor=None)
    svc.record_manual(invoice.id, amount=invoice.amount_due, method="bank_transfer",
                      reference="UTR 9", actor=None)  # paid by transfer ...
    gateway.payments[order.razorpay_order_id] = [payment_entity(  # ... and by card, webhook lost
        "pay_twice", order.razorpay_order_id, invoice.amount_due, "captured")]
    clock.now += RECOVERY_SCHEDULE[0]
    assert svc.recover(order_ref(order.razorpay_order_id)) == 1
    svc.apply_delivery(gateway_event_ref("recovery:pay_twice:captured"))
    twice = ledger.get(razorpay_payment_ref("pay_twice"), Payment)
    assert (twice.status, twice.applied) == ("captured", 0)
    assert "beyond what invoice" in twice.review[0]
