"""The invoice run leaves alone every organisation that a dead letter can affect — in any read
model pricing depends on (usage totals, plans, catalogue, invoices, organisations), however
many dead letters there are — and reports each with the read model and ledger positions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest

from adapters.bookkeeping import DLQ_LIST_MAX_ROWS
from adapters.usage_writer import encode_usage
from domain.organisation import OrganisationSettings
from domain.plan import ChargeSpec
from domain.records import KeyRecord, RunResult
from domain.services.catalogue import CatalogueService
from domain.services.organisations import OrganisationService
from domain.services.plans import PlansService
from domain.usage import UsageFact
from infra.wiring import Runtime
from projections import invoices
from tests.conftest import ThreadedWriter
from tests.integration.invoice_run_steps import caught_up, live_runtime, now, run_invoices

SUBSCRIBED_FROM = datetime(2026, 8, 1, tzinfo=UTC)
OUTSIDE_LOOKBACK = datetime(2026, 5, 15, tzinfo=UTC)  # before 2026-08, 2026-09 and 2026-10
IN_PERIOD = datetime(2026, 10, 15, tzinfo=UTC)
MORE_THAN_A_PAGE = DLQ_LIST_MAX_ROWS + 1


@pytest.fixture
def live(runtime: Runtime) -> Iterator[tuple[Runtime, ThreadedWriter]]:
    with live_runtime(runtime) as both:
        yield both


def dead_letter(rt: Runtime, name: str, *positions: int) -> None:
    """Record positions as dead-lettered by read model `name`, as the projector does."""
    with rt.pool.connection() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO projection_dead_letters (name, position, topic, error, attempts)"
            " VALUES (%s, %s, 'test', 'test', 6)", [(name, p) for p in positions])


def blocked(result: RunResult) -> dict[UUID, dict[str, list[int]]]:
    """Blocked organisation -> read model -> positions (BlockedBy; a plain Blocked: usage)."""
    return {b.organisation_id: getattr(b, "read_models", {"usage_totals": b.missing_positions})
            for b in result.blocked}


def test_dead_letters_in_every_read_model_pricing_reads_block_the_organisations_they_affect(
    live: tuple[Runtime, ThreadedWriter],
) -> None:
    rt, writer = live
    catalogue = CatalogueService(rt.ledger, now, uuid4)
    meter, _ = catalogue.define_meter(code="calls", name="Calls", aggregation="count", field=None,
                                      group_by=[], allow_negative=False, has_usage=lambda _: False,
                                      actor=None)
    plans = PlansService(rt.ledger, now)
    calls = [ChargeSpec("calls", "per_unit", unit_price=Decimal(1))]
    plans.publish(code="basic", name="Basic", currency="INR", base_fee=Decimal(10), minimum=Decimal(0),
                  charges=calls, known_meters={"calls"}, actor=None)
    other = plans.publish(code="other", name="Other", currency="INR", base_fee=Decimal(10),
                          minimum=Decimal(0), charges=calls, known_meters={"calls"}, actor=None)
    orgs = OrganisationService(rt.ledger, now, uuid4)
    ids: dict[str, UUID] = {}
    subscribed: dict[str, int] = {}
    for name in ("subscription", "project", "invoice", "settings", "old usage", "usage",
                 "plan", "clean"):
        ids[name] = orgs.create(OrganisationSettings(name=name, billing_email="a@b.in"),
                                actor=None).aggregate.id
        subscribed[name] = plans.subscribe(ids[name], "other" if name == "plan" else "basic",
                                           SUBSCRIBED_FROM, actor=None).position
    caught_up(rt)
    assert run_invoices(rt, "2026-09", datetime(2026, 10, 5, tzinfo=UTC)).created == len(ids)
    with rt.pool.connection() as conn:
        (invoice,) = invoices.page(conn, 10, None, organisation_id=ids["invoice"], period="2026-09")

    project = catalogue.create_project(ids["project"], "web", actor=None).position
    settings = orgs.update_settings(ids["settings"], OrganisationSettings(name="settings renamed"),
                                    actor=None).position

    def usage(org: str, at: datetime, count: int) -> list[int]:
        key = KeyRecord(uuid4(), "p", "h", uuid4(), ids[org], "Asia/Kolkata", None, False)
        before = rt.ledger.head()
        rows = [encode_usage(key, UsageFact(uuid4().hex, "calls", Decimal(1), at, {}), now())
                for _ in range(count)]
        after = writer.submit(rows).result(10).position
        return [int(n.id) for n in rt.ledger.read_after(before, count, stop=after)]

    old = usage("old usage", OUTSIDE_LOOKBACK, MORE_THAN_A_PAGE)  # dead letters sorted first
    (recent,) = usage("usage", IN_PERIOD, 1)
    caught_up(rt)
    dead_letter(rt, "plans", subscribed["subscription"], other.position)
    dead_letter(rt, "catalogue", project)
    dead_letter(rt, "invoices", invoice.ledger_position)
    dead_letter(rt, "organisations", settings)
    dead_letter(rt, "usage_totals", *old, recent)
    with rt.pool.connection() as conn:  # as if that subscription had never reached the model
        conn.execute("DELETE FROM subscriptions WHERE organisation_id = %s", (ids["subscription"],))

    result = run_invoices(rt, "2026-10", datetime(2026, 11, 5, tzinfo=UTC))
    assert blocked(result) == {
        ids["subscription"]: {"plans": [subscribed["subscription"]]},
        ids["project"]: {"catalogue": [project]},
        ids["invoice"]: {"invoices": [invoice.ledger_position]},
        ids["settings"]: {"organisations": [settings]},
        ids["usage"]: {"usage_totals": [recent]},
        ids["plan"]: {"plans": [other.position]},  # a plan version: its subscribers
    }
    assert all(b.missing_positions == sorted(p for ps in blocked(result)[b.organisation_id].values()
                                             for p in ps) for b in result.blocked)
    assert result.created == 2  # "old usage" (outside the periods billed) and "clean"

    # A meter is platform-wide: its dead letter blocks every organisation not yet invoiced
    # ("subscription" is no longer in the plans model at all, and no dead letter names it).
    with rt.pool.connection() as conn:
        conn.execute("DELETE FROM projection_dead_letters")
    dead_letter(rt, "catalogue", meter.position)
    dead_letter(rt, "usage_totals", meter.position)
    result = run_invoices(rt, "2026-10", datetime(2026, 11, 5, tzinfo=UTC))
    everyone: dict[str, Any] = {"catalogue": [meter.position], "usage_totals": [meter.position]}
    assert blocked(result) == {ids[name]: everyone for name in (
        "project", "invoice", "settings", "usage", "plan")}
    assert result.existing == 2

    with rt.pool.connection() as conn:  # re-driven: everyone is invoiced
        conn.execute("DELETE FROM projection_dead_letters")
    result = run_invoices(rt, "2026-10", datetime(2026, 11, 5, tzinfo=UTC))
    assert (result.blocked, result.created) == ([], 5)
