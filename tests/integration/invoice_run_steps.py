"""Shared steps for the invoice-run tests: a runtime with the relay and projectors running and
a usage writer, waiting for every read model, and one invoice run at a chosen instant."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from uuid import UUID, uuid4

from adapters.invoice_run import InvoiceRun
from adapters.maintenance import rebuild
from domain.meter import Meter
from domain.organisation import Organisation, OrganisationSettings
from domain.period import period_bounds
from domain.plan import ChargeSpec, Plan
from domain.records import RunResult
from domain.services.invoicing import InvoicingService
from domain.subscription import Subscription
from infra.wiring import READ_MODELS, Runtime
from tests.conftest import ThreadedWriter, background_roles, reached, threaded_writer, wait_sync

GRACE = timedelta(hours=24)
SUPPLIER_STATE_CODE = "29"


@contextlib.contextmanager
def live_runtime(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with threaded_writer(runtime) as writer, background_roles(runtime, {"relay", "project"}):
        yield runtime, writer


def now() -> datetime:
    return datetime.now(UTC)


def caught_up(rt: Runtime, position: int | None = None) -> None:
    """Wait until every read model has applied the ledger up to `position` (default: head)."""
    target = rt.ledger.head() if position is None else position
    for model in READ_MODELS:
        wait_sync(partial(reached, rt, model.name, target), f"{model.name} caught up")


def run_invoices(rt: Runtime, period: str, at: datetime) -> RunResult:
    """One invoice run of `period` with the clock at `at`; returns once its drafts are projected."""
    clock = lambda: at  # noqa: E731
    result = InvoiceRun(rt.pool, rt.ledger, InvoicingService(rt.ledger, clock), SUPPLIER_STATE_CODE,
                        clock, GRACE, rt.settings.pg_schema).run(period, actor=None)
    caught_up(rt)
    return result


def subscribed(rt: Runtime, period: str, count: int, plan_code: str) -> list[UUID]:
    """`count` organisations subscribed since before `period` to a plan `plan_code` (a base fee
    and API calls at 0.5), saved in one append, with the read models rebuilt up to it (no
    projectors needed): an invoice run of `period` drafts one invoice for each."""
    at = now()
    meter = Meter.define("calls", "API calls", "count", None, [], False, at)
    plan = Plan.publish(plan_code, plan_code.title(), "INR", Decimal(500), Decimal(0),
                        [ChargeSpec("calls", "per_unit", unit_price=Decimal("0.5"))], {"calls"}, at)
    starts = period_bounds(period, "Asia/Kolkata")[0] - timedelta(days=40)
    aggregates: list[object] = [meter, plan]
    ids = []
    for i in range(count):
        org = Organisation.create(uuid4(), OrganisationSettings(
            name=f"org {i}", billing_email=f"o{i}@example.in", state_code="29"), at)
        aggregates += [org, Subscription.start(org.id, plan_code, starts, at)]
        ids.append(org.id)
    rt.ledger.save(*aggregates, actor=None)  # type: ignore[arg-type]
    rebuild_read_models(rt)
    return ids


def rebuild_read_models(rt: Runtime) -> None:
    """Every read model up to the ledger's head, without projectors (a run waits for them)."""
    for model in READ_MODELS:
        rebuild(rt.pool, rt.ledger, model)


def entries_of(rt: Runtime, topic: str) -> int:
    """How many ledger entries have a topic ending in `topic` ("Invoice.Drafted")."""
    with rt.pool.connection() as conn:
        row = conn.execute(f"SELECT count(*) FROM {rt.ledger.table} WHERE topic LIKE %s",
                           (f"%{topic}",)).fetchone()
    assert row is not None
    return int(row[0])
