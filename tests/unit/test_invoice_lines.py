"""Invoice lines a customer understands (issue 21): meter names on the lines, recorded on the
draft; old drafts without them still read (their description is the meter code); documents'
file names; the start-up warning for a missing SUPPLIER_GSTIN; the plan's name and version;
a tiered charge's breakdown per tier."""

from __future__ import annotations

import dataclasses
import logging
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import msgspec
import pytest

from adapters.codec import MsgspecMapper
from adapters.documents import render_html, render_pdf, render_text
from api.invoices import from_row
from domain.documents import DRAFT_NUMBER, DocumentTier, file_stem, rupee_price
from domain.invoice import Invoice, InvoiceLineTier
from domain.plan import to_version
from domain.pricing import (
    Charge,
    LateUsage,
    Tier,
    TierPart,
    charge_amount,
    late_usage_lines,
    price,
    tier_parts,
)
from domain.tax import TaxFacts
from infra.wiring import MISSING_SUPPLIER_GSTIN, build_api
from projections import invoices as view
from tests.unit.test_documents import make_doc, pdf_text
from tests.unit.test_invoices import SUPPLIER, USAGE, draft, org, plan, setup
from tests.unit.test_wiring import unconnected_runtime

NAMES = {"api_calls": "API calls", "storage_gb": "Storage (GB-month)"}


def test_charge_lines_are_described_by_the_meter_name_and_fall_back_to_the_code() -> None:
    version = to_version(plan())
    tax = TaxFacts("IN", "29", SUPPLIER)
    named = price(version, USAGE, tax, meter_names=NAMES)
    coded = price(version, USAGE, tax)
    assert [x.description for x in named.lines][:3] == [
        "base fee", "API calls", "Storage (GB-month)"]
    assert [x.description for x in coded.lines][:3] == ["base fee", "api_calls", "storage_gb"]
    # a name changes words only: the metric code and every amount stay what they were
    assert [(x.metric, x.quantity, x.amount) for x in named.lines] == [
        (x.metric, x.quantity, x.amount) for x in coded.lines]
    assert (named.subtotal, named.total) == (coded.subtotal, coded.total)
    partly = price(version, USAGE, tax, meter_names={"api_calls": "API calls"})
    assert [x.description for x in partly.lines][1:3] == ["API calls", "storage_gb"]


def test_late_usage_lines_name_their_meter() -> None:
    late = LateUsage("2026-09", to_version(plan()), {"api_calls": Decimal(1000)},
                     {"api_calls": Decimal(3000)})
    line = late_usage_lines(late, NAMES)[0]
    assert (line.description, line.metric, line.amount) == (
        "late usage for 2026-09: API calls", "api_calls", 700)
    assert late_usage_lines(late)[0].description == "late usage for 2026-09"


def test_a_draft_records_the_meter_names_it_was_drafted_with() -> None:
    svc, ledger, _ = setup()
    written, status = draft(svc, org(), meter_names=NAMES)
    assert status == "created"
    assert [x.description for x in written.aggregate.lines][:3] == [
        "base fee", "API calls", "Storage (GB-month)"]
    # a ledger fact: the Drafted event as stored and decoded again carries the name
    (drafted,) = ledger.events[written.aggregate.id]
    assert [x.description for x in drafted.lines][1] == "API calls"


def test_document_file_names_are_the_number_with_dashes_or_draft_and_the_id() -> None:
    ident = uuid4()
    assert file_stem("INV/2627/000001", ident) == "INV-2627-000001"
    assert file_stem(None, ident) == file_stem(DRAFT_NUMBER, ident) == f"DRAFT-{ident}"
    doc = make_doc()
    assert (doc.file_stem, doc.pdf_filename) == ("INV-2627-000001", "INV-2627-000001.pdf")
    draft_doc = dataclasses.replace(doc, number=DRAFT_NUMBER)
    assert draft_doc.pdf_filename == f"DRAFT-{doc.invoice_id}.pdf"


