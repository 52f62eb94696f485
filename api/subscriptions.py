"""Admin routes for an organisation's subscription: assign a plan (it starts now, or changes
from the next period, or an earlier `starts_at` moves its start back) and read the schedule
(/admin/v1/organisations/{org_id}/subscription)."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, put
from litestar.params import FromPath, JSONBody

from api.auth import Acting
from api.deps import Deps
from api.read_your_writes import LEDGER_POSITION_HEADER, wait_caught_up
from domain.errors import NotFound
from domain.subscription import Subscription, SubscriptionEntry, plan_at
from projections import plans as view


class PutSubscription(msgspec.Struct, forbid_unknown_fields=True):
    plan_code: str
    starts_at: datetime | None = None  # first subscription: default now; a change: next period


class ScheduleEntryOut(msgspec.Struct):
    plan_code: str
    effective_from: datetime


class SubscriptionOut(msgspec.Struct):
    organisation_id: UUID
    plan_code: str | None  # PUT: the plan asked for; GET: the plan in force now (null: not started)
    effective_from: datetime | None  # when that plan applies from
    history: list[ScheduleEntryOut]  # every step, in the order they were recorded


def _schedule(history: list[SubscriptionEntry]) -> list[ScheduleEntryOut]:
    return [ScheduleEntryOut(e.plan_code, e.effective_from) for e in history]


def subscription_answer(sub: Subscription, plan_code: str,
                        starts_at: datetime | None = None) -> SubscriptionOut:
    """The PUT answer: the schedule step that puts `plan_code` in force (the newest one), or
    the first step when the request moved the start to `starts_at`."""
    first = sub.history[0] if sub.history else None
    moved = first is not None and (first.plan_code, first.effective_from) == (plan_code, starts_at)
    step = first if moved else next((e for e in reversed(sub.history) if e.plan_code == plan_code), None)
    return SubscriptionOut(sub.organisation_id, plan_code, step.effective_from if step else None,
                           _schedule(sub.history))


class SubscriptionController(Controller):
    path = "/admin/v1"
    tags = ["subscriptions"]

    @put("/organisations/{org_id:uuid}/subscription",
         summary="Assign a plan: starts a subscription (201), changes plan from the next period (200),"
                 " or moves the start earlier (200; 422 when a period it re-prices has an invoice)")
    async def assign(self, org_id: FromPath[UUID], data: JSONBody[PutSubscription],
                     deps: Deps, actor: Acting) -> Response[SubscriptionOut]:
        assign = partial(deps.plans.subscribe, org_id, data.plan_code, data.starts_at, actor=actor)
        moves = await anyio.to_thread.run_sync(deps.plans.moves_start, org_id, data.starts_at)
        if moves:
            # It moves the start back, maybe into ended periods: never while a run drafts them.
            written = await anyio.to_thread.run_sync(deps.invoice_runner.move_start, assign)
        else:
            written = await anyio.to_thread.run_sync(assign)
        sub = written.aggregate
        started = written.position > 0 and sub.version == 1  # Started is its first event
        return Response(subscription_answer(sub, data.plan_code, data.starts_at),
                        status_code=201 if started else 200,
                        headers={LEDGER_POSITION_HEADER: str(written.position)})

    @get("/organisations/{org_id:uuid}/subscription",
         summary="Read an organisation's subscription: the plan in force now and every step")
    async def read(self, org_id: FromPath[UUID],
                   request: Request[Any, Any, Any], deps: Deps) -> SubscriptionOut:
        await wait_caught_up(deps, request, view.NAME)

        def fetch() -> list[view.SubscriptionRow]:
            with deps.read_pool.connection() as conn:
                return view.subscription_history(conn, org_id)

        history = view.history_entries(await anyio.to_thread.run_sync(fetch))
        if not history:
            raise NotFound("subscription of organisation", org_id)
        now = plan_at(history, deps.clock())
        return SubscriptionOut(org_id, now.plan_code if now else None,
                               now.effective_from if now else None, _schedule(history))
