"""Moving a subscription's start earlier (issue 21): allowed while the periods it re-prices have
no invoice but void ones, a 422 naming them otherwise, never silently ignored."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from uuid import UUID

import pytest

from domain.errors import ValidationFailed
from domain.invoice import Invoice
from domain.organisation import Organisation
from domain.plan import to_version
from domain.pricing import price
from domain.services.plans import PlansService
from domain.subscription import (
    START_MOVE_MAX_PERIODS,
    Subscription,
    SubscriptionEntry,
    periods_changed_by_start_move,
    subscription_id,
)
from domain.tax import TaxFacts
from tests.unit.memory import MemoryLedger
from tests.unit.test_invoices import plan as stored_plan
from tests.unit.test_plans import KOLKATA, ist, make_org, publish_with, service


def _subscribed(now: datetime) -> tuple[PlansService, MemoryLedger, UUID, Subscription]:
    svc, ledger, _clock = service(now)
    org = make_org(ledger)
    publish_with(svc, "std")
    svc.subscribe(org, "std", None, actor=None)  # starts now
    return svc, ledger, org, ledger.get(subscription_id(org), Subscription)


def test_the_periods_a_move_re_prices_are_those_it_uncovers_and_a_moved_pin() -> None:
    history = [SubscriptionEntry("std", ist(2026, 12, 6, 10))]
    # Nov is uncovered; Dec was priced from Dec 6 and now from Dec 1: same version, unchanged.
    assert periods_changed_by_start_move(history, ist(2026, 11, 1), KOLKATA) == ["2026-11"]
    # A version published on Dec 3: Dec's pin moves from v2 (Dec 6) to v1 (Dec 1).
    versions = {"std": [(1, ist(2026, 1, 1)), (2, ist(2026, 12, 3))]}
    assert periods_changed_by_start_move(history, ist(2026, 10, 15), KOLKATA, versions) == [
        "2026-10", "2026-11", "2026-12"]
    with pytest.raises(ValidationFailed, match="at most"):
        periods_changed_by_start_move(history, ist(2026 - START_MOVE_MAX_PERIODS // 12 - 1, 1, 1),
                                      KOLKATA)


def test_a_back_dated_correction_moves_the_first_entry_and_is_recorded() -> None:
    svc, ledger, org, _before = _subscribed(ist(2026, 12, 6, 10))
    written = svc.subscribe(org, "std", ist(2026, 11, 1), actor=None)
    assert written.position > 0
    sub = ledger.get(subscription_id(org), Subscription)
    assert sub.history == [SubscriptionEntry("std", ist(2026, 11, 1))]
    assert sub.plan_for_period("2026-11", KOLKATA) is not None
    assert isinstance(ledger.events[sub.id][-1], Subscription.StartMoved)
    # The same start again, or a later one, is no move: nothing is recorded for it.
    again = svc.subscribe(org, "std", ist(2026, 11, 1), actor=None)
    assert again.position == 0


def test_a_move_needs_the_first_plan() -> None:
    svc, _ledger, org, _ = _subscribed(ist(2026, 12, 6, 10))
    publish_with(svc, "pro")
    with pytest.raises(ValidationFailed) as info:
        svc.subscribe(org, "pro", ist(2026, 11, 1), actor=None)
    assert [e.field for e in info.value.errors] == ["plan_code"]
    assert "'std'" in info.value.errors[0].message


def _invoice(ledger: MemoryLedger, org_id: UUID, period: str) -> Invoice:
    customer = ledger.get(org_id, Organisation)
    tax = TaxFacts("IN", "29", "29")
    priced = price(to_version(stored_plan("std")), {"api_calls": Decimal(10)}, tax)
    invoice = Invoice.draft(
        organisation_id=customer.id, period=period, revision=0, priced=priced,
        plan_code="std", plan_version=1, quantities={}, usage_position=1, tax=tax, late=(),
        at=ist(2026, 12, 2), gstin="", plan_name="Std")
    ledger.save(invoice)
    return invoice


def test_an_invoice_of_a_re_priced_period_refuses_the_move_and_a_void_one_does_not() -> None:
    svc, ledger, org, _ = _subscribed(ist(2026, 12, 6, 10))
    # A stray invoice for October (drafted by hand): the move to Oct 1 re-prices it.
    october = _invoice(ledger, org, "2026-10")
    with pytest.raises(ValidationFailed) as info:
        svc.subscribe(org, "std", ist(2026, 10, 1), actor=None)
    assert [e.field for e in info.value.errors] == ["starts_at"]
    assert "2026-10 (draft)" in info.value.errors[0].message
    assert ledger.get(subscription_id(org), Subscription).starts_at == ist(2026, 12, 6, 10)
    october.void("wrong", ist(2026, 12, 6, 11))
    ledger.save(october)
    svc.subscribe(org, "std", ist(2026, 10, 1), actor=None)
    assert ledger.get(subscription_id(org), Subscription).starts_at == ist(2026, 10, 1)
