"""Invoices on the real ledger: concurrent finalizations get gapless, unique numbers; drafting
is idempotent; the invoices read model replays to what the ledger says."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import msgspec

from adapters.maintenance import ensure_tables, rebuild
from domain.errors import Conflict
from domain.invoice import Invoice, invoice_id
from domain.numbering import InvoiceSequence, format_number, sequence_id
from domain.organisation import Organisation, OrganisationSettings
from domain.plan import ChargeSpec, Plan, plan_id
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from domain.subscription import Subscription, subscription_id
from infra.wiring import Runtime
from projections import invoices
from tests.conftest import table_rows

IST = ZoneInfo("Asia/Kolkata")
PERIOD = "2026-10"
SUPPLIER = "29"
INVOICES = 24
THREADS = 8
METERS = frozenset({"api_calls"})
PER_UNIT = ChargeSpec("api_calls", "per_unit", unit_price=Decimal("0.0035"))
DRAFTED_AT = datetime(2026, 11, 2, 9, 0, tzinfo=IST)
FINALIZED_AT = datetime(2026, 11, 5, 12, 0, tzinfo=IST)


def ist(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=IST)


def subscribed_orgs(rt: Runtime, count: int) -> list[UUID]:
    orgs = OrganisationService(rt.ledger, lambda: ist(2026, 8, 1), uuid4)
    plans = PlansService(rt.ledger, lambda: ist(2026, 8, 1))
    plans.publish(code="pro", name="Pro", currency="INR", base_fee=Decimal(499), minimum=Decimal(0),
                  charges=(PER_UNIT,), known_meters=METERS, actor=None)
    ids = []
    for i in range(count):
        state = "29" if i % 2 else "27"  # half intra-state (CGST+SGST), half IGST
        ident = orgs.create(OrganisationSettings(
            name=f"org-{i}", billing_email=f"ap{i}@example.in", state_code=state), actor=None).aggregate.id
        plans.subscribe(ident, "pro", starts_at=ist(2026, 9, 1), actor=None)
        ids.append(ident)
    return ids


def draft(rt: Runtime, svc: InvoicingService, org_id: UUID, calls: int) -> tuple[Any, str]:
    """What the invoice run does for one organisation, with the domain's own aggregates."""
    org = rt.ledger.get(org_id, Organisation)
    history = rt.ledger.get(subscription_id(org_id), Subscription).history
    versions = rt.ledger.get(plan_id("pro"), Plan).versions
    return svc.draft(org, period=PERIOD, subscription_history=history, plan_versions={"pro": versions},
                     quantities={"api_calls": Decimal(calls)}, usage_position=rt.ledger.head(),
                     supplier_state_code=SUPPLIER, actor=None)[:2]


def read(rt: Runtime, query: Any, *args: Any, **kwargs: Any) -> Any:
    with rt.pool.connection() as conn:
        return query(conn, *args, **kwargs)


