"""The pure pricing engine: plan versions, their validation, and pricing a period's usage.

Owns the value types of a plan (`Tier`, `Charge`, `PlanVersion`), the rules a plan must obey
(`validate_plan`), the four charge models (`charge_amount`, unrounded rupees) and turning a
plan plus quantities plus tax facts into invoice lines, GST and totals in paise (`price`).
Everything is exact `Decimal` arithmetic; the only rounding is per line (money.to_paise) and
per tax component (tax.gst). The rules as implemented are written down in docs/PRICING.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Literal

from domain.errors import Problems
from domain.money import MONEY_EXACT, is_finite_decimal, to_paise
from domain.organisation import SUPPORTED_CURRENCIES
from domain.tax import TaxFacts, TaxLine, gst

ChargeModel = Literal["per_unit", "graduated", "volume", "package"]
CHARGE_MODELS: tuple[ChargeModel, ...] = ("per_unit", "graduated", "volume", "package")
TIERED_MODELS = frozenset({"graduated", "volume"})

PLAN_CODE_MAX_CHARS = 64
PLAN_NAME_MAX_CHARS = 200
# Bounds on what a plan may say, so that every amount it can produce is a number the ledger,
# Postgres (bigint paise) and a human can hold. Generous for any real price list.
PRICE_MAX_RUPEES = Decimal(10) ** 9  # a unit price, flat fee, base fee or minimum
PRICE_MAX_DECIMAL_PLACES = 10  # fractions of a paisa: 0.0035 has 4
QUANTITY_MAX = Decimal(10) ** 18  # a tier bound or package size: usage values stay below 1e18
QUANTITY_MAX_DECIMAL_PLACES = 18
# One invoice line, subtotal or total, in paise: ₹10 trillion. Beyond it an invoice would
# overflow the ledger's integer encoding; pricing refuses it (that organisation's failure).
INVOICE_AMOUNT_MAX_PAISE = 10**15

BASE_FEE_DESCRIPTION = "base fee"
MINIMUM_DESCRIPTION = "minimum commitment"  # wording fixed by docs/PRICING.md

ZERO = Decimal(0)
ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Tier:
    """One price band of a graduated or volume charge. `up_to` is inclusive (units, may be
    fractional); None marks the open-ended last tier. Prices are rupees."""

    up_to: Decimal | None
    unit_price: Decimal
    flat_fee: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class Charge:
    """How one meter's period quantity is priced. Only the fields of its `model` are set:
    per_unit -> unit_price; graduated / volume -> tiers; package -> package_size, package_price."""

    metric: str
    model: ChargeModel
    unit_price: Decimal | None = None
    tiers: tuple[Tier, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PlanVersion:
    """One immutable version of a plan. Money fields are rupees per billing period."""

    code: str
    version: int
    name: str
    currency: str
    base_fee: Decimal = ZERO
    minimum: Decimal = ZERO
    charges: tuple[Charge, ...] = ()


@dataclass(frozen=True, slots=True)
class TierPart:
    """The part of a tiered charge one tier priced: `tier` its 1-based place in the plan's tiers,
    `up_to` that tier's bound (None: open-ended), `quantity` the units it priced (graduated: the
    units inside the band; volume: every unit), at `unit_price` plus `flat_fee` (rupees, as the
    plan says: unrounded)."""

    tier: int
    up_to: Decimal | None
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal


@dataclass(frozen=True, slots=True)
class Line:
    """One invoice line; `amount` is whole paise (may be negative only for a late-usage
    minimum-commitment adjustment). A graduated or volume charge's line carries the `tiers`
    that priced it; their exact sum, rounded once, is `amount`."""

    description: str
    metric: str | None
    quantity: Decimal
    amount: int
    tiers: tuple[TierPart, ...] = ()


@dataclass(frozen=True, slots=True)
class LateUsage:
    """Usage of an already-finalized period: the quantities its invoice billed and the
    quantities now known, priced with the plan version that priced that period."""

    period: str
    plan: PlanVersion
    billed: Mapping[str, Decimal] = field(default_factory=dict)
    corrected: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Priced:
    """A priced invoice: every amount is whole paise of `currency`."""

    currency: str
    lines: tuple[Line, ...]
    subtotal: int
    taxes: tuple[TaxLine, ...]
    total: int


# ---------------------------------------------------------------------------------------------
# Validation


def validate_plan(plan: PlanVersion, known_meters: AbstractSet[str]) -> None:
    """Raise ValidationFailed naming every rule `plan` breaks; `known_meters` are meter codes."""
    problems = Problems()
    _check_header(plan, problems)
    seen: set[str] = set()
    for index, charge in enumerate(plan.charges):
        where = f"charges[{index}]"
        _check_charge(charge, where, known_meters, problems)
        if charge.metric in seen:
            problems.add(f"{where}.metric", f"{charge.metric!r} already has a charge in this plan")
        seen.add(charge.metric)
    problems.raise_if_any()


def _check_header(plan: PlanVersion, problems: Problems) -> None:
    if not isinstance(plan.code, str) or not plan.code.strip():
        problems.add("code", "must not be empty")
    elif len(plan.code) > PLAN_CODE_MAX_CHARS:
        problems.add("code", f"at most {PLAN_CODE_MAX_CHARS} characters")
    if not isinstance(plan.name, str) or not plan.name.strip():
        problems.add("name", "must not be empty")
    elif len(plan.name) > PLAN_NAME_MAX_CHARS:
        problems.add("name", f"at most {PLAN_NAME_MAX_CHARS} characters")
    if isinstance(plan.version, bool) or not isinstance(plan.version, int) or plan.version < 1:
        problems.add("version", "must be a whole number from 1")
    if plan.currency not in SUPPORTED_CURRENCIES:
        problems.add("currency", f"must be one of {sorted(SUPPORTED_CURRENCIES)}")
    _check_price(plan.base_fee, "base_fee", problems)
    _check_price(plan.minimum, "minimum", problems)


def _check_price(value: object, where: str, problems: Problems) -> None:
    if not is_finite_decimal(value):
        problems.add(where, "must be a decimal number")
    elif isinstance(value, Decimal) and value < 0:
        problems.add(where, "must not be negative")
    elif isinstance(value, Decimal):
        _check_bounds(value, PRICE_MAX_RUPEES, PRICE_MAX_DECIMAL_PLACES, where, problems)


def _check_bounds(value: Decimal, most: Decimal, places: int, where: str, problems: Problems) -> None:
    problem = _bounds_problem(value, most, places)
    if problem:
        problems.add(where, problem)


def _bounds_problem(value: Decimal, most: Decimal, places: int) -> str | None:
    if value > most:
        return f"at most {most:f}"
    if decimal_places(value) > places:
        return f"at most {places} decimal places"
    return None


def decimal_places(value: Decimal) -> int:
    """Digits after the point that matter ("1.50" has 1), counted without arithmetic: no
    context's precision can round or trap on a long value."""
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # a finite value's
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0")) if any(digits) else 0
    return max(0, -(exponent + trailing))


