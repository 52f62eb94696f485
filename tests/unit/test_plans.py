"""Plans and subscriptions decide alone: versions, validation, next-period changes, pinning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import msgspec
import pytest

from adapters.codec import MsgspecMapper
from api.plans import JSON_SAFE_INTEGER_MAX, PublishPlan, charge_out, parse_decimal, parse_plan
from domain.errors import NotFound, Problems, ValidationFailed
from domain.organisation import Organisation, OrganisationSettings
from domain.period import parse_period, period_bounds
from domain.plan import ChargeSpec, Plan, StoredVersion, TierSpec, plan_id, to_version
from domain.pricing import price
from domain.services.base import SAVE_ATTEMPTS
from domain.services.plans import PlansService
from domain.subscription import (
    PeriodPlan,
    Subscription,
    SubscriptionEntry,
    change_effective_from,
    plan_at,
    plan_for_period,
    subscription_id,
)
from domain.tax import TaxFacts
from tests.unit.memory import Clock, MemoryLedger

IST = ZoneInfo("Asia/Kolkata")
KOLKATA = "Asia/Kolkata"
METERS = frozenset({"api_calls", "storage_gb", "seats"})
AT = datetime(2026, 9, 10, 9, 0, tzinfo=UTC)

PER_UNIT = ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0035"))
GRADUATED = ChargeSpec("storage_gb", "graduated", tiers=(
    TierSpec(Decimal(100), Decimal("2.50")),
    TierSpec(None, Decimal("1.75"), flat_fee=Decimal(10)),
))
PACKAGE = ChargeSpec("seats", "package", package_size=Decimal(5), package_price=Decimal(999))


def ist(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=IST)


def publish(code: str = "pro", at: datetime = AT, **over: Any) -> Plan:
    args: dict[str, Any] = {"name": "Pro", "currency": "INR", "base_fee": Decimal(500),
                            "minimum": Decimal(1000), "charges": (PER_UNIT, GRADUATED)} | over
    return Plan.publish(code, args["name"], args["currency"], args["base_fee"], args["minimum"],
                        args["charges"], METERS, at)


def next_version(plan: Plan, at: datetime, **over: Any) -> StoredVersion:
    args: dict[str, Any] = {"name": "Pro", "currency": "INR", "base_fee": Decimal(600),
                            "minimum": Decimal(0), "charges": (PER_UNIT,)} | over
    return plan.publish_version(args["name"], args["currency"], args["base_fee"], args["minimum"],
                                args["charges"], METERS, at)


def fields(info: pytest.ExceptionInfo[ValidationFailed]) -> set[str]:
    return {e.field for e in info.value.errors}


# ---- plans ------------------------------------------------------------------------------------

def test_versions_increment_and_each_event_carries_the_full_version() -> None:
    plan = publish()
    assert plan.id == plan_id("pro") != plan_id("basic")
    v2 = next_version(plan, AT + timedelta(days=1))
    v3 = next_version(plan, AT + timedelta(days=2), name="Pro 2027", charges=(PACKAGE,))
    assert [v.version for v in plan.versions] == [1, 2, 3] and plan.latest == v3
    assert (v2.base_fee, v2.minimum, v2.charges) == (Decimal(600), Decimal(0), (PER_UNIT,))
    events = plan.collect_events()
    assert [type(e) for e in events] == [Plan.Published, Plan.VersionPublished, Plan.VersionPublished]
    first = events[0]
    assert isinstance(first, Plan.Published)
    assert (first.code, first.version, first.name, first.currency, first.base_fee, first.minimum,
            first.charges) == ("pro", 1, "Pro", "INR", Decimal(500), Decimal(1000),
                               (PER_UNIT, GRADUATED))
    assert plan.versions[0].published_at == AT and v3.name == "Pro 2027"
    assert [plan.version_at(AT + timedelta(hours=h)).version for h in (-1, 0, 24, 36, 48)] == [
        1, 1, 2, 2, 3]


def test_events_survive_the_ledger_codec_exactly() -> None:
    plan = publish()
    next_version(plan, AT + timedelta(days=1), charges=(PACKAGE, GRADUATED))
    mapper = MsgspecMapper()
    back = [mapper.to_domain_event(mapper.to_stored_event(e)) for e in plan.collect_events()]
    rebuilt: Any = None
    for event in back:
        rebuilt = event.mutate(rebuilt)
    assert rebuilt.versions == plan.versions
    assert str(rebuilt.versions[0].charges[0].unit_price) == "0.0035"  # same digits, no float
    assert isinstance(rebuilt.versions[1].charges[1].tiers[1], TierSpec)


def test_to_version_feeds_the_pricing_engine() -> None:
    plan = publish()
    version = to_version(plan.latest)
    assert (version.code, version.version, version.base_fee) == ("pro", 1, Decimal(500))
    assert version.charges[1].tiers[1].up_to is None
    priced = price(version, {"api_calls": Decimal(100_000), "storage_gb": Decimal(150)},
                   TaxFacts("US", None, "29"))
    # base 500; api 350; storage 100 x 2.50 + 50 x 1.75 + 10 = 347.50; charges 697.50 < 1000
    assert [line.amount for line in priced.lines] == [50_000, 35_000, 34_750, 30_250]


def test_every_broken_rule_is_reported_at_once() -> None:
    bad = (
        ChargeSpec("nope", "per_unit", unit_price=Decimal(-1)),
        ChargeSpec("storage_gb", "volume",
                   tiers=(TierSpec(None, Decimal(1)), TierSpec(Decimal(5), Decimal(1)))),
        ChargeSpec("seats", "package", unit_price=Decimal(1), package_size=Decimal(0),
                   package_price=Decimal(1)),
        ChargeSpec("api_calls", "flat"),
    )
    with pytest.raises(ValidationFailed) as info:
        publish("Pro Plan", name=" ", currency="USD", base_fee=Decimal("NaN"), charges=bad)
    assert fields(info) == {
        "code", "name", "currency", "base_fee", "charges[0].metric", "charges[0].unit_price",
        "charges[1].tiers[0].up_to", "charges[1].tiers[1].up_to", "charges[2].unit_price",
        "charges[2].package_size", "charges[3].model",
    }


def test_plan_codes_are_url_safe_slugs() -> None:
    for code in ("pro", "pro-2026", "pro_v2.1"):
        assert publish(code).code == code
    for code in ("Pro", "pro plan", "pro/x", "1pro", "x" * 65):
        with pytest.raises(ValidationFailed) as info:
            publish(code)
        assert fields(info) == {"code"}


def test_a_new_version_is_validated_and_keeps_the_currency() -> None:
    plan = publish()
    plan.collect_events()
    with pytest.raises(ValidationFailed) as info:
        next_version(plan, AT, currency="USD", minimum=Decimal(-5),
                     charges=(PER_UNIT, PER_UNIT))
    assert fields(info) == {"currency", "minimum", "charges[1].metric"}
    assert [v.version for v in plan.versions] == [1] and plan.collect_events() == []


# ---- periods ----------------------------------------------------------------------------------

def test_periods_are_local_calendar_months() -> None:
    start, end = period_bounds("2026-10", KOLKATA)
    assert start == ist(2026, 10, 1) == datetime(2026, 9, 30, 18, 30, tzinfo=UTC)
    assert end == ist(2026, 11, 1)
    assert period_bounds("2026-12", KOLKATA)[1] == ist(2027, 1, 1)
    assert period_bounds("2026-10", "UTC") == (datetime(2026, 10, 1, tzinfo=UTC),
                                               datetime(2026, 11, 1, tzinfo=UTC))
    assert parse_period("2027-01") == (2027, 1)
    for bad in ("2026-13", "2026-00", "2026-1", "26-10", "2026/10", "0000-01", ""):
        with pytest.raises(ValidationFailed) as info:
            parse_period(bad)
        assert fields(info) == {"period"}


@pytest.mark.parametrize(("requested", "effective"), [
    (ist(2026, 10, 20, 15, 0), ist(2026, 11, 1)),                    # mid-period
    (ist(2026, 10, 1, 0, 0), ist(2026, 11, 1)),                      # first instant of a period
    (datetime(2026, 10, 31, 18, 29, 59, tzinfo=UTC), ist(2026, 11, 1)),  # 23:59:59 IST, 31 Oct
    (datetime(2026, 10, 31, 18, 30, tzinfo=UTC), ist(2026, 12, 1)),  # already 1 Nov in Kolkata
    (datetime(2026, 10, 31, 20, 0, tzinfo=UTC), ist(2026, 12, 1)),   # still October in UTC
    (ist(2026, 12, 31, 23, 59), ist(2027, 1, 1)),                    # across the year
])
def test_a_change_takes_effect_at_the_next_local_month(requested: datetime, effective: datetime) -> None:
    assert change_effective_from(requested, KOLKATA, ist(2026, 1, 1), None) == effective


def test_a_change_may_ask_for_a_later_period_but_never_an_earlier_one() -> None:
    now, start = ist(2026, 10, 20), ist(2026, 1, 1)
    assert change_effective_from(now, KOLKATA, start, ist(2026, 12, 1)) == ist(2026, 12, 1)
    assert change_effective_from(now, KOLKATA, start, ist(2026, 12, 15)) == ist(2027, 1, 1)
    assert change_effective_from(now, KOLKATA, start, ist(2026, 10, 1)) == ist(2026, 11, 1)
    # never before the subscription itself starts
    assert change_effective_from(now, KOLKATA, ist(2026, 12, 15), None) == ist(2026, 12, 15)


# ---- subscriptions ----------------------------------------------------------------------------

def test_first_subscription_starts_at_starts_at_and_changes_wait_for_the_next_period() -> None:
    org = uuid4()
    sub = Subscription.start(org, "basic", ist(2026, 10, 5, 12, 0), at=ist(2026, 10, 5, 12, 0))
    assert sub.id == subscription_id(org) and sub.organisation_id == org
    assert sub.history == [SubscriptionEntry("basic", ist(2026, 10, 5, 12, 0))]
    assert sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 20))
    assert sub.history[-1] == SubscriptionEntry("pro", ist(2026, 11, 1))
    assert sub.plan_code_at(ist(2026, 10, 31, 23, 59)) == "basic"
    assert sub.plan_code_at(ist(2026, 11, 1)) == "pro"
    events = sub.collect_events()
    assert [type(e) for e in events] == [Subscription.Started, Subscription.PlanChanged]
    changed = events[1]
    assert isinstance(changed, Subscription.PlanChanged)
    assert (changed.organisation_id, changed.plan_code, changed.starts_at) == (org, "pro", ist(2026, 11, 1))


def test_start_needs_an_aware_time() -> None:
    with pytest.raises(ValidationFailed) as info:
        Subscription.start(uuid4(), "pro", datetime(2026, 10, 1), at=AT)
    assert fields(info) == {"starts_at"}


def test_asking_for_what_the_schedule_already_says_records_nothing() -> None:
    sub = Subscription.start(uuid4(), "basic", ist(2026, 10, 1), at=ist(2026, 10, 1))
    sub.collect_events()
    assert not sub.change_plan("basic", KOLKATA, at=ist(2026, 10, 20))
    assert sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 20))
    assert not sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 25))
    assert len(sub.collect_events()) == 1
    # back to basic before the change took effect: recorded, and it overrides the pending one
    assert sub.change_plan("basic", KOLKATA, at=ist(2026, 10, 26))
    assert sub.plan_code_at(ist(2026, 11, 15)) == "basic"


def test_a_later_request_overrides_a_pending_change_from_its_effective_date() -> None:
    sub = Subscription.start(uuid4(), "basic", ist(2026, 10, 1), at=ist(2026, 10, 1))
    assert sub.change_plan("enterprise", KOLKATA, at=ist(2026, 10, 2), starts_at=ist(2027, 1, 1))
    assert sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 3))
    assert [plan_for_period(sub.history, p, KOLKATA) for p in ("2026-10", "2026-11", "2027-01")] == [
        PeriodPlan("basic", None, ist(2026, 10, 1)),
        PeriodPlan("pro", None, ist(2026, 11, 1)),
        PeriodPlan("pro", None, ist(2027, 1, 1)),
    ]


def test_a_change_before_a_future_start_replaces_the_first_plan() -> None:
    sub = Subscription.start(uuid4(), "basic", ist(2026, 12, 15), at=ist(2026, 10, 2))
    assert sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 3))
    assert sub.history[-1].effective_from == ist(2026, 12, 15)  # not 1 Nov: no earlier than start
    assert plan_for_period(sub.history, "2026-11", KOLKATA) is None
    period = plan_for_period(sub.history, "2026-12", KOLKATA)
    assert period is not None and period.plan_code == "pro"


# ---- plan_for_period --------------------------------------------------------------------------

VERSIONS = {"pro": [(1, ist(2026, 9, 10)), (2, ist(2026, 10, 15)), (3, ist(2026, 11, 1))],
            "basic": [(1, ist(2026, 1, 1))]}


def test_the_version_in_force_at_the_period_start_is_pinned() -> None:
    history = [SubscriptionEntry("pro", ist(2026, 9, 1))]
    pinned = {p: plan_for_period(history, p, KOLKATA, VERSIONS) for p in
              ("2026-08", "2026-09", "2026-10", "2026-11", "2026-12")}
    assert pinned["2026-08"] is None  # before the subscription
    # September began before version 1 existed: the first version prices it
    assert pinned["2026-09"] == PeriodPlan("pro", 1, ist(2026, 9, 1))
    assert pinned["2026-10"] == PeriodPlan("pro", 1, ist(2026, 10, 1))  # v2 came mid-October
    assert pinned["2026-11"] == PeriodPlan("pro", 3, ist(2026, 11, 1))  # published at the start
    assert pinned["2026-12"] == PeriodPlan("pro", 3, ist(2026, 12, 1))
    assert plan_for_period(history, "2026-10", KOLKATA) == PeriodPlan("pro", None, ist(2026, 10, 1))


def test_a_plan_change_applies_from_the_next_period_with_its_own_pinned_version() -> None:
    sub = Subscription.start(uuid4(), "basic", ist(2026, 9, 1), at=ist(2026, 9, 1))
    sub.change_plan("pro", KOLKATA, at=ist(2026, 10, 20))  # mid-October
    october = sub.plan_for_period("2026-10", KOLKATA, VERSIONS)
    november = sub.plan_for_period("2026-11", KOLKATA, VERSIONS)
    assert october == PeriodPlan("basic", 1, ist(2026, 10, 1))
    assert november == PeriodPlan("pro", 3, ist(2026, 11, 1))


def test_a_subscription_starting_mid_period_prices_that_whole_period() -> None:
    history = [SubscriptionEntry("pro", ist(2026, 10, 20, 10, 0))]
    # pinned when the subscription began: version 2 (published 15 Oct) was the plan on offer
    assert plan_for_period(history, "2026-10", KOLKATA, VERSIONS) == PeriodPlan(
        "pro", 2, ist(2026, 10, 20, 10, 0))
    assert plan_for_period(history, "2026-09", KOLKATA, VERSIONS) is None


def test_month_boundaries_are_kolkata_months_not_utc_months() -> None:
    # 31 Oct 19:00 UTC is 1 Nov 00:30 in Kolkata: a subscription starting then is a November one
    history = [SubscriptionEntry("pro", datetime(2026, 10, 31, 19, 0, tzinfo=UTC))]
    assert plan_for_period(history, "2026-10", KOLKATA) is None
    assert plan_for_period(history, "2026-11", KOLKATA) == PeriodPlan(
        "pro", None, datetime(2026, 10, 31, 19, 0, tzinfo=UTC))
    assert plan_for_period(history, "2026-10", "UTC") is not None  # in UTC it is still October
    # one second before midnight IST is still October in Kolkata
    late = [SubscriptionEntry("pro", datetime(2026, 10, 31, 18, 29, 59, tzinfo=UTC))]
    assert plan_for_period(late, "2026-10", KOLKATA) is not None
    # a version published at 00:00 IST on 1 Nov (18:30 UTC on 31 Oct) prices November
    versions = {"pro": [(1, ist(2026, 1, 1)), (2, datetime(2026, 10, 31, 18, 30, tzinfo=UTC))]}
    always = [SubscriptionEntry("pro", ist(2026, 1, 1))]
    nov = plan_for_period(always, "2026-11", KOLKATA, versions)
    oct_ = plan_for_period(always, "2026-10", KOLKATA, versions)
    assert (nov and nov.version, oct_ and oct_.version) == (2, 1)


def test_plan_at_takes_the_last_recorded_entry_in_force() -> None:
    history = [SubscriptionEntry("a", ist(2026, 1, 1)), SubscriptionEntry("b", ist(2026, 3, 1)),
               SubscriptionEntry("c", ist(2026, 2, 1))]
    assert plan_at(history, ist(2025, 12, 31)) is None
    assert [e.plan_code for e in (plan_at(history, ist(2026, m, 1)) for m in (1, 2, 3)) if e] == [
        "a", "c", "c"]


# ---- the service, on an in-memory ledger ------------------------------------------------------

def service(now: datetime = AT) -> tuple[PlansService, MemoryLedger, Clock]:
    ledger, clock = MemoryLedger(), Clock(now)
    return PlansService(ledger, clock), ledger, clock


def make_org(ledger: MemoryLedger, timezone: str = KOLKATA) -> UUID:
    org = Organisation.create(
        uuid4(), OrganisationSettings(name="Acme", billing_email="ap@acme.in", timezone=timezone), AT)
    ledger.save(org)
    return org.id


def publish_with(svc: PlansService, code: str = "pro", **over: Any) -> Any:
    args: dict[str, Any] = {"name": "Pro", "currency": "INR", "base_fee": Decimal(500),
                            "minimum": Decimal(0), "charges": (PER_UNIT,)} | over
    return svc.publish(code=code, name=args["name"], currency=args["currency"], base_fee=args["base_fee"],
                       minimum=args["minimum"], charges=args["charges"], known_meters=METERS, actor=None)


def test_service_publishes_versions_and_stamps_them_with_its_clock() -> None:
    svc, ledger, clock = service()
    first = publish_with(svc)
    clock.now = AT + timedelta(days=3)
    second = publish_with(svc, base_fee=Decimal(700))
    assert (first.position, second.position) == (1, 2)
    plan = ledger.get(plan_id("pro"), Plan)
    assert [(v.version, v.base_fee, v.published_at) for v in plan.versions] == [
        (1, Decimal(500), AT), (2, Decimal(700), AT + timedelta(days=3))]
    with pytest.raises(ValidationFailed) as info:
        publish_with(svc, charges=(ChargeSpec("unknown", "per_unit", unit_price=Decimal(1)),))
    assert fields(info) == {"charges[0].metric"}
    assert ledger.position == 2


def test_service_decides_again_after_losing_a_race() -> None:
    svc, ledger, _ = service()
    publish_with(svc)
    rival, _, _ = service()
    rival._ledger = ledger  # another replica, same ledger
    ledger.before_save = lambda: publish_with(rival, name="Rival")
    written = publish_with(svc, name="Mine")
    assert [v.name for v in written.aggregate.versions] == ["Pro", "Rival", "Mine"]
    assert SAVE_ATTEMPTS >= 2


def test_subscribe_refuses_unknown_organisations_and_plans() -> None:
    svc, ledger, _ = service()
    publish_with(svc)
    with pytest.raises(NotFound):
        svc.subscribe(uuid4(), "pro", actor=None)
    org = make_org(ledger)
    with pytest.raises(NotFound) as info:
        svc.subscribe(org, "gold", actor=None)
    assert (info.value.kind, info.value.ident) == ("plan", "gold")
    assert ledger.get(org, Organisation) and subscription_id(org) not in ledger.events


def test_subscribe_starts_now_by_default_then_changes_from_the_next_local_month() -> None:
    svc, ledger, clock = service(ist(2026, 10, 5, 11, 0))
    publish_with(svc, "basic")
    publish_with(svc, "pro")
    org = make_org(ledger)
    started = svc.subscribe(org, "basic", actor=None)
    assert started.position > 0 and started.aggregate.history == [
        SubscriptionEntry("basic", ist(2026, 10, 5, 11, 0))]
    clock.now = datetime(2026, 10, 31, 18, 45, tzinfo=UTC)  # 1 Nov 00:15 in Kolkata
    changed = svc.subscribe(org, "pro", actor=None)
    assert changed.aggregate.history[-1] == SubscriptionEntry("pro", ist(2026, 12, 1))
    again = svc.subscribe(org, "pro", actor=None)
    assert again.position == 0 and len(again.aggregate.history) == 2
    stored = ledger.get(subscription_id(org), Subscription)
    assert stored.plan_for_period("2026-11", KOLKATA) == PeriodPlan("basic", None, ist(2026, 11, 1))
    assert stored.plan_for_period("2026-12", KOLKATA) == PeriodPlan("pro", None, ist(2026, 12, 1))


def test_subscribe_uses_the_organisations_own_timezone() -> None:
    svc, ledger, _ = service(datetime(2026, 10, 31, 20, 0, tzinfo=UTC))
    publish_with(svc, "basic")
    publish_with(svc, "pro")
    org = make_org(ledger, timezone="UTC")
    svc.subscribe(org, "basic", starts_at=datetime(2026, 10, 1, tzinfo=UTC), actor=None)
    changed = svc.subscribe(org, "pro", actor=None)  # still October in UTC, already November in Kolkata
    assert changed.aggregate.history[-1].effective_from == datetime(2026, 11, 1, tzinfo=UTC)


# ---- the API's numbers (issue 14: numbers where people type numbers) --------------------------

def _body(**over: Any) -> bytes:
    plan: dict[str, Any] = {"code": "pro", "name": "Pro", "charges": [
        {"metric": "storage_gb", "model": "graduated", "tiers": [
            {"up_to": 100, "unit_price": "2.50"}, {"up_to": None, "unit_price": "1.75"}]},
        {"metric": "seats", "model": "package", "package_size": 5, "package_price": "999"}]}
    return msgspec.json.encode(plan | over)


def _parse(raw: bytes) -> tuple[Decimal, Decimal, tuple[ChargeSpec, ...]]:
    return parse_plan(msgspec.json.decode(raw, type=PublishPlan))


def test_up_to_and_package_size_accept_json_integers_exactly_like_decimal_strings() -> None:
    as_integers = _parse(_body())
    as_strings = _parse(_body(charges=[
        {"metric": "storage_gb", "model": "graduated", "tiers": [
            {"up_to": "100", "unit_price": "2.50"}, {"up_to": None, "unit_price": "1.75"}]},
        {"metric": "seats", "model": "package", "package_size": "5", "package_price": "999"}]))
    assert as_integers == as_strings
    graduated, package = as_integers[2]
    assert [t.up_to for t in graduated.tiers] == [Decimal(100), None]
    assert package.package_size == Decimal(5)


def test_prices_accept_json_integers_too() -> None:
    base_fee, minimum, _ = _parse(_body(base_fee=500, minimum=0))
    assert (base_fee, minimum) == (Decimal(500), Decimal(0))


def test_a_json_number_with_a_fraction_is_refused_naming_its_field() -> None:
    # It may have passed through a binary float on its way here: the author must quote it.
    with pytest.raises(msgspec.ValidationError, match=r"\$\.charges\[0\]\.tiers\[0\]\.unit_price"):
        _parse(_body(charges=[{"metric": "storage_gb", "model": "graduated", "tiers": [
            {"up_to": 100, "unit_price": 0.5}, {"up_to": None, "unit_price": "1"}]}]))
    with pytest.raises(msgspec.ValidationError, match=r"\$\.base_fee"):
        _parse(_body(base_fee=499.5))


def test_integers_beyond_what_every_json_client_keeps_exact_are_refused() -> None:
    with pytest.raises(ValidationFailed) as info:
        _parse(_body(base_fee=JSON_SAFE_INTEGER_MAX + 1, charges=[
            {"metric": "seats", "model": "package", "package_size": -(JSON_SAFE_INTEGER_MAX + 1),
             "package_price": "1"}]))
    assert fields(info) == {"base_fee", "charges[0].package_size"}
    assert _parse(_body(base_fee=str(JSON_SAFE_INTEGER_MAX + 1)))[0] == JSON_SAFE_INTEGER_MAX + 1


def test_decimal_strings_stay_plain_and_every_bad_one_is_reported_at_once() -> None:
    with pytest.raises(ValidationFailed) as info:
        _parse(_body(base_fee="1e3", minimum=" 1", charges=[
            {"metric": "seats", "model": "package", "package_size": "5.", "package_price": "NaN"}]))
    assert fields(info) == {"base_fee", "minimum", "charges[0].package_size",
                            "charges[0].package_price"}


def test_decimals_are_answered_in_plain_notation() -> None:
    out = charge_out(ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0000001")))
    assert out.unit_price == "0.0000001"


@pytest.mark.parametrize("text", ["12\n", "\u0661\u0662", "\uff11\uff12", "+5", " 5", "1_000", "1e3", "NaN"])
def test_a_plan_price_must_be_a_plain_decimal_in_ascii_digits(text: str) -> None:
    """Issue 20: numbers people send as strings take ASCII digits only, with no sign but '-',
    no spaces, separators or exponent (Decimal() itself accepts all of these)."""
    problems = Problems()
    parse_decimal(text, "base_fee", problems)
    assert [e.field for e in problems.errors] == ["base_fee"]
