"""Usage that arrives for an already-invoiced period is billed on the next invoice as its own
"late usage for <period>" line — once, never silently dropped (docs/INVOICES.md, Late usage) — whether
the earlier invoices were finalized at once or are still drafts (BILLING_AUTO_FINALIZE_HOURS=0,
nobody finalizing): a draft's quantities are what it bills, and drafts are never re-priced."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from uuid import uuid4

import pytest

from adapters.invoice_run import InvoiceRun
from adapters.usage_writer import encode_usage
from domain.invoice import VOID, Invoice
from domain.organisation import OrganisationSettings
from domain.period import period_bounds, period_of, shift_period
from domain.plan import ChargeSpec
from domain.records import KeyRecord, RunResult
from domain.services.catalogue import CatalogueService
from domain.services.invoicing import InvoicingService
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from domain.usage import UsageFact
from infra.wiring import READ_MODELS, Runtime
from projections import invoices
from tests.conftest import ThreadedWriter, reached, tracked, wait_sync
from tests.integration.invoice_run_steps import caught_up, live_runtime, now, run_invoices

OCTOBER = datetime(2026, 10, 20, 12, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 10, 12, tzinfo=UTC)
TIMEZONE = "Asia/Kolkata"
RUN_AFTER_PERIOD_END = timedelta(days=3)  # past the 24 h grace, well within the 35-day window
ONE_RUPEE_PER_CALL = Decimal(1)



LATE = "late usage for "


def late_period(description: str) -> str:
    """The period a "late usage for <period>: <meter name>" line bills."""
    return description.removeprefix(LATE).split(":", 1)[0]


@pytest.fixture
def live(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with live_runtime(runtime) as both:
        yield both


class Tenant:
    """One organisation on a per-unit plan, with the steps a late-usage scenario takes."""

    def __init__(self, rt: Runtime, writer: ThreadedWriter, charges: list[ChargeSpec],
                 base_fee: Decimal = Decimal(0)) -> None:
        self.rt, self.writer = rt, writer
        self.org = OrganisationService(rt.ledger, now, uuid4).create(
            OrganisationSettings(name="Late Ltd", billing_email="a@b.in", state_code="29"),
            actor=None).aggregate
        plans = PlansService(rt.ledger, now)
        plans.publish(code="late", name="Late", currency="INR", base_fee=base_fee, minimum=Decimal(0),
                      charges=charges, known_meters={c.metric for c in charges}, actor=None)
        plans.subscribe(self.org.id, "late", datetime(2026, 6, 1, tzinfo=UTC), actor=None)
        self.key = KeyRecord(uuid4(), "p", "h", uuid4(), self.org.id, TIMEZONE, None, False)
        self.sent: dict[tuple[str, str], Decimal] = {}  # (period, metric) -> sum of values sent

    def usage(self, *moments: datetime, metric: str = "calls", value: Decimal = Decimal(1)) -> None:
        rows = [encode_usage(self.key, UsageFact(uuid4().hex, metric, value, at, {}), now())
                for at in moments]
        position = self.writer.submit(rows).result(10).position
        for at in moments:
            key = (period_of(at, TIMEZONE), metric)
            self.sent[key] = self.sent.get(key, Decimal(0)) + value
        self.caught_up(position)

    def caught_up(self, position: int) -> None:
        caught_up(self.rt, position)

    def run(self, period: str) -> RunResult:
        return run_invoices(self.rt, period, period_bounds(period, TIMEZONE)[1] + RUN_AFTER_PERIOD_END)

    def drafted(self, period: str) -> Invoice:
        result = self.run(period)
        assert (result.created, result.failed, result.blocked) == (1, 0, []), result
        with self.rt.pool.connection() as conn:
            (row,) = invoices.page(conn, 10, None, organisation_id=self.org.id, period=period)
        return self.rt.ledger.get(row.id, Invoice)

    def finalize(self, invoice: Invoice) -> Invoice:
        written = InvoicingService(self.rt.ledger, now).finalize(invoice.id, actor=None)
        self.caught_up(written.position)
        return written.aggregate

    def all_invoices(self) -> list[Invoice]:
        with self.rt.pool.connection() as conn:
            rows = invoices.page(conn, invoices.LIST_MAX_ROWS, None, organisation_id=self.org.id)
        return [self.rt.ledger.get(row.id, Invoice) for row in rows]

    def billed(self) -> dict[tuple[str, str], Decimal]:
        """(period, metric) -> quantity billed for it across every non-void invoice: the
        period's own charge line plus every "late usage for <period>" line."""
        out: dict[tuple[str, str], Decimal] = {}
        for invoice in self.all_invoices():
            if invoice.status == VOID:
                continue
            for line in invoice.lines:
                if line.metric is None:
                    continue
                if not line.description.startswith(LATE):  # the period's own line (the meter's name)
                    key = (invoice.period, line.metric)
                else:
                    key = (late_period(line.description), line.metric)
                out[key] = out.get(key, Decimal(0)) + line.quantity
        return {k: v for k, v in out.items() if v}  # a charge line at 0 bills nothing

    def late_amounts(self, invoice: Invoice, period: str) -> list[int]:
        return [line.amount for line in invoice.lines
                if line.description.startswith(LATE) and late_period(line.description) == period]


