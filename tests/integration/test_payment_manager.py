"""The payments process manager on the real ledger: deliveries recorded by the webhook route are
applied once, by two managers racing too; one that cannot be applied never blocks the rest; a
save race is retried, never recorded as failed; and no error ends the manager's run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID

import pytest

from adapters.payment_manager import NAME, PaymentManager
from domain.errors import Conflict
from domain.gateway_events import PaymentEntity, webhook_body
from domain.invoice import Invoice
from domain.payment import GatewayEvent, Payment, gateway_event_ref, razorpay_payment_ref
from domain.services.invoicing import InvoicingService
from domain.services.payments import APPLIED, FAILED, PaymentsService
from infra.wiring import Runtime
from tests.conftest import tracked, wait_until
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


class Broken(PaymentsService):
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
                             Broken(payments, gateway_event_ref("evt_bad")), retry_backoff_s=(0.01,))
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


class _Faulty(PaymentsService):
    """A service whose applying (or recording a failure) raises what `faults` says, in turn,
    before behaving; counts the calls."""

    def __init__(self, inner: PaymentsService, *, apply: list[Exception] | None = None,
                 give_up: list[Exception] | None = None) -> None:
        self.__dict__.update(inner.__dict__)
        self._apply_faults = list(apply or [])
        self._give_up_faults = list(give_up or [])
        self.apply_calls = 0
        self.give_up_calls = 0

    def apply_delivery(self, ref: UUID, *, again: bool = False) -> str:
        self.apply_calls += 1
        if self._apply_faults:
            raise self._apply_faults.pop(0)
        return super().apply_delivery(ref, again=again)

    def give_up(self, ref: UUID, error: str) -> None:
        self.give_up_calls += 1
        if self._give_up_faults:
            raise self._give_up_faults.pop(0)
        super().give_up(ref, error)


async def _run_until(manager: PaymentManager, condition: Callable[[], bool], what: str) -> None:
    """Run the manager until `condition`; fail at once if `run` ends before (it never may)."""
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop))
    try:
        await wait_until(lambda: task.done() or condition(), what)
        assert not task.done(), f"run ended: {task.exception()!r}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_an_error_escaping_a_pass_is_logged_and_the_manager_keeps_running(
        runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    payments, _ = finalized(runtime)
    payments.record_delivery(event_id="evt_doomed", body=b'{"event": "payment.captured"}')
    ref = gateway_event_ref("evt_doomed")
    # Applying always fails; recording the failure fails once with a bug of its own.
    service = _Faulty(payments, apply=[RuntimeError("apply bug")] * 10,
                      give_up=[RuntimeError("give_up bug")])
    manager = PaymentManager(runtime.ledger, runtime.pool, service, retry_backoff_s=(),
                             error_delay_s=0.05)
    with caplog.at_level(logging.ERROR, logger="billing.payments"):
        await _run_until(manager, lambda: runtime.ledger.get(ref, GatewayEvent).processed,
                         "the delivery recorded as failed on the pass after the error")
    assert runtime.ledger.get(ref, GatewayEvent).outcome == FAILED
    assert (manager.errors, service.give_up_calls) == (1, 2)
    (logged,) = [r for r in caplog.records if r.exc_info and "a pass failed" in r.getMessage()]
    assert "give_up bug" in str(logged.exc_info[1])  # type: ignore[index]


async def test_a_save_race_that_outlasts_the_services_retries_is_retried_not_recorded_as_failed(
        runtime: Runtime) -> None:
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    payments.record_delivery(event_id="evt_raced",
                             body=captured(order.razorpay_order_id, invoice.amount_due))
    ref = gateway_event_ref("evt_raced")
    # More conflicts in a row than the manager's retries of an unexpected error (one).
    service = _Faulty(payments, apply=[Conflict("already recorded in the ledger")] * 3)
    manager = PaymentManager(runtime.ledger, runtime.pool, service, retry_backoff_s=(0.01,),
                             retry_max_delay_s=0.05)
    await _run_until(manager, lambda: runtime.ledger.get(ref, GatewayEvent).processed,
                     "the delivery applied after the races")
    assert runtime.ledger.get(ref, GatewayEvent).outcome == APPLIED
    assert (manager.failed, service.give_up_calls, service.apply_calls) == (0, 0, 4)
    assert runtime.ledger.get(invoice.id, Invoice).status == "paid"
