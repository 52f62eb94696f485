"""A property of the whole pipeline: for any sequence of invoices, payments (by hand and through
Razorpay webhooks), credit notes (every settlement) and refunds (webhooks processed, failed,
repeated; retries), the organisation's balance in the read models equals the sum of the ledger's
own facts, computed here from the raw entries: finalized totals - credited - paid + returned.

On the real ledger, relay and projectors (background roles); the gateways are the memory ones
behind the ports (the real SDK against the fake Razorpay is tested in
tests/integration/test_razorpay_gateway.py and tests/e2e/test_credit_notes_http.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.utils import get_topic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.credit_note import (
    OUT_OF_BAND,
    SETTLEMENTS,
    CreditNote,
    check_section_34,
    section_34_deadline,
)
from domain.errors import Conflict, Unavailable, ValidationFailed
from domain.gateway_events import RefundEntity, webhook_body
from domain.invoice import Invoice
from domain.organisation import OrganisationSettings
from domain.payment import gateway_event_ref
from domain.services.credit_notes import CreditNotesService
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.payments import PaymentsService
from domain.services.plans import PlansService
from infra.scheduler import REFUND_REQUEST_GRACE, request_pending_refunds
from infra.wiring import Runtime
from projections import credit_notes as credit_notes_view
from projections import invoices
from tests.conftest import background_roles, reached, wait_sync
from tests.integration.test_invoice_numbering import (
    DRAFTED_AT,
    FINALIZED_AT,
    METERS,
    PER_UNIT,
    draft,
    ist,
)
from tests.unit.memory import Clock
from tests.unit.test_payments import MemoryGateway, payment_entity

T0 = datetime(2026, 11, 6, 10, 0, tzinfo=UTC)
STEP = timedelta(seconds=1)
ORGS_PER_EXAMPLE = 2
EXAMPLES = 8
WAIT_S = 20.0
PAGE = 1000
FACT_TOPICS = [get_topic(e) for e in (Invoice.Drafted, Invoice.Finalized, Invoice.PaymentApplied,
                                      CreditNote.Issued, CreditNote.RefundProcessed)]


class MemoryRefunds:
    """domain.ports.RefundGateway in memory: X-Refund-Idempotency honoured (the same key
    answers the same refund), every refund pending until a webhook says otherwise."""

    def __init__(self) -> None:
        self.by_key: dict[str, RefundEntity] = {}
        self.made: list[RefundEntity] = []
        self.status: dict[str, str] = {}

    def refund(self, *, razorpay_payment_id: str, amount: int, idempotency_key: str,
               notes: Mapping[str, str]) -> RefundEntity:
        if idempotency_key not in self.by_key:
            made = RefundEntity(f"rfnd_{len(self.made) + 1:014d}", razorpay_payment_id, amount,
                                "INR", "pending", dict(notes))
            self.by_key[idempotency_key] = made
            self.made.append(made)
            self.status[made.id] = "pending"
        return self.by_key[idempotency_key]

    def fetch_refund(self, refund_id: str) -> RefundEntity:
        known = next(r for r in self.made if r.id == refund_id)
        return RefundEntity(known.id, known.payment_id, known.amount, known.currency,
                            self.status[refund_id], known.notes)


class World:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.clock = Clock(T0)
        self.orders = MemoryGateway()
        self.refunds = MemoryRefunds()
        self.payments = PaymentsService(rt.ledger, self.clock, self.orders, "key-secret")
        self.notes = CreditNotesService(rt.ledger, self.clock, uuid4, self.refunds)
        self.drafting = InvoicingService(rt.ledger, lambda: DRAFTED_AT)
        self.finalizing = InvoicingService(rt.ledger, lambda: FINALIZED_AT)
        self.orgs = OrganisationService(rt.ledger, lambda: ist(2026, 8, 1), uuid4)
        self.plans = PlansService(rt.ledger, lambda: ist(2026, 8, 1))
        self.plans.publish(code="pro", name="Pro", currency="INR", base_fee=Decimal(499),
                           minimum=Decimal(0), charges=(PER_UNIT,), known_meters=METERS,
                           actor=None)
        self.events = 0

    def invoice(self, n: int, calls: int) -> UUID:
        org = self.orgs.create(OrganisationSettings(
            name=f"bal-{uuid4().hex[:8]}", billing_email="ap@example.in",
            state_code="29" if n % 2 else "27"), actor=None).aggregate.id
        self.plans.subscribe(org, "pro", starts_at=ist(2026, 9, 1), actor=None)
        ident: UUID = draft(self.rt, self.drafting, org, calls)[0].aggregate.id
        self.finalizing.finalize(ident, actor=None)
        return ident

    def deliver(self, body: bytes) -> None:
        self.events += 1
        self.clock.now += STEP
        event_id = f"evt_bal_{uuid4().hex[:16]}"
        self.payments.record_delivery(event_id=event_id, body=body)
        self.payments.apply_delivery(gateway_event_ref(event_id))

    def play(self, op: tuple[Any, ...], invoice_ids: list[UUID], notes: list[UUID]) -> None:
        kind, ledger = op[0], self.rt.ledger
        self.clock.now += STEP
        if kind == "pay_manual":
            invoice = ledger.get(invoice_ids[op[1]], Invoice)
            amount = max(1, invoice.amount_due * op[2] // 100)
            self.payments.record_manual(invoice.id, amount=amount, method="upi",
                                        reference=f"UPI-{uuid4().hex[:8]}", actor=None)
        elif kind == "pay_razorpay":
            invoice = ledger.get(invoice_ids[op[1]], Invoice)
            order = self.payments.create_order(invoice.id, actor=None)
            self.deliver(webhook_body("payment.captured", payment=payment_entity(
                f"pay_{uuid4().hex[:14]}", order.razorpay_order_id, order.amount, "captured")))
        elif kind == "credit":
            _, index, settlement, pct = op
            invoice = ledger.get(invoice_ids[index], Invoice)
            left = invoice.lines[0].amount - invoice.credited_lines.get(0, 0)
            written = self.notes.issue(
                invoice.id, reason="other", settlement=settlement,
                lines=[(0, max(1, left * pct // 100))] if pct % 2 else None,
                amount=None if pct % 2 else max(118, (invoice.total - invoice.credited) * pct // 100),
                reference="UTR-1" if settlement == OUT_OF_BAND else None, actor=None)
            notes.append(written.aggregate.id)
            if settlement == "refund":
                self.notes.request_refunds(written.aggregate.id)
        elif kind == "refund_webhook" and self.refunds.made:
            made = self.refunds.made[op[1] % len(self.refunds.made)]
            if self.refunds.status[made.id] != "processed":
                self.refunds.status[made.id] = op[2]
            seen = self.refunds.fetch_refund(made.id)
            self.deliver(webhook_body(f"refund.{op[2]}", refund=RefundEntity(
                seen.id, seen.payment_id, seen.amount, seen.currency, op[2], seen.notes)))
        elif kind == "retry" and notes:
            self.notes.request_refunds(notes[op[1] % len(notes)], retry=True)


def ledger_balance(rt: Runtime, after: int, invoice_ids: set[UUID]) -> int:
    """From the raw ledger entries after `after`: finalized totals - credited - paid +
    returned (out_of_band notes and processed refunds), for these invoices."""
    totals: dict[UUID, int] = {}
    finalized: set[UUID] = set()
    credited = paid = returned = 0
    position = after
    while entries := rt.ledger.read_after(position, PAGE, topics=FACT_TOPICS):
        for entry in entries:
            position = entry.id
            e = rt.ledger.decode(entry)
            if isinstance(e, Invoice.Drafted) and e.originator_id in invoice_ids:
                totals[e.originator_id] = e.total
            elif isinstance(e, Invoice.Finalized) and e.originator_id in invoice_ids:
                finalized.add(e.originator_id)
            elif isinstance(e, Invoice.PaymentApplied) and e.originator_id in invoice_ids:
                paid += e.amount
            elif isinstance(e, CreditNote.Issued) and e.invoice_id in invoice_ids:
                credited += e.total
                returned += e.total if e.settlement == OUT_OF_BAND else 0
            elif isinstance(e, CreditNote.RefundProcessed) and e.invoice_id in invoice_ids:
                returned += e.amount
    return sum(totals[i] for i in finalized) - credited - paid + returned


ORG = st.integers(0, ORGS_PER_EXAMPLE - 1)
PAYMENTS = st.one_of(st.tuples(st.just("pay_manual"), ORG, st.integers(1, 100)),
                     st.tuples(st.just("pay_razorpay"), ORG))
CREDITS = st.tuples(st.just("credit"), ORG, st.sampled_from(SETTLEMENTS), st.integers(1, 60))
REFUNDS = st.one_of(st.tuples(st.just("refund_webhook"), st.integers(0, 20),
                              st.sampled_from(["pending", "processed", "failed"])),
                    st.tuples(st.just("retry"), st.integers(0, 20)))
# Payments first, then notes, then what happens to their refunds, then more of everything: a
# flat random list would mostly credit invoices that nothing was paid on.
OPS = st.tuples(st.lists(PAYMENTS, max_size=3), st.lists(CREDITS, min_size=1, max_size=4),
                st.lists(REFUNDS, max_size=6),
                st.lists(st.one_of(PAYMENTS, CREDITS, REFUNDS), max_size=4)).map(
    lambda parts: [op for part in parts for op in part])


def test_the_balance_is_the_sum_of_ledger_facts_for_any_sequence(runtime: Runtime) -> None:
    world = World(runtime)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(calls=st.lists(st.integers(0, 50_000), min_size=ORGS_PER_EXAMPLE,
                          max_size=ORGS_PER_EXAMPLE), ops=OPS)
    def example(calls: list[int], ops: list[tuple[Any, ...]]) -> None:
        start = runtime.ledger.head()
        invoice_ids = [world.invoice(n, c) for n, c in enumerate(calls)]
        notes: list[UUID] = []
        for op in ops:
            # A refused step changes nothing (the ledger facts say so too).
            with contextlib.suppress(ValidationFailed, Conflict):
                world.play(op, invoice_ids, notes)
        head = runtime.ledger.head()
        wait_sync(lambda: reached(runtime, invoices.NAME, head), "the invoices view", WAIT_S)
        for ident in invoice_ids:
            org = runtime.ledger.get(ident, Invoice).organisation_id
            with runtime.pool.connection() as conn:
                invoiced, paid = invoices.billed_and_paid(conn, org)
                credited, refunded = invoices.credited_and_refunded(conn, org)
                outstanding = invoices.outstanding(conn, org)
            balance = invoiced - credited - paid + refunded
            assert balance == ledger_balance(runtime, start, {ident})
            invoice = runtime.ledger.get(ident, Invoice)
            assert outstanding == invoice.amount_due >= 0
            assert invoice.credited <= invoice.total

    with background_roles(runtime, {"relay", "project"}):
        example()


@pytest.mark.parametrize(("finalized", "issued", "allowed"), [
    (datetime(2026, 11, 5, 12, tzinfo=UTC), datetime(2027, 11, 30, 18, 29, tzinfo=UTC), True),
    (datetime(2026, 11, 5, 12, tzinfo=UTC), datetime(2027, 11, 30, 18, 30, tzinfo=UTC), False),
    # 1 April 00:00 IST starts the next financial year, and with it a year later deadline.
    (datetime(2027, 3, 31, 18, 30, tzinfo=UTC), datetime(2028, 11, 30, 10, tzinfo=UTC), True),
    (datetime(2027, 3, 31, 18, 29, tzinfo=UTC), datetime(2027, 12, 1, 10, tzinfo=UTC), False),
])
def test_section_34_refuses_a_note_after_30_november_following_the_financial_year(
        finalized: datetime, issued: datetime, allowed: bool) -> None:
    # 18:30 UTC on 30 November is midnight in India: the next day.
    if allowed:
        check_section_34(finalized, issued)
    else:
        with pytest.raises(ValidationFailed, match="section 34"):
            check_section_34(finalized, issued)
    assert section_34_deadline(finalized).month == 11


def test_section_34_through_the_service_changes_nothing(runtime: Runtime) -> None:
    world = World(runtime)
    ident = world.invoice(1, 100)
    late = CreditNotesService(runtime.ledger, lambda: datetime(2027, 12, 1, tzinfo=UTC), uuid4,
                              world.refunds)
    head = runtime.ledger.head()
    with pytest.raises(ValidationFailed, match="until 2027-11-30"):
        late.issue(ident, reason="other", settlement="reduce_due", amount=1_180, actor=None)
    assert runtime.ledger.head() == head


def test_a_refund_never_asked_for_is_asked_by_the_scheduler_once(runtime: Runtime) -> None:
    world = World(runtime)
    ident = world.invoice(1, 100)
    world.play(("pay_razorpay", 0), [ident], [])
    # Issued, then the process stopped before asking Razorpay: the note waits, pending.
    note = world.notes.issue(ident, reason="other", settlement="refund", amount=1_180,
                             actor=None).aggregate
    issued_later = note.created_on + REFUND_REQUEST_GRACE + STEP
    with background_roles(runtime, {"relay", "project"}):
        wait_sync(lambda: reached(runtime, credit_notes_view.NAME, runtime.ledger.head()),
                  "the credit notes view", WAIT_S)
        assert request_pending_refunds(runtime, note.created_on, world.notes) == 0  # too young
        assert request_pending_refunds(runtime, issued_later, world.notes) == 1
        assert [r.amount for r in world.refunds.made] == [1_180]
        wait_sync(lambda: reached(runtime, credit_notes_view.NAME, runtime.ledger.head()),
                  "the credit notes view", WAIT_S)
        assert request_pending_refunds(runtime, issued_later, world.notes) == 0
    assert runtime.ledger.get(note.id, CreditNote).status == "refund_pending"


class DownRefunds(MemoryRefunds):
    """Razorpay unreachable: every refund request fails (no refund is made)."""

    def refund(self, *, razorpay_payment_id: str, amount: int, idempotency_key: str,
               notes: Mapping[str, str]) -> RefundEntity:
        raise Unavailable("razorpay is unreachable", retry_after_s=1)


def test_a_share_never_asked_for_is_asked_by_the_scheduler_even_when_another_failed(
        runtime: Runtime) -> None:
    """Crash point: a refund note over two captured payments; asking for the first share failed
    (recorded: the note is refund_failed), then the process stopped before asking for the
    second. The scheduler still asks for the second; the failed one waits for a person."""
    world = World(runtime)
    ident = world.invoice(1, 100)
    total = runtime.ledger.get(ident, Invoice).amount_due
    for part in (total // 2, total - total // 2):  # two captured payments
        order = world.payments.create_order(ident, actor=None)
        world.deliver(webhook_body("payment.captured", payment=payment_entity(
            f"pay_{uuid4().hex[:14]}", order.razorpay_order_id, part, "captured")))
    note = world.notes.issue(ident, reason="other", settlement="refund",
                             lines=[(0, runtime.ledger.get(ident, Invoice).lines[0].amount)],
                             actor=None).aggregate
    assert len(note.refunds) == 2, note.refunds
    down = CreditNotesService(runtime.ledger, world.clock, uuid4, DownRefunds())
    down._request_one(note.id, 0, 0, None)  # the first share's request fails; then the crash
    assert runtime.ledger.get(note.id, CreditNote).status == "refund_failed"
    issued_later = note.created_on + REFUND_REQUEST_GRACE + STEP
    with background_roles(runtime, {"relay", "project"}):
        wait_sync(lambda: reached(runtime, credit_notes_view.NAME, runtime.ledger.head()),
                  "the credit notes view", WAIT_S)
        assert request_pending_refunds(runtime, issued_later, world.notes) == 1
    assert [(r.payment_id, r.amount) for r in world.refunds.made] == [
        (note.refunds[1].razorpay_payment_id, note.refunds[1].amount)]