def calls_tenant(live: tuple[Runtime, ThreadedWriter], base_fee: Decimal = Decimal(0)) -> Tenant:
    rt, writer = live
    CatalogueService(rt.ledger, now, uuid4).define_meter(code="calls", name="Calls", aggregation="count",
                                                         field=None, group_by=[], allow_negative=False,
                                                         has_usage=lambda _: False, actor=None)
    return Tenant(rt, writer, [ChargeSpec("calls", "per_unit", unit_price=ONE_RUPEE_PER_CALL)],
                  base_fee)


@pytest.mark.parametrize("finalized", ["each at once", "none until the end", "only the first"])
def test_late_usage_is_billed_on_the_next_invoice_once(
    live: tuple[Runtime, ThreadedWriter], finalized: str,
) -> None:
    tenant = calls_tenant(live)
    drafts: list[Invoice] = []

    def invoice(period: str) -> Invoice:
        drafted = tenant.drafted(period)
        if finalized == "each at once" or (finalized == "only the first" and not drafts):
            drafted = tenant.finalize(drafted)
        drafts.append(drafted)
        return drafted

    tenant.usage(OCTOBER, OCTOBER, OCTOBER)
    october = invoice("2026-10")
    assert [(line.description, line.amount) for line in october.lines] == [("Calls", 300)]

    tenant.usage(OCTOBER, OCTOBER, NOVEMBER)  # two late October events, one November event
    november = invoice("2026-11")
    lines = {line.description: line.amount for line in november.lines}
    assert lines["Calls"] == 100
    assert tenant.late_amounts(november, "2026-10") == [200], lines

    tenant.usage(OCTOBER)  # one more, after November's invoice billed the first two late ones
    december = invoice("2026-12")
    assert tenant.late_amounts(december, "2026-10") == [100], december.lines

    for draft in drafts:
        if draft.status == "draft":
            tenant.finalize(draft)
    assert tenant.billed() == tenant.sent


def test_every_event_is_billed_exactly_once_across_open_drafts(
    live: tuple[Runtime, ThreadedWriter],
) -> None:
    """Five months drafted and left open, usage for the two months before each run arriving
    between runs, all finalized at the end: per period, own line + late lines == its events."""
    tenant = calls_tenant(live, base_fee=Decimal(10))  # a base fee: every month has an invoice
    periods = [shift_period("2026-07", i) for i in range(7)]  # 2026-07 .. 2027-01
    arrivals = {0: (3, 0, 0), 1: (2, 4, 0), 2: (5, 1, 2), 3: (1, 3, 1), 4: (2, 2, 3),
                5: (0, 1, 1), 6: (0, 0, 2)}  # run index -> events for (P, P-1, P-2)
    drafts = []
    for index, period in enumerate(periods):
        for back, count in enumerate(arrivals[index]):
            if count and index - back >= 0:
                mid_month = period_bounds(shift_period(period, -back), TIMEZONE)[0] + timedelta(days=14)
                tenant.usage(*[mid_month] * count)
        drafts.append(tenant.drafted(period))
        assert all(d.status == "draft" for d in tenant.all_invoices())  # nothing finalized yet
    for draft in drafts:
        tenant.finalize(draft)
    assert tenant.billed() == tenant.sent
    assert sum(tenant.sent.values()) == sum(sum(a) for a in arrivals.values())


