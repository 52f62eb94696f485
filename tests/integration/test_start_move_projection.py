"""A moved start (Subscription.StartMoved) in the plans read model: the first step's
effective_from is rewritten, later steps stay, and a replay from the ledger gives the same."""

from __future__ import annotations

from decimal import Decimal

from domain.services.plans import PlansService
from domain.subscription import Subscription
from infra.wiring import Runtime
from projections import plans
from tests.integration.test_plans_projection import METERS, PER_UNIT, ist, new_org, read, replay
from tests.unit.memory import Clock


def test_a_moved_start_rewrites_the_first_step_and_replays_the_same(runtime: Runtime) -> None:
    clock = Clock(ist(2026, 10, 20, 11, 0))
    svc = PlansService(runtime.ledger, clock)
    for code in ("basic", "pro"):
        svc.publish(code=code, name=code, currency="INR", base_fee=Decimal(1), minimum=Decimal(0),
                    charges=(PER_UNIT,), known_meters=METERS, actor=None)
    org = new_org(runtime)
    svc.subscribe(org, "basic", actor=None)  # starts now, 20 October
    svc.subscribe(org, "pro", actor=None)  # from 1 November
    replay(runtime)
    moved = svc.subscribe(org, "basic", starts_at=ist(2026, 9, 1), actor=None)
    expected = [("basic", ist(2026, 9, 1)), ("pro", ist(2026, 11, 1))]
    assert [(e.plan_code, e.effective_from) for e in moved.aggregate.history] == expected
    # Applied incrementally (the projector's handler on the rows of before) and replayed.
    with runtime.pool.connection() as conn, conn.cursor() as cur:
        events = runtime.ledger.read_after(moved.position - 1, 1, stop=moved.position)
        event = runtime.ledger.decode(next(iter(events)))
        assert isinstance(event, Subscription.StartMoved)
        plans.READ_MODEL.handlers[Subscription.StartMoved](cur, event, moved.position)
    rows = read(runtime, plans.subscription_history, org)
    assert [(r.plan_code, r.effective_from) for r in rows] == expected
    replay(runtime)
    rows = read(runtime, plans.subscription_history, org)
    assert [(r.plan_code, r.effective_from) for r in rows] == expected
