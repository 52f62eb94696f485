"""The payments process manager on the real ledger: deliveries recorded by the webhook route are
applied once, by two managers racing too, and one that cannot be applied never blocks the rest."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from adapters.payment_manager import NAME, PaymentManager
from domain.gateway_events import PaymentEntity, webhook_body
from domain.invoice import Invoice
from domain.payment import GatewayEvent, Payment, gateway_event_ref, razorpay_payment_ref
from domain.services.invoicing import InvoicingService
from domain.services.payments import APPLIED, FAILED, PaymentsService
from infra.wiring import Runtime
from tests.conftest import tracked
from tests.unit.memory import Clock
from tests.unit.test_invoices import AFTER_OCTOBER, draft, org
from tests.unit.test_payments import MemoryGateway

pytestmark = pytest.mark.anyio


def finalized(rt: Runtime) -> tuple[PaymentsService, Invoice]:
    clock = Clock(AFTER_OCTOBER)
    invoicing = InvoicingService(rt.ledger, clock)
    written, _ = draft(invoicing, org())
    invoice = invoicing.finalize(written.aggregate.id, actor=None).aggregate
    return PaymentsService(rt.ledger, clock, MemoryGateway()), invoice


def captured(order_id: str, amount: int, pid: str = "pay_1") -> bytes:
    return webhook_body("payment.captured", payment=PaymentEntity(
        pid, amount, "INR", "captured", order_id, "upi", captured=True))


async def test_two_managers_apply_each_delivery_once_and_track_the_head(runtime: Runtime) -> None:
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    half = invoice.amount_due // 2
    for n, amount in enumerate((half, invoice.amount_due - half)):
        payments.record_delivery(event_id=f"evt_{n}", body=captured(order.razorpay_order_id, amount,
                                                                     f"pay_{n}"))
    payments.record_delivery(event_id="evt_0", body=b"{}")  # a repeat: not recorded again
    recorded_up_to = runtime.ledger.head()
    first = PaymentManager(runtime.ledger, runtime.pool, payments)
    second = PaymentManager(runtime.ledger, runtime.pool, payments)
    await asyncio.gather(first.step(), second.step())
    paid = runtime.ledger.get(invoice.id, Invoice)
    assert (paid.status, paid.amount_due, paid.paid) == ("paid", 0, invoice.amount_due)
    assert sorted(paid.payments.values()) == sorted((half, invoice.amount_due - half))
    for n in range(2):
        assert runtime.ledger.get(gateway_event_ref(f"evt_{n}"), GatewayEvent).outcome == APPLIED
        assert runtime.ledger.get(razorpay_payment_ref(f"pay_{n}"), Payment).settled
    assert tracked(runtime, NAME) == recorded_up_to  # the head each pass read, forward only
    applied = first.applied + second.applied
    assert not await first.step()  # only what applying appended: nothing to apply
    assert first.applied + second.applied == applied
    assert tracked(runtime, NAME) == runtime.ledger.head()


class _Broken(PaymentsService):
    """A service with a bug for one delivery: the manager must not stop at it."""

    def __init__(self, inner: PaymentsService, broken: UUID) -> None:
        self.__dict__.update(inner.__dict__)
        self._broken = broken

    def apply_delivery(self, ref: UUID, *, again: bool = False) -> str:
        if ref == self._broken:
            raise RuntimeError("a bug in applying")
        return super().apply_delivery(ref, again=again)


async def test_a_delivery_that_keeps_failing_is_recorded_as_failed_and_the_next_is_applied(
        runtime: Runtime) -> None:
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    payments.record_delivery(event_id="evt_bad", body=b'{"event": "payment.captured"}')
    payments.record_delivery(event_id="evt_good",
                             body=captured(order.razorpay_order_id, invoice.amount_due))
    manager = PaymentManager(runtime.ledger, runtime.pool,
                             _Broken(payments, gateway_event_ref("evt_bad")), retry_backoff_s=(0.01,))
    await manager.step()
    bad = runtime.ledger.get(gateway_event_ref("evt_bad"), GatewayEvent)
    assert bad.outcome == FAILED and manager.failed == 1
    assert runtime.ledger.get(invoice.id, Invoice).status == "paid"


async def test_a_manager_that_lost_its_tracking_in_a_crash_applies_nothing_twice(
        runtime: Runtime) -> None:
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    payments.record_delivery(event_id="evt_1", body=captured(order.razorpay_order_id, 1000))
    manager = PaymentManager(runtime.ledger, runtime.pool, payments)
    await manager.step()
    applied_at = runtime.ledger.head()
    with runtime.pool.connection() as conn:  # the tracking commit lost with the crash
        conn.execute("UPDATE projection_tracking SET position = 0 WHERE name = %s", (NAME,))
    restarted = PaymentManager(runtime.ledger, runtime.pool, payments)
    await restarted.step()
    assert runtime.ledger.head() == applied_at  # read again, found processed, nothing appended
    paid = runtime.ledger.get(invoice.id, Invoice)
    assert (paid.status, paid.paid) == ("partially_paid", 1000)
