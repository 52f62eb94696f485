"""Invoice documents as plain data and the pure formatting rules they share (the Mailer port that
sends them is in domain/ports.py).

`InvoiceDocument` is everything a GST tax invoice shows (CGST Rules, rule 46): supplier and
recipient name, address and GSTIN, a serial number of at most 16 characters, the date, the SAC
of the service, the taxable value, each tax component's rate and amount, the total and the
place of supply; for an export, the zero-rating endorsement instead of tax. It is built by the
caller from an invoice and the organisation; the adapters only lay it out (HTML, PDF, email).
Amounts are integer paise and are formatted here, once, with Indian digit grouping
(12,34,567.89). docs/DOCUMENTS.md explains the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Literal
from uuid import UUID

from domain.money import PAISE_PER_RUPEE
from domain.period import is_period
from domain.tax import INDIA, TaxLine

# SAC (Services Accounting Code) for metered cloud/platform usage: heading 9983, group 99831,
# "Hosting and information technology (IT) infrastructure provisioning services" (covers
# application hosting and provisioning software/compute/storage as a service). Not 998314
# (bespoke IT design and development) nor 997331 (licence to use packaged software):
# the customer buys metered use of a hosted platform, not a build or a licence.
SAC_CODE = "998315"
SAC_DESCRIPTION = "Hosting and IT infrastructure provisioning services"

INVOICE_NUMBER_MAX_CHARS = 16  # CGST Rules, rule 46(b)
MONEY_DECIMALS_SHOWN = 2  # at least: rupees and paise
DRAFT_NUMBER = "DRAFT"  # what a draft (no number yet) shows in the number's place
# Endorsement an invoice for an export of services carries when no IGST is paid (rule 46,
# proviso; IGST Act s.16: exports are zero-rated, supplied under a Letter of Undertaking).
EXPORT_NOTE = "Supply meant for export of services under LUT without payment of integrated tax (IGST)"
# GST state code used in returns and e-invoices for a place of supply outside India.
OTHER_COUNTRY_STATE_CODE = "96"

EmailKind = Literal["invoice", "paid", "void"]

# GST state / union territory codes (first two characters of a GSTIN).
GST_STATES: dict[str, str] = {
    "01": "Jammu and Kashmir",
    "02": "Himachal Pradesh",
    "03": "Punjab",
    "04": "Chandigarh",
    "05": "Uttarakhand",
    "06": "Haryana",
    "07": "Delhi",
    "08": "Rajasthan",
    "09": "Uttar Pradesh",
    "10": "Bihar",
    "11": "Sikkim",
    "12": "Arunachal Pradesh",
    "13": "Nagaland",
    "14": "Manipur",
    "15": "Mizoram",
    "16": "Tripura",
    "17": "Meghalaya",
    "18": "Assam",
    "19": "West Bengal",
    "20": "Jharkhand",
    "21": "Odisha",
    "22": "Chhattisgarh",
    "23": "Madhya Pradesh",
    "24": "Gujarat",
    "25": "Daman and Diu",
    "26": "Dadra and Nagar Haveli and Daman and Diu",
    "27": "Maharashtra",
    "28": "Andhra Pradesh (before 2014)",
    "29": "Karnataka",
    "30": "Goa",
    "31": "Lakshadweep",
    "32": "Kerala",
    "33": "Tamil Nadu",
    "34": "Puducherry",
    "35": "Andaman and Nicobar Islands",
    "36": "Telangana",
    "37": "Andhra Pradesh",
    "38": "Ladakh",
    "97": "Other Territory",
}


@dataclass(frozen=True, slots=True)
class DocumentTier:
    """One tier of a tiered charge as printed under its line: the units it priced, at a unit
    price plus a flat fee (exact rupees, as the plan says them)."""

    tier: int  # 1-based place in the plan's tiers
    up_to: Decimal | None  # None: the open-ended last tier
    quantity: Decimal
    unit_price: Decimal
    flat_fee: Decimal

    @property
    def label(self) -> str:
        """`Tier 2 (up to 1,00,000)`; the open-ended last tier `Tier 3 (and above)`."""
        bound = "and above" if self.up_to is None else f"up to {plain_decimal(self.up_to)}"
        return f"Tier {self.tier} ({bound})"


@dataclass(frozen=True, slots=True)
class DocumentLine:
    """One invoice line: what was supplied, how much, and its taxable value in paise; a
    tiered charge's line has the tiers that priced it (their sum, rounded once, is `amount`)."""

    description: str
    quantity: Decimal
    amount: int
    tiers: tuple[DocumentTier, ...] = ()


