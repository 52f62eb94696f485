"""Hand-computed pricing cases: every charge model at its tier and package edges, half-up
rounding of fractional paise, base fee, minimum top-up, late usage, and GST placement.

Every expected figure was worked out by hand in the comment beside it (rupees unless marked
"p" for paise); none is produced by the code under test.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from domain.errors import ValidationFailed
from domain.pricing import Charge, LateUsage, PlanVersion, Tier, charge_amount, price, validate_plan
from domain.tax import TaxFacts

D = Decimal

# Graduated/volume tiers used throughout: 1..100 at ₹1, 101..1000 at ₹0.50 (+ ₹10 once),
# above 1000 at ₹0.25.
TIERS = (
    Tier(D("100"), D("1.00")),
    Tier(D("1000"), D("0.50"), D("10")),
    Tier(None, D("0.25")),
)
GRADUATED = Charge("storage_gb", "graduated", tiers=TIERS)
VOLUME = Charge("storage_gb", "volume", tiers=TIERS)
PACKAGE = Charge("sms", "package", package_size=D("1000"), package_price=D("5"))
API_CALLS = Charge("api_calls", "per_unit", unit_price=D("0.0035"))


def per_unit(price_rupees: str) -> Charge:
    return Charge("api_calls", "per_unit", unit_price=D(price_rupees))


# (case id, charge, quantity, exact rupees, rounded paise)
CHARGE_CASES: list[tuple[str, Charge, str, str, int]] = [
    # per_unit, fractional-paisa prices and the half-up rule
    ("per_unit 0.0035 x 1000", API_CALLS, "1000", "3.5", 350),  # 3.5000 -> 350p
    ("per_unit 0.0035 x 1 rounds 0.35p down", API_CALLS, "1", "0.0035", 0),  # 0.35p -> 0
    ("per_unit 0.0035 x 2 rounds 0.70p up", API_CALLS, "2", "0.0070", 1),  # 0.70p -> 1
    ("per_unit 0.0035 x 3 rounds 1.05p down", API_CALLS, "3", "0.0105", 1),  # 1.05p -> 1
    ("per_unit exactly half a paisa rounds up", per_unit("0.005"), "1", "0.005", 1),  # 0.5p -> 1
    ("per_unit 12.5p rounds up not to even", per_unit("0.125"), "1", "0.125", 13),  # banker's: 12
    ("per_unit 234.5p rounds up not to even", per_unit("2.345"), "1", "2.345", 235),  # banker's: 234
    ("per_unit 0.45p rounds down", per_unit("0.0015"), "3", "0.0045", 0),  # 3 x 0.0015 = 0.45p -> 0
    ("per_unit zero usage", API_CALLS, "0", "0", 0),
    ("per_unit fractional quantity", per_unit("2.50"), "1.5", "3.75", 375),  # 1.5 x 2.50 = 3.75
    # graduated: each unit in its own tier, flat fee once per touched tier
    ("graduated zero usage", GRADUATED, "0", "0", 0),
    ("graduated first unit", GRADUATED, "1", "1.00", 100),  # 1 x 1.00
    ("graduated exactly at first up_to", GRADUATED, "100", "100", 10000),  # 100 x 1.00
    ("graduated first unit past up_to", GRADUATED, "101", "110.50", 11050),  # 100 + 1x0.50 + 10
    ("graduated exactly at second up_to", GRADUATED, "1000", "560", 56000),  # 100 + 900x0.50 + 10
    ("graduated into the open tier", GRADUATED, "1001", "560.25", 56025),  # 560 + 1x0.25
    ("graduated fraction straddles a bound", GRADUATED, "100.5", "110.25", 11025),  # 100 + .5x.5 + 10
    ("graduated fraction inside first tier", GRADUATED, "0.5", "0.50", 50),  # 0.5 x 1.00
    (
        "graduated fractional-paisa tiers",
        Charge("api_calls", "graduated", tiers=(Tier(D("1000"), D("0.0035")), Tier(None, D("0.002")))),
        "1501",
        "4.502",  # 1000 x 0.0035 = 3.5; 501 x 0.002 = 1.002; 4.502 = 450.2p
        450,
    ),
    (
        "graduated first-tier flat fee needs a unit",
        Charge("seats", "graduated", tiers=(Tier(D("10"), D("0"), D("99")), Tier(None, D("2")))),
        "0",
        "0",  # no unit falls in tier 1, so no flat fee
        0,
    ),
    (
        "graduated first-tier flat fee for one unit",
        Charge("seats", "graduated", tiers=(Tier(D("10"), D("0"), D("99")), Tier(None, D("2")))),
        "1",
        "99",  # 1 x 0 + 99
        9900,
    ),
    # volume: one tier prices every unit
    ("volume zero usage costs nothing", VOLUME, "0", "0", 0),
    ("volume first unit", VOLUME, "1", "1.00", 100),  # 1 x 1.00
    ("volume exactly at first up_to", VOLUME, "100", "100", 10000),  # 100 x 1.00
    ("volume first unit past up_to", VOLUME, "101", "60.50", 6050),  # 101 x 0.50 + 10
    ("volume exactly at second up_to", VOLUME, "1000", "510", 51000),  # 1000 x 0.50 + 10
    ("volume into the open tier", VOLUME, "1001", "250.25", 25025),  # 1001 x 0.25
    ("volume fraction past a bound", VOLUME, "100.5", "60.25", 6025),  # 100.5 x 0.50 + 10
    # package: a started package is a whole package
    ("package zero usage costs nothing", PACKAGE, "0", "0", 0),
    ("package one unit buys one package", PACKAGE, "1", "5", 500),  # ceil(1/1000) = 1
    ("package exactly one package", PACKAGE, "1000", "5", 500),  # ceil(1000/1000) = 1
    ("package one past a package", PACKAGE, "1001", "10", 1000),  # ceil(1001/1000) = 2
    ("package exactly two packages", PACKAGE, "2000", "10", 1000),  # ceil(2000/1000) = 2
    ("package fractional usage", PACKAGE, "0.5", "5", 500),  # ceil(0.0005) = 1
    (
        "package fractional size at a boundary",
        Charge("gb", "package", package_size=D("2.5"), package_price=D("1.25")),
        "5",
        "2.50",  # ceil(5/2.5) = 2; 2 x 1.25
        250,
    ),
    (
        "package fractional size just past a boundary",
        Charge("gb", "package", package_size=D("2.5"), package_price=D("1.25")),
        "5.01",
        "3.75",  # ceil(2.004) = 3; 3 x 1.25
        375,
    ),
    (
        "package half-paisa price rounds up",
        Charge("sms", "package", package_size=D("100"), package_price=D("0.005")),
        "100",
        "0.005",  # 1 package x 0.005 = 0.5p -> 1
        1,
    ),
]


@pytest.mark.parametrize(
    ("charge", "quantity", "rupees", "paise"),
    [case[1:] for case in CHARGE_CASES],
    ids=[case[0] for case in CHARGE_CASES],
)
def test_charge_costs_the_hand_computed_amount(
    charge: Charge, quantity: str, rupees: str, paise: int
) -> None:
    amount = charge_amount(charge, D(quantity))
    assert amount == D(rupees)
    plan = PlanVersion("p", 1, "P", "INR", charges=(charge,))
    priced = price(plan, {charge.metric: D(quantity)}, EXPORT)
    assert [line.amount for line in priced.lines] == [paise]


INTRA = TaxFacts("IN", "29", "29")  # Karnataka customer, Karnataka supplier
INTER = TaxFacts("IN", "27", "29")  # Maharashtra customer
NO_STATE = TaxFacts("IN", None, "29")  # Indian customer, state unknown
EXPORT = TaxFacts("US", None, "29")


def plan(base: str = "0", minimum: str = "0", *charges: Charge) -> PlanVersion:
    return PlanVersion("growth", 1, "Growth", "INR", D(base), D(minimum), charges)


MIXED = plan(
    "0",
    "0",
    API_CALLS,
    GRADUATED,
    Charge("seats", "package", package_size=D("10"), package_price=D("100")),
)
MIXED_USAGE = {"api_calls": D("12345"), "storage_gb": D("101"), "seats": D("11")}
PER_RUPEE = Charge("api_calls", "per_unit", unit_price=D("1.00"))

Lines = list[tuple[str, int]]
Taxes = list[tuple[str, int]]
# (case id, plan, quantities, tax facts, late usage, [(description, paise)], subtotal, [(tax, paise)], total)
INVOICE_CASES: list[
    tuple[str, PlanVersion, dict[str, Decimal], TaxFacts, list[LateUsage], Lines, int, Taxes, int]
] = [
    (
        "base fee only, same state: CGST and SGST",
        plan("999"), {}, INTRA, [],
        [("base fee", 99900)], 99900,
        [("CGST", 8991), ("SGST", 8991)],  # 99900 x 0.09 = 8991 exactly
        117882,  # 99900 + 2 x 8991
    ),
    (
        "base fee only, other state: IGST",
        plan("999"), {}, INTER, [],
        [("base fee", 99900)], 99900,
        [("IGST", 17982)],  # 99900 x 0.18
        117882,
    ),
    (
        "base fee only, Indian customer without state: IGST",
        plan("999"), {}, NO_STATE, [],
        [("base fee", 99900)], 99900, [("IGST", 17982)], 117882,
    ),
    (
        "base fee only, export: no GST",
        plan("999"), {}, EXPORT, [],
        [("base fee", 99900)], 99900, [], 99900,
    ),
    (
        "minimum tops up charges, base fee not counted",
        plan("500", "1000", API_CALLS), {"api_calls": D("100000")}, INTER, [],
        # 100000 x 0.0035 = 350 -> 35000p; top-up 100000 - 35000 = 65000
        [("base fee", 50000), ("api_calls", 35000), ("minimum commitment", 65000)],
        150000,
        [("IGST", 27000)],  # 150000 x 0.18
        177000,
    ),
    (
        "minimum already met: no top-up line",
        plan("500", "300", API_CALLS), {"api_calls": D("100000")}, INTRA, [],
        [("base fee", 50000), ("api_calls", 35000)], 85000,
        [("CGST", 7650), ("SGST", 7650)],  # 85000 x 0.09 = 7650
        100300,
    ),
    (
        "minimum met exactly: no top-up line",
        plan("500", "350", API_CALLS), {"api_calls": D("100000")}, EXPORT, [],
        [("base fee", 50000), ("api_calls", 35000)], 85000, [], 85000,
    ),
    (
        "zero usage with a minimum bills the minimum",
        plan("0", "1000", API_CALLS), {"api_calls": D("0")}, EXPORT, [],
        [("api_calls", 0), ("minimum commitment", 100000)], 100000, [], 100000,
    ),
    (
        "zero usage, no base fee, no minimum: zero line, zero taxes",
        plan("0", "0", API_CALLS), {}, INTRA, [],
        [("api_calls", 0)], 0, [("CGST", 0), ("SGST", 0)], 0,
    ),
    (
        "CGST and SGST each round half a paisa up",
        plan("0.50"), {}, INTRA, [],
        [("base fee", 50)], 50,
        [("CGST", 5), ("SGST", 5)],  # 50 x 0.09 = 4.5 -> 5, twice
        60,
    ),
    (
        "IGST on the same subtotal is not doubled rounding",
        plan("0.50"), {}, INTER, [],
        [("base fee", 50)], 50, [("IGST", 9)], 59,  # 50 x 0.18 = 9
    ),
    (
        "CGST and SGST half-up at 13.5 paise",
        plan("1.50"), {}, INTRA, [],
        [("base fee", 150)], 150,
        [("CGST", 14), ("SGST", 14)],  # 150 x 0.09 = 13.5 -> 14
        178,
    ),
    (
        "mixed plan, same state",
        MIXED, MIXED_USAGE, INTRA, [],
        # 12345 x 0.0035 = 43.2075 = 4320.75p -> 4321; graduated 101 = 110.50;
        # seats ceil(11/10) = 2 x 100 = 200
        [("api_calls", 4321), ("storage_gb", 11050), ("seats", 20000)],
        35371,  # 4321 + 11050 + 20000
        [("CGST", 3183), ("SGST", 3183)],  # 35371 x 0.09 = 3183.39 -> 3183
        41737,  # 35371 + 6366
    ),
    (
        "mixed plan, other state",
        MIXED, MIXED_USAGE, INTER, [],
        [("api_calls", 4321), ("storage_gb", 11050), ("seats", 20000)],
        35371,
        [("IGST", 6367)],  # 35371 x 0.18 = 6366.78 -> 6367
        41738,
    ),
    (
        "subtotal is the sum of rounded lines",
        plan("0", "0", per_unit("0.005"), Charge("sms", "per_unit", unit_price=D("0.005"))),
        {"api_calls": D("1"), "sms": D("1")}, EXPORT, [],
        # each 0.5p -> 1; the unrounded sum (1.0p) would have given 1
        [("api_calls", 1), ("sms", 1)], 2, [], 2,
    ),
    (
        "usage of a metric the plan does not charge is free",
        plan("999"), {"ghost": D("999")}, EXPORT, [],
        [("base fee", 99900)], 99900, [], 99900,
    ),
    (
        "late usage is billed as the difference it makes to its period",
        plan("0", "0", PER_RUPEE), {"api_calls": D("10")}, EXPORT,
        [LateUsage("2026-09", plan("0", "0", PER_RUPEE), {"api_calls": D("100")}, {"api_calls": D("150")})],
        # this period 10 x 1 = 1000p; late 150 - 100 = 50 units = 5000p
        [("api_calls", 1000), ("late usage for 2026-09", 5000)], 6000, [], 6000,
    ),
    (
        "late usage the minimum already paid for is not billed twice",
        plan("0", "200", PER_RUPEE), {"api_calls": D("300")}, EXPORT,
        [LateUsage("2026-09", plan("0", "200", PER_RUPEE), {"api_calls": D("100")}, {"api_calls": D("150")})],
        # this period 300 -> 30000p, minimum 20000 met. September billed 10000 + top-up 10000;
        # corrected: 15000 + top-up 5000 -> +5000 usage, -5000 top-up
        [
            ("api_calls", 30000),
            ("late usage for 2026-09", 5000),
            ("late usage for 2026-09: minimum commitment adjustment", -5000),
        ],
        30000, [], 30000,
    ),
    (
        "late usage lands in the tier it would have fallen in",
        plan("0", "0", GRADUATED), {}, INTER,
        [LateUsage("2026-09", plan("0", "0", GRADUATED), {"storage_gb": D("90")}, {"storage_gb": D("110")})],
        # billed 90 x 1 = 90; corrected 100 + 10 x 0.5 + 10 = 115; difference 25 -> 2500p
        # (20 units priced alone from the first tier would have been 2000p)
        [("storage_gb", 0), ("late usage for 2026-09", 2500)], 2500,
        [("IGST", 450)],  # 2500 x 0.18
        2950,
    ),
]


@pytest.mark.parametrize(
    ("plan_version", "quantities", "facts", "late", "lines", "subtotal", "taxes", "total"),
    [case[1:] for case in INVOICE_CASES],
    ids=[case[0] for case in INVOICE_CASES],
)
def test_invoice_has_the_hand_computed_lines_taxes_and_total(
    plan_version: PlanVersion,
    quantities: dict[str, Decimal],
    facts: TaxFacts,
    late: list[LateUsage],
    lines: Lines,
    subtotal: int,
    taxes: Taxes,
    total: int,
) -> None:
    priced = price(plan_version, quantities, facts, late)
    assert [(line.description, line.amount) for line in priced.lines] == lines
    assert priced.subtotal == subtotal
    assert [(tax.name, tax.amount) for tax in priced.taxes] == taxes
    assert priced.total == total
    assert priced.currency == "INR"


def test_gst_rates_are_nine_and_eighteen_percent_as_fractions() -> None:
    intra = price(plan("100"), {}, INTRA).taxes
    inter = price(plan("100"), {}, INTER).taxes
    assert [(t.name, t.rate) for t in intra] == [("CGST", D("0.09")), ("SGST", D("0.09"))]
    assert [(t.name, t.rate) for t in inter] == [("IGST", D("0.18"))]


def test_charge_lines_carry_metric_and_quantity_fixed_lines_do_not_name_a_metric() -> None:
    priced = price(plan("500", "1000", API_CALLS), {"api_calls": D("100.5")}, EXPORT)
    assert [(line.metric, line.quantity) for line in priced.lines] == [
        (None, D(1)),
        ("api_calls", D("100.5")),
        (None, D(1)),
    ]


KNOWN = frozenset({"api_calls", "storage_gb", "sms", "seats"})

# (case id, plan, the exact set of fields reported)
INVALID_PLANS: list[tuple[str, PlanVersion, set[str]]] = [
    (
        "every header rule at once",
        PlanVersion(" ", 0, "", "USD", D("-1"), D("NaN")),
        {"code", "version", "name", "currency", "base_fee", "minimum"},
    ),
    (
        "unknown meter, duplicate metric, unknown model",
        plan("0", "0", API_CALLS, API_CALLS, Charge("nope", "per_unit", unit_price=D(1)),
             Charge("sms", "tiered", unit_price=D(1))),  # type: ignore[arg-type]
        {"charges[1].metric", "charges[2].metric", "charges[3].model"},
    ),
    (
        "tiers descending, open tier not last, last tier bounded",
        plan("0", "0", Charge("storage_gb", "graduated", tiers=(
            Tier(D("100"), D("1")), Tier(D("50"), D("1")), Tier(None, D("1")), Tier(D("500"), D("1"))))),
        {"charges[0].tiers[1].up_to", "charges[0].tiers[2].up_to", "charges[0].tiers[3].up_to"},
    ),
    (
        "negative tier prices and a zero bound",
        plan("0", "0", Charge("storage_gb", "volume", tiers=(
            Tier(D("0"), D("-1"), D("-2")), Tier(None, D("1"))))),
        {"charges[0].tiers[0].up_to", "charges[0].tiers[0].unit_price", "charges[0].tiers[0].flat_fee"},
    ),
    (
        "tiered charge without tiers",
        plan("0", "0", Charge("storage_gb", "graduated")),
        {"charges[0].tiers"},
    ),
    (
        "package size zero, negative price",
        plan("0", "0", Charge("sms", "package", package_size=D(0), package_price=D("-5"))),
        {"charges[0].package_size", "charges[0].package_price"},
    ),
    (
        "per_unit without a price, with fields of other models",
        plan("0", "0", Charge("api_calls", "per_unit", tiers=TIERS, package_size=D(1))),
        {"charges[0].unit_price", "charges[0].tiers", "charges[0].package_size"},
    ),
]


@pytest.mark.parametrize(
    ("bad_plan", "fields"),
    [case[1:] for case in INVALID_PLANS],
    ids=[case[0] for case in INVALID_PLANS],
)
def test_validate_plan_reports_every_broken_rule_at_once(bad_plan: PlanVersion, fields: set[str]) -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_plan(bad_plan, KNOWN)
    assert {e.field for e in info.value.errors} == fields


def test_validate_plan_accepts_every_model() -> None:
    validate_plan(MIXED, KNOWN)
    validate_plan(plan("999", "1000", VOLUME, PACKAGE), KNOWN)


def test_negative_period_quantity_is_refused_not_billed() -> None:
    with pytest.raises(ValidationFailed) as info:
        price(plan("0", "0", API_CALLS), {"api_calls": D("-1")}, EXPORT)
    assert [e.field for e in info.value.errors] == ["quantities.api_calls"]
    with pytest.raises(ValueError):
        charge_amount(API_CALLS, D("-1"))


def test_late_usage_that_went_down_needs_a_credit_note() -> None:
    late = LateUsage("2026-09", plan("0", "0", PER_RUPEE), {"api_calls": D("150")}, {"api_calls": D("100")})
    with pytest.raises(ValidationFailed) as info:
        price(plan("0", "0", PER_RUPEE), {}, EXPORT, [late])
    assert [e.field for e in info.value.errors] == ["late[0]"]


def test_late_usage_priced_in_another_currency_is_refused() -> None:
    other = PlanVersion("old", 1, "Old", "USD", charges=(PER_RUPEE,))
    late = LateUsage("2026-09", other, {}, {"api_calls": D("1")})
    with pytest.raises(ValidationFailed) as info:
        price(plan("0", "0", PER_RUPEE), {}, EXPORT, [late])
    assert [e.field for e in info.value.errors] == ["late[0].plan"]
