"""Invoice documents: rupee formatting, the document's own consistency checks, and the HTML,
text and PDF renderings (what a GST tax invoice must show; escaping; PDF text via pypdf)."""

from __future__ import annotations

import dataclasses
import io
from datetime import date
from decimal import Decimal
from uuid import UUID

import pypdf
import pytest

from adapters.documents import render_html, render_pdf, render_text
from domain.documents import (
    EXPORT_NOTE,
    SAC_CODE,
    DocumentLine,
    InvoiceDocument,
    indian_rupees,
    number_in_words,
    percent,
    plain_decimal,
    rupees_in_words,
)
from domain.tax import TaxLine

INVOICE_ID = UUID("5f0c6f0e-8a55-4c38-9f77-2f3c0e4a9b11")
SUPPLIER_GSTIN = "29ABCDE1234F1Z5"
CUSTOMER_GSTIN = "29AAAPL1234C1ZV"
HOSTILE_NAME = '<script>alert("x")</script> #emph[x] *bold* $y$ & Sons'


def make_doc(**overrides: object) -> InvoiceDocument:
    """An intra-state invoice (Karnataka → Karnataka): CGST 9 % + SGST 9 %."""
    lines = (
        DocumentLine("api_calls", Decimal("1234567"), 1_00_00_000_00),
        DocumentLine("storage_gb (late usage for 2026-09)", Decimal("12.50"), 2_345_67),
        DocumentLine("base fee", Decimal(1), 5_000_00),
    )
    subtotal = sum(line.amount for line in lines)
    taxes = (
        TaxLine("CGST", Decimal("0.09"), 9_00_711_11),
        TaxLine("SGST", Decimal("0.09"), 9_00_711_11),
    )
    total = subtotal + sum(t.amount for t in taxes)
    fields: dict[str, object] = {
        "invoice_id": INVOICE_ID,
        "number": "INV/2627/000001",
        "invoice_date": date(2026, 11, 2),
        "period": "2026-10",
        "due_date": date(2026, 11, 16),
        "currency": "INR",
        "supplier_name": "Cloudworks Private Limited",
        "supplier_gstin": SUPPLIER_GSTIN,
        "supplier_state_code": "29",
        "supplier_address": "12 MG Road\nBengaluru 560001",
        "customer_name": "Acme Traders",
        "customer_gstin": CUSTOMER_GSTIN,
        "customer_state_code": "29",
        "customer_country": "IN",
        "customer_address": "4 Residency Road\nBengaluru 560025",
        "billing_email": "ap@acme.in",
        "lines": lines,
        "subtotal": subtotal,
        "taxes": taxes,
        "total": total,
        "amount_due": total,
    }
    fields.update(overrides)
    return InvoiceDocument(**fields)  # type: ignore[arg-type]


def export_doc() -> InvoiceDocument:
    line = DocumentLine("api_calls", Decimal(1000), 50_000_00)
    return make_doc(
        customer_name="Globex Inc",
        customer_gstin=None,
        customer_state_code=None,
        customer_country="US",
        customer_address="1 Market St\nSan Francisco CA 94105",
        lines=(line,),
        subtotal=line.amount,
        taxes=(),
        total=line.amount,
        amount_due=line.amount,
    )


def pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages)


# ---- formatting ----


@pytest.mark.parametrize(
    ("paise", "text"),
    [
        (0, "0.00"),
        (5, "0.05"),
        (100, "1.00"),
        (99_999, "999.99"),
        (123_456, "1,234.56"),
        (1_234_567_89, "12,34,567.89"),
        (10_00_000_00, "10,00,000.00"),
        (1_23_45_678_90, "1,23,45,678.90"),
        (1_00_00_00_000_00, "1,00,00,00,000.00"),
        (-5, "-0.05"),
        (-123_456, "-1,234.56"),
        (-1_234_567_89, "-12,34,567.89"),
    ],
)
def test_indian_rupees(paise: int, text: str) -> None:
    assert indian_rupees(paise) == text


def test_indian_rupees_rejects_non_integers() -> None:
    with pytest.raises(TypeError):
        indian_rupees(True)
    with pytest.raises(TypeError):
        indian_rupees(Decimal("1.5"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal(0), "0"),
        (Decimal("1E+3"), "1,000"),
        (Decimal("1234567.500"), "12,34,567.5"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("-2500"), "-2,500"),
    ],
)
def test_plain_decimal(value: Decimal, text: str) -> None:
    assert plain_decimal(value) == text


def test_percent() -> None:
    assert [percent(Decimal(r)) for r in ("0.09", "0.18", "0.025", "0.1")] == ["9%", "18%", "2.5%", "10%"]


def test_amount_in_words_uses_lakh_and_crore() -> None:
    assert number_in_words(0) == "Zero"
    assert number_in_words(1_234_567) == "Twelve Lakh Thirty Four Thousand Five Hundred Sixty Seven"
    assert number_in_words(1_00_00_000) == "One Crore"
    assert number_in_words(250_00_00_000) == "Two Hundred Fifty Crore"
    assert rupees_in_words(123_456) == "Rupees One Thousand Two Hundred Thirty Four and Fifty Six Paise Only"
    assert rupees_in_words(100) == "Rupees One Only"
    assert rupees_in_words(-50) == "Minus Rupees Zero and Fifty Paise Only"