@dataclass(frozen=True, slots=True)
class InvoiceDocument:
    """A finalized invoice as it is printed and mailed. Money is integer paise.

    Construction checks that the document adds up (subtotal = sum of lines, total = subtotal +
    taxes) so a document that would disagree with the ledger can never be rendered or sent.
    """

    invoice_id: UUID
    number: str
    invoice_date: date
    period: str  # "YYYY-MM"
    due_date: date
    currency: str
    supplier_name: str
    supplier_gstin: str | None
    supplier_state_code: str
    customer_name: str
    customer_gstin: str | None
    customer_state_code: str | None
    customer_country: str
    billing_email: str
    lines: tuple[DocumentLine, ...]
    subtotal: int
    taxes: tuple[TaxLine, ...]  # domain.tax's GST components, as priced
    total: int
    amount_due: int
    supplier_address: str | None = None
    customer_address: str | None = None
    sac_code: str = SAC_CODE
    plan_name: str | None = None  # the plan the period was priced by, and its version
    plan_version: int | None = None

    def __post_init__(self) -> None:
        problems = _inconsistencies(self)
        if problems:
            raise ValueError(f"invoice document {self.number!r}: " + "; ".join(problems))

    @property
    def is_export(self) -> bool:
        """A customer outside India: an export of services, zero-rated (no GST)."""
        return self.customer_country != INDIA

    @property
    def place_of_supply(self) -> str:
        """Place of supply as printed: the recipient's state (code and name) for a supply in
        India (IGST Act s.12(2): location of the recipient), or outside India for an export."""
        if self.is_export:
            return f"{OTHER_COUNTRY_STATE_CODE} - Outside India ({self.customer_country})"
        if self.customer_state_code is None:
            return "India (state not on record)"
        return state_label(self.customer_state_code)

    @property
    def export_note(self) -> str | None:
        """The zero-rating endorsement for an export invoice without tax, else None."""
        return EXPORT_NOTE if self.is_export and not self.taxes else None

    @property
    def plan_label(self) -> str:
        """`Growth (version 2)`; "" when the document names no plan."""
        if not self.plan_name:
            return ""
        return self.plan_name + (f" (version {self.plan_version})" if self.plan_version else "")

    @property
    def tax_total(self) -> int:
        return sum(t.amount for t in self.taxes)

    @property
    def file_stem(self) -> str:
        """The document's file name without extension: `INV/2627/000001` → `INV-2627-000001`
        (a slash cannot be in a file name); a draft, which has no number yet, `DRAFT-<id>`."""
        return file_stem(self.number, self.invoice_id)

    @property
    def pdf_filename(self) -> str:
        """`INV/2627/000001` → `INV-2627-000001.pdf`."""
        return self.file_stem + ".pdf"


def _inconsistencies(doc: InvoiceDocument) -> list[str]:
    problems: list[str] = []
    if not doc.number or len(doc.number) > INVOICE_NUMBER_MAX_CHARS:
        problems.append(f"number must be 1..{INVOICE_NUMBER_MAX_CHARS} characters")
    if not is_period(doc.period):
        problems.append("period must be YYYY-MM")
    lines_sum = sum(line.amount for line in doc.lines)
    if doc.subtotal != lines_sum:
        problems.append(f"subtotal {doc.subtotal} != sum of lines {lines_sum}")
    if doc.total != doc.subtotal + doc.tax_total:
        problems.append(f"total {doc.total} != subtotal + taxes {doc.subtotal + doc.tax_total}")
    if not 0 <= doc.amount_due <= max(doc.total, 0):
        problems.append(f"amount_due {doc.amount_due} outside 0..total")
    return problems


