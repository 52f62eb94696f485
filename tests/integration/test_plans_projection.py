"""Plans and subscriptions on the real ledger, replayed into the plans read model (Postgres)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import msgspec
import pytest

from adapters.maintenance import ensure_tables, rebuild
from domain.errors import NotFound
from domain.organisation import OrganisationSettings
from domain.plan import ChargeSpec, Plan, TierSpec, plan_id, to_version
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from domain.subscription import PeriodPlan, Subscription, plan_for_period, subscription_id
from infra.wiring import Runtime
from projections import plans
from tests.conftest import table_rows

IST = ZoneInfo("Asia/Kolkata")
METERS = frozenset({"api_calls", "storage_gb"})
PER_UNIT = ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0035"))
GRADUATED = ChargeSpec("storage_gb", "graduated", tiers=(
    TierSpec(Decimal("100.5"), Decimal("2.50")),
    TierSpec(None, Decimal("1.75"), flat_fee=Decimal("10.00")),
))


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def ist(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=IST)


def replay(rt: Runtime) -> None:
    ensure_tables(rt.pool, plans.READ_MODEL)
    rebuild(rt.pool, rt.ledger, plans.READ_MODEL)


def read(rt: Runtime, query: Any, *args: Any) -> Any:
    with rt.pool.connection() as conn:
        return query(conn, *args)


def new_org(rt: Runtime) -> UUID:
    svc = OrganisationService(rt.ledger, lambda: ist(2026, 9, 1), uuid4)
    return svc.create(OrganisationSettings(name="Acme", billing_email="ap@acme.in"), actor=None).aggregate.id


def test_plans_and_subscriptions_replay_into_the_read_model(runtime: Runtime) -> None:
    clock = Clock(ist(2026, 9, 10, 12, 0))
    svc = PlansService(runtime.ledger, clock)
    svc.publish(code="basic", name="Basic", currency="INR", base_fee=Decimal(0), minimum=Decimal(0),
                charges=(PER_UNIT,), known_meters=METERS, actor=None)
    v1 = svc.publish(code="pro", name="Pro", currency="INR", base_fee=Decimal("499.00"),
                     minimum=Decimal(1000), charges=(PER_UNIT, GRADUATED), known_meters=METERS, actor=None)
    clock.now = ist(2026, 10, 15, 9, 30)
    v2 = svc.publish(code="pro", name="Pro 2", currency="INR", base_fee=Decimal("599.50"), minimum=Decimal(0),
                     charges=(GRADUATED,), known_meters=METERS, actor=None)
    assert v2.position > v1.position > 0

    org, other = new_org(runtime), new_org(runtime)
    clock.now = ist(2026, 10, 20)
    svc.subscribe(org, "basic", starts_at=ist(2026, 9, 1), actor=None)
    changed = svc.subscribe(org, "pro", actor=None)  # mid-October: from 1 November
    assert changed.aggregate.history[-1].effective_from == ist(2026, 11, 1)
    svc.subscribe(other, "pro", actor=None)  # starts now, mid-October

    replay(runtime)

    latest = read(runtime, plans.plan_latest, "pro")
    assert latest is not None and (latest.version, latest.name) == (2, "Pro 2")
    assert str(latest.base_fee) == "599.50"  # numeric keeps the exact digits
    expected_json = [{
        "metric": "storage_gb", "model": "graduated", "unit_price": None,
        "tiers": [{"up_to": "100.5", "unit_price": "2.50", "flat_fee": "0"},
                  {"up_to": None, "unit_price": "1.75", "flat_fee": "10.00"}],
        "package_size": None, "package_price": None,
    }]
    assert msgspec.json.decode(msgspec.json.encode(latest.charges)) == expected_json
    with runtime.pool.connection() as conn:  # the column itself: decimals stored as strings
        row = conn.execute("SELECT charges FROM plan_versions WHERE code = 'pro' AND version = 2").fetchone()
    assert row is not None and row[0] == expected_json
    assert read(runtime, plans.plan_latest, "gold") is None

    rows = read(runtime, plans.plan_versions, "pro")
    assert [r.version for r in rows] == [1, 2]
    # the read model gives back exactly what the ledger holds
    in_ledger = runtime.ledger.get(plan_id("pro"), Plan).versions
    assert [plans.stored_version(r) for r in rows] == in_ledger
    assert to_version(plans.stored_version(rows[0])).charges[0].unit_price == Decimal("0.0035")
    one = read(runtime, plans.plan_version, "pro", 1)
    assert one is not None and one.minimum == Decimal(1000)

    history = read(runtime, plans.subscription_history, org)
    assert [(h.plan_code, h.effective_from) for h in history] == [
        ("basic", ist(2026, 9, 1)), ("pro", ist(2026, 11, 1))]
    assert read(runtime, plans.subscription_history, uuid4()) == []
    assert read(runtime, plans.subscribed_organisations) == sorted([org, other])

    versions = {code: plans.published_versions(read(runtime, plans.plan_versions, code))
                for code in ("basic", "pro")}
    entries = plans.history_entries(history)
    assert [plan_for_period(entries, p, "Asia/Kolkata", versions) for p in
            ("2026-08", "2026-10", "2026-11")] == [
        None,
        PeriodPlan("basic", 1, ist(2026, 10, 1)),
        PeriodPlan("pro", 2, ist(2026, 11, 1)),
    ]
    # the other organisation started mid-October, when version 2 was on offer
    mid = plan_for_period(plans.history_entries(read(runtime, plans.subscription_history, other)),
                          "2026-10", "Asia/Kolkata", versions)
    assert mid == PeriodPlan("pro", 2, ist(2026, 10, 20))


def test_a_rebuild_gives_the_same_rows_every_time(runtime: Runtime) -> None:
    clock = Clock(datetime(2026, 10, 1, tzinfo=UTC))
    svc = PlansService(runtime.ledger, clock)
    for i in range(3):
        clock.now += timedelta(days=1)
        svc.publish(code="pro", name=f"Pro {i}", currency="INR", base_fee=Decimal(i), minimum=Decimal(0),
                    charges=(PER_UNIT,), known_meters=METERS, actor=None)
    org = new_org(runtime)
    svc.subscribe(org, "pro", actor=None)
    replay(runtime)
    first = (table_rows(runtime, "plan_versions", "code, version"),
             table_rows(runtime, "subscriptions", "ledger_position"))
    replay(runtime)
    again = (table_rows(runtime, "plan_versions", "code, version"),
             table_rows(runtime, "subscriptions", "ledger_position"))
    assert first == again and len(first[0]) == 3 and len(first[1]) == 1


def test_subscribe_refuses_what_the_ledger_does_not_know(runtime: Runtime) -> None:
    svc = PlansService(runtime.ledger, lambda: datetime(2026, 10, 1, tzinfo=UTC))
    svc.publish(code="pro", name="Pro", currency="INR", base_fee=Decimal(0), minimum=Decimal(0), charges=(),
                known_meters=METERS, actor=None)
    with pytest.raises(NotFound):
        svc.subscribe(uuid4(), "pro", actor=None)
    org = new_org(runtime)
    with pytest.raises(NotFound):
        svc.subscribe(org, "gold", actor=None)
    with pytest.raises(NotFound):
        runtime.ledger.get(subscription_id(org), Subscription)