# ---- the document ----


def test_document_must_add_up() -> None:
    doc = make_doc()
    with pytest.raises(ValueError, match="subtotal"):
        dataclasses.replace(doc, subtotal=doc.subtotal + 1, total=doc.total + 1)
    with pytest.raises(ValueError, match="total"):
        dataclasses.replace(doc, total=doc.total - 1, amount_due=0)
    with pytest.raises(ValueError, match="amount_due"):
        dataclasses.replace(doc, amount_due=doc.total + 1)
    with pytest.raises(ValueError, match="number"):
        dataclasses.replace(doc, number="INVOICE/2026-27/000001")  # 22 > 16 characters
    with pytest.raises(ValueError, match="period"):
        dataclasses.replace(doc, period="2026-13")


def test_place_of_supply_and_export_note() -> None:
    assert make_doc().place_of_supply == "29 - Karnataka"
    assert make_doc(customer_state_code="27").place_of_supply == "27 - Maharashtra"
    assert make_doc().export_note is None
    exported = export_doc()
    assert exported.is_export
    assert "Outside India (US)" in exported.place_of_supply
    assert exported.export_note == EXPORT_NOTE
    assert exported.pdf_filename == "INV-2627-000001.pdf"


# ---- HTML ----


def test_html_shows_what_a_gst_tax_invoice_must_show() -> None:
    doc = make_doc()
    html = render_html(doc)
    for must in (
        "Tax Invoice",
        "INV/2627/000001",
        "02 November 2026",
        "Cloudworks Private Limited",
        "12 MG Road",
        SUPPLIER_GSTIN,
        "Acme Traders",
        "4 Residency Road",
        CUSTOMER_GSTIN,
        f"SAC {SAC_CODE}",
        "Place of supply",
        "29 - Karnataka",
        "Reverse charge",
        "Taxable value",
        indian_rupees(doc.subtotal),
        "CGST @ 9%",
        "SGST @ 9%",
        "9,00,711.11",
        indian_rupees(doc.total),
        "Amount due",
        "12,34,567",  # quantity, Indian-grouped
        "Rupees ",
    ):
        assert must in html, must
    assert "IGST" not in html
    assert EXPORT_NOTE not in html


def test_html_inter_state_shows_igst() -> None:
    subtotal = make_doc().subtotal
    igst = TaxLine("IGST", Decimal("0.18"), 18_01_422_22)
    doc = make_doc(
        customer_gstin="27AAAPL1234C1ZV",
        customer_state_code="27",
        taxes=(igst,),
        total=subtotal + igst.amount,
        amount_due=subtotal + igst.amount,
    )
    html = render_html(doc)
    assert "IGST @ 18%" in html
    assert "18,01,422.22" in html
    assert "CGST" not in html and "SGST" not in html
    assert "27 - Maharashtra" in html


def test_html_escapes_customer_text() -> None:
    html = render_html(make_doc(customer_name=HOSTILE_NAME, customer_address="<b>bold</b>"))
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "&amp; Sons" in html
    assert "<b>bold</b>" not in html


def test_export_invoice_has_note_and_no_tax() -> None:
    html = render_html(export_doc())
    assert EXPORT_NOTE in html
    assert "Unregistered" in html
    assert "GST @" not in html
    assert EXPORT_NOTE in render_text(export_doc())


def test_text_alternative_is_not_escaped() -> None:
    text = render_text(make_doc(customer_name="Smith & Sons <Ltd>"))
    assert "Smith & Sons <Ltd>" in text
    assert "INV/2627/000001" in text
    assert "CGST @ 9%:" in text


# ---- PDF ----


def test_pdf_contains_number_and_total() -> None:
    doc = make_doc()
    data = render_pdf(doc)
    assert data.startswith(b"%PDF")
    text = pdf_text(data)
    assert doc.number in text
    assert indian_rupees(doc.total) in text
    assert SUPPLIER_GSTIN in text and CUSTOMER_GSTIN in text
    assert SAC_CODE in text
    assert "CGST @ 9%" in text and "SGST @ 9%" in text


def test_pdf_is_deterministic() -> None:
    assert render_pdf(make_doc()) == render_pdf(make_doc())


def test_pdf_shows_customer_text_literally() -> None:
    text = " ".join(pdf_text(render_pdf(make_doc(customer_name=HOSTILE_NAME))).split())
    # Typst markup in the name is printed, not interpreted (no emphasis, no math, no code).
    assert HOSTILE_NAME in text


def test_pdf_export_note() -> None:
    doc = export_doc()
    text = " ".join(pdf_text(render_pdf(doc)).split())
    assert EXPORT_NOTE in text
    assert indian_rupees(doc.total) in text


def test_pdf_long_invoice_paginates() -> None:
    lines = tuple(DocumentLine(f"meter_{i:03d}", Decimal(i), 100 * i) for i in range(1, 121))
    subtotal = sum(line.amount for line in lines)
    doc = make_doc(lines=lines, subtotal=subtotal, taxes=(), total=subtotal, amount_due=subtotal)
    reader = pypdf.PdfReader(io.BytesIO(render_pdf(doc)))
    assert len(reader.pages) > 1
    text = pdf_text(render_pdf(doc))
    assert "meter_120" in text and indian_rupees(doc.total) in text
    assert f"page 1 of {len(reader.pages)}" in text
