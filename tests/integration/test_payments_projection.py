"""Payments on the real ledger (PaymentsService, a memory gateway behind the port), projected
live by a relay and the payments and invoices projectors: rows say what the aggregates say,
whatever the repeats; the recovery schedule; and a rebuild from position 0 gives the same rows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from adapters.maintenance import rebuild
from adapters.projector import Projector
from adapters.relay import Relay
from domain.gateway_events import RefundEntity, webhook_body
from domain.invoice import Invoice
from domain.payment import (
    RECOVERY_SCHEDULE,
    Payment,
    gateway_event_ref,
    manual_payment_ref,
    order_ref,
    razorpay_payment_ref,
)
from domain.services.invoicing import InvoicingService
from domain.services.payments import APPLIED, IGNORED, PaymentsService
from infra.wiring import Runtime
from projections import invoices, payments
from projections.base import ReadModel
from tests.conftest import close_nats, reached, table_rows, wait_until
from tests.integration.test_invoice_numbering import DRAFTED_AT, FINALIZED_AT, draft, subscribed_orgs
from tests.unit.memory import Clock
from tests.unit.test_payments import MemoryGateway, payment_entity

pytestmark = pytest.mark.anyio

PIPELINE_STOP_TIMEOUT_S = 30
T0 = datetime(2026, 11, 6, 10, 0, tzinfo=UTC)  # when the orders are created
STEP = timedelta(seconds=1)  # between recorded facts, so created_at orders them
REFUNDED = 5000  # paise of pay_1 refunded
PENDING_REFUND = 700  # paise of pay_1 asked back, not refunded (yet)
CHEQUE = 10000  # paise of the manual payment
TABLES = ("payments", "payment_orders", "gateway_events", "invoices")


@contextlib.asynccontextmanager
async def projecting(rt: Runtime, models: Sequence[ReadModel]) -> AsyncIterator[None]:
    """A relay and one projector per model, running in this event loop for the block."""
    js = await rt.connect_nats("test")
    stop = asyncio.Event()
    relay = Relay(rt.ledger, rt.database_url, rt.settings.pg_schema, js, rt.streams)
    tasks = [asyncio.create_task(relay.run(stop))]
    tasks += [asyncio.create_task(Projector(m, rt.ledger, rt.projection_pool(), js, rt.streams).run(stop))
              for m in models]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), PIPELINE_STOP_TIMEOUT_S)
        await close_nats(rt)


async def caught_up(rt: Runtime) -> None:
    head = rt.ledger.head()
    await wait_until(lambda: reached(rt, payments.NAME, head) and reached(rt, invoices.NAME, head),
                     "payments and invoices caught up")


def read(rt: Runtime, query: Any, *args: Any, **kwargs: Any) -> Any:
    with rt.pool.connection() as conn:
        return query(conn, *args, **kwargs)


class Scenario:
    """Three finalized invoices and what happened to them (see `play`)."""

    def __init__(self, rt: Runtime) -> None:
        self.orgs = subscribed_orgs(rt, 3)
        drafting = InvoicingService(rt.ledger, lambda: DRAFTED_AT)
        ids = [draft(rt, drafting, org, 1000 * (i + 1))[0].aggregate.id
               for i, org in enumerate(self.orgs)]
        self.invoicing = InvoicingService(rt.ledger, lambda: FINALIZED_AT)
        for ident in ids:
            self.invoicing.finalize(ident, actor=None)
        self.paid, self.partial, self.voided = ids
        self.totals = {ident: rt.ledger.get(ident, Invoice).total for ident in ids}
        self.clock = Clock(T0)
        self.gateway = MemoryGateway()
        self.svc = PaymentsService(rt.ledger, self.clock, self.gateway, "key-secret")
        self.events: set[str] = set()

    def deliver(self, event_id: str, body: bytes) -> str:
        self.clock.now += STEP
        self.events.add(event_id)
        self.svc.record_delivery(event_id=event_id, body=body)
        return self.svc.apply_delivery(gateway_event_ref(event_id))

    def play(self) -> None:
        """paid: an order, then pay_1 authorized, captured (the same delivery twice, and again
        under another event id), partly refunded (pending, processed, processed again; a second
        refund still pending). partial: a cheque for part of it, an order for the rest, pay_2 failed on it.
        voided: an order, then the invoice voided. Plus a capture on no order of ours and a
        delivery of a type we ignore."""
        svc, total = self.svc, self.totals[self.paid]
        self.o1 = svc.create_order(self.paid, actor=None).razorpay_order_id
        self.o3 = svc.create_order(self.voided, actor=None).razorpay_order_id
        self.invoicing.void(self.voided, actor=None)
        authorized = payment_entity("pay_1", self.o1, total, "authorized")
        captured = payment_entity("pay_1", self.o1, total, "captured")
        assert self.deliver("evt_auth_1", webhook_body("payment.authorized", payment=authorized)) == APPLIED
        for event_id in ("evt_cap_1", "evt_cap_1", "evt_cap_1_again"):
            assert self.deliver(event_id, webhook_body("payment.captured", payment=captured)) == APPLIED
        for event_id, event, refund_id, amount, status in (
                ("evt_rf_1", "refund.created", "rfnd_1", REFUNDED, "pending"),
                ("evt_rf_2", "refund.processed", "rfnd_1", REFUNDED, "processed"),
                ("evt_rf_3", "refund.processed", "rfnd_1", REFUNDED, "processed"),
                ("evt_rf_4", "refund.created", "rfnd_2", PENDING_REFUND, "pending")):
            refund = RefundEntity(refund_id, "pay_1", amount, "INR", status)
            assert self.deliver(event_id, webhook_body(event, refund=refund)) == APPLIED

        self.clock.now += STEP
        svc.record_manual(self.partial, amount=CHEQUE, method="cheque", reference="CHQ 77",
                          actor=None)
        self.clock.now = T0  # the second order at the same instant as the first
        self.o2 = svc.create_order(self.partial, actor=None).razorpay_order_id
        self.clock.now = T0 + 20 * STEP
        failed = payment_entity("pay_2", self.o2, self.totals[self.partial] - CHEQUE, "failed",
                                error_description="card declined")
        self.gateway.payments[self.o2] = [failed]
        assert self.deliver("evt_fail_2", webhook_body("payment.failed", payment=failed)) == APPLIED
        stray = payment_entity("pay_x", "order_not_ours", 5000, "captured")
        assert self.deliver("evt_stray", webhook_body("payment.captured", payment=stray)) == APPLIED
        assert self.deliver("evt_other", b'{"event": "subscription.charged", "payload": {}}') == IGNORED

    def payment_ids(self) -> list[UUID]:
        manual = manual_payment_ref(self.partial, "CHQ 77")
        return [razorpay_payment_ref("pay_1"), manual, razorpay_payment_ref("pay_2"),
                razorpay_payment_ref("pay_x")]  # in the order they were first recorded


async def test_payments_project_as_the_aggregates_say_and_a_rebuild_gives_the_same_rows(
        runtime: Runtime) -> None:
    s = Scenario(runtime)
    s.play()
    pay_1, manual, pay_2, stray = s.payment_ids()
    paid_total, partial_total = s.totals[s.paid], s.totals[s.partial]

    async with projecting(runtime, (payments.READ_MODEL, invoices.READ_MODEL)):
        await caught_up(runtime)

        # every row says what its aggregate says, the status above all
        for ident in s.payment_ids():
            row, agg = read(runtime, payments.get, ident), runtime.ledger.get(ident, Payment)
            assert (row.status, row.authorized, row.captured_amount, row.failure, row.refunded,
                    row.applied, row.review, row.invoice_id, row.settled) == (
                agg.status, agg.authorized, agg.captured_amount, agg.failure, agg.refunded,
                agg.applied, agg.review, agg.invoice_id, agg.settled)
        one = read(runtime, payments.get, pay_1)
        assert (one.status, one.amount, one.captured_amount, one.refunded, one.applied) == (
            "partially_refunded", paid_total, paid_total, REFUNDED, paid_total)
        assert one.refunds == {"rfnd_1": (REFUNDED, "processed"),  # pending -> processed: once
                               "rfnd_2": (PENDING_REFUND, "pending")}
        assert (one.razorpay_order_id, one.razorpay_payment_id, one.method, one.source) == (
            s.o1, "pay_1", "upi", "razorpay")
        cheque = read(runtime, payments.get, manual)
        assert (cheque.status, cheque.source, cheque.method, cheque.reference, cheque.applied,
                cheque.organisation_id) == ("captured", "manual", "cheque", "CHQ 77", CHEQUE, s.orgs[1])
        two = read(runtime, payments.get, pay_2)
        assert (two.status, two.failure, two.applied, two.invoice_id) == (
            "failed", "card declined", 0, s.partial)
        odd = read(runtime, payments.get, stray)
        assert odd.status == "captured" and odd.invoice_id is None
        assert len(odd.review) == 1 and "no order of ours" in odd.review[0]
        assert read(runtime, payments.get, razorpay_payment_ref("pay_none")) is None

        # the queries
        assert [r.id for r in read(runtime, payments.page, 10, None)] == s.payment_ids()
        first = read(runtime, payments.page, 2, None)
        rest = read(runtime, payments.page, 10, (first[-1].created_at, first[-1].id))
        assert [r.id for r in first + rest] == s.payment_ids()
        assert [r.id for r in read(runtime, payments.page, 10, None, invoice_id=s.partial)] == [
            manual, pay_2]
        assert [r.id for r in read(runtime, payments.page, 10, None, organisation_id=s.orgs[1],
                                   status="failed")] == [pay_2]
        assert [r.id for r in read(runtime, payments.page, 10, None, review=True)] == [stray]
        assert len(read(runtime, payments.page, 10, None, review=False)) == 3
        assert read(runtime, payments.review_count) == 1

        orders = {o: read(runtime, payments.order, order_ref(o)) for o in (s.o1, s.o2, s.o3)}
        assert [(orders[o].paid, orders[o].amount) for o in (s.o1, s.o2, s.o3)] == [
            (True, paid_total), (False, partial_total - CHEQUE), (False, s.totals[s.voided])]
        assert orders[s.o2].invoice_id == s.partial and orders[s.o2].receipt

        events = table_rows(runtime, "gateway_events")
        assert len(events) == len(s.events)  # a repeated event id is one delivery
        capture = read(runtime, payments.gateway_event, gateway_event_ref("evt_cap_1"))
        assert (capture.event_type, capture.source, capture.outcome) == (
            "payment.captured", "webhook", APPLIED)
        assert read(runtime, payments.gateway_event, gateway_event_ref("evt_other")).outcome == IGNORED

        # the invoices follow their payments
        paid, partial = (read(runtime, invoices.get, i) for i in (s.paid, s.partial))
        assert (paid.status, paid.amount_due, paid.paid) == ("paid", 0, paid_total)
        assert (partial.status, partial.amount_due, partial.paid) == (
            "partially_paid", partial_total - CHEQUE, CHEQUE)
        for row in (paid, partial):
            invoice = runtime.ledger.get(row.id, Invoice)
            assert (row.status, row.amount_due, row.paid) == (
                invoice.status, invoice.amount_due, invoice.paid)
        assert read(runtime, invoices.outstanding, s.orgs[0]) == 0
        assert read(runtime, invoices.outstanding, s.orgs[1]) == partial_total - CHEQUE
        assert read(runtime, invoices.outstanding, s.orgs[2]) == 0  # void
        assert [r.id for r in read(runtime, invoices.paid_not_emailed, 10)] == [s.paid]

        # recovery: o1 is paid; o2 and o3 (its invoice void: a payment on it must still be found
        # and flagged) are due 5 minutes after they were made, then by the schedule from their
        # creation, and never after the last check
        def due_at(at: Any) -> list[tuple[str, int]]:
            return sorted((o.razorpay_order_id, o.checks)
                          for o in read(runtime, payments.orders_to_check, at, 10))

        assert due_at(T0 + RECOVERY_SCHEDULE[0] - STEP) == []
        assert due_at(T0 + RECOVERY_SCHEDULE[0]) == sorted([(s.o2, 0), (s.o3, 0)])
        s.clock.now = T0 + RECOVERY_SCHEDULE[0]
        assert s.svc.recover(order_ref(s.o2)) == 1  # pay_2 found: recorded as a recovery delivery
        assert s.svc.recover(order_ref(s.o3)) == 0
        await caught_up(runtime)
        checked = read(runtime, payments.order, order_ref(s.o2))
        assert (checked.checks, checked.last_checked_at) == (1, T0 + RECOVERY_SCHEDULE[0])
        assert due_at(T0 + RECOVERY_SCHEDULE[0]) == []
        assert due_at(T0 + RECOVERY_SCHEDULE[1] - STEP) == []
        assert due_at(T0 + RECOVERY_SCHEDULE[1]) == sorted([(s.o2, 1), (s.o3, 1)])
        for step in RECOVERY_SCHEDULE[1:]:
            s.clock.now = T0 + step
            assert s.svc.recover(order_ref(s.o2)) == 0  # the same payment: nothing new
        await caught_up(runtime)
        assert read(runtime, payments.order, order_ref(s.o2)).checks == len(RECOVERY_SCHEDULE)
        assert due_at(T0 + timedelta(days=365)) == [(s.o3, 1)]
        recovered = read(runtime, payments.gateway_event, gateway_event_ref("recovery:pay_2:failed"))
        assert (recovered.source, recovered.outcome) == ("recovery", None)  # not applied yet

    live = {table: table_rows(runtime, table) for table in TABLES}
    rebuild(runtime.pool, runtime.ledger, payments.READ_MODEL)
    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)
    assert {table: table_rows(runtime, table) for table in TABLES} == live
    assert [len(live[t]) for t in TABLES] == [4, 3, len(s.events) + 1, 3]
