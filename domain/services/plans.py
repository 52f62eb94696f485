"""Plans and subscriptions: publish plan versions, assign a plan to an organisation.

Two writers racing on the same plan code (or organisation) collide on the aggregate's next
version in the ledger; the loser decides again from the fresh state, a bounded number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from domain.audit import Actor
from domain.errors import FieldError, NotFound, ValidationFailed
from domain.instants import check_instant
from domain.invoice import FIRST_REVISION, VOID, Invoice, invoice_id
from domain.organisation import Organisation
from domain.plan import ChargeSpec, Plan, plan_id
from domain.ports import Clock, Ledger
from domain.services.base import Written, with_retries
from domain.services.invoicing import REVISIONS_MAX
from domain.subscription import (
    PublishedVersions,
    Subscription,
    periods_changed_by_start_move,
    subscription_id,
)


class PlansService:
    """Publishes plan versions and assigns plans to organisations."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self._ledger = ledger
        self._clock = clock

    def publish(
        self, *, code: str, name: str, currency: str, base_fee: Decimal, minimum: Decimal,
        charges: Sequence[ChargeSpec], known_meters: AbstractSet[str], actor: Actor | None,
    ) -> Written[Plan]:
        """Publish version 1 of a new plan, or the next version of an existing one.
        `known_meters` are the defined meter codes a charge may refer to."""

        def attempt() -> Written[Plan]:
            now = self._clock()
            try:
                plan = self._ledger.get(plan_id(code), Plan)
            except NotFound:
                plan = Plan.publish(code, name, currency, base_fee, minimum, charges, known_meters, now)
            else:
                plan.publish_version(name, currency, base_fee, minimum, charges, known_meters, now)
            return Written(plan, self._ledger.save(plan, actor=actor))

        return with_retries(attempt)

    def plan(self, code: str) -> Plan:
        """The plan with every version, from the ledger; NotFound for an unknown code."""
        try:
            return self._ledger.get(plan_id(code), Plan)
        except NotFound:
            raise NotFound("plan", code) from None

    def subscribe(
        self, organisation_id: UUID, plan_code: str, starts_at: datetime | None = None, *,
        actor: Actor | None,
    ) -> Written[Subscription]:
        """Start the organisation's subscription (from `starts_at`, default now), or change its
        plan from the next period, or (a `starts_at` earlier than its start) move its start
        earlier: allowed while the periods that re-prices have no invoice but void ones,
        otherwise ValidationFailed saying which. Position 0 when the schedule already says so."""

        check_instant(starts_at, "starts_at")

        def attempt() -> Written[Subscription]:
            now = self._clock()
            org = self._ledger.get(organisation_id, Organisation)  # NotFound: unknown organisation
            plan = self.plan(plan_code)
            if plan.latest.currency != org.currency:
                raise ValidationFailed([FieldError(
                    "plan_code", f"plan {plan_code!r} is priced in {plan.latest.currency}; the "
                                 f"organisation is billed in {org.currency}")])
            try:
                sub = self._ledger.get(subscription_id(organisation_id), Subscription)
            except NotFound:
                sub = Subscription.start(organisation_id, plan_code, starts_at or now, now)
                return Written(sub, self._ledger.save(sub, actor=actor))
            if starts_at is not None and sub.moves_start(starts_at):
                versions: dict[str, PublishedVersions] = {
                    code: [(v.version, v.published_at) for v in self.plan(code).versions]
                    for code in {entry.plan_code for entry in sub.history}}
                changed = periods_changed_by_start_move(sub.history, starts_at, org.timezone, versions)
                invoiced = {period: status for period in changed
                            if (status := self._invoice_status(organisation_id, period)) is not None}
                sub.move_start(plan_code, starts_at, now, invoiced)
                return Written(sub, self._ledger.save(sub, actor=actor))
            if not sub.change_plan(plan_code, org.timezone, now, starts_at):
                return Written(sub, 0)
            return Written(sub, self._ledger.save(sub, actor=actor))

        return with_retries(attempt)

    def moves_start(self, organisation_id: UUID, starts_at: datetime | None) -> bool:
        """True when `subscribe` with this `starts_at` would move an existing subscription's
        start earlier (the caller then holds the invoice run's lock: api/subscriptions.py)."""
        if starts_at is None or starts_at.tzinfo is None or starts_at.utcoffset() is None:
            return False
        try:
            sub = self._ledger.get(subscription_id(organisation_id), Subscription)
        except NotFound:
            return False
        return sub.moves_start(starts_at)

    def _invoice_status(self, organisation_id: UUID, period: str) -> str | None:
        """The status of the period's invoice that is not void (a replacement of a voided one
        included), or None when it has none."""
        for revision in range(FIRST_REVISION, REVISIONS_MAX + 1):
            try:
                invoice = self._ledger.get(invoice_id(organisation_id, period, revision), Invoice)
            except NotFound:
                return None
            if invoice.status != VOID:
                return str(invoice.status)
        return None
