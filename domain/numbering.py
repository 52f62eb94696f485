"""Gapless invoice numbers per Indian financial year: `INV/2627/000001`.

GST rules want invoice numbers that are consecutive and unique within a financial year (April
to March) and at most 16 characters long. Each financial year has one `InvoiceSequence`
aggregate (its ledger identity is derived from the year) whose `last` is the last number issued.
Finalizing an invoice issues the next number and saves the invoice and the sequence in one
atomic ledger append: two finalizations racing for the same number collide on the sequence's
next version, the loser reads the sequence again and takes the number after (InvoicingService).
A number is therefore never issued twice and never skipped — a number is only recorded
together with the invoice that carries it.

Which year: the financial year that contains the finalization instant in India Standard Time
(Asia/Kolkata), whatever the organisation's own billing timezone — the numbering series is the
supplier's, and the supplier files GST in India. 31 Mar 23:59 IST belongs to the year that ends
that day; 1 Apr 00:00 IST starts the next one. The rules are written down in docs/INVOICES.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

from eventsourcing.domain import Aggregate

from domain.errors import Conflict

INVOICE_PREFIX = "INV"
NUMBER_MAX_CHARS = 16  # GST: an invoice number is at most 16 characters
SEQUENCE_DIGITS = 6
SEQUENCE_MAX = 10**SEQUENCE_DIGITS - 1  # 999,999 invoices per financial year
FY_FIRST_MONTH = 4  # the Indian financial year starts on 1 April
FY_TIMEZONE = "Asia/Kolkata"  # the supplier's GST calendar, not the customer's
YEAR_DIGITS_KEPT = 100  # '2026' -> '26' in the FY label
_SEQUENCE_NAMESPACE = UUID("5c1f9e2a-8d4b-4f6e-a3c7-2b9d0e7f1a33")

assert len(f"{INVOICE_PREFIX}/0000/{SEQUENCE_MAX}") <= NUMBER_MAX_CHARS


def financial_year(at: datetime) -> int:
    """The calendar year in which the financial year containing `at` (in IST) starts:
    2026 for any instant from 1 Apr 2026 00:00 IST up to 31 Mar 2027 23:59:59.999 IST."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("an instant with a UTC offset is required")
    local = at.astimezone(ZoneInfo(FY_TIMEZONE))
    return local.year if local.month >= FY_FIRST_MONTH else local.year - 1


def fy_label(start_year: int) -> str:
    """'2627' for the financial year April 2026 - March 2027."""
    return f"{start_year % YEAR_DIGITS_KEPT:02d}{(start_year + 1) % YEAR_DIGITS_KEPT:02d}"


def format_number(start_year: int, sequence: int, *, prefix: str = INVOICE_PREFIX) -> str:
    """`{prefix}/{FY}/{seq:06d}`, e.g. INV/2627/000001 (15 characters) or, for the credit
    notes' series, CN/2627/000001."""
    if not 1 <= sequence <= SEQUENCE_MAX:
        raise ValueError(f"sequence must be 1..{SEQUENCE_MAX}, got {sequence}")
    number = f"{prefix}/{fy_label(start_year)}/{sequence:0{SEQUENCE_DIGITS}d}"
    assert len(number) <= NUMBER_MAX_CHARS
    return number


def sequence_id(start_year: int, *, prefix: str = INVOICE_PREFIX) -> UUID:
    """One sequence per series and financial year: its ledger identity is derived from both,
    so two processes opening the first number of a year collide instead of starting two."""
    return uuid5(_SEQUENCE_NAMESPACE, f"{prefix}/{start_year}")


class InvoiceSequence(Aggregate):
    """The invoice numbers issued in one financial year; `last` is 0 before the first."""

    class Opened(Aggregate.Created):
        """The year's series exists (recorded with its first number, in the same append)."""

        financial_year: int

    class NumberIssued(Aggregate.Event):
        """`number` (the `sequence`-th of the year) now belongs to `invoice_id`."""

        number: str
        sequence: int
        invoice_id: UUID

        def apply(self, aggregate: Any) -> None:
            aggregate.last = self.sequence
            aggregate.last_invoice_id = self.invoice_id

    def __init__(self, financial_year: int) -> None:
        self.financial_year = financial_year
        self.last = 0
        self.last_invoice_id: UUID | None = None

    @classmethod
    def open(cls, start_year: int, at: datetime) -> InvoiceSequence:
        """Decide: start the series of the financial year beginning in April `start_year`."""
        return cls._create(cls.Opened, id=sequence_id(start_year), timestamp=at,
                           financial_year=start_year)

    @property
    def label(self) -> str:
        return fy_label(self.financial_year)

    def issue(self, invoice_id: UUID, at: datetime) -> str:
        """Decide: the next number of the year goes to `invoice_id`; returns it."""
        following = self.last + 1
        if following > SEQUENCE_MAX:
            raise Conflict(f"invoice numbers of financial year {self.label} are exhausted "
                           f"({SEQUENCE_MAX} issued); the numbering format must be widened")
        number = format_number(self.financial_year, following)
        self.trigger_event(self.NumberIssued, timestamp=at, number=number, sequence=following,
                           invoice_id=invoice_id)
        return number