def test_concurrent_finalizations_get_gapless_unique_numbers(runtime: Runtime) -> None:
    org_ids = subscribed_orgs(runtime, INVOICES)
    drafting = InvoicingService(runtime.ledger, lambda: DRAFTED_AT)
    drafted = [draft(runtime, drafting, org, 1000 * (i + 1)) for i, org in enumerate(org_ids)]
    assert {status for _, status in drafted} == {"created"}
    ids = [written.aggregate.id for written, _ in drafted]
    assert ids == [invoice_id(org, PERIOD) for org in org_ids]

    # a second run over the same period appends nothing
    head = runtime.ledger.head()
    again = [draft(runtime, drafting, org, 1) for org in org_ids]
    assert {status for _, status in again} == {"existing"}
    assert {written.position for written, _ in again} == {0}
    assert runtime.ledger.head() == head

    # The threads race for the same sequence version: losers re-read it and retry (a run on
    # 2 cores typically loses 60-90 races here, up to ~15 in a row for one finalization).
    finalizing = InvoicingService(runtime.ledger, lambda: FINALIZED_AT)
    start = threading.Barrier(THREADS)

    def finalize_share(share: list[UUID]) -> list[str]:
        start.wait()
        numbers = []
        for ident in share:
            number = finalizing.finalize(ident, actor=None).aggregate.number
            assert number is not None, "a finalized invoice has its number"
            numbers.append(number)
        return numbers

    with ThreadPoolExecutor(THREADS) as pool:
        shares = [ids[i::THREADS] for i in range(THREADS)]
        numbers = [n for chunk in pool.map(finalize_share, shares) for n in chunk]

    expected = [format_number(2026, seq) for seq in range(1, INVOICES + 1)]
    assert sorted(numbers) == expected  # 1..N: no gap, no duplicate
    in_ledger = {ident: runtime.ledger.get(ident, Invoice) for ident in ids}
    assert sorted(inv.number or "" for inv in in_ledger.values()) == expected
    assert {inv.status for inv in in_ledger.values()} == {"finalized"}
    sequence = runtime.ledger.get(sequence_id(2026), InvoiceSequence)
    assert sequence.last == INVOICES

    # a finalized invoice is immutable, even against a second finalization
    head = runtime.ledger.head()
    try:
        finalizing.finalize(ids[0], actor=None)
        raise AssertionError("finalizing twice must be refused")
    except Conflict:
        pass
    assert runtime.ledger.head() == head

    # ---- the read model, replayed from the ledger ----
    voided = finalizing.void(ids[0], "issued in error", actor=None).aggregate
    assert voided.number == in_ledger[ids[0]].number  # a void invoice keeps its number
    ensure_tables(runtime.pool, invoices.READ_MODEL)
    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)

    row = read(runtime, invoices.get, ids[1])
    inv = in_ledger[ids[1]]
    assert row is not None
    assert (row.status, row.number, row.subtotal, row.total, row.amount_due) == (
        "finalized", inv.number, inv.subtotal, inv.total, inv.total)
    assert msgspec.json.decode(msgspec.json.encode(list(row.lines))) == [
        {"description": x.description, "metric": x.metric, "quantity": str(x.quantity),
         "amount": x.amount, "tiers": msgspec.json.decode(msgspec.json.encode(list(x.tiers)))}
        for x in inv.lines]
    assert msgspec.to_builtins(list(row.taxes)) == [
        {"name": t.name, "rate": str(t.rate), "amount": t.amount} for t in inv.taxes]
    assert row.finalized_at == FINALIZED_AT and row.created_at == DRAFTED_AT
    assert read(runtime, invoices.get, uuid4()) is None

    everything = read(runtime, invoices.page, 1000, None)
    assert sorted(r.id for r in everything) == sorted(ids)
    first = read(runtime, invoices.page, 10, None)
    rest = read(runtime, invoices.page, 1000, (first[-1].created_at, first[-1].id))
    assert [r.id for r in first + rest] == [r.id for r in everything]
    assert [r.id for r in read(runtime, invoices.page, 1000, None, status="void")] == [ids[0]]
    mine = read(runtime, invoices.page, 1000, None, organisation_id=org_ids[3], period=PERIOD)
    assert [r.id for r in mine] == [ids[3]]
    assert read(runtime, invoices.page, 1000, None, period="2026-09") == []

    assert read(runtime, invoices.outstanding, org_ids[3]) == in_ledger[ids[3]].total
    assert read(runtime, invoices.outstanding, org_ids[0]) == 0  # void owes nothing
    existing = read(runtime, invoices.existing_for_period, PERIOD)
    assert existing == {org: ("void" if org == org_ids[0] else "finalized") for org in org_ids}
    assert read(runtime, invoices.existing_for_period, "2026-11") == {}

    # a rebuild is deterministic
    before = table_rows(runtime, "invoices")
    rebuild(runtime.pool, runtime.ledger, invoices.READ_MODEL)
    assert table_rows(runtime, "invoices") == before
