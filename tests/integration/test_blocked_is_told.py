"""An organisation the invoice run cannot invoice is never a silent gap (issue 20, item 3): the
run records it, /metrics counts it by period, `billing status` names it, and an error log line
names it. A later run that invoices it clears it. One organisation whose draft fails, with any
kind of error, is that organisation's failure alone (item 7)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from adapters import bookkeeping
from domain.organisation import OrganisationSettings
from domain.plan import ChargeSpec
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from infra.cli import _status as status
from infra.wiring import Runtime
from tests.conftest import ThreadedWriter
from tests.integration.invoice_run_steps import caught_up, live_runtime, now, run_invoices

SUBSCRIBED_FROM = datetime(2026, 8, 1, tzinfo=UTC)
RUN_AT = datetime(2026, 11, 5, tzinfo=UTC)
PERIOD = "2026-10"


@pytest.fixture
def live(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with live_runtime(runtime) as both:
        yield both


def _subscribed(rt: Runtime, *names: str) -> tuple[OrganisationService, list[UUID]]:
    """Organisations subscribed to a per-unit plan since SUBSCRIBED_FROM."""
    plans = PlansService(rt.ledger, now)
    calls = [ChargeSpec("calls", "per_unit", unit_price=Decimal(1))]
    plans.publish(code="basic", name="Basic", currency="INR", base_fee=Decimal(10), minimum=Decimal(0),
                  charges=calls, known_meters={"calls"}, actor=None)
    orgs = OrganisationService(rt.ledger, now, uuid4)
    ids = [orgs.create(OrganisationSettings(name=name, billing_email="a@b.in"), actor=None).aggregate.id
           for name in names]
    for ident in ids:
        plans.subscribe(ident, "basic", SUBSCRIBED_FROM, actor=None)
    return orgs, ids


def test_a_blocked_organisation_is_recorded_counted_and_logged_until_invoiced(
    live: tuple[Runtime, ThreadedWriter], caplog: pytest.LogCaptureFixture
) -> None:
    rt, _ = live
    orgs, (stuck,) = _subscribed(rt, "Stuck Ltd")
    renamed = orgs.update_settings(stuck, OrganisationSettings(name="Stuck Ltd"), actor=None).position
    caught_up(rt)
    with rt.pool.connection() as conn:
        conn.execute("INSERT INTO projection_dead_letters (name, position, topic, error, attempts)"
                     " VALUES ('organisations', %s, 'test', 'test', 6)", (renamed,))

    caplog.set_level(logging.ERROR, logger="billing.invoice_run")
    result = run_invoices(rt, PERIOD, RUN_AT)
    assert [b.organisation_id for b in result.blocked] == [stuck]
    assert any("Stuck Ltd" in r.getMessage() and str(stuck) in r.getMessage() for r in caplog.records)
    with rt.pool.connection() as conn:
        recorded = bookkeeping.blocked_organisations(conn)
    assert [(b["period"], b["organisation_id"], b["name"]) for b in recorded] == [
        (PERIOD, stuck, "Stuck Ltd")]
    assert recorded[0]["read_models"] == {"organisations": [renamed]}
    assert rt.ops_snapshot().blocked == {PERIOD: 1}
    told = io.StringIO()
    assert status(rt, told) == 1  # `billing status`
    assert f"not invoiced for {PERIOD}: Stuck Ltd ({stuck})" in told.getvalue()

    with rt.pool.connection() as conn:  # re-driven
        conn.execute("DELETE FROM projection_dead_letters")
    assert run_invoices(rt, PERIOD, RUN_AT).created == 1
    with rt.pool.connection() as conn:
        assert bookkeeping.blocked_organisations(conn) == []
    assert rt.ops_snapshot().blocked == {}
    assert status(rt, io.StringIO()) == 0


def test_an_unexpected_error_for_one_organisation_fails_only_that_organisation(
    live: tuple[Runtime, ThreadedWriter], caplog: pytest.LogCaptureFixture
) -> None:
    rt, _ = live
    _, ids = _subscribed(rt, "org 0", "org 1", "org 2")
    caught_up(rt)
    with rt.pool.connection() as conn:  # a date Python cannot hold: psycopg raises DataError
        conn.execute("UPDATE subscriptions SET effective_from = 'infinity' WHERE organisation_id = %s",
                     (ids[1],))
    caplog.set_level(logging.ERROR, logger="billing.invoice_run")
    result = run_invoices(rt, PERIOD, RUN_AT)
    assert (result.created, result.failed) == (2, 1)
    assert result.failed_organisations == [ids[1]]
    # Named with its reason, by the error's type only: its message may hold internals.
    assert [(e.organisation_id, e.name, e.outcome, e.reason) for e in result.entries] == [
        (ids[1], "org 1", "failed", "failed: DataError (the log has the details)")]
    assert any(str(ids[1]) in r.getMessage() for r in caplog.records)
