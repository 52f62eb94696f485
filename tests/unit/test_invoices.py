"""Invoices decide alone: drafting from pricing, idempotency, lifecycle, gapless FY numbering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import pytest
from eventsourcing.domain import Aggregate

from adapters.codec import MsgspecMapper
from domain.errors import Conflict, NotFound, Unavailable, ValidationFailed
from domain.invoice import VOID_REASON_MAX_CHARS, Invoice, InvoiceLine, InvoiceTax, invoice_id
from domain.numbering import (
    NUMBER_MAX_CHARS,
    SEQUENCE_MAX,
    InvoiceSequence,
    financial_year,
    format_number,
    fy_label,
    sequence_id,
)
from domain.organisation import Organisation, OrganisationSettings
from domain.period import period_has_ended
from domain.plan import ChargeSpec, Plan, StoredVersion, TierSpec, to_version
from domain.pricing import LateUsage, price
from domain.services.invoicing import FINALIZE_ATTEMPTS, InvoicingService
from domain.subscription import SubscriptionEntry
from domain.tax import TaxFacts
from tests.unit.memory import Clock, MemoryLedger

IST = ZoneInfo("Asia/Kolkata")
METERS = frozenset({"api_calls", "storage_gb"})
SUPPLIER = "29"
PERIOD = "2026-10"
AFTER_OCTOBER = datetime(2026, 11, 2, 10, 0, tzinfo=IST)
A = TypeVar("A", bound=Aggregate)

PER_UNIT = ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0035"))
GRADUATED = ChargeSpec("storage_gb", "graduated", tiers=(
    TierSpec(Decimal(100), Decimal("2.50")),
    TierSpec(None, Decimal("1.75"), flat_fee=Decimal(10)),
))
USAGE = {"api_calls": Decimal(123_457), "storage_gb": Decimal("150.5"), "unbilled": Decimal(9)}


def ist(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=IST)


def org(state_code: str | None = "29", country: str = "IN", timezone: str = "Asia/Kolkata") -> Organisation:
    settings = OrganisationSettings(name="Acme", billing_email="ap@acme.in", country=country,
                                    state_code=state_code, timezone=timezone)
    return Organisation.create(uuid4(), settings, ist(2026, 1, 1))


def plan(code: str = "pro", base_fee: str = "499", minimum: str = "1000",
         charges: tuple[ChargeSpec, ...] = (PER_UNIT, GRADUATED)) -> StoredVersion:
    return Plan.publish(code, "Pro", "INR", Decimal(base_fee), Decimal(minimum), charges, METERS,
                        ist(2026, 1, 1)).latest


SUBSCRIBED_FROM = ist(2026, 9, 1)


def history(code: str = "pro", since: datetime = SUBSCRIBED_FROM) -> list[SubscriptionEntry]:
    return [SubscriptionEntry(code, since)]


def setup(now: datetime = AFTER_OCTOBER) -> tuple[InvoicingService, MemoryLedger, Clock]:
    ledger, clock = MemoryLedger(), Clock(now)
    return InvoicingService(ledger, clock), ledger, clock


def draft(svc: InvoicingService, customer: Organisation, version: StoredVersion | None = None,
          quantities: dict[str, Decimal] | None = None, period: str = PERIOD, **kw: Any) -> Any:
    version = version or plan()
    return svc.draft(customer, period=period, subscription_history=kw.pop("history", history(version.code)),
                     plan_versions={version.code: [version]},
                     quantities=USAGE if quantities is None else quantities,
                     usage_position=kw.pop("usage_position", 42), supplier_state_code=SUPPLIER,
                     actor=kw.pop("actor", None), **kw)[:2]


# ---- numbering ----------------------------------------------------------------------------------

def test_numbers_are_prefix_fy_and_six_digits_within_16_characters() -> None:
    assert format_number(2026, 1) == "INV/2627/000001"
    assert format_number(2099, SEQUENCE_MAX) == "INV/9900/999999"
    assert len(format_number(2026, SEQUENCE_MAX)) <= NUMBER_MAX_CHARS
    assert fy_label(2026) == "2627" and fy_label(2009) == "0910"
    for bad in (0, SEQUENCE_MAX + 1):
        with pytest.raises(ValueError):
            format_number(2026, bad)


def test_the_financial_year_turns_at_midnight_of_1_april_ist() -> None:
    assert financial_year(ist(2027, 3, 31, 23, 59, 59)) == 2026
    assert financial_year(ist(2027, 4, 1, 0, 0, 0)) == 2027
    # the same instants in UTC: 1 Apr 00:00 IST is 31 Mar 18:30 UTC
    assert financial_year(datetime(2027, 3, 31, 18, 29, 59, tzinfo=UTC)) == 2026
    assert financial_year(datetime(2027, 3, 31, 18, 30, tzinfo=UTC)) == 2027
    assert financial_year(ist(2027, 1, 15)) == 2026 and financial_year(ist(2026, 12, 31)) == 2026
    with pytest.raises(ValueError):
        financial_year(datetime(2027, 4, 1))  # naive: which 1 April?


def test_a_sequence_issues_consecutive_numbers_and_refuses_past_its_width() -> None:
    seq = InvoiceSequence.open(2026, ist(2026, 4, 1))
    assert seq.id == sequence_id(2026) != sequence_id(2027)
    assert [seq.issue(uuid4(), ist(2026, 5, 1)) for _ in range(3)] == [
        "INV/2627/000001", "INV/2627/000002", "INV/2627/000003"]
    seq.last = SEQUENCE_MAX
    with pytest.raises(Conflict, match="exhausted"):
        seq.issue(uuid4(), ist(2026, 5, 1))


# ---- drafting -----------------------------------------------------------------------------------

def test_the_invoice_id_is_derived_from_organisation_and_period() -> None:
    a, b = uuid4(), uuid4()
    assert invoice_id(a, PERIOD) == invoice_id(a, PERIOD) == invoice_id(a, PERIOD, 0)
    assert len({invoice_id(a, PERIOD), invoice_id(b, PERIOD), invoice_id(a, "2026-11"),
                invoice_id(a, PERIOD, 1)}) == 4


@pytest.mark.parametrize("state_code, country, taxes", [
    ("29", "IN", ["CGST", "SGST"]), ("27", "IN", ["IGST"]), (None, "IN", ["IGST"]), (None, "US", []),
])
def test_a_draft_carries_exactly_what_the_pricing_engine_computes(
    state_code: str | None, country: str, taxes: list[str]
) -> None:
    svc, ledger, _ = setup()
    customer, version = org(state_code, country), plan()
    written, status = draft(svc, customer, version)
    assert status == "created" and written.position == ledger.position == 1
    inv: Invoice = written.aggregate
    expected = price(to_version(version), USAGE, TaxFacts(country, state_code, SUPPLIER))
    assert inv.id == invoice_id(customer.id, PERIOD)
    # (a tiered line's breakdown, recorded too, is checked in test_invoice_lines.py)
    assert [(x.description, x.metric, x.quantity, x.amount) for x in inv.lines] == [
        (x.description, x.metric, x.quantity, x.amount) for x in expected.lines]
    assert inv.taxes == tuple(InvoiceTax(t.name, t.rate, t.amount) for t in expected.taxes)
    assert [t.name for t in inv.taxes] == taxes
    assert (inv.subtotal, inv.total, inv.amount_due, inv.currency) == (
        expected.subtotal, expected.total, expected.total, "INR")
    assert inv.total == inv.subtotal + sum(t.amount for t in inv.taxes)
    assert (inv.status, inv.number, inv.period, inv.organisation_id) == ("draft", None, PERIOD, customer.id)
    assert (inv.plan_code, inv.plan_version, inv.usage_position) == ("pro", 1, 42)
    # the priced quantities of the charged meters, not the meters the plan does not bill
    assert inv.quantities == {"api_calls": Decimal(123_457), "storage_gb": Decimal("150.5")}
    assert (inv.country, inv.state_code, inv.supplier_state_code) == (country, state_code, SUPPLIER)


def test_drafting_twice_finds_the_first_invoice_and_appends_nothing() -> None:
    svc, ledger, clock = setup()
    customer = org()
    first, status = draft(svc, customer)
    clock.now += timedelta(days=1)
    again, second = draft(svc, customer, quantities={"api_calls": Decimal(1)})
    assert (status, second) == ("created", "existing")
    assert again.position == 0 and ledger.position == 1
    assert again.aggregate.id == first.aggregate.id and again.aggregate.total == first.aggregate.total


def test_a_run_that_loses_the_race_to_draft_reports_existing() -> None:
    svc, ledger, _ = setup()
    customer = org()
    rival = InvoicingService(ledger, Clock(AFTER_OCTOBER))
    ledger.before_save = lambda: draft(rival, customer)
    written, status = draft(svc, customer)
    assert status == "existing" and written.position == 0 and ledger.position == 1


def test_no_plan_for_the_period_or_nothing_to_bill_is_skipped() -> None:
    svc, ledger, _ = setup()
    # subscribed only from December: October has no plan
    assert draft(svc, org(), history=history(since=ist(2026, 12, 1))) == (None, "skipped")
    assert draft(svc, org(), history=[]) == (None, "skipped")
    # a plan with neither base fee nor minimum, and no usage: an invoice of 0 is not issued
    free = plan(base_fee="0", minimum="0")
    assert draft(svc, org(), free, quantities={}) == (None, "skipped")
    # usage on a free tier prices at 0 too
    zero_tier = plan("zero", "0", "0", (ChargeSpec("api_calls", "per_unit", unit_price=Decimal(0)),))
    assert draft(svc, org(), zero_tier, quantities={"api_calls": Decimal(10)}) == (None, "skipped")
    assert ledger.position == 0


def test_a_skipped_draft_says_why_never_subscribed_later_or_all_zero() -> None:
    svc = setup()[0]

    def why(version: StoredVersion, subscribed: list[SubscriptionEntry],
            quantities: dict[str, Decimal] | None = None) -> tuple[str, str]:
        _, status, reason = svc.draft(
            org(), period=PERIOD, subscription_history=subscribed,
            plan_versions={version.code: [version]},
            quantities=USAGE if quantities is None else quantities, usage_position=42,
            supplier_state_code=SUPPLIER, actor=None)
        return status, reason

    assert why(plan(), []) == ("skipped", "no plan covers the period: never subscribed")
    assert why(plan(), history(since=ist(2026, 12, 1))) == (
        "skipped", "no plan covers the period: subscribed from 2026-12-01T00:00:00+05:30, "
                   "after 2026-10 ended")
    assert why(plan(base_fee="0", minimum="0"), history(), {}) == (
        "skipped", "every line amounts to 0 (plan 'pro' v1)")
    assert why(plan(), history()) == ("created", "")


def test_zero_usage_still_bills_the_base_fee_and_the_minimum() -> None:
    svc, _, _ = setup()
    written, status = draft(svc, org(), quantities={})
    inv = written.aggregate
    assert status == "created"
    assert [(x.description, x.amount) for x in inv.lines] == [
        ("base fee", 49_900), ("api_calls", 0), ("storage_gb", 0), ("minimum commitment", 100_000)]
    assert inv.subtotal == 149_900 and inv.total == 149_900 + 2 * 13_491


def test_a_period_that_has_not_ended_is_refused() -> None:
    svc, ledger, _ = setup(now=ist(2026, 10, 31, 23, 59))
    with pytest.raises(ValidationFailed, match="not ended"):
        draft(svc, org())
    assert not period_has_ended(PERIOD, "Asia/Kolkata", ist(2026, 10, 31, 23, 59, 59))
    assert period_has_ended(PERIOD, "Asia/Kolkata", ist(2026, 11, 1))
    with pytest.raises(ValidationFailed):
        draft(svc, org(), period="2026-13")
    assert ledger.position == 0


def test_a_missing_plan_version_is_an_error_not_a_silent_skip() -> None:
    svc, _, _ = setup()
    with pytest.raises(NotFound, match="plan"):
        svc.draft(org(), period=PERIOD, subscription_history=history("gold"), plan_versions={"pro": [plan()]},
                  quantities=USAGE, usage_position=0, supplier_state_code=SUPPLIER, actor=None)


def test_late_usage_is_priced_on_the_invoice_and_recorded_with_it() -> None:
    svc, _, _ = setup()
    version = plan(minimum="0")
    late = LateUsage("2026-09", to_version(version), {"api_calls": Decimal(1000)},
                     {"api_calls": Decimal(3000)})
    inv = draft(svc, org(), version, late=[late])[0].aggregate
    assert inv.lines[-1] == InvoiceLine("late usage for 2026-09", "api_calls", Decimal(2000), 700)
    assert inv.late_usage[0].period == "2026-09" and inv.late_usage[0].corrected == {
        "api_calls": Decimal(3000)}


# ---- lifecycle ----------------------------------------------------------------------------------

def drafted(svc: InvoicingService, count: int = 1) -> list[UUID]:
    return [draft(svc, org())[0].aggregate.id for _ in range(count)]


def test_finalize_numbers_the_invoice_and_freezes_it() -> None:
    svc, ledger, _ = setup()
    ident, = drafted(svc)
    written = svc.finalize(ident, actor=None)
    inv = written.aggregate
    assert (inv.status, inv.number, inv.finalized_at) == ("finalized", "INV/2627/000001", AFTER_OCTOBER)
    assert inv.is_immutable and written.position == ledger.position
    seq = ledger.get(sequence_id(2026), InvoiceSequence)
    assert (seq.last, seq.last_invoice_id) == (1, ident)
    before = ledger.position
    with pytest.raises(Conflict, match="INV/2627/000001 is finalized and immutable"):
        svc.finalize(ident, actor=None)
    with pytest.raises(Conflict):
        inv.check_mutable("changed")
    assert ledger.position == before


def test_void_from_draft_or_finalized_and_nothing_after() -> None:
    svc, ledger, _ = setup()
    draft_id, final_id = drafted(svc, 2)
    svc.finalize(final_id, actor=None)
    voided = svc.void(draft_id, "duplicate", actor=None).aggregate
    assert (voided.status, voided.void_reason, voided.number) == ("void", "duplicate", None)
    kept = svc.void(final_id, actor=None).aggregate
    assert (kept.status, kept.number, kept.void_reason) == ("void", "INV/2627/000001", "voided")
    for ident in (draft_id, final_id):
        with pytest.raises(Conflict, match="void"):
            svc.void(ident, "again", actor=None)
        with pytest.raises(Conflict, match="void"):
            svc.finalize(ident, actor=None)
    with pytest.raises(ValidationFailed):
        svc.void(drafted(svc)[0], "x" * (VOID_REASON_MAX_CHARS + 1), actor=None)
    with pytest.raises(NotFound, match="invoice"):
        svc.finalize(uuid4(), actor=None)
    # the next number follows on: a void finalized invoice keeps its number
    assert svc.finalize(drafted(svc)[0], actor=None).aggregate.number == "INV/2627/000002"
    assert ledger.get(sequence_id(2026), InvoiceSequence).last == 2


def test_a_voided_period_is_redrafted_only_when_asked() -> None:
    svc, _, _ = setup()
    customer = org()
    first = draft(svc, customer)[0].aggregate
    svc.void(first.id, "wrong usage", actor=None)
    again, status = draft(svc, customer)
    assert status == "existing" and again.aggregate.status == "void"
    replacement, status = draft(svc, customer, redraft_voided=True)
    assert status == "created" and replacement.aggregate.revision == 1
    assert replacement.aggregate.id == invoice_id(customer.id, PERIOD, 1)
    assert draft(svc, customer, redraft_voided=True)[1] == "existing"
    # an ordinary run now finds the replacement, the newest revision
    newest, status = draft(svc, customer)
    assert status == "existing" and newest.aggregate.id == replacement.aggregate.id
    svc.void(replacement.aggregate.id, "wrong again", actor=None)
    third = draft(svc, customer, redraft_voided=True)[0].aggregate
    assert third.revision == 2 and third.id == invoice_id(customer.id, PERIOD, 2)


def test_numbers_follow_the_financial_year_of_finalization_in_ist() -> None:
    svc, _, clock = setup()
    ids = drafted(svc, 4)
    clock.now = ist(2027, 3, 31, 23, 59, 59)
    numbers = [svc.finalize(i, actor=None).aggregate.number for i in ids[:2]]
    assert numbers == ["INV/2627/000001", "INV/2627/000002"]
    clock.now = ist(2027, 4, 1, 0, 0, 0)
    numbers = [svc.finalize(i, actor=None).aggregate.number for i in ids[2:]]
    assert numbers == ["INV/2728/000001", "INV/2728/000002"]


def test_losing_the_race_for_a_number_takes_the_next_one() -> None:
    svc, ledger, _ = setup()
    mine, theirs = drafted(svc, 2)
    rival = InvoicingService(ledger, Clock(AFTER_OCTOBER))
    ledger.before_save = lambda: rival.finalize(theirs, actor=None)
    assert svc.finalize(mine, actor=None).aggregate.number == "INV/2627/000002"
    assert ledger.get(theirs, Invoice).number == "INV/2627/000001"
    issued = [e.number for e in ledger.events[sequence_id(2026)] if hasattr(e, "number")]
    assert issued == ["INV/2627/000001", "INV/2627/000002"]


def test_numbering_that_stays_contended_gives_up_with_unavailable() -> None:
    ledger, waits = MemoryLedger(), list[int]()
    svc = InvoicingService(ledger, Clock(AFTER_OCTOBER), pause=waits.append)
    ident, = drafted(svc)
    ledger.always_conflict = True
    with pytest.raises(Unavailable):
        svc.finalize(ident, actor=None)
    assert waits == list(range(FINALIZE_ATTEMPTS))
    ledger.always_conflict = False
    assert ledger.get(ident, Invoice).status == "draft"


def test_invoice_and_sequence_events_survive_the_ledger_codec() -> None:
    svc, ledger, _ = setup()
    ident, = drafted(svc)
    svc.finalize(ident, actor=None)
    svc.void(ident, "customer left", actor=None)
    mapper = MsgspecMapper()
    for aggregate_id, kind in ((ident, Invoice), (sequence_id(2026), InvoiceSequence)):
        rebuilt: Any = None
        for event in ledger.events[aggregate_id]:
            rebuilt = mapper.to_domain_event(mapper.to_stored_event(event)).mutate(rebuilt)
        original = ledger.get(aggregate_id, kind)
        assert vars(rebuilt) == vars(original)
    inv = ledger.get(ident, Invoice)
    assert isinstance(inv.lines[0], InvoiceLine) and inv.quantities["storage_gb"] == Decimal("150.5")


def test_a_draft_is_the_invoice_the_library_would_create_and_reads_back_from_the_ledger_as_it() -> None:
    """Invoice.draft builds its Drafted event and the invoice without the library's _create
    (a run drafts one per organisation): the same topic, event and invoice as _create gives,
    and the same invoice again when the event is read back through the ledger's codec."""
    from eventsourcing.utils import get_topic

    tax = TaxFacts("IN", "29", SUPPLIER)
    fresh = Invoice.draft(
        organisation_id=uuid4(), period=PERIOD, revision=1,
        priced=price(to_version(plan()), USAGE, tax), plan_code="pro", plan_version=1,
        quantities=USAGE, usage_position=7, tax=tax, late=(), at=AFTER_OCTOBER, gstin="",
        plan_name="Pro")
    (drafted,) = fresh.pending_events
    fields = {k: v for k, v in vars(drafted).items()
              if k not in {"originator_id", "originator_version", "timestamp", "originator_topic"}}
    assert vars(drafted)["originator_topic"] == get_topic(Invoice)
    library = Invoice._create(Invoice.Drafted, id=fresh.id, timestamp=AFTER_OCTOBER, **fields)
    (expected,) = library.pending_events
    assert vars(drafted) == vars(expected)

    def state(i: Invoice) -> dict[str, Any]:
        return {k: v for k, v in vars(i).items() if k != "_pending_events"}

    assert state(fresh) == state(library)
    mapper = MsgspecMapper()
    read_back = mapper.to_domain_event(mapper.to_stored_event(drafted)).mutate(None)
    assert state(read_back) == state(fresh)
