"""Reconciliation: the report of a replay of the ledger compared with what was built from it,
and the ledger fact that one was completed (`Reconciliation.Completed`, the issue's
ReconciliationCompleted, with the SHA-256 of the report).

Pure: the comparison of expected values (from the replay) with actual ones (read models, bills,
the gateway) and the rules of a verdict. No silent success: a check that compared nothing
while the ledger holds facts of its kind fails, and a difference in either direction (missing,
unexpected, or different) fails. docs/RECONCILIATION.md describes the checks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate

MISSING = "missing"  # expected by the replay, absent from what was built
UNEXPECTED = "unexpected"  # present in what was built, absent from the replay
DIFFERENT = "different"  # present in both, with other values
FINDINGS_MAX_PER_CHECK = 1000  # a report lists at most this many differences per check
POSITIONS_MAX_PER_FINDING = 20


class Difference(msgspec.Struct, frozen=True):
    """One difference: what `subject` (a table, an invoice, an order) holds under `key`."""

    subject: str
    key: str
    kind: str  # MISSING | UNEXPECTED | DIFFERENT
    expected: Any
    actual: Any
    positions: tuple[int, ...] = ()


class CheckResult(msgspec.Struct, frozen=True):
    """One check: how many items it compared, how many ledger facts of its kind the replay met,
    and its differences (at most FINDINGS_MAX_PER_CHECK listed; `difference_count` counts all)."""

    name: str
    title: str
    compared: int
    facts: int
    differences: tuple[Difference, ...] = ()
    difference_count: int = 0
    note: str = ""
    skipped: bool = False  # not run here (no gateway configured, the check not installed)

    @property
    def silent(self) -> bool:
        """Compared nothing while the ledger holds facts of its kind."""
        return not self.skipped and self.compared == 0 and self.facts > 0

    @property
    def ok(self) -> bool:
        return self.difference_count == 0 and not self.silent


class Report(msgspec.Struct, frozen=True):
    """A reconciliation's whole report: the ledger position it covers and every check."""

    id: UUID
    started_at: datetime
    finished_at: datetime
    ledger_position: int
    events_replayed: int
    checks: tuple[CheckResult, ...]
    organisation_id: UUID | None = None
    period: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def difference_count(self) -> int:
        return sum(c.difference_count + (1 if c.silent else 0) for c in self.checks)


def report_bytes(report: Report) -> bytes:
    """The report's canonical JSON (keys sorted): what its hash is taken over."""
    return msgspec.json.encode(msgspec.to_builtins(report), order="sorted")


def report_hash(report: Report) -> str:
    return hashlib.sha256(report_bytes(report)).hexdigest()


def compare(
    subject: str,
    expected: Mapping[Any, Any],
    actual: Mapping[Any, Any],
    *,
    positions: Callable[[Any, Any, Any], Iterable[int]] = lambda key, e, a: (),
    key_text: Callable[[Any], str] = str,
) -> list[Difference]:
    """Every key whose value differs, in either direction. `positions(key, expected, actual)`
    names the ledger positions involved (either value may be None)."""
    found: list[Difference] = []
    for key, want in expected.items():
        have = actual.get(key, _ABSENT)
        if have is _ABSENT:
            found.append(_difference(subject, key, MISSING, want, None, positions, key_text))
        elif have != want:
            found.append(_difference(subject, key, DIFFERENT, want, have, positions, key_text))
    for key, have in actual.items():
        if key not in expected:
            found.append(_difference(subject, key, UNEXPECTED, None, have, positions, key_text))
    return found


_ABSENT = object()


def _difference(subject: str, key: Any, kind: str, want: Any, have: Any,
                positions: Callable[[Any, Any, Any], Iterable[int]],
                key_text: Callable[[Any], str]) -> Difference:
    found = sorted({int(p) for p in positions(key, want, have) if p})
    return Difference(subject, key_text(key), kind, _plain(want), _plain(have),
                      tuple(found[:POSITIONS_MAX_PER_FINDING]))


def _plain(value: Any) -> Any:
    """JSON-ready: tuples and Decimals as msgspec writes them."""
    return msgspec.to_builtins(value, str_keys=True) if value is not None else None


def check_result(name: str, title: str, compared: int, facts: int,
                 differences: list[Difference], note: str = "") -> CheckResult:
    return CheckResult(name, title, compared, facts, tuple(differences[:FINDINGS_MAX_PER_CHECK]),
                       len(differences), note)


def skipped(name: str, title: str, note: str) -> CheckResult:
    return CheckResult(name, title, 0, 0, (), 0, note, skipped=True)


def hash_chain_result(checked: int, first_mismatch: int | None, ledger_entries: int,
                      expected: str = "", actual: str = "") -> CheckResult:
    """Check 5 from a verification of the ledger's hash chain: `checked` entries recomputed,
    the first position whose seal does not match (None: all do), and the ledger's entries (the
    facts: a chain that checked nothing over a non-empty ledger fails)."""
    found = [] if first_mismatch is None else [Difference(
        "hash chain", f"position {first_mismatch}", DIFFERENT, expected or "the sealed hash",
        actual or "a different hash", (first_mismatch,))]
    return check_result("hash_chain", "the ledger's hash chain recomputed", checked,
                        ledger_entries, found)