def _check_charge(charge: Charge, where: str, known_meters: AbstractSet[str], problems: Problems) -> None:
    if charge.metric not in known_meters:
        problems.add(f"{where}.metric", f"{charge.metric!r} is not a defined meter")
    if charge.model not in CHARGE_MODELS:
        problems.add(f"{where}.model", f"must be one of {list(CHARGE_MODELS)}")
        return
    _check_fields_of_model(charge, where, problems)
    if charge.model == "per_unit":
        _check_price(charge.unit_price, f"{where}.unit_price", problems)
    elif charge.model in TIERED_MODELS:
        _check_tiers(charge.tiers, f"{where}.tiers", problems)
    else:
        _check_package(charge, where, problems)


def _check_fields_of_model(charge: Charge, where: str, problems: Problems) -> None:
    # A field that the model ignores is refused: it almost always means the plan author
    # picked the wrong model, and silently ignoring a price is how invoices go wrong.
    used = {
        "per_unit": {"unit_price"},
        "graduated": {"tiers"},
        "volume": {"tiers"},
        "package": {"package_size", "package_price"},
    }[charge.model]
    present = {
        "unit_price": charge.unit_price is not None,
        "tiers": bool(charge.tiers),
        "package_size": charge.package_size is not None,
        "package_price": charge.package_price is not None,
    }
    for name, is_set in present.items():
        if is_set and name not in used:
            problems.add(f"{where}.{name}", f"has no meaning for a {charge.model} charge")


