"""Every money and quantity a plan accepts is bounded in magnitude and in decimal places, and an
invoice amount that would not fit the ledger is refused by pricing (issue 20, item 7: one
oversized base fee aborted the whole invoice run for everyone)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from domain.errors import ValidationFailed
from domain.pricing import (
    INVOICE_AMOUNT_MAX_PAISE,
    PRICE_MAX_DECIMAL_PLACES,
    PRICE_MAX_RUPEES,
    QUANTITY_MAX,
    QUANTITY_MAX_DECIMAL_PLACES,
    Charge,
    PlanVersion,
    Tier,
    price,
    validate_plan,
)
from domain.tax import TaxFacts

METERS = {"calls"}
DOMESTIC = TaxFacts("IN", "29", "29")


def _plan(base_fee: Decimal = Decimal(0), *charges: Charge) -> PlanVersion:
    return PlanVersion("p", 1, "P", "INR", base_fee, Decimal(0), tuple(charges))


def _fields(plan: PlanVersion) -> list[str]:
    with pytest.raises(ValidationFailed) as info:
        validate_plan(plan, METERS)
    return [e.field for e in info.value.errors]


def test_the_probes_forty_digit_base_fee_is_refused() -> None:
    assert _fields(_plan(Decimal("9" * 40))) == ["base_fee"]


@pytest.mark.parametrize("value", [PRICE_MAX_RUPEES + 1, Decimal(1).scaleb(-PRICE_MAX_DECIMAL_PLACES - 1)])
def test_a_price_past_its_magnitude_or_its_decimal_places_is_refused(value: Decimal) -> None:
    charge = Charge("calls", "per_unit", unit_price=value)
    assert _fields(_plan(Decimal(0), charge)) == ["charges[0].unit_price"]


def test_prices_and_quantities_at_their_bounds_are_accepted() -> None:
    tiers = (Tier(QUANTITY_MAX - 1, PRICE_MAX_RUPEES, Decimal(1).scaleb(-PRICE_MAX_DECIMAL_PLACES)),
             Tier(None, Decimal("0.0035"), Decimal(0)))
    validate_plan(_plan(PRICE_MAX_RUPEES, Charge("calls", "graduated", tiers=tiers)), METERS)
    package = Charge("calls", "package", package_size=Decimal(1).scaleb(-QUANTITY_MAX_DECIMAL_PLACES),
                     package_price=Decimal(1))
    validate_plan(_plan(Decimal(0), package), METERS)


@pytest.mark.parametrize("size", [QUANTITY_MAX + 1, Decimal(1).scaleb(-QUANTITY_MAX_DECIMAL_PLACES - 1)])
def test_a_quantity_past_its_bounds_is_refused(size: Decimal) -> None:
    package = Charge("calls", "package", package_size=size, package_price=Decimal(1))
    assert _fields(_plan(Decimal(0), package)) == ["charges[0].package_size"]
    tiers = (Tier(size, Decimal(1), Decimal(0)), Tier(None, Decimal(1), Decimal(0)))
    assert _fields(_plan(Decimal(0), Charge("calls", "volume", tiers=tiers))) == ["charges[0].tiers[0].up_to"]


def test_an_invoice_amount_that_would_not_fit_is_a_validation_error_not_an_overflow() -> None:
    plan = _plan(Decimal(0), Charge("calls", "per_unit", unit_price=PRICE_MAX_RUPEES))
    with pytest.raises(ValidationFailed) as info:
        price(plan, {"calls": Decimal(10) ** 17}, DOMESTIC)
    assert "at most" in info.value.errors[0].message
    assert str(INVOICE_AMOUNT_MAX_PAISE) in info.value.errors[0].message
