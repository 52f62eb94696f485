"""Invoice documents: HTML (Jinja2, autoescaped), plain text and PDF (Typst) from an InvoiceDocument.

All three render one view: a dict of already-formatted strings built by `invoice_view` (money
with Indian grouping, dates spelt out, rates as percentages). The Typst template receives it as
JSON through `sys.inputs`, so customer text is data and never Typst markup; the HTML template
escapes it. PDFs use only the fonts embedded in the typst wheel and the invoice date as the
document timestamp, so the same document renders to the same bytes on every machine.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import typst
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from domain.documents import (
    SAC_DESCRIPTION,
    InvoiceDocument,
    indian_rupees,
    percent,
    plain_decimal,
    rupee_price,
    rupees_in_words,
    state_label,
)
from domain.period import MONTH_NAMES, period_label
from domain.tax import INDIA

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
HTML_TEMPLATE = "invoice.html.j2"
TEXT_TEMPLATE = "invoice.txt.j2"
PDF_TEMPLATE = "invoice.typ"
TYPST_INPUT_KEY = "invoice"  # sys.inputs key the Typst template reads its JSON from
RUPEE_CURRENCY = "INR"
TITLE = "Tax Invoice"
REVERSE_CHARGE = "No"  # the supplier pays the GST it charges; never reverse charge here
COMPUTER_GENERATED = "This is a computer-generated invoice."


def _escape_unless_text(template_name: str | None) -> bool:
    # Autoescape everything except the plain-text body: HTML-escaping is on by default.
    return not (template_name or "").endswith(".txt.j2")


_ENV = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=_escape_unless_text,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def long_date(day: date) -> str:
    """2026-11-02 → '02 November 2026' (locale-independent, unambiguous)."""
    return f"{day.day:02d} {MONTH_NAMES[day.month - 1]} {day.year}"


def _address_lines(address: str | None) -> list[str]:
    return [line.strip() for line in (address or "").splitlines() if line.strip()]


def invoice_view(doc: InvoiceDocument) -> dict[str, Any]:
    """The document as formatted strings: what every template shows, and nothing else."""
    paid = doc.total - doc.amount_due
    return {
        "title": TITLE,
        "number": doc.number,
        "invoice_date": long_date(doc.invoice_date),
        "due_date": long_date(doc.due_date),
        "period": doc.period,
        "period_label": period_label(doc.period),
        "currency": doc.currency,
        "supplier": {
            "name": doc.supplier_name,
            "gstin": doc.supplier_gstin or "",
            "address": _address_lines(doc.supplier_address),
            "state": state_label(doc.supplier_state_code),
        },
        "customer": {
            "name": doc.customer_name,
            "gstin": doc.customer_gstin or "Unregistered",
            "address": _address_lines(doc.customer_address),
            "state": (
                state_label(doc.customer_state_code)
                if doc.customer_country == INDIA and doc.customer_state_code
                else ""
            ),
            "country": doc.customer_country,
            "email": doc.billing_email,
        },
        "place_of_supply": doc.place_of_supply,
        "plan": doc.plan_label,
        "reverse_charge": REVERSE_CHARGE,
        "sac_code": doc.sac_code,
        "sac_description": SAC_DESCRIPTION,
        "lines": [
            {
                "n": str(i),
                "description": line.description,
                "sac": doc.sac_code,
                "quantity": plain_decimal(line.quantity),
                "amount": indian_rupees(line.amount),
                "tiers": [
                    {
                        "label": tier.label,
                        "quantity": plain_decimal(tier.quantity),
                        "unit_price": rupee_price(tier.unit_price),
                        "flat_fee": rupee_price(tier.flat_fee) if tier.flat_fee else "",
                    }
                    for tier in line.tiers
                ],
            }
            for i, line in enumerate(doc.lines, start=1)
        ],
        "subtotal": indian_rupees(doc.subtotal),
        "taxes": [
            {"name": t.name, "rate": percent(t.rate), "amount": indian_rupees(t.amount)}
            for t in doc.taxes
        ],
        "tax_total": indian_rupees(doc.tax_total),
        "total": indian_rupees(doc.total),
        "paid": indian_rupees(paid) if paid else "",
        "amount_due": indian_rupees(doc.amount_due),
        "amount_in_words": rupees_in_words(doc.total) if doc.currency == RUPEE_CURRENCY else "",
        "export_note": doc.export_note or "",
        "footer": COMPUTER_GENERATED,
    }


def render_html(doc: InvoiceDocument) -> str:
    """The invoice as a standalone HTML page (also the HTML part of the invoice email)."""
    return _ENV.get_template(HTML_TEMPLATE).render(invoice=invoice_view(doc))


def render_text(doc: InvoiceDocument) -> str:
    """The invoice as plain text (the text/plain alternative of the invoice email)."""
    return _ENV.get_template(TEXT_TEMPLATE).render(invoice=invoice_view(doc))


def render_pdf(doc: InvoiceDocument) -> bytes:
    """The invoice as a PDF (A4). Deterministic: same document, same bytes."""
    data = json.dumps(invoice_view(doc), ensure_ascii=False)
    stamp = datetime.combine(doc.invoice_date, time(0, 0), tzinfo=UTC)
    return typst.compile(
        str(TEMPLATES_DIR / PDF_TEMPLATE),
        root=str(TEMPLATES_DIR),
        format="pdf",
        sys_inputs={TYPST_INPUT_KEY: data},
        ignore_system_fonts=True,
        timestamp=stamp,
    )