def file_stem(number: str | None, invoice_id: UUID) -> str:
    """A file name (without extension) for an invoice's document: its number with `/` as `-`,
    or `DRAFT-<id>` before it has one (every draft would otherwise be `DRAFT`)."""
    if number is None or number == DRAFT_NUMBER:
        return f"{DRAFT_NUMBER}-{invoice_id}"
    return number.replace("/", "-")


def state_label(code: str) -> str:
    """`29` → `29 - Karnataka`; an unknown code is printed as it is."""
    name = GST_STATES.get(code)
    return f"{code} - {name}" if name else code


# ---- formatting (pure) ----


def indian_grouping(digits: str) -> str:
    """Group a string of digits the Indian way: last three, then pairs (1234567 → 12,34,567)."""
    if len(digits) <= 3:
        return digits
    head, tail = digits[:-3], digits[-3:]
    pairs = [head[max(i - 2, 0) : i] for i in range(len(head), 0, -2)]
    return ",".join(reversed(pairs)) + "," + tail


def indian_rupees(paise: int) -> str:
    """Paise as rupees with two decimals and Indian grouping: 123456 → '1,234.56',
    123456789 → '1,23,45,678.89', -5 → '-0.05'. Exact: integer arithmetic only."""
    if isinstance(paise, bool) or not isinstance(paise, int):
        raise TypeError(f"paise must be an int, got {type(paise).__name__}")
    sign = "-" if paise < 0 else ""
    rupees, rest = divmod(abs(paise), PAISE_PER_RUPEE)
    return f"{sign}{indian_grouping(str(rupees))}.{rest:02d}"


def plain_decimal(value: Decimal) -> str:
    """A quantity without exponent or trailing zeros, Indian-grouped: 1234567.50 → 12,34,567.5."""
    text = format(value.normalize(), "f") if value else "0"
    sign = "-" if text.startswith("-") else ""
    whole, _, fraction = text.lstrip("-").partition(".")
    return sign + indian_grouping(whole) + (f".{fraction}" if fraction else "")


def rupee_price(value: Decimal) -> str:
    """A price in rupees as the plan says it, exactly: Indian-grouped, at least two decimals
    and as many more as it has (0.0035 → '0.0035', 1500 → '1,500.00'). Never rounded: a
    tier's unit price may be a fraction of a paisa."""
    text = plain_decimal(value)
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(MONEY_DECIMALS_SHOWN, '0')}"


def percent(rate: Decimal) -> str:
    """A rate fraction as a percentage: 0.09 → '9%', 0.025 → '2.5%'."""
    return format((rate * 100).normalize(), "f") + "%"


_ONES = (
    "Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
    "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen", "Eighteen",
    "Nineteen",
)
_TENS = ("", "", "Twenty", "Thirty", "Forty", "Fifty", "Sixty", "Seventy", "Eighty", "Ninety")
_CRORE = 10_000_000
_LAKH = 100_000
_THOUSAND = 1_000
_HUNDRED = 100


def _below_hundred(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")


def number_in_words(n: int) -> str:
    """A non-negative whole number in Indian English words (lakh, crore): 1234567 →
    'Twelve Lakh Thirty Four Thousand Five Hundred Sixty Seven'."""
    if n < 0:
        raise ValueError("number_in_words takes n >= 0")
    if n < _HUNDRED:
        return _below_hundred(n)
    parts: list[str] = []
    for size, name in ((_CRORE, "Crore"), (_LAKH, "Lakh"), (_THOUSAND, "Thousand"), (_HUNDRED, "Hundred")):
        count, n = divmod(n, size)
        if count:
            parts.append(f"{number_in_words(count)} {name}")
    if n:
        parts.append(_below_hundred(n))
    return " ".join(parts)


def rupees_in_words(paise: int) -> str:
    """The amount in words as Indian invoices print it: 123456 →
    'Rupees One Thousand Two Hundred Thirty Four and Fifty Six Paise Only'."""
    sign = "Minus " if paise < 0 else ""
    rupees, rest = divmod(abs(paise), PAISE_PER_RUPEE)
    words = f"{sign}Rupees {number_in_words(rupees)}"
    if rest:
        words += f" and {number_in_words(rest)} Paise"
    return words + " Only"
