"""Money arithmetic: exact Decimal contexts and half-up rounding to whole paise.

Plans price in rupees (decimal strings that may be fractions of a paisa); invoices carry
integers in paise. This module owns the only two places where precision is given up:
rounding a rupee amount to the paisa, and rounding a paise amount (a tax) to the paisa.
"""

from __future__ import annotations

from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)

PAISE_PER_RUPEE = 100
# Inputs are at most a few dozen significant digits (quantities: 18, docs/METERING.md), so products
# and sums of them fit comfortably; the Inexact trap makes any silent loss impossible.
MONEY_EXACT_DIGITS = 200

# For pricing arithmetic: every + - * must be exact, or it raises decimal.Inexact.
MONEY_EXACT = Context(
    prec=MONEY_EXACT_DIGITS,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow, Inexact],
)
# For the deliberate rounding step only: rounding is the point, so Inexact is not trapped.
_ROUNDING = Context(
    prec=MONEY_EXACT_DIGITS,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
_WHOLE = Decimal(1)


def round_half_up(amount: Decimal) -> int:
    """Round to the nearest integer, halves away from zero (0.5 -> 1, 2.5 -> 3, never banker's)."""
    return int(amount.quantize(_WHOLE, rounding=ROUND_HALF_UP, context=_ROUNDING))


def to_paise(rupees: Decimal) -> int:
    """Rupees (any number of decimals) to whole paise, ROUND_HALF_UP at the paisa (docs/PRICING.md)."""
    return round_half_up(MONEY_EXACT.multiply(rupees, Decimal(PAISE_PER_RUPEE)))


def is_finite_decimal(value: object) -> bool:
    """True for a Decimal that is a number (not NaN or ±Infinity)."""
    return isinstance(value, Decimal) and value.is_finite()