def replay_failed_result(position: int, problem: str) -> CheckResult:
    """The replay stopped at an entry it cannot decode or apply (one a projector dead-letters):
    a failed check naming that position, so that the run is recorded as failed."""
    return check_result("replay", "the ledger replayed by the read models' own handlers", 0, 1,
                        [Difference("replay", f"position {position}", DIFFERENT,
                                    "an entry the read models can apply", problem, (position,))])


class Reconciliation(Aggregate):
    """One completed reconciliation, as the ledger records it."""

    class Completed(Aggregate.Created):
        """ReconciliationCompleted: the report's hash and verdict; `report` is its canonical
        JSON (what `report_hash` is the SHA-256 of)."""

        ledger_position: int
        ok: bool
        differences: int
        report_sha256: str
        report: str
        organisation_id: UUID | None = None
        period: str | None = None

    def __init__(self, ledger_position: int, ok: bool, differences: int, report_sha256: str,
                 report: str, organisation_id: UUID | None = None,
                 period: str | None = None) -> None:
        self.ledger_position = ledger_position
        self.ok = ok
        self.differences = differences
        self.report_sha256 = report_sha256
        self.report = report
        self.organisation_id = organisation_id
        self.period = period

    @classmethod
    def complete(cls, report: Report) -> Reconciliation:
        """Decide: record a finished report (its id is the reconciliation's)."""
        return cls._create(
            cls.Completed, id=report.id, timestamp=report.finished_at,
            ledger_position=report.ledger_position, ok=report.ok,
            differences=report.difference_count, report_sha256=report_hash(report),
            report=report_bytes(report).decode(), organisation_id=report.organisation_id,
            period=report.period)


# ---- credit notes against their invoices, and their numbering (checks 2 and 4) ---------------

class NoteFacts(msgspec.Struct, frozen=True):
    """A credit note as the replay rebuilt it. Amounts are paise."""

    id: UUID
    number: str
    invoice_id: UUID
    organisation_id: UUID
    invoice_number: str
    subtotal: int
    tax_names: tuple[str, ...]
    taxes: int
    total: int
    position: int


class InvoiceFacts(msgspec.Struct, frozen=True):
    """What a credit note is checked against: its invoice, as the replay rebuilt it."""

    id: UUID
    number: str | None
    organisation_id: UUID
    total: int
    credited: int
    tax_names: tuple[str, ...]
    position: int


def credit_note_findings(notes: list[NoteFacts],
                         invoices: Mapping[UUID, InvoiceFacts]) -> tuple[int, list[Difference]]:
    """Every note against its invoice (its number, organisation, tax split, its own sum), the
    credited total of every credited invoice (the notes' sum, never above the invoice), and the
    notes' numbers gapless and unique per financial year (`CN/<fy>/<seq>`): what was compared,
    and every difference."""
    found: list[Difference] = []
    compared = 0

    def differ(key: str, expected: Any, actual: Any, *positions: int) -> None:
        found.append(Difference("credit notes", key, DIFFERENT, expected, actual, positions))

    by_invoice: dict[UUID, list[NoteFacts]] = {}
    by_year: dict[str, dict[int, list[NoteFacts]]] = {}
    for note in notes:
        compared += 1
        by_invoice.setdefault(note.invoice_id, []).append(note)
        invoice = invoices.get(note.invoice_id)
        key = f"credit note {note.number}"
        if invoice is None:
            differ(key, f"against invoice {note.invoice_id}", "no such invoice", note.position)
            continue
        if (note.invoice_number, note.organisation_id) != (invoice.number, invoice.organisation_id):
            differ(key, f"invoice {invoice.number} of {invoice.organisation_id}",
                   f"invoice {note.invoice_number} of {note.organisation_id}",
                   note.position, invoice.position)
        if not set(note.tax_names) <= set(invoice.tax_names):
            differ(key, f"tax reversed in the invoice's split {list(invoice.tax_names)}",
                   list(note.tax_names), note.position, invoice.position)
        if note.subtotal + note.taxes != note.total:
            differ(key, f"total {note.subtotal + note.taxes} (subtotal + tax)", note.total,
                   note.position)
        parts = note.number.split("/")
        if len(parts) == 3 and parts[2].isdigit():
            by_year.setdefault(parts[1], {}).setdefault(int(parts[2]), []).append(note)
        else:
            differ(key, "a number CN/<year>/<sequence>", note.number, note.position)
    for invoice_id, invoice in invoices.items():
        credited = sum(n.total for n in by_invoice.get(invoice_id, []))
        if not credited and not invoice.credited:
            continue
        compared += 1
        positions = [invoice.position, *(n.position for n in by_invoice.get(invoice_id, []))]
        if credited != invoice.credited:
            differ(f"invoice {invoice.number} credited", credited, invoice.credited, *positions)
        if credited > invoice.total:
            differ(f"invoice {invoice.number} credited", f"at most {invoice.total}", credited,
                   *positions)
    for year, issued in by_year.items():
        for seq in range(1, max(issued) + 1):
            compared += 1
            given = issued.get(seq, [])
            if len(given) != 1:
                differ(f"credit note number {seq} of {year}", "issued once",
                       f"issued {len(given)} times", *(n.position for n in given))
    return compared, found
