"""Properties of the pricing engine over generated plans, quantities and tax facts: totals add
up, amounts are whole paise, charge models agree with independent reference computations,
usage never lowers a monotone charge, GST splits fairly, late usage prices the difference,
and validation refuses broken plans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import ROUND_FLOOR, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from domain.money import to_paise
from domain.pricing import (
    Charge,
    LateUsage,
    PlanVersion,
    Tier,
    charge_amount,
    late_usage_lines,
    period_lines,
    price,
    validate_plan,
)
from domain.tax import GST_RATE, TaxFacts, gst

D = Decimal
EXAMPLES = settings(max_examples=200, deadline=None)
METRICS = ("api_calls", "storage_gb", "sms", "seats")
SPARE_METRIC = "spare"  # a defined meter no generated plan uses, for adding broken charges
KNOWN = frozenset({*METRICS, SPARE_METRIC})

rupees = st.decimals(min_value=0, max_value=10_000, places=4)
quantities = st.decimals(min_value=0, max_value=10_000_000, places=3)
bounds = st.decimals(min_value=D("0.001"), max_value=1_000_000, places=3)
tax_facts = st.builds(
    TaxFacts,
    country=st.sampled_from(["IN", "US", "GB"]),
    state_code=st.sampled_from([None, "29", "27", "07"]),
    supplier_state_code=st.just("29"),
)


@st.composite
def tier_lists(draw: st.DrawFn, bound: st.SearchStrategy[Decimal] = bounds) -> tuple[Tier, ...]:
    ups = sorted(set(draw(st.lists(bound, max_size=4))))
    tiers = [Tier(up, draw(rupees), draw(rupees)) for up in ups]
    return (*tiers, Tier(None, draw(rupees), draw(rupees)))


def charges_for(metric: str) -> st.SearchStrategy[Charge]:
    return st.one_of(
        st.builds(Charge, st.just(metric), st.just("per_unit"), unit_price=rupees),
        st.builds(Charge, st.just(metric), st.just("graduated"), tiers=tier_lists()),
        st.builds(Charge, st.just(metric), st.just("volume"), tiers=tier_lists()),
        st.builds(
            Charge, st.just(metric), st.just("package"),
            package_size=st.decimals(min_value=D("0.5"), max_value=10_000, places=1),
            package_price=rupees,
        ),
    )


@st.composite
def plans(draw: st.DrawFn) -> PlanVersion:
    metrics = draw(st.lists(st.sampled_from(METRICS), unique=True, max_size=len(METRICS)))
    charges = tuple(draw(charges_for(metric)) for metric in metrics)
    return PlanVersion("growth", 1, "Growth", "INR", draw(rupees), draw(rupees), charges)


usage = st.dictionaries(st.sampled_from(METRICS), quantities)


@EXAMPLES
@given(plan=plans(), quantities=usage, facts=tax_facts)
def test_total_is_subtotal_plus_taxes_and_subtotal_is_sum_of_rounded_lines(
    plan: PlanVersion, quantities: dict[str, Decimal], facts: TaxFacts
) -> None:
    priced = price(plan, quantities, facts)
    assert priced.subtotal == sum(line.amount for line in priced.lines)
    assert priced.total == priced.subtotal + sum(tax.amount for tax in priced.taxes)
    for line, charge in zip([ln for ln in priced.lines if ln.metric], plan.charges, strict=True):
        assert line.amount == to_paise(charge_amount(charge, quantities.get(charge.metric, D(0))))


@EXAMPLES
@given(plan=plans(), quantities=usage, facts=tax_facts)
def test_every_invoice_amount_is_a_whole_number_of_paise(
    plan: PlanVersion, quantities: dict[str, Decimal], facts: TaxFacts
) -> None:
    priced = price(plan, quantities, facts)
    amounts = [priced.subtotal, priced.total, *(ln.amount for ln in priced.lines),
               *(tax.amount for tax in priced.taxes)]
    assert all(type(amount) is int for amount in amounts)


@EXAMPLES
@given(plan=plans(), quantities=usage, facts=tax_facts)
def test_charges_never_fall_below_the_minimum_and_base_fee_stands_apart(
    plan: PlanVersion, quantities: dict[str, Decimal], facts: TaxFacts
) -> None:
    priced = price(plan, quantities, facts)
    charged = sum(ln.amount for ln in priced.lines if ln.description != "base fee")
    assert charged == max(to_paise(plan.minimum), sum(ln.amount for ln in priced.lines if ln.metric))
    assert priced.subtotal == charged + to_paise(plan.base_fee)


def unit_by_unit_graduated(tiers: tuple[Tier, ...], units: int) -> Decimal:
    """Reference: walk units 1..q, price each by the first tier whose up_to covers it."""
    total = D(0)
    touched: set[int] = set()
    for unit in range(1, units + 1):
        index = next(i for i, t in enumerate(tiers) if t.up_to is None or unit <= t.up_to)
        total += tiers[index].unit_price
        touched.add(index)
    return total + sum((tiers[i].flat_fee for i in touched), D(0))


def clamped_graduated(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    """Reference for continuous quantities: each tier prices clamp(q, lower, upper) - lower."""
    total = D(0)
    lowers = [D(0), *(t.up_to for t in tiers[:-1] if t.up_to is not None)]
    for tier, lower in zip(tiers, lowers, strict=True):
        upper = quantity if tier.up_to is None else tier.up_to
        inside = max(D(0), min(quantity, upper) - lower)
        if inside > 0:
            total += inside * tier.unit_price + tier.flat_fee
    return total


whole_bounds = st.integers(min_value=1, max_value=400).map(D)


@EXAMPLES
@given(tiers=tier_lists(whole_bounds), units=st.integers(min_value=0, max_value=500))
def test_graduated_whole_units_equal_pricing_each_unit_in_its_tier(
    tiers: tuple[Tier, ...], units: int
) -> None:
    charge = Charge("storage_gb", "graduated", tiers=tiers)
    assert charge_amount(charge, D(units)) == unit_by_unit_graduated(tiers, units)


@EXAMPLES
@given(tiers=tier_lists(), quantity=quantities)
def test_graduated_equals_the_sum_over_tiers_computed_independently(
    tiers: tuple[Tier, ...], quantity: Decimal
) -> None:
    charge = Charge("storage_gb", "graduated", tiers=tiers)
    assert charge_amount(charge, quantity) == clamped_graduated(tiers, quantity)


@EXAMPLES
@given(unit_price=rupees, flat_fee=rupees, quantity=quantities)
def test_volume_and_graduated_agree_with_a_single_tier(
    unit_price: Decimal, flat_fee: Decimal, quantity: Decimal
) -> None:
    tiers = (Tier(None, unit_price, flat_fee),)
    graduated = charge_amount(Charge("sms", "graduated", tiers=tiers), quantity)
    assert graduated == charge_amount(Charge("sms", "volume", tiers=tiers), quantity)


@EXAMPLES
@given(tiers=tier_lists(), quantity=quantities)
def test_volume_prices_every_unit_at_the_tier_containing_the_quantity(
    tiers: tuple[Tier, ...], quantity: Decimal
) -> None:
    amount = charge_amount(Charge("sms", "volume", tiers=tiers), quantity)
    if quantity == 0:
        assert amount == 0
        return
    tier = next(t for t in tiers if t.up_to is None or quantity <= t.up_to)
    assert amount == quantity * tier.unit_price + tier.flat_fee


monotone_charges = st.sampled_from(METRICS).flatmap(charges_for).filter(lambda c: c.model != "volume")


@EXAMPLES
@given(charge=monotone_charges, quantity=quantities, more=quantities)
def test_adding_usage_never_lowers_a_per_unit_graduated_or_package_charge(
    charge: Charge, quantity: Decimal, more: Decimal
) -> None:
    before = charge_amount(charge, quantity)
    after = charge_amount(charge, quantity + more)
    assert after >= before
    assert to_paise(after) >= to_paise(before)


@EXAMPLES
@given(size=st.decimals(min_value=D("0.5"), max_value=10_000, places=1), package_price=rupees,
       quantity=quantities)
def test_package_charges_whole_packages_that_cover_the_quantity(
    size: Decimal, package_price: Decimal, quantity: Decimal
) -> None:
    amount = charge_amount(Charge("sms", "package", package_size=size, package_price=package_price), quantity)
    if package_price == 0:
        assert amount == 0
        return
    packages = amount / package_price
    assert packages == packages.to_integral_value()
    assert (packages - 1) * size < quantity <= packages * size  # the fewest packages that cover q


subtotals = st.integers(min_value=0, max_value=10**12)


@EXAMPLES
@given(subtotal=subtotals, state=st.sampled_from(["29", "27", None]))
def test_gst_is_cgst_plus_equal_sgst_within_a_paisa_of_18_percent_or_igst(
    subtotal: int, state: str | None
) -> None:
    taxes = gst(subtotal, TaxFacts("IN", state, "29"))
    exact = D(subtotal) * GST_RATE
    if state == "29":
        cgst, sgst = taxes
        assert (cgst.name, sgst.name) == ("CGST", "SGST")
        assert cgst.amount == sgst.amount
        assert abs(cgst.amount + sgst.amount - exact) <= 1
    else:
        (igst,) = taxes
        assert igst.name == "IGST"
        assert abs(igst.amount - exact) <= D("0.5")


@EXAMPLES
@given(subtotal=subtotals, country=st.sampled_from(["US", "GB", "SG", "AE"]),
       state=st.sampled_from(["29", None]))
def test_customers_outside_india_pay_no_gst(subtotal: int, country: str, state: str | None) -> None:
    assert gst(subtotal, TaxFacts(country, state, "29")) == ()


@EXAMPLES
@given(amount=st.decimals(min_value=-10**9, max_value=10**9, places=6))
def test_to_paise_is_within_half_a_paisa_and_rounds_halves_away_from_zero(amount: Decimal) -> None:
    paise = to_paise(amount)
    exact = amount * 100
    assert abs(paise - exact) <= D("0.5")
    if abs(exact - exact.to_integral_value(rounding=ROUND_FLOOR)) == D("0.5"):
        assert abs(paise) > abs(exact)


@EXAMPLES
@given(plan=plans(), billed=usage, extra=usage)
def test_late_usage_makes_the_period_cost_what_the_corrected_usage_costs(
    plan: PlanVersion, billed: dict[str, Decimal], extra: dict[str, Decimal]
) -> None:
    corrected = {m: billed.get(m, D(0)) + extra.get(m, D(0)) for m in METRICS}
    on_time = sum(line.amount for line in period_lines(plan, billed))
    late = sum(line.amount for line in late_usage_lines(LateUsage("2026-09", plan, billed, corrected)))
    assert on_time + late == sum(line.amount for line in period_lines(plan, corrected))


@EXAMPLES
@given(plan=plans())
def test_generated_plans_are_valid(plan: PlanVersion) -> None:
    validate_plan(plan, KNOWN)


Breakage = Callable[[Decimal], tuple[Charge, str]]

# Each builds a broken charge (for the spare meter) and names the field it must be refused on.
BROKEN_CHARGES: list[Breakage] = [
    lambda x: (Charge(SPARE_METRIC, "per_unit", unit_price=-x), "unit_price"),
    lambda x: (Charge(SPARE_METRIC, "package", package_size=-x, package_price=x), "package_size"),
    lambda x: (Charge(SPARE_METRIC, "package", package_size=D(0), package_price=x), "package_size"),
    lambda x: (Charge(SPARE_METRIC, "package", package_size=x, package_price=-x), "package_price"),
    lambda x: (Charge(SPARE_METRIC, "graduated", tiers=(Tier(x, D(1)),)), "tiers[0].up_to"),
    lambda x: (Charge(SPARE_METRIC, "volume", tiers=(Tier(None, D(1)), Tier(None, D(1)))), "tiers[0].up_to"),
    lambda x: (Charge(SPARE_METRIC, "graduated",
                      tiers=(Tier(x + 1, D(1)), Tier(x, D(1)), Tier(None, D(1)))), "tiers[1].up_to"),
    lambda x: (Charge(SPARE_METRIC, "volume", tiers=(Tier(x, D(1)), Tier(x, D(1)), Tier(None, D(1)))),
               "tiers[1].up_to"),
    lambda x: (Charge(SPARE_METRIC, "graduated", tiers=(Tier(None, D(1), -x),)), "tiers[0].flat_fee"),
    lambda x: (Charge("not_a_meter", "per_unit", unit_price=x), "metric"),
]


@EXAMPLES
@given(plan=plans(), breakage=st.sampled_from(BROKEN_CHARGES),
       magnitude=st.decimals(min_value=D("0.001"), max_value=1_000, places=3))
def test_validation_refuses_a_plan_with_a_broken_charge(
    plan: PlanVersion, breakage: Breakage, magnitude: Decimal
) -> None:
    charge, field = breakage(magnitude)
    broken = replace(plan, charges=(*plan.charges, charge))
    with pytest.raises(ValidationFailed) as info:
        validate_plan(broken, KNOWN)
    assert f"charges[{len(plan.charges)}].{field}" in {e.field for e in info.value.errors}


@EXAMPLES
@given(plan=plans(), magnitude=st.decimals(min_value=D("0.0001"), max_value=1_000, places=4),
       change=st.sampled_from(["base_fee", "minimum", "currency", "duplicate"]))
def test_validation_refuses_a_plan_with_a_broken_header_or_duplicate_metric(
    plan: PlanVersion, magnitude: Decimal, change: str
) -> None:
    if change == "duplicate":
        charge = Charge(SPARE_METRIC, "per_unit", unit_price=magnitude)
        broken = replace(plan, charges=(*plan.charges, charge, charge))
        field = f"charges[{len(plan.charges) + 1}].metric"
    elif change == "currency":
        broken, field = replace(plan, currency="USD"), "currency"
    elif change == "base_fee":
        broken, field = replace(plan, base_fee=-magnitude), change
    else:
        broken, field = replace(plan, minimum=-magnitude), change
    with pytest.raises(ValidationFailed) as info:
        validate_plan(broken, KNOWN)
    assert [e.field for e in info.value.errors] == [field]
