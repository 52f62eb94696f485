"""The report's rules, pure: a difference in either direction fails, a check that compared
nothing while the ledger holds facts of its kind fails, and the hash is of canonical bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

from adapters.reconciliation import chain_check
from domain.reconciliation import (
    DIFFERENT,
    MISSING,
    UNEXPECTED,
    InvoiceFacts,
    NoteFacts,
    Reconciliation,
    Report,
    check_result,
    compare,
    credit_note_findings,
    hash_chain_result,
    report_hash,
)

AT = datetime(2026, 12, 1, tzinfo=UTC)


def test_every_direction_of_a_difference_is_found_with_its_positions() -> None:
    found = compare("t", {"a": 1, "b": 2, "c": 3}, {"b": 2, "c": 4, "d": 5},
                    positions=lambda key, e, a: [{"a": 7, "c": 9, "d": 11}[key]])
    assert [(d.key, d.kind, d.expected, d.actual, d.positions) for d in found] == [
        ("a", MISSING, 1, None, (7,)), ("c", DIFFERENT, 3, 4, (9,)),
        ("d", UNEXPECTED, None, 5, (11,))]


def test_a_check_that_compared_nothing_fails_only_when_the_ledger_holds_facts() -> None:
    assert not check_result("x", "x", compared=0, facts=3, differences=[]).ok
    assert check_result("x", "x", compared=0, facts=0, differences=[]).ok
    assert check_result("x", "x", compared=5, facts=3, differences=[]).ok
    assert not check_result("x", "x", 5, 3, compare("t", {"a": 1}, {})).ok


def test_a_report_is_ok_only_with_every_check_ok_and_its_hash_is_recorded() -> None:
    good = check_result("a", "a", 1, 1, [])
    silent = check_result("b", "b", 0, 2, [])
    report = Report(uuid4(), AT, AT, 10, 10, (good, silent))
    assert not report.ok and report.difference_count == 1
    assert Report(uuid4(), AT, AT, 10, 10, (good,)).ok
    assert not Report(uuid4(), AT, AT, 10, 10, ()).ok  # nothing checked is no success
    recorded = Reconciliation.complete(report)
    assert recorded.report_sha256 == report_hash(report) and not recorded.ok
    assert recorded.id == report.id and recorded.differences == 1


def test_the_hash_chain_check_names_the_first_position_that_does_not_match() -> None:
    assert hash_chain_result(10, None, 10).ok
    assert not hash_chain_result(0, None, 10).ok  # verified nothing over a non-empty ledger
    broken = hash_chain_result(10, 7, 10)
    assert not broken.ok and broken.differences[0].positions == (7,)


def test_a_chain_verifier_plugs_in_as_check_five() -> None:
    @dataclass
    class Found:
        ok: bool
        first_bad_position: int | None
        problem: str | None
        sealed_entries: int

    ctx: Any = SimpleNamespace(conn=None, live_schema="s", state=SimpleNamespace(events=12))
    edited = chain_check(lambda conn, schema: Found(False, 9, "row 9 edited", 12))(ctx)
    assert not edited.ok and edited.differences[0].positions == (9,)
    assert edited.differences[0].actual == "row 9 edited"
    assert chain_check(lambda conn, schema: Found(True, None, None, 12))(ctx).ok


def _note(n: int, invoice: InvoiceFacts, total: int = 1_180, year: str = "2627") -> NoteFacts:
    return NoteFacts(uuid4(), f"CN/{year}/{n:06d}", invoice.id, invoice.organisation_id,
                     invoice.number or "", total - total * 18 // 118, ("CGST", "SGST"),
                     total * 18 // 118, total, 100 + n)


def _invoice(total: int, credited: int, taxes: tuple[str, ...] = ("CGST", "SGST")) -> InvoiceFacts:
    return InvoiceFacts(uuid4(), "INV/2627/000001", uuid4(), total, credited, taxes, 50)


def test_credit_notes_that_agree_with_their_invoices_and_count_up_are_no_difference() -> None:
    invoice = _invoice(59_000, 2_360)
    compared, found = credit_note_findings([_note(1, invoice), _note(2, invoice)],
                                           {invoice.id: invoice})
    assert (compared, found) == (5, [])  # two notes, one invoice, two numbers


def test_a_gap_a_wrong_split_and_a_credited_total_the_notes_do_not_make_are_each_found() -> None:
    invoice = _invoice(59_000, 9_999, taxes=("IGST",))
    _, found = credit_note_findings([_note(1, invoice), _note(3, invoice)], {invoice.id: invoice})
    keys = sorted(d.key for d in found)
    assert keys == ["credit note CN/2627/000001", "credit note CN/2627/000003",
                    "credit note number 2 of 2627", "invoice INV/2627/000001 credited"], found
    over = _invoice(1_000, 1_180)
    _, found = credit_note_findings([_note(1, over)], {over.id: over})
    assert [d.expected for d in found] == ["at most 1000"]