def test_a_late_item_that_went_down_is_left_out_alone(live: tuple[Runtime, ThreadedWriter]) -> None:
    """Usage of one earlier period that went down needs a credit note: only that item is left
    out; the other late usage of the same draft is still billed."""
    rt, writer = live
    catalogue = CatalogueService(rt.ledger, now, uuid4)
    catalogue.define_meter(code="calls", name="Calls", aggregation="count", field=None, group_by=[],
                           allow_negative=False, has_usage=lambda _: False, actor=None)
    catalogue.define_meter(code="credits", name="Credits", aggregation="sum", field=None, group_by=[],
                           allow_negative=True, has_usage=lambda _: False, actor=None)
    tenant = Tenant(rt, writer, [ChargeSpec("calls", "per_unit", unit_price=Decimal(1)),
                                 ChargeSpec("credits", "per_unit", unit_price=Decimal(1))])
    august, september = (datetime(2026, m, 15, tzinfo=UTC) for m in (8, 9))
    tenant.usage(august, metric="credits", value=Decimal(10))
    tenant.usage(august)
    tenant.finalize(tenant.drafted("2026-08"))
    tenant.usage(september)
    tenant.finalize(tenant.drafted("2026-09"))
    # Before October's run: August's credits go down (a correction), August's calls and
    # September's calls go up.
    tenant.usage(august, metric="credits", value=Decimal(-4))
    tenant.usage(august, september, september)
    october = tenant.drafted("2026-10")
    late = {(late_period(line.description), line.metric): line.amount for line in october.lines
            if line.description.startswith(LATE)}
    assert late == {("2026-08", "calls"): 100, ("2026-09", "calls"): 200}, october.lines


def test_late_usage_of_a_voided_carrier_is_billed_again(live: tuple[Runtime, ThreadedWriter]) -> None:
    """A void invoice bills nothing: late usage it carried goes on the next invoice."""
    tenant = calls_tenant(live, base_fee=Decimal(10))
    september = datetime(2026, 9, 15, tzinfo=UTC)
    tenant.usage(september)
    tenant.drafted("2026-09")
    tenant.usage(september, september)
    october = tenant.drafted("2026-10")
    assert tenant.late_amounts(october, "2026-09") == [200]
    written = InvoicingService(tenant.rt.ledger, now).void(october.id, "wrong", actor=None)
    tenant.caught_up(written.position)
    tenant.usage(september)
    november = tenant.drafted("2026-11")
    assert tenant.late_amounts(november, "2026-09") == [300]
    sent = {k: v for k, v in tenant.sent.items() if k[0] == "2026-09"}
    assert {k: v for k, v in tenant.billed().items() if k[0] == "2026-09"} == sent


def test_drafts_are_finalized_automatically_after_the_configured_delay(
    live: tuple[Runtime, ThreadedWriter],
) -> None:
    from infra.scheduler import finalize_due

    rt, _ = live

    org = OrganisationService(rt.ledger, now, uuid4).create(
        OrganisationSettings(name="Auto Ltd", billing_email="a@b.in"), actor=None).aggregate
    plans = PlansService(rt.ledger, now)
    plans.publish(code="auto", name="Auto", currency="INR", base_fee=Decimal(100), minimum=Decimal(0),
                  charges=[], known_meters=set(), actor=None)
    plans.subscribe(org.id, "auto", datetime(2026, 9, 1, tzinfo=UTC), actor=None)
    at = datetime(2026, 11, 3, tzinfo=UTC)
    invoicing = InvoicingService(rt.ledger, lambda: at)
    head = rt.ledger.head()
    for model in READ_MODELS:
        wait_sync(partial(reached, rt, model.name, head), f"{model.name} caught up")
    result = InvoiceRun(rt.pool, rt.ledger, invoicing, "29", lambda: at, timedelta(hours=24),
                        rt.settings.pg_schema).run("2026-10", actor=None)
    assert result.created == 1
    drafted = rt.ledger.head()
    wait_sync(lambda: tracked(rt, "invoices") >= drafted, "draft in the read model")
    assert finalize_due(rt, at + timedelta(hours=1)) == 0  # younger than 24 h: left as a draft
    assert finalize_due(rt, at + timedelta(hours=25)) == 1
    with rt.pool.connection() as conn:
        (row,) = invoices.page(conn, 10, None, organisation_id=org.id, period="2026-10")
    assert row.status in ("draft", "finalized")  # the read model may still be catching up
    assert invoicing.invoice(row.id).status == "finalized"

