"""The Subscription aggregate (one per organisation) and which plan prices which period.

A subscription is an append-only schedule of (plan code, effective from) entries: `Started`
records the first one, `PlanChanged` every later one. A plan change takes effect from the
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
from domain.period import next_period_start, period_bounds, period_start_at_or_after
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

    def plan_code_at(self, instant: datetime) -> str | None:
        entry = plan_at(self.history, instant)
        return None if entry is None else entry.plan_code

    def plan_for_period(
        self, period: str, timezone: str, versions: Mapping[str, PublishedVersions] | None = None
    ) -> PeriodPlan | None:
        return plan_for_period(self.history, period, timezone, versions)