def test_the_api_warns_at_start_without_a_supplier_gstin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = unconnected_runtime(tmp_path)
    with caplog.at_level(logging.WARNING, logger="billing.infra"):
        role = build_api(rt, admin_token="given")
    assert role.deps.warnings == (MISSING_SUPPLIER_GSTIN,)
    assert any("SUPPLIER_GSTIN" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with_gstin = dataclasses.replace(rt, settings=dataclasses.replace(
        rt.settings, supplier_gstin="29ABCDE1234F1Z5"))
    with caplog.at_level(logging.WARNING, logger="billing.infra"):
        assert build_api(with_gstin, admin_token="given").deps.warnings == ()
    assert not any("SUPPLIER_GSTIN" in r.getMessage() for r in caplog.records)


def test_a_draft_records_its_plan_name_and_an_older_draft_shows_the_plan_code() -> None:
    svc, ledger, _ = setup()
    inv = draft(svc, org())[0].aggregate
    (drafted,) = ledger.events[inv.id]
    assert (drafted.plan_name, drafted.plan_code, drafted.plan_version) == ("Pro", "pro", 1)
    out = from_row(view.row_of(ledger.get(inv.id, Invoice), 1))
    assert (out.plan_name, out.plan_code, out.plan_version) == ("Pro", "pro", 1)
    # A draft without the name is what the ledger held before it was recorded: the codec omits
    # a field at its default, so these are the old bytes exactly.
    old = dataclasses.replace(drafted, plan_name=None)
    stored = MsgspecMapper().to_stored_event(old)
    assert b"plan_name" not in stored.state
    rebuilt = MsgspecMapper().to_domain_event(stored).mutate(None)
    assert rebuilt.plan_name is None
    assert from_row(view.row_of(rebuilt, 1)).plan_name == "pro"


def test_the_document_names_the_plan_and_its_version() -> None:
    doc = dataclasses.replace(make_doc(), plan_name="Growth", plan_version=2)
    assert doc.plan_label == "Growth (version 2)"
    assert "Growth (version 2)" in render_html(doc) and "Plan:" in render_text(doc)
    assert "Growth (version 2)" in render_text(doc) and "Growth (version 2)" in pdf_text(render_pdf(doc))
    assert make_doc().plan_label == "" and "Plan" not in render_text(make_doc())


# ---- tiers --------------------------------------------------------------------------------------

GRADUATED = Charge("gb", "graduated", tiers=(
    Tier(Decimal(100), Decimal("2.50")), Tier(None, Decimal("1.75"), Decimal(10))))
VOLUME = Charge("seats", "volume", tiers=(
    Tier(Decimal(10), Decimal(100)), Tier(None, Decimal(80), Decimal(20))))


def test_tier_parts_say_what_each_tier_priced_and_add_up_to_the_charge() -> None:
    assert tier_parts(GRADUATED, Decimal("150.5")) == (
        TierPart(1, Decimal(100), Decimal(100), Decimal("2.50"), Decimal(0)),
        TierPart(2, None, Decimal("50.5"), Decimal("1.75"), Decimal(10)))
    assert tier_parts(GRADUATED, Decimal(40)) == (
        TierPart(1, Decimal(100), Decimal(40), Decimal("2.50"), Decimal(0)),)
    # volume: the one tier the whole quantity falls in; nothing at 0 (it costs 0)
    assert tier_parts(VOLUME, Decimal(30)) == (
        TierPart(2, None, Decimal(30), Decimal(80), Decimal(20)),)
    assert tier_parts(VOLUME, Decimal(0)) == () == tier_parts(GRADUATED, Decimal(0))
    assert tier_parts(Charge("x", "per_unit", unit_price=Decimal(1)), Decimal(5)) == ()
    for charge in (GRADUATED, VOLUME):
        for q in ("0", "0.5", "10", "10.000001", "100", "100.5", "123456.789"):
            parts = tier_parts(charge, Decimal(q))
            assert sum((p.quantity * p.unit_price + p.flat_fee for p in parts), Decimal(0)) == (
                charge_amount(charge, Decimal(q)))
            assert sum((p.quantity for p in parts), Decimal(0)) == Decimal(q)


def test_a_draft_records_each_tiered_line_s_tiers_and_the_api_shows_them() -> None:
    svc, ledger, _ = setup()
    inv = draft(svc, org(), meter_names=NAMES)[0].aggregate
    stored = ledger.get(inv.id, Invoice)  # through the ledger's codec
    by_metric = {x.metric: x for x in stored.lines}
    assert by_metric["api_calls"].tiers == () and by_metric[None].tiers == ()
    assert by_metric["storage_gb"].tiers == (
        InvoiceLineTier(1, Decimal(100), Decimal(100), Decimal("2.50"), Decimal(0)),
        InvoiceLineTier(2, None, Decimal("50.5"), Decimal("1.75"), Decimal(10)))
    # 100 x 2.50 + 50.5 x 1.75 + 10 = 348.375 -> 348.38, the line's amount as before
    assert by_metric["storage_gb"].amount == 34_838
    out = {x.metric: x for x in from_row(view.row_of(stored, 1)).lines}
    assert [msgspec.to_builtins(t) for t in out["storage_gb"].tiers] == [
        {"tier": 1, "up_to": "100", "quantity": "100", "unit_price": "2.50", "flat_fee": "0"},
        {"tier": 2, "up_to": None, "quantity": "50.5", "unit_price": "1.75", "flat_fee": "10"}]
    assert out["api_calls"].tiers == []
    # a line recorded before tiers were: the codec omits the empty default, so old bytes decode
    stored_line = MsgspecMapper().to_stored_event(ledger.events[inv.id][0]).state
    assert stored_line.count(b"tiers") == 1  # only the tiered line has the field at all
    old = msgspec.json.decode(b'{"description": "gb", "metric": "gb", "quantity": "1", "amount": 5}',
                              type=view.InvoiceLineRow)
    assert old.tiers == ()


def test_the_document_prints_the_tiers_under_their_line() -> None:
    tiers = (DocumentTier(1, Decimal(100), Decimal(100), Decimal("2.50"), Decimal(0)),
             DocumentTier(2, None, Decimal("50.5"), Decimal("0.0035"), Decimal(10)))
    doc = make_doc()
    first = dataclasses.replace(doc.lines[0], tiers=tiers)
    doc = dataclasses.replace(doc, lines=(first, *doc.lines[1:]))
    html, text = render_html(doc), render_text(doc)
    assert "Tier 1 (up to 100): 2.50 per unit" in html
    assert "Tier 2 (and above): 0.0035 per unit + 10.00 flat fee" in html
    assert "   Tier 2 (and above): 50.5 x INR 0.0035 + INR 10.00 flat fee\n" in text
    assert "   Tier 1 (up to 100): 100 x INR 2.50\n" in text
    printed = pdf_text(render_pdf(doc))
    assert "Tier 1 (up to 100)" in printed and "0.0035 per unit" in printed
    assert (rupee_price(Decimal("1500")), rupee_price(Decimal("0.0035")),
            rupee_price(Decimal("123456.5"))) == ("1,500.00", "0.0035", "1,23,456.50")
