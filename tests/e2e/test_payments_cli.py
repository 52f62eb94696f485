"""`billing payments failed` and `billing payments reapply`: a delivery the process manager
recorded as failed (a bug in applying it) is listed, re-applied once the bug is fixed (the
invoice is paid), and the command says when one still fails, or names no delivery. Run in
process over the real ledger and read model (the commands' parsing and dispatch included)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from adapters.maintenance import rebuild
from adapters.payment_manager import PaymentManager
from domain.invoice import Invoice
from domain.payment import GatewayEvent, gateway_event_ref
from domain.services.payments import APPLIED, FAILED
from infra.cli import _operate, _parser, reapply
from infra.wiring import Runtime
from projections import payments as view
from tests.integration.test_payment_manager import Broken as _Buggy
from tests.integration.test_payment_manager import captured, finalized

pytestmark = pytest.mark.anyio


def billing(rt: Runtime, *argv: str) -> tuple[int, str]:
    """`billing argv...` against this runtime: its exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _operate(rt, _parser().parse_args(list(argv)))
    return code, out.getvalue()


async def test_a_failed_delivery_is_listed_and_reapplied_after_the_fix(runtime: Runtime) -> None:
    payments, invoice = finalized(runtime)
    order = payments.create_order(invoice.id, actor=None)
    payments.record_delivery(event_id="evt_paid",
                             body=captured(order.razorpay_order_id, invoice.amount_due))
    payments.record_delivery(event_id="evt_fine", body=b'{"event": "payment.dispute.won"}')
    ref = gateway_event_ref("evt_paid")
    buggy = _Buggy(payments, ref)
    await PaymentManager(runtime.ledger, runtime.pool, buggy, retry_backoff_s=()).step()
    assert runtime.ledger.get(ref, GatewayEvent).outcome == FAILED
    rebuild(runtime.pool, runtime.ledger, view.READ_MODEL)  # the read model the commands list

    code, printed = billing(runtime, "payments", "failed")
    listed = [json.loads(line) for line in printed.splitlines()]
    assert code == 0 and [(d["id"], d["event_id"], d["event_type"]) for d in listed] == [
        (str(ref), "evt_paid", "payment.captured")]
    assert "a bug in applying" in listed[0]["detail"]

    # Before the fix: still failed, said so, exit 1; nothing changed.
    still = io.StringIO()
    assert reapply(runtime, buggy, still, event_id=None) == 1
    assert "evt_paid payment.captured: still failed: RuntimeError: a bug in applying" in \
        still.getvalue()
    assert runtime.ledger.get(ref, GatewayEvent).outcome == FAILED
    # One that did not fail is left as it is; an unknown event id is exit 2.
    assert billing(runtime, "payments", "reapply", "--event-id", "evt_fine") == (
        0, "evt_fine payment.dispute.won: ignored (not failed: left as it is)\n")
    assert billing(runtime, "payments", "reapply", "--event-id", "evt_nope")[0] == 2

    # After the fix (the real service): applied, the invoice paid, nothing left failed.
    code, printed = billing(runtime, "payments", "reapply")
    assert (code, printed) == (0, "evt_paid payment.captured: applied\n"
                                  "re-applied 1 of 1 failed deliveries\n")
    assert runtime.ledger.get(ref, GatewayEvent).outcome == APPLIED
    paid = runtime.ledger.get(invoice.id, Invoice)
    assert (paid.status, paid.amount_due) == ("paid", 0)
    rebuild(runtime.pool, runtime.ledger, view.READ_MODEL)
    assert billing(runtime, "payments", "failed") == (0, "")
    assert billing(runtime, "payments", "reapply") == (0, "re-applied 0 of 0 failed deliveries\n")
