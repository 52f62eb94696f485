"""The invoice run's decisions, as pure functions over what the run has read (docs/INVOICES.md).
adapters/invoice_run.py reads Postgres and the ledger, holds the lock, and calls these.

- Due: an organisation is invoiced once its period (in its timezone) has ended plus the grace
  period; before that it is "not_due", left for a later run.
- Dead letters: a dead-lettered ledger entry blocks the organisations it can affect (its scope):
  a usage event of a period the run bills, the organisation an entry names, the subscribers of
  a plan code, or everyone (a meter; an entry that cannot be read or attributed).
- Late usage: the run's period P bills late usage of the LATE_LOOKBACK_PERIODS before it, from
  the invoices of P-2 .. P+1 (runs can happen out of order) and the earlier periods' totals.
- The draft retry: when pricing refuses some late items (and nothing else), the draft is made
  again without them alone.
- Counting: each organisation's outcome, tallied into one RunResult; those not invoiced are
  named with why (the reason functions below), up to RUN_ENTRIES_MAX.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

from eventsourcing.domain import Aggregate

from domain.errors import DomainError, ValidationFailed
from domain.invoice import Invoice
from domain.mail_record import InvoiceMail
from domain.meter import Meter
from domain.organisation import Organisation
from domain.period import period_bounds, period_of, shift_period
from domain.plan import Plan
from domain.pricing import LateUsage
from domain.records import RUN_ENTRIES_MAX, Blocked, RunEntry, RunResult
from domain.usage import Usage

# Usage is accepted up to 35 days late, so a run can meet new usage of the two periods before
# its own (never older): those, if already invoiced, get "late usage" lines on this invoice.
LATE_LOOKBACK_PERIODS = 2
_LATE_ITEM = re.compile(r"^late\[(\d+)\]")  # the field of a refused late item: late[<index>]...

Outcome = Literal["created", "existing", "skipped", "not_due", "failed", "blocked"]


# ---- due ---------------------------------------------------------------------------------------


def is_due(period: str, timezone: str, now: datetime, grace: timedelta) -> bool:
    """True once `period` has ended in `timezone` and the grace period has passed too."""
    return now >= period_bounds(period, timezone)[1] + grace


def not_due_reason(period: str, timezone: str, grace: timedelta) -> str:
    """Why an organisation is not due yet, and when it will be."""
    # Shown in the organisation's timezone: that is the clock its period ends by.
    end = period_bounds(period, timezone)[1].astimezone(ZoneInfo(timezone))
    return (f"not due yet: {period} ends at {end.isoformat()} ({timezone}); with the grace "
            f"period it is due from {(end + grace).isoformat()}")


# ---- late usage ----------------------------------------------------------------------------------


def lookback_periods(period: str) -> list[str]:
    """The earlier periods whose late usage an invoice of `period` bills, oldest first."""
    return [shift_period(period, -back) for back in range(LATE_LOOKBACK_PERIODS, 0, -1)]


def usage_periods(period: str) -> list[str]:
    """The periods whose usage the run bills: the lookback and `period` itself."""
    return [*lookback_periods(period), period]


def billing_periods(period: str) -> list[str]:
    """The periods whose invoices can bill late usage of the lookback: late items of a period go
    on invoices of the LATE_LOOKBACK_PERIODS after it, and runs can happen out of order."""
    return [shift_period(period, k) for k in range(-LATE_LOOKBACK_PERIODS, LATE_LOOKBACK_PERIODS)]


def lookback_totals(
    organisation_id: UUID, earlier_totals: Mapping[str, Mapping[UUID, Mapping[str, Decimal]]]
) -> dict[str, Mapping[str, Decimal]]:
    """One organisation's usage totals now (period -> metric -> quantity) of the lookback
    periods, from every organisation's (period -> organisation -> metric -> quantity)."""
    return {q: totals.get(organisation_id, {}) for q, totals in earlier_totals.items()}


