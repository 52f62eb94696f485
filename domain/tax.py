"""GST on an invoice subtotal: which components apply (CGST+SGST, IGST or none) and their amounts.

Rules (docs/PRICING.md, GST): 18 % GST on the subtotal for organisations in India;
intra-state supply (customer state == supplier state) splits it into CGST 9 % + SGST 9 %,
inter-state supply is IGST 18 %; customers outside India are an export of services
(zero-rated), so no GST. Each component is rounded half-up to the paisa on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from domain.money import MONEY_EXACT, round_half_up

INDIA = "IN"
GST_RATE = Decimal("0.18")  # fraction of the subtotal, not a percentage
CGST_RATE = Decimal("0.09")
SGST_RATE = Decimal("0.09")
IGST_RATE = GST_RATE

TaxName = Literal["CGST", "SGST", "IGST"]


@dataclass(frozen=True, slots=True)
class TaxFacts:
    """What the place of supply depends on: the customer's country and GST state code, and ours."""

    country: str
    state_code: str | None
    supplier_state_code: str


@dataclass(frozen=True, slots=True)
class TaxLine:
    """One GST component: `rate` is a fraction (0.09 is 9 %), `amount` is in paise."""

    name: TaxName
    rate: Decimal
    amount: int


def is_intra_state(facts: TaxFacts) -> bool:
    """Same GST state as the supplier. An Indian customer without a state code is treated as
    inter-state: the place of supply is unknown, and IGST is the charge that is never wrong
    in kind for a supply from our state to anywhere in India."""
    return facts.state_code is not None and facts.state_code == facts.supplier_state_code


def gst(subtotal: int, facts: TaxFacts) -> tuple[TaxLine, ...]:
    """The GST components on `subtotal` paise; empty for a customer outside India (export)."""
    if facts.country != INDIA:
        return ()
    if is_intra_state(facts):
        return (_component("CGST", CGST_RATE, subtotal), _component("SGST", SGST_RATE, subtotal))
    return (_component("IGST", IGST_RATE, subtotal),)


def _component(name: TaxName, rate: Decimal, subtotal: int) -> TaxLine:
    # Rounded per component, so CGST and SGST each carry their own half-paisa rounding.
    return TaxLine(name, rate, round_half_up(MONEY_EXACT.multiply(Decimal(subtotal), rate)))