def _check_package(charge: Charge, where: str, problems: Problems) -> None:
    size = charge.package_size
    if not is_finite_decimal(size):
        problems.add(f"{where}.package_size", "must be a decimal number")
    elif isinstance(size, Decimal) and size <= 0:
        problems.add(f"{where}.package_size", "must be greater than 0")
    elif isinstance(size, Decimal):
        _check_bounds(size, QUANTITY_MAX, QUANTITY_MAX_DECIMAL_PLACES, f"{where}.package_size",
                      problems)
    _check_price(charge.package_price, f"{where}.package_price", problems)


def _check_tiers(tiers: tuple[Tier, ...], where: str, problems: Problems) -> None:
    if not tiers:
        problems.add(where, "at least one tier is required")
        return
    last = len(tiers) - 1
    previous: Decimal | None = None
    for index, tier in enumerate(tiers):
        at = f"{where}[{index}]"
        _check_price(tier.unit_price, f"{at}.unit_price", problems)
        _check_price(tier.flat_fee, f"{at}.flat_fee", problems)
        if tier.up_to is None:
            if index != last:
                problems.add(f"{at}.up_to", "only the last tier may be open-ended (up_to null)")
            continue
        if index == last:
            problems.add(f"{at}.up_to", "the last tier must be open-ended (up_to null)")
        if not is_finite_decimal(tier.up_to):
            problems.add(f"{at}.up_to", "must be a decimal number")
        elif tier.up_to <= 0:
            problems.add(f"{at}.up_to", "must be greater than 0")
        elif problem := _bounds_problem(tier.up_to, QUANTITY_MAX, QUANTITY_MAX_DECIMAL_PLACES):
            problems.add(f"{at}.up_to", problem)
        elif previous is not None and tier.up_to <= previous:
            problems.add(f"{at}.up_to", f"must be greater than the previous tier's up_to ({previous})")
        else:
            previous = tier.up_to


# ---------------------------------------------------------------------------------------------
# Charge models (unrounded rupees)


def charge_amount(charge: Charge, quantity: Decimal) -> Decimal:
    """The exact, unrounded rupee amount of `charge` for a period quantity (>= 0).

    Expects a charge that passed validate_plan; raises ValueError for a malformed charge or a
    negative / non-finite quantity, decimal.Inexact if exact arithmetic were ever impossible.
    """
    if not is_finite_decimal(quantity) or quantity < 0:
        raise ValueError(f"quantity must be a finite decimal >= 0, got {quantity!r}")
    with localcontext(MONEY_EXACT):
        if charge.model == "per_unit":
            return quantity * _required(charge.unit_price, "unit_price")
        if charge.model == "graduated":
            return _graduated(charge.tiers, quantity)
        if charge.model == "volume":
            return _volume(charge.tiers, quantity)
        if charge.model == "package":
            return _package(
                _required(charge.package_size, "package_size"),
                _required(charge.package_price, "package_price"),
                quantity,
            )
    raise ValueError(f"unknown charge model {charge.model!r}")


def _required(value: Decimal | None, name: str) -> Decimal:
    if value is None:
        raise ValueError(f"charge has no {name}; validate_plan first")
    return value


def tier_parts(charge: Charge, quantity: Decimal) -> tuple[TierPart, ...]:
    """The tiers that price `quantity` under a graduated or volume charge, each with the units
    it priced; () for any other model, or a volume charge at 0. The charge amount is exactly
    the sum of quantity x unit_price + flat_fee over them (charge_amount computes it so)."""
    if not is_finite_decimal(quantity) or quantity < 0:
        raise ValueError(f"quantity must be a finite decimal >= 0, got {quantity!r}")
    with localcontext(MONEY_EXACT):
        if charge.model == "graduated":
            return _graduated_parts(charge.tiers, quantity)
        if charge.model == "volume":
            return _volume_parts(charge.tiers, quantity)
    return ()


