"""The Subscription aggregate (one per organisation) and which plan prices which period.

A subscription is an append-only schedule of (plan code, effective from) entries: `Started`
records the first one, `PlanChanged` every later one, and `StartMoved` corrects the first one's
start to an earlier instant (a back-dated correction; `periods_changed_by_start_move` names the
periods it re-prices, which must have no invoice but a void one). A plan change takes effect from the
start of the next billing period (calendar month in the organisation's timezone), never in
the middle of one. `plan_for_period` is the pure rule that picks the plan code of a period and
pins the plan version in force when the period began. The rules are in docs/PLANS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import FieldError, ValidationFailed
from domain.period import (
    next_period_start,
    period_bounds,
    period_of,
    period_start_at_or_after,
    shift_period,
)
from domain.plan import pinned_version

_SUBSCRIPTION_NAMESPACE = UUID("3e8b1f6a-7c2d-4a59-8e0f-6b1d2c3a4f22")

# (version, published_at) of each version of one plan code
PublishedVersions = Sequence[tuple[int, datetime]]


def subscription_id(organisation_id: UUID) -> UUID:
    """One subscription per organisation: its ledger identity is derived from the organisation."""
    return uuid5(_SUBSCRIPTION_NAMESPACE, str(organisation_id))


# ---------------------------------------------------------------------------------------------
# The schedule and the plan of a period


@dataclass(frozen=True, slots=True)
class SubscriptionEntry:
    """One recorded step of a subscription: `plan_code` applies from `effective_from`."""

    plan_code: str
    effective_from: datetime


@dataclass(frozen=True, slots=True)
class PeriodPlan:
    """The plan that prices one period: its code, the pinned version (None when the caller
    gave no published versions for that code) and the instant the pin was taken at."""

    plan_code: str
    version: int | None
    pinned_at: datetime


def plan_at(history: Sequence[SubscriptionEntry], instant: datetime) -> SubscriptionEntry | None:
    """The entry in force at `instant`: of the entries effective at or before it, the one
    recorded last (a later request overrides earlier ones from its effective date on)."""
    in_force: SubscriptionEntry | None = None
    for entry in history:  # recorded order
        if entry.effective_from <= instant:
            in_force = entry
    return in_force


def plan_for_period(
    history: Sequence[SubscriptionEntry],
    period: str,
    timezone: str,
    versions: Mapping[str, PublishedVersions] | None = None,
) -> PeriodPlan | None:
    """Which plan prices `period` ('YYYY-MM' in `timezone`), or None if no subscription covers it.

    `history` is the subscription's entries in recorded order. The plan in force at the
    period's start prices the whole period; if the subscription had not started by then, the
    plan in force when it starts within the period prices the whole period (no proration).
    The pinned version is the latest one published at or before that instant (the plan's
    first version if none was); `versions` maps plan codes to (version, published_at) pairs.
    """
    start, end = period_bounds(period, timezone)
    pinned_at = start
    entry = plan_at(history, start)
    if entry is None:
        starts = sorted(e.effective_from for e in history if start < e.effective_from < end)
        if not starts:
            return None
        pinned_at = starts[0]
        entry = plan_at(history, pinned_at)
        assert entry is not None
    published = (versions or {}).get(entry.plan_code) or ()
    version = pinned_version(published, pinned_at) if published else None
    return PeriodPlan(entry.plan_code, version, pinned_at)


def change_effective_from(
    requested_at: datetime, timezone: str, subscription_start: datetime, starts_at: datetime | None
) -> datetime:
    """When a plan change requested at `requested_at` takes effect: the start of the next
    period, or of a later period if `starts_at` asks for one (a `starts_at` inside a period
    means the period after it), and never before the subscription itself starts."""
    effective = next_period_start(requested_at, timezone)
    if starts_at is not None:
        effective = max(effective, period_start_at_or_after(starts_at, timezone))
    return max(effective, subscription_start)


# A start moved earlier re-prices at most this many periods (ten years of months).
START_MOVE_MAX_PERIODS = 120


def moved_history(history: Sequence[SubscriptionEntry], starts_at: datetime) -> list[SubscriptionEntry]:
    """The schedule with its first entry starting at `starts_at` instead."""
    first = history[0]
    return [SubscriptionEntry(first.plan_code, starts_at), *history[1:]]


def periods_changed_by_start_move(
    history: Sequence[SubscriptionEntry], starts_at: datetime, timezone: str,
    versions: Mapping[str, PublishedVersions] | None = None,
) -> list[str]:
    """The periods whose plan (code or pinned version) moving the start to `starts_at` changes,
    oldest first: those it uncovers, and the first period of the old start when its pin moves.
    ValidationFailed when that span is longer than START_MOVE_MAX_PERIODS."""
    first = period_of(starts_at, timezone)
    last = period_of(history[0].effective_from, timezone)
    span = [first]
    while span[-1] < last:
        if len(span) >= START_MOVE_MAX_PERIODS:
            raise ValidationFailed([FieldError(
                "starts_at", f"can move the start back by at most {START_MOVE_MAX_PERIODS} periods")])
        span.append(shift_period(span[-1], 1))
    moved = moved_history(history, starts_at)

    def priced_by(schedule: Sequence[SubscriptionEntry], period: str) -> tuple[str, int | None] | None:
        plan = plan_for_period(schedule, period, timezone, versions)
        return None if plan is None else (plan.plan_code, plan.version)

    return [p for p in span if priced_by(history, p) != priced_by(moved, p)]


def _require_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationFailed([FieldError(name, "must be a time with a UTC offset (RFC 3339)")])
    return value.astimezone(UTC)


class Subscription(Aggregate):
    """The plan schedule of one organisation, in recorded order."""

    class Started(Aggregate.Created):
        """The organisation's first plan, from `starts_at`."""

        organisation_id: UUID
        plan_code: str
        starts_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.history.append(SubscriptionEntry(self.plan_code, self.starts_at))

    class PlanChanged(Aggregate.Event):
        """A new plan from `starts_at` (a period start); overrides pending changes from then on.
        Carries the organisation too, so every fact names whom it bills."""

        organisation_id: UUID
        plan_code: str
        starts_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.history.append(SubscriptionEntry(self.plan_code, self.starts_at))

    class StartMoved(Aggregate.Event):
        """A correction: the first entry (plan `plan_code`) applies from `starts_at`, earlier
        than it did. Carries the organisation too, so every fact names whom it bills."""

        organisation_id: UUID
        plan_code: str
        starts_at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.history[:] = moved_history(aggregate.history, self.starts_at)

    def __init__(self, organisation_id: UUID) -> None:
        self.organisation_id = organisation_id
        self.history: list[SubscriptionEntry] = []

    @property
    def starts_at(self) -> datetime:
        return self.history[0].effective_from

    @classmethod
    def start(cls, organisation_id: UUID, plan_code: str, starts_at: datetime, at: datetime) -> Subscription:
        """Decide: the organisation's first plan applies from `starts_at` (may be back-dated)."""
        start = _require_aware(starts_at, "starts_at")
        return cls._create(cls.Started, id=subscription_id(organisation_id), timestamp=at,
                           organisation_id=organisation_id, plan_code=plan_code, starts_at=start)

    def change_plan(self, plan_code: str, timezone: str, at: datetime,
                    starts_at: datetime | None = None) -> bool:
        """Decide: switch to `plan_code` from the next period (or the one `starts_at` asks for).
        Returns False, recording nothing, when the schedule already has that plan from then on."""
        requested = None if starts_at is None else _require_aware(starts_at, "starts_at")
        effective = change_effective_from(at, timezone, self.starts_at, requested)
        points = [effective, *(e.effective_from for e in self.history if e.effective_from > effective)]
        if all((p := plan_at(self.history, t)) is not None and p.plan_code == plan_code for t in points):
            return False
        self.trigger_event(self.PlanChanged, timestamp=at, organisation_id=self.organisation_id,
                           plan_code=plan_code, starts_at=effective)
        return True

    def moves_start(self, starts_at: datetime | None) -> bool:
        """True when `starts_at` asks for the subscription to start earlier than it does."""
        return starts_at is not None and _require_aware(starts_at, "starts_at") < self.starts_at

    def move_start(self, plan_code: str, starts_at: datetime, at: datetime,
                   invoiced: Mapping[str, str]) -> None:
        """Decide: start earlier, at `starts_at`. `invoiced` maps each period the move changes
        (periods_changed_by_start_move) that has an invoice other than a void one to that
        invoice's status; any such period refuses the move, as does another plan than the
        first one (a correction of the start, not a plan change)."""
        start = _require_aware(starts_at, "starts_at")
        first = self.history[0]
        problems = []
        if plan_code != first.plan_code:
            problems.append(FieldError(
                "plan_code", f"moving the start earlier keeps the first plan {first.plan_code!r}: "
                             f"send plan_code {first.plan_code!r} (then change the plan, if need be)"))
        if invoiced:
            listed = ", ".join(f"{p} ({status})" for p, status in sorted(invoiced.items()))
            problems.append(FieldError(
                "starts_at", f"cannot start earlier: the periods this re-prices already have "
                             f"invoices: {listed}; void them first, then redraft"))
        if problems:
            raise ValidationFailed(problems)
        self.trigger_event(self.StartMoved, timestamp=at, organisation_id=self.organisation_id,
                           plan_code=plan_code, starts_at=start)

    def plan_code_at(self, instant: datetime) -> str | None:
        entry = plan_at(self.history, instant)
        return None if entry is None else entry.plan_code

    def plan_for_period(
        self, period: str, timezone: str, versions: Mapping[str, PublishedVersions] | None = None
    ) -> PeriodPlan | None:
        return plan_for_period(self.history, period, timezone, versions)
