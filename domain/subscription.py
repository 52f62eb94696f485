"""The Subscription aggregate (one per organisation) and which plan prices which period.

A subscription is an append-only schedule of (plan code, effective from) entries: `Started`
records the first one, `PlanChanged` every later one. A plan change takes effect from the
start of the next billing period (calendar month in the organisation's timezone), never in
the middle of one. `plan_for_period` is the pure rule that picks the plan code of a period and
pins the plan version in force when the period began. The rules are in docs/PLANS.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5
from zoneinfo import ZoneInfo

from eventsourcing.domain import Aggregate

from domain.errors import FieldError, ValidationFailed
from domain.plan import pinned_version

MONTHS_PER_YEAR = 12
# Billing periods since the Unix epoch, and far enough ahead that the month after a period and
# any timezone's view of its bounds stay inside the calendar.
PERIOD_YEAR_MIN = 1970
PERIOD_YEAR_MAX = 9998
_PERIOD = re.compile(r"^([0-9]{4})-([0-9]{2})$")  # ASCII digits only: \d takes any script's
_SUBSCRIPTION_NAMESPACE = UUID("3e8b1f6a-7c2d-4a59-8e0f-6b1d2c3a4f22")

# (version, published_at) of each version of one plan code
PublishedVersions = Sequence[tuple[int, datetime]]


def subscription_id(organisation_id: UUID) -> UUID:
    """One subscription per organisation: its ledger identity is derived from the organisation."""
    return uuid5(_SUBSCRIPTION_NAMESPACE, str(organisation_id))


# ---------------------------------------------------------------------------------------------
# Periods: calendar months in a timezone, as UTC instants


def parse_period(period: str) -> tuple[int, int]:
    """'YYYY-MM' -> (year, month); ValidationFailed (field `period`) for anything else."""
    match = _PERIOD.match(period)
    if not match or not 1 <= int(match.group(2)) <= MONTHS_PER_YEAR:
        raise ValidationFailed([FieldError("period", "must be a month written YYYY-MM, e.g. 2026-10")])
    if not PERIOD_YEAR_MIN <= int(match.group(1)) <= PERIOD_YEAR_MAX:
        raise ValidationFailed([FieldError(
            "period", f"must be a month of the years {PERIOD_YEAR_MIN} to {PERIOD_YEAR_MAX}")])
    return int(match.group(1)), int(match.group(2))


def _month_start(year: int, month: int, zone: ZoneInfo) -> datetime:
    return datetime(year, month, 1, tzinfo=zone).astimezone(UTC)


def _following(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == MONTHS_PER_YEAR else (year, month + 1)


def period_bounds(period: str, timezone: str) -> tuple[datetime, datetime]:
    """[start, end) of a period in `timezone`, as UTC instants."""
    year, month = parse_period(period)
    zone = ZoneInfo(timezone)
    return _month_start(year, month, zone), _month_start(*_following(year, month), zone)


# The time zone where a month ends first (UTC+14): until then it has ended for nobody.
EARLIEST_ZONE = "Pacific/Kiritimati"


def check_period_has_ended_somewhere(period: str, now: datetime) -> None:
    """ValidationFailed (field `period`) unless `period` has ended in at least one time zone:
    an invoice run for a month still under way anywhere-first is a mistake, not "not due"."""
    end = period_bounds(period, EARLIEST_ZONE)[1]
    if now < end:
        raise ValidationFailed([FieldError(
            "period", f"{period} has not ended yet (the earliest it ends anywhere is "
                      f"{end.isoformat()}); it can be invoiced after that")])


def period_of(instant: datetime, timezone: str) -> str:
    """The 'YYYY-MM' period that contains `instant` in `timezone`."""
    local = instant.astimezone(ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}"


def period_start(instant: datetime, timezone: str) -> datetime:
    """The start (UTC) of the period that contains `instant`."""
    return period_bounds(period_of(instant, timezone), timezone)[0]


def next_period_start(instant: datetime, timezone: str) -> datetime:
    """The start (UTC) of the period after the one that contains `instant`."""
    return period_bounds(period_of(instant, timezone), timezone)[1]


def period_start_at_or_after(instant: datetime, timezone: str) -> datetime:
    """`instant` itself if a period starts exactly then, else the next period's start."""
    start = period_start(instant, timezone)
    return start if start == instant else next_period_start(instant, timezone)


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


def shift_period(period: str, months: int) -> str:
    """The period `months` after `period` (before it, when negative)."""
    year, month = parse_period(period)
    index = year * 12 + (month - 1) + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def due_periods(now: datetime, grace: timedelta, count: int) -> list[str]:
    """The last `count` calendar months that ended at least `grace` ago (UTC calendar; the run
    checks each organisation's own timezone)."""
    periods: list[str] = []
    at = now - grace
    year, month = at.year, at.month
    for _ in range(count):
        month -= 1
        if month == 0:
            year, month = year - 1, 12
        periods.append(f"{year:04d}-{month:02d}")
    return periods