def late_items_to_keep(late: Sequence[LateUsage], refusal: ValidationFailed) -> list[LateUsage] | None:
    """The late items to draft again with, after pricing refused the draft: all but the refused
    ones when only late items were refused (e.g. another currency), else None (the refusal is
    the draft's own). What was left out stays unbilled (the chain did not move), so a later
    run sees it again."""
    refused = {int(m.group(1)) for err in refusal.errors if (m := _LATE_ITEM.match(err.field))}
    if not refused or any(not _LATE_ITEM.match(err.field) for err in refusal.errors):
        return None
    return [item for index, item in enumerate(late) if index not in refused]


# ---- dead letters ------------------------------------------------------------------------------


class Everyone:
    """Scope of an entry that can affect every organisation (a meter, an unreadable entry)."""

    def __repr__(self) -> str:
        return "EVERYONE"


EVERYONE = Everyone()
# Whom a dead-lettered entry can affect: an organisation id, a plan code (its subscribers),
# EVERYONE, or None (a usage event outside the periods the run bills).
Scope = UUID | str | Everyone | None


@dataclass(frozen=True)
class OwnerOf:
    """The entry names no organisation: its scope is its aggregate's (`aggregate_id`, read as
    `kind`), to be read from the ledger; EVERYONE when that cannot be read."""

    aggregate_id: UUID
    kind: type[Aggregate]


def scope_of(event: object, usage_periods: Sequence[str]) -> Scope | OwnerOf:
    """Whom a dead-lettered ledger entry can affect, or the aggregate to read to know."""
    if isinstance(event, Usage.Recorded):
        inside = period_of(event.occurred_at, event.timezone) in usage_periods
        return event.organisation_id if inside else None
    organisation_id = getattr(event, "organisation_id", None)
    if isinstance(organisation_id, UUID):
        return organisation_id
    if isinstance(event, (Plan.Published, Plan.VersionPublished)):
        return str(event.code)
    if isinstance(event, (Meter.Defined, Meter.Redefined)):
        return EVERYONE
    if isinstance(event, InvoiceMail.Sent):
        return OwnerOf(event.invoice_id, Invoice)
    originator_id = getattr(event, "originator_id", None)
    return OwnerOf(originator_id, Aggregate) if isinstance(originator_id, UUID) else EVERYONE


def scope_of_owner(aggregate: object | None) -> Scope:
    """The scope of an entry whose aggregate is `aggregate` (None: it could not be read)."""
    if aggregate is None:
        return EVERYONE
    if isinstance(aggregate, Organisation):
        return aggregate.id
    organisation_id = getattr(aggregate, "organisation_id", None)
    return organisation_id if isinstance(organisation_id, UUID) else EVERYONE


@dataclass(frozen=True)
class DeadLettered:
    """What dead letters block, by scope: read model -> positions, for one organisation, for
    the subscribers of one plan code, or for every organisation."""

    by_organisation: dict[UUID, dict[str, list[int]]] = field(default_factory=dict)
    by_plan_code: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    everyone: dict[str, list[int]] = field(default_factory=dict)

    def for_organisation(self, org_id: UUID, plan_codes: Iterable[str]) -> dict[str, list[int]]:
        """Read model -> sorted positions that block `org_id` (empty: nothing does)."""
        if not (self.everyone or self.by_organisation or self.by_plan_code):
            return {}  # no dead letters (every organisation of a healthy run asks)
        out: dict[str, set[int]] = {}
        scopes = [self.everyone, self.by_organisation.get(org_id, {}),
                  *(self.by_plan_code.get(code, {}) for code in set(plan_codes))]
        for scope in scopes:
            for name, positions in scope.items():
                out.setdefault(name, set()).update(positions)
        return {name: sorted(positions) for name, positions in sorted(out.items())}


def dead_lettered(entries: Iterable[tuple[str, int, Scope]]) -> DeadLettered:
    """Gather dead letters (read model, ledger position, scope) by scope; a None scope blocks
    nobody."""
    out = DeadLettered()
    for name, position, scope in entries:
        if scope is None:
            continue
        if isinstance(scope, UUID):
            target = out.by_organisation.setdefault(scope, {})
        elif isinstance(scope, str):
            target = out.by_plan_code.setdefault(scope, {})
        else:
            target = out.everyone
        target.setdefault(name, []).append(position)
    return out


