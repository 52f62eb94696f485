"""Usage that arrives for an already-finalized period is billed on the next invoice as its own
"late usage for <period>" line — once, never silently dropped (BILLING.md, Periods)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from uuid import uuid4

import pytest

from adapters.invoice_run import InvoiceRun
from adapters.usage_writer import encode_usage
from domain.invoice import Invoice
from domain.invoicing import InvoicingService
from domain.plan import ChargeSpec
from domain.plans_service import PlansService
from domain.ports import KeyRecord
from domain.services import CatalogueService, OrganisationService
from domain.usage import UsageFact
from infra.wiring import READ_MODELS, Runtime
from projections import invoices
from tests.conftest import (
    ThreadedWriter,
    background_roles,
    reached,
    threaded_writer,
    tracked,
    wait_sync,
)

OCTOBER = datetime(2026, 10, 20, 12, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 10, 12, tzinfo=UTC)


@pytest.fixture
def live(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with threaded_writer(runtime) as writer, background_roles(runtime, {"relay", "project"}):
        yield runtime, writer


def test_late_usage_is_billed_on_the_next_invoice_once(live: tuple[Runtime, ThreadedWriter]) -> None:
    rt, writer = live
    def now() -> datetime:
        return datetime.now(UTC)

    CatalogueService(rt.ledger, now, uuid4, lambda: ("p", "s")).define_meter(
        "calls", "Calls", "count", None, [], False, lambda _: False)
    org = OrganisationService(rt.ledger, now, uuid4).create(
        {"name": "Late Ltd", "billing_email": "a@b.in", "state_code": "29"}).aggregate
    plans = PlansService(rt.ledger, now)
    plans.publish("late", "Late", "INR", Decimal(0), Decimal(0),
                  [ChargeSpec("calls", "per_unit", unit_price=Decimal(1))], {"calls"})
    plans.subscribe(org.id, "late", datetime(2026, 9, 1, tzinfo=UTC))
    key = KeyRecord(uuid4(), "p", "h", uuid4(), org.id, "Asia/Kolkata", None, False)

    def usage(*moments: datetime) -> None:
        rows = [encode_usage(key, UsageFact(uuid4().hex, "calls", Decimal(1), at, {}), now())
                for at in moments]
        position = writer.submit(rows).result(10).position
        for model in READ_MODELS:
            wait_sync(partial(reached, rt, model.name, position), f"{model.name} caught up")

    def run(period: str, at: datetime) -> Invoice:
        clock = lambda: at  # noqa: E731
        invoicing = InvoicingService(rt.ledger, clock)
        result = InvoiceRun(rt.pool, rt.ledger, invoicing, "29", clock, timedelta(hours=24),
                            rt.settings.pg_schema).run(period)
        assert (result.created, result.failed, result.blocked) == (1, 0, [])
        drafted = rt.ledger.head()
        wait_sync(lambda: tracked(rt, "invoices") >= drafted, "draft in the read model")
        with rt.pool.connection() as conn:
            (row,) = invoices.page(conn, 10, None, organisation_id=org.id, period=period)
        written = invoicing.finalize(row["id"])
        head = rt.ledger.head()
        wait_sync(lambda: tracked(rt, "invoices") >= head, "invoices caught up")
        return written.aggregate

    usage(OCTOBER, OCTOBER, OCTOBER)
    october = run("2026-10", datetime(2026, 11, 3, tzinfo=UTC))
    assert [(line.description, line.amount) for line in october.lines] == [("calls", 300)]

    usage(OCTOBER, OCTOBER, NOVEMBER)  # two late October events, one November event
    november = run("2026-11", datetime(2026, 12, 3, tzinfo=UTC))
    lines = {line.description: line.amount for line in november.lines}
    assert lines["calls"] == 100
    late = [(d, a) for d, a in lines.items() if d.startswith("late usage for 2026-10")]
    assert [a for _, a in late] == [200], lines

    usage(OCTOBER)  # one more, after November's invoice billed the first two late ones
    december = run("2026-12", datetime(2027, 1, 3, tzinfo=UTC))
    lines = {line.description: line.amount for line in december.lines}
    assert [a for d, a in lines.items() if d.startswith("late usage for 2026-10")] == [100], lines


def test_drafts_are_finalized_automatically_after_the_configured_delay(
    live: tuple[Runtime, ThreadedWriter],
) -> None:
    from infra.scheduler import finalize_due

    rt, _ = live
    def now() -> datetime:
        return datetime.now(UTC)

    org = OrganisationService(rt.ledger, now, uuid4).create(
        {"name": "Auto Ltd", "billing_email": "a@b.in"}).aggregate
    plans = PlansService(rt.ledger, now)
    plans.publish("auto", "Auto", "INR", Decimal(100), Decimal(0), [], set())
    plans.subscribe(org.id, "auto", datetime(2026, 9, 1, tzinfo=UTC))
    at = datetime(2026, 11, 3, tzinfo=UTC)
    invoicing = InvoicingService(rt.ledger, lambda: at)
    head = rt.ledger.head()
    for model in READ_MODELS:
        wait_sync(partial(reached, rt, model.name, head), f"{model.name} caught up")
    result = InvoiceRun(rt.pool, rt.ledger, invoicing, "29", lambda: at, timedelta(hours=24),
                        rt.settings.pg_schema).run("2026-10")
    assert result.created == 1
    drafted = rt.ledger.head()
    wait_sync(lambda: tracked(rt, "invoices") >= drafted, "draft in the read model")
    assert finalize_due(rt, at + timedelta(hours=1)) == 0  # younger than 24 h: left as a draft
    assert finalize_due(rt, at + timedelta(hours=25)) == 1
    with rt.pool.connection() as conn:
        (row,) = invoices.page(conn, 10, None, organisation_id=org.id, period="2026-10")
    assert row["status"] in ("draft", "finalized")  # the read model may still be catching up
    assert invoicing.invoice(row["id"]).status == "finalized"