def _part(index: int, tier: Tier, quantity: Decimal) -> TierPart:
    return TierPart(index + 1, tier.up_to, quantity, tier.unit_price, tier.flat_fee)


def _parts_total(parts: tuple[TierPart, ...]) -> Decimal:
    total = ZERO
    for part in parts:
        total += part.quantity * part.unit_price + part.flat_fee
    return total


def _graduated_parts(tiers: tuple[Tier, ...], quantity: Decimal) -> tuple[TierPart, ...]:
    # Continuous: tier i prices the part of `quantity` inside (previous up_to, up_to], so
    # 100.5 units over a 100-unit first tier puts 0.5 of a unit in the second tier.
    parts: list[TierPart] = []
    lower = ZERO
    for index, tier in enumerate(tiers):
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        portion = upper - lower
        if portion > 0:
            parts.append(_part(index, tier, portion))
        if tier.up_to is None or quantity <= tier.up_to:
            break
        lower = tier.up_to
    return tuple(parts)


def _graduated(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    return _parts_total(_graduated_parts(tiers, quantity))


def _volume_parts(tiers: tuple[Tier, ...], quantity: Decimal) -> tuple[TierPart, ...]:
    if quantity == 0:
        return ()  # docs/PRICING.md: q = 0 costs 0, the first tier's flat fee included
    index, tier = _tier_containing(tiers, quantity)
    return (_part(index, tier, quantity),)


def _volume(tiers: tuple[Tier, ...], quantity: Decimal) -> Decimal:
    return _parts_total(_volume_parts(tiers, quantity))


def _tier_containing(tiers: tuple[Tier, ...], quantity: Decimal) -> tuple[int, Tier]:
    for index, tier in enumerate(tiers):
        if tier.up_to is None or quantity <= tier.up_to:
            return index, tier
    raise ValueError("tiers have no open-ended last tier; validate_plan first")


def _package(size: Decimal, package_price: Decimal, quantity: Decimal) -> Decimal:
    # ceil(q / size) with exact integer division: a started package is a whole package.
    packages = quantity // size
    if quantity % size:
        packages += 1
    return packages * package_price


# ---------------------------------------------------------------------------------------------
# Invoice pricing


def price(
    plan: PlanVersion,
    quantities: Mapping[str, Decimal],
    tax: TaxFacts,
    late: Sequence[LateUsage] = (),
    *,
    meter_names: Mapping[str, str] | None = None,
) -> Priced:
    """Price one period: lines (base fee, one per charge, minimum top-up, late usage), subtotal,
    GST and total, all in paise. Metrics without a charge in `plan` are not billed; a charged
    metric missing from `quantities` has quantity 0. A charge line is described by its meter's
    name from `meter_names` (code -> name), else by the meter code. Raises ValidationFailed for
    a negative or non-finite quantity, a late plan in another currency, or late usage that
    went down."""
    problems = Problems()
    _check_quantities(plan, quantities, "quantities", problems)
    for index, item in enumerate(late):
        _check_late(plan, item, f"late[{index}]", problems)
    problems.raise_if_any()
    names = meter_names or {}
    lines = [*period_lines(plan, quantities, names)]
    for index, item in enumerate(late):
        late_lines = late_usage_lines(item, names)
        if sum(line.amount for line in late_lines) < 0:
            problems.add(
                f"late[{index}]",
                f"usage for {item.period} went down after its invoice was finalized; "
                "that needs a credit note, not an invoice line",
            )
        lines.extend(late_lines)
    problems.raise_if_any()
    subtotal = sum(line.amount for line in lines)
    taxes = gst(subtotal, tax)
    total = subtotal + sum(t.amount for t in taxes)
    amounts = [*(line.amount for line in lines), subtotal, total]
    if any(abs(amount) > INVOICE_AMOUNT_MAX_PAISE for amount in amounts):
        problems.add("quantities", f"this invoice's amounts would exceed {INVOICE_AMOUNT_MAX_PAISE}"
                                   " paise; at most that much can be billed on one invoice")
        problems.raise_if_any()
    return Priced(plan.currency, tuple(lines), subtotal, taxes, total)


def period_lines(
    plan: PlanVersion, quantities: Mapping[str, Decimal], meter_names: Mapping[str, str] | None = None
) -> tuple[Line, ...]:
    """The period's own lines: base fee (if any), every charge (even at 0), minimum top-up (if any)."""
    lines: list[Line] = []
    if plan.base_fee > 0:
        lines.append(Line(BASE_FEE_DESCRIPTION, None, ONE, to_paise(plan.base_fee)))
    names = meter_names or {}
    charge_lines = [_charge_line(charge, quantities, names) for charge in plan.charges]
    lines.extend(charge_lines)
    top_up = minimum_top_up(plan, sum(line.amount for line in charge_lines))
    if top_up:
        lines.append(Line(MINIMUM_DESCRIPTION, None, ONE, top_up))
    return tuple(lines)


def minimum_top_up(plan: PlanVersion, charges_paise: int) -> int:
    """Paise needed to lift the rounded charge lines (base fee excluded) to the plan minimum."""
    return max(0, to_paise(plan.minimum) - charges_paise)


def late_usage_lines(item: LateUsage, meter_names: Mapping[str, str] | None = None) -> tuple[Line, ...]:
    """Lines for usage that reached an already-finalized period: per changed metric, what the
    corrected quantity costs beyond what was billed; plus the change in that period's minimum
    top-up, so late usage the minimum already paid for is not billed twice. A metered line
    names its meter when `meter_names` has it ("late usage for 2026-09: API calls")."""
    label = f"late usage for {item.period}"
    names = meter_names or {}
    lines: list[Line] = []
    billed_total = corrected_total = 0
    for charge in item.plan.charges:
        billed = item.billed.get(charge.metric, ZERO)
        corrected = item.corrected.get(charge.metric, ZERO)
        billed_paise = to_paise(charge_amount(charge, billed))
        corrected_paise = to_paise(charge_amount(charge, corrected))
        billed_total += billed_paise
        corrected_total += corrected_paise
        if corrected != billed:
            quantity = MONEY_EXACT.subtract(corrected, billed)
            name = names.get(charge.metric)
            lines.append(Line(f"{label}: {name}" if name else label, charge.metric, quantity,
                              corrected_paise - billed_paise))
    adjustment = minimum_top_up(item.plan, corrected_total) - minimum_top_up(item.plan, billed_total)
    if adjustment:
        lines.append(Line(f"{label}: {MINIMUM_DESCRIPTION} adjustment", None, ONE, adjustment))
    return tuple(lines)


def _charge_line(charge: Charge, quantities: Mapping[str, Decimal], names: Mapping[str, str]) -> Line:
    # The meter's name is what a customer understands; its code stands in when there is none.
    quantity = quantities.get(charge.metric, ZERO)
    description = names.get(charge.metric) or charge.metric
    if charge.model not in TIERED_MODELS:
        return Line(description, charge.metric, quantity, to_paise(charge_amount(charge, quantity)))
    # A tiered charge's amount is the sum over its tiers (as charge_amount computes it): the
    # tiers are worked out once, for the line's breakdown and its amount.
    parts = tier_parts(charge, quantity)
    with localcontext(MONEY_EXACT):
        amount = _parts_total(parts)
    return Line(description, charge.metric, quantity, to_paise(amount), parts)


def _check_quantities(
    plan: PlanVersion, quantities: Mapping[str, Decimal], where: str, problems: Problems
) -> None:
    for charge in plan.charges:
        quantity = quantities.get(charge.metric, ZERO)
        if not is_finite_decimal(quantity):
            problems.add(f"{where}.{charge.metric}", "must be a decimal number")
        elif quantity < 0:
            problems.add(f"{where}.{charge.metric}", "a period quantity cannot be negative")


def _check_late(plan: PlanVersion, item: LateUsage, where: str, problems: Problems) -> None:
    if item.plan.currency != plan.currency:
        problems.add(f"{where}.plan", f"priced in {item.plan.currency}, this invoice is in {plan.currency}")
    _check_quantities(item.plan, item.billed, f"{where}.billed", problems)
    _check_quantities(item.plan, item.corrected, f"{where}.corrected", problems)