def organisations_to_run(
    subscribed: Iterable[UUID], dead: DeadLettered, subscriptions_model: str
) -> list[UUID]:
    """The organisations the run goes through, sorted: the subscribed ones, and those whose
    subscription itself is dead-lettered in `subscriptions_model` (missing from it): they are
    still reported (blocked), never silently left out."""
    missing = {org_id for org_id, models in dead.by_organisation.items() if subscriptions_model in models}
    return sorted(set(subscribed) | missing)


def blocked(
    organisation_id: UUID, name: str, dead: DeadLettered, plan_codes: Iterable[str]
) -> Blocked | None:
    """The organisation as blocked by dead letters (its subscription's plan codes matter), or
    None when none can affect it."""
    missing = dead.for_organisation(organisation_id, plan_codes)
    if not missing:
        return None
    positions = sorted({p for ps in missing.values() for p in ps})
    return Blocked(organisation_id, name, positions, missing)


def blocked_reason(stuck: Blocked) -> str:
    """Why a blocked organisation was left alone: which read models, which positions."""
    models = "; ".join(f"{name} at {', '.join(map(str, positions))}"
                       for name, positions in stuck.read_models.items())
    return f"blocked by dead-lettered ledger entries: {models}; run `billing dlq redrive`"


def failed_reason(error: BaseException) -> str:
    """Why drafting failed: a domain error's own message; any other error by its type alone
    (its message may carry internals; the log has the traceback)."""
    if isinstance(error, DomainError):
        return f"failed: {error}"
    return f"failed: {type(error).__name__} (the log has the details)"


# ---- counting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """What the run did with one organisation: its outcome, why it was blocked, and why it was
    not invoiced (for every outcome but created and existing)."""

    organisation_id: UUID
    outcome: Outcome
    blocked: Blocked | None = None
    name: str = ""
    reason: str = ""


_INVOICED: frozenset[Outcome] = frozenset({"created", "existing"})


class Tally:
    """The run's result, counted as organisations are done: counts by outcome, the blocked and
    the failed ones named, those not invoiced listed with why, the first `entries_max` of them
    (the rest counted in `more`). Holds no more than that, however many organisations a run
    goes through."""

    def __init__(self, entries_max: int = RUN_ENTRIES_MAX) -> None:
        self.counts: dict[Outcome, int] = {}
        self.blocked: list[Blocked] = []
        self.failed: list[UUID] = []
        self.entries: list[RunEntry] = []
        self.more = 0
        self._entries_max = entries_max

    @property
    def done(self) -> int:
        """Organisations counted so far."""
        return sum(self.counts.values())

    def add(self, one: Done) -> None:
        self.counts[one.outcome] = self.counts.get(one.outcome, 0) + 1
        if one.outcome not in _INVOICED:
            if len(self.entries) < self._entries_max:
                self.entries.append(RunEntry(one.organisation_id, one.name, one.outcome,
                                             one.reason))
            else:
                self.more += 1
        if one.blocked is not None:
            self.blocked.append(one.blocked)
        if one.outcome == "failed":
            self.failed.append(one.organisation_id)

    def result(self, period: str, run_id: UUID | None = None) -> RunResult:
        counts = self.counts
        return RunResult(
            period, created=counts.get("created", 0), existing=counts.get("existing", 0),
            skipped=counts.get("skipped", 0), not_due=counts.get("not_due", 0),
            failed=counts.get("failed", 0), blocked=list(self.blocked),
            failed_organisations=list(self.failed), entries=list(self.entries),
            more=self.more, run_id=run_id)


def tally(period: str, done: Iterable[Done], entries_max: int = RUN_ENTRIES_MAX) -> RunResult:
    """The run's result: organisations counted by outcome; the blocked and the failed ones
    named, in the order they were met; those not invoiced listed with why, the first
    `entries_max` of them (the rest counted in `more`)."""
    counted = Tally(entries_max)
    for one in done:
        counted.add(one)
    return counted.result(period)
